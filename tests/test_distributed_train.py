"""Distributed training: the launcher, DDP in the training loop, sharded samplers, the noniid
scenario, sync options, failure within the timeout, exact resume (gloo, CPU, 2-3 processes).

Oracles: the single-process step on the concatenated batch with torch's BatchNorm (float64,
1e-9), the single-process run of the same loop at W times the batch, set identities on the
samplers' indices, an uninterrupted run for resume, a NumPy formula for the rank spread.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from normlab.cli import main
from normlab.data import Dataset, get_scenario
from normlab.data.samplers import NonIIDSampler, ShardedSampler, make_sampler, noniid_labels
from normlab.distributed import DistributedError, launch
from normlab.methods import resolve_method
from normlab.nn import SyncBatchNorm
from normlab.train import TrainConfig, _forward_synced, train

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

F64 = torch.float64
TOL = {"atol": 1e-9, "rtol": 1e-9}


# ---- sharded samplers ------------------------------------------------------------------------


def _labels(n: int = 301, classes: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    probs = torch.tensor([0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.05])[:classes]
    return torch.multinomial(probs, n, replacement=True, generator=g)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize(
    ("kind", "batch_size", "k"),
    [
        ("shuffled", 16, None),
        ("unshuffled", 16, None),
        ("k-labels", 16, 2),
        ("online", 1, None),
        ("shuffled", 2, None),
    ],
)
def test_sharded_samplers_cover_each_epoch_exactly_once(kind, batch_size, k, world):
    y = _labels()
    single = make_sampler(kind, y, batch_size=batch_size, seed=5, k=k)
    ranks = [
        make_sampler(kind, y, batch_size=batch_size, seed=5, k=k, rank=r, world_size=world)
        for r in range(world)
    ]
    assert all(isinstance(s, ShardedSampler) for s in ranks)
    for epoch in range(3):
        batches = [s.batches(epoch) for s in ranks]
        assert len({len(b) for b in batches}) == 1, "every rank runs the same number of steps"
        flat = torch.cat([torch.cat(b) for b in batches])
        assert torch.equal(flat.sort().values, torch.arange(len(y))), "each sample once"
        assert min(len(x) for b in batches for x in b) >= 1
        if batch_size >= 4:  # halves keep two samples; pieces come from one plan batch
            assert min(len(x) for b in batches for x in b) >= 2
            owner = {int(i): j for j, b in enumerate(single.batches(epoch)) for i in b}
            for b in batches:
                for x in b:
                    assert len({owner[int(i)] for i in x}) == 1
        if kind == "unshuffled":
            assert all(len(torch.unique(y[x])) == 1 for b in batches for x in b)
        if kind == "k-labels":
            assert all(len(torch.unique(y[x])) <= k for b in batches for x in b)
        if kind == "shuffled" and batch_size >= 4:
            # a step's batches are consecutive slices of the epoch's permutation: the batch of
            # one process at world times the batch size (the steps before any halved batch)
            wide = make_sampler(kind, y, batch_size=batch_size * world, seed=5).batches(epoch)
            full = [all(len(b[t]) == batch_size for b in batches) for t in range(len(batches[0]))]
            steps = full.index(False) if False in full else len(full)
            assert steps >= len(y) // (batch_size * world) - 1
            for t in range(steps):
                step = torch.cat([batches[r][t] for r in range(world)])
                assert torch.equal(step, wide[t])


def test_sharded_and_noniid_samplers_resume_mid_epoch_and_check_their_state():
    y = _labels()
    for make in (
        lambda: make_sampler("shuffled", y, batch_size=8, seed=1, rank=1, world_size=3),
        lambda: make_sampler("noniid", y, batch_size=8, seed=1, rank=1, world_size=3),
    ):
        a = make()
        a.set_epoch(2)
        it = iter(a)
        seen = [next(it) for _ in range(4)]
        b = make()
        b.load_state_dict(a.state_dict())
        rest = list(b)
        assert torch.equal(torch.cat(seen + rest), torch.cat(a.batches(2)))
        other = make_sampler("shuffled", y, batch_size=8, seed=1, rank=0, world_size=3)
        if a.kind == other.kind:
            with pytest.raises(ValueError, match="rank"):
                other.load_state_dict(a.state_dict())


@pytest.mark.parametrize(("world", "k"), [(1, None), (1, 3), (2, None), (3, None), (3, 2)])
def test_noniid_gives_each_rank_disjoint_labels_and_covers_them_once(world, k):
    y = _labels()
    classes = torch.unique(y).tolist()
    samplers = [NonIIDSampler(y, 16, k, rank=r, world_size=world, seed=2) for r in range(world)]
    held = [set(s.held_labels.tolist()) for s in samplers]
    for r, h in enumerate(held):
        assert len(h) == (k if k is not None else len(np.array_split(classes, world)[r]))
        assert all(not (h & other) for other in held[r + 1 :])
    if k is None:
        assert set().union(*held) == set(classes)
    for epoch in range(2):
        batches = [s.batches(epoch) for s in samplers]
        assert len({len(b) for b in batches}) == 1
        for h, b in zip(held, batches, strict=True):
            assert all(set(y[x].tolist()) <= h for x in b)
            assert max(len(x) for x in b) <= 16 and min(len(x) for x in b) >= 1
        flat = torch.cat([torch.cat(b) for b in batches]).sort().values
        expected = torch.nonzero(torch.isin(y, torch.tensor(sorted(set().union(*held))))).flatten()
        assert torch.equal(flat, expected)
    if world == 1 and k is None:  # one process: every label, like shuffled
        assert held[0] == set(classes)
    assert list(noniid_labels(y, 0, world, k)) == sorted(held[0])


def test_noniid_scenario_errors():
    y = _labels()
    with pytest.raises(ValueError, match="needs 8 disjoint classes"):
        NonIIDSampler(y, 16, 4, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank must be in"):
        NonIIDSampler(y, 16, rank=2, world_size=2)
    with pytest.raises(ValueError, match="labels per rank"):
        get_scenario("noniid", k=0)
    assert get_scenario("noniid", k=2).k == 2 and get_scenario("noniid").takes_k
    with pytest.raises(ValueError, match="regression"):
        get_scenario("noniid").make_sampler(torch.randn(30), seed=0)


def test_sync_options_in_one_process_build_local_layers():
    method, options = resolve_method("fn", {"sync": True})
    assert method.norm_layer(options)(4, "1d").process_group is None
    bnp, bnp_options = resolve_method("bnp", {"sync": True})
    hook = bnp.training_hook(nn.Sequential(nn.Linear(3, 2)), bnp_options)
    hook.remove()
    default_hook = bnp.training_hook(nn.Sequential(nn.Linear(3, 2)), resolve_method("bnp")[1])
    assert default_hook._group is None  # one process: local statistics
    default_hook.remove()
    with pytest.raises(TypeError, match="sync must be a bool"):
        method.norm_layer({**options, "sync": "yes"})
    sync_bn, sync_options = resolve_method("sync-bn")
    assert isinstance(sync_bn.norm_layer(sync_options)(5, "2d"), SyncBatchNorm)


# ---- a DDP step with SyncBatchNorm equals one process on the concatenated batch ---------------


def _model64() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 6),
        SyncBatchNorm(6),
        nn.ReLU(),
        nn.Linear(6, 4),
        SyncBatchNorm(4),
        nn.Linear(4, 3),
    ).to(F64)


def _batch(n: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 5, generator=g, dtype=F64) * 2 + 1, torch.randint(0, 3, (n,), generator=g)


def _ddp_step_worker(sizes: tuple[int, ...], steps: int) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model64()
    net = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for step in range(steps):
        x, y = _batch(sum(sizes), step)
        lo = sum(sizes[:rank])
        xr, yr = x[lo : lo + sizes[rank]], y[lo : lo + sizes[rank]]
        _, loss, union_loss, _ = _forward_synced(
            net,
            xr,
            yr,
            lambda out, yr=yr: F.cross_entropy(out, yr),
            contextlib.nullcontext,
            "classification",
            world,
            torch.device("cpu"),
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(union_loss)
    # the sync options fill in the world group; bnp refuses local statistics under DDP
    method, options = resolve_method("fn", {"sync": True})
    assert method.norm_layer(options)(3, "1d").process_group is dist.group.WORLD
    bnp, bnp_options = resolve_method("bnp")  # default: synchronized when distributed
    hook = bnp.training_hook(nn.Sequential(nn.Linear(3, 2)), bnp_options)
    assert hook._group is dist.group.WORLD
    hook.remove()
    with contextlib.suppress(ValueError):
        bnp.training_hook(nn.Sequential(nn.Linear(3, 2)), {**bnp_options, "sync": False})
        raise AssertionError("bnp with sync=False must raise under DDP")
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "losses": losses}


@pytest.mark.parametrize("sizes", [(4, 4), (3, 5)])
def test_ddp_step_with_syncbn_equals_single_process_on_concatenated_batch(sizes):
    steps = 3
    result = launch(_ddp_step_worker, 2, sizes, steps, device="cpu", timeout=60)
    # the oracle: torch's BatchNorm1d in one process on the concatenated batch, mean loss
    ref = _model64()
    for i, m in enumerate(ref):
        if isinstance(m, SyncBatchNorm):
            ref[i] = nn.BatchNorm1d(m.num_features).to(F64)
    missing, _ = ref.load_state_dict(_model64().state_dict(), strict=False)
    assert not missing
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for step in range(steps):
        x, y = _batch(sum(sizes), step)
        loss = F.cross_entropy(ref(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(result["state"][key], value, **TOL, msg=key)
    np.testing.assert_allclose(result["losses"], losses, rtol=1e-12)


# ---- the training loop under DDP -------------------------------------------------------------


def _dataset(n_train: int = 96, n_test: int = 40) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + n_test, 1, 4, 4, generator=g)
    y = torch.randint(0, 4, (n_train + n_test,), generator=g)
    x = x + y[:, None, None, None] * 0.5
    return Dataset("toy4", x[:n_train], y[:n_train], x[n_train:], y[n_train:], 4, "classification")


def _train_worker(cfg: TrainConfig, out: str | None) -> list[dict]:
    result = train(cfg, out, data=_dataset())
    return [result.evaluations, {k: v.clone() for k, v in result.model.state_dict().items()}]


def test_two_rank_training_equals_one_process_at_twice_the_batch():
    cfg = TrainConfig(
        method="sync-bn",
        widths=(12,),
        batch_size=8,
        epochs=2,
        optimizer="momentum",
        lr=0.05,
        device="cpu",
    )
    evaluations, state = launch(_train_worker, 2, cfg, None, device="cpu", timeout=60)
    single = train(cfg.replace(batch_size=16), data=_dataset())
    for key, value in single.model.state_dict().items():  # float32 losses: float32 tolerance
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert [e["step"] for e in evaluations] == [e["step"] for e in single.evaluations] == [6, 12]
    for a, b in zip(evaluations, single.evaluations, strict=True):
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=1.01 / 40)  # one borderline
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5)


class _Stop(Exception):
    pass


def _interrupted_worker(cfg: TrainConfig, full: str, part: str) -> None:
    train(cfg, full, data=_dataset())

    def stop(step: int, record: dict) -> None:
        if step == 7:
            raise _Stop

    with contextlib.suppress(_Stop):  # every rank stops at the same step
        train(cfg, part, data=_dataset(), on_step=stop)


def _records(path) -> list[dict]:
    lines = (path / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines]


def test_resume_after_interruption_equals_uninterrupted_two_rank_run(tmp_path):
    cfg = TrainConfig(
        method="fn",
        scenario="noniid",
        widths=(12,),
        batch_size=8,
        epochs=2,
        checkpoint_every=5,
        device="cpu",
    )
    full, part = tmp_path / "full", tmp_path / "part"
    launch(_interrupted_worker, 2, cfg, str(full), str(part), device="cpu", timeout=60)
    assert [r["step"] for r in _records(part) if r["kind"] == "step"][-1] == 7
    evaluations, state = launch(_train_worker, 2, cfg, str(part), device="cpu", timeout=60)
    assert _records(part) == _records(full)
    from normlab._io import load_checkpoint

    ref = load_checkpoint(full / "checkpoint.pt")
    ckpt = load_checkpoint(part / "checkpoint.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["ranks"]) == 2
    assert ckpt["ranks"][0]["sampler"]["rank"] == 0 and ckpt["ranks"][1]["sampler"]["rank"] == 1
    for key, value in ref["model"].items():
        assert torch.equal(ckpt["model"][key], value), key
        assert torch.equal(state[key], value), key
    assert json.loads((full / "config.json").read_text())["world_size"] == 2
    # a checkpoint of 2 ranks does not resume in one process
    from normlab.errors import ConfigMismatchError

    with pytest.raises(ConfigMismatchError, match="2 process"):
        train(cfg, part, data=_dataset())


# ---- failures end the run with an error within the timeout -----------------------------------


def _failing_worker(cfg: TrainConfig, how: str) -> None:
    def on_step(step: int, record: dict) -> None:
        if dist.get_rank() == 1 and step == 3:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(600)  # hang: never joins the next collective

    train(cfg, None, data=_dataset(), on_step=on_step)


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_dead_or_hung_rank_ends_the_run_with_an_error_within_the_timeout(how):
    cfg = TrainConfig(method="bn", widths=(8,), batch_size=8, epochs=3, device="cpu")
    timeout = 4.0
    start = time.monotonic()
    with pytest.raises(DistributedError) as info:
        launch(_failing_worker, 2, cfg, how, device="cpu", timeout=timeout)
    elapsed = time.monotonic() - start
    message = str(info.value)
    if how == "kill":
        assert "rank 1 was killed by SIGKILL" in message
    else:
        assert "rank 0 failed" in message and "timeout, 4 s" in message
    assert elapsed < 30 + timeout  # start-up of two processes on a loaded CPU, plus the timeout


def dying_model(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """A model factory for ``--model``: rank 1's forward kills its process at the 3rd call."""

    class Dying(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Flatten(),
                nn.Linear(int(np.prod(input_shape)), 8),
                nn.BatchNorm1d(8),
                nn.Linear(8, num_outputs),
            )
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls == 3 and dist.is_initialized() and dist.get_rank() == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            return self.body(x)

    return Dying()


def test_cli_exit_status_is_nonzero_when_a_rank_dies(tmp_path, capsys):
    args = ["run", "compare", "--smoke", "--nproc", "2", "--dist-timeout", "5", "--no-progress"]
    args += ["--out", str(tmp_path / "out"), "--methods", "bn", "--scenarios", "shuffled"]
    args += ["--model", f"{__name__}:dying_model"]
    assert main(args) == 1
    assert "rank 1 was killed by SIGKILL" in capsys.readouterr().err


# ---- the command line ------------------------------------------------------------------------


def test_compare_smoke_on_two_processes_writes_results(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert (
        main(["run", "compare", "--smoke", "--nproc", "2", "--out", str(out), "--no-progress"]) == 0
    )
    results = json.loads((out / "results.json").read_text())
    cells = results["cells"]
    assert cells and all("ok" in c for c in cells.values())
    # online: one sample per rank; sync-bn normalizes over both ranks' samples, bn cannot
    assert cells["sync-bn/online"]["ok"]
    assert not cells["bn/online"]["ok"] and "BatchTooSmallError" in cells["bn/online"]["error"]
    run = out / "runs" / "sync-bn_shuffled"
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert "results:" in capsys.readouterr().out


def test_rank_spread_matches_numpy_formula():
    result = launch(_spread_worker, 3, device="cpu", timeout=60)
    means = np.array([[r + 1.0, 2 * r, -r] for r in range(3)])
    variances = np.array([[1.0 + r, 4.0, 0.5 * (r + 1)] for r in range(3)])
    rel = means.std(0) / np.sqrt(variances.mean(0) + 1e-5)
    assert result["spread"] == pytest.approx(rel.mean(), rel=1e-12)
    assert result["none"] is None


def _spread_worker() -> dict:
    from normlab.experiments.noniid_workers import running_stat_spread

    r = dist.get_rank()
    layer = nn.BatchNorm1d(3)
    layer.running_mean.copy_(torch.tensor([r + 1.0, 2 * r, -r]))
    layer.running_var.copy_(torch.tensor([1.0 + r, 4.0, 0.5 * (r + 1)]))
    return {
        "spread": running_stat_spread(nn.Sequential(layer), {})["rank_spread"],
        "none": running_stat_spread(nn.Sequential(nn.Linear(2, 2)), {})["rank_spread"],
    }


def test_torchrun_launch_joins_the_group_and_rank_zero_writes(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "tr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "normlab", "run", "compare", "--smoke", "--no-progress", "--out", str(out)]
    cmd += ["--methods", "sync-bn", "--scenarios", "online"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("results:") == 1  # rank 0 reports; rank 1 only trains
    config = json.loads((out / "runs" / "sync-bn_online" / "config.json").read_text())
    assert config["world_size"] == 2
    assert json.loads((out / "results.json").read_text())["cells"]["sync-bn/online"]["ok"]
