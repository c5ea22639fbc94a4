"""SyncBatchNorm and the packed all-reduce helpers against their oracles.

Oracles: one process's torch.nn.BatchNorm1d/2d/3d on the concatenation of every rank's batch
(outputs and input gradients per rank slice, weight/bias gradients summed over ranks, running
statistics), a single-process DDP-free training step on the concatenated batch, float64
gradcheck/gradgradcheck, and the byte counts of the collectives actually issued.

Distributed tests run 2 or 3 gloo CPU processes (tests/_dist_helpers.py); each worker runs
several cases so that each test spawns processes once. Tolerances: float64 1e-9 absolute and
relative (the spec of the layer); float32 1e-5.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from _dist_helpers import run_distributed
from torch import nn

from normlab.errors import BatchTooSmallError
from normlab.functional import (
    all_reduce_packed,
    packet_dtype,
    sync_batch_norm_train,
    sync_bytes_per_step,
    sync_moments,
)
from normlab.nn import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchRenorm2d, SyncBatchNorm

F64 = {"rtol": 1e-9, "atol": 1e-9}
F32 = {"rtol": 1e-5, "atol": 1e-5}
TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


# --- cases shared by the workers (children) and the oracle (parent) ---------------------------


def _case(sizes, tail=(), c=3, dtype=torch.float64, steps=2, seed=0, device="cpu", **layer_kwargs):
    return {
        "device": device,
        "sizes": tuple(sizes),
        "tail": tuple(tail),
        "c": c,
        "dtype": dtype,
        "steps": steps,
        "seed": seed,
        "layer": layer_kwargs,
    }


def _batch(case, step):
    """The full (concatenated) input and upstream gradient of one step."""
    g = torch.Generator().manual_seed(1000 * case["seed"] + step)
    shape = (sum(case["sizes"]), case["c"], *case["tail"])
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 0.7
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    return x.to(case["dtype"]), grad.to(case["dtype"])


def _init_affine(layer, case):
    if layer.weight is not None:
        g = torch.Generator().manual_seed(case["seed"] + 77)
        with torch.no_grad():
            layer.weight.copy_(torch.rand(case["c"], generator=g, dtype=torch.float64) + 0.5)
            if layer.bias is not None:
                layer.bias.copy_(torch.randn(case["c"], generator=g, dtype=torch.float64))


def _shard(t, sizes, rank):
    start = sum(sizes[:rank])
    return t[start : start + sizes[rank]]


class _CountAllReduce:
    """Records ``(numel, dtype)`` of every ``torch.distributed.all_reduce`` while active."""

    def __init__(self):
        self.calls: list[tuple[int, torch.dtype]] = []
        self._orig = None

    def __enter__(self):
        self._orig = dist.all_reduce

        def counting(tensor, *args, **kwargs):
            self.calls.append((tensor.numel(), tensor.dtype))
            return self._orig(tensor, *args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


def _run_case(rank, case, group=None, sizes=None):
    """Train a SyncBatchNorm for ``case["steps"]`` steps on this rank's shards."""
    sizes = case["sizes"] if sizes is None else sizes
    device = case["device"]
    layer = SyncBatchNorm(
        case["c"], process_group=group, device=device, dtype=case["dtype"], **case["layer"]
    )
    _init_affine(layer, case)
    steps = []
    for step in range(case["steps"]):
        x_full, g_full = _batch(case, step)
        x = _shard(x_full, sizes, rank).to(device).requires_grad_(True)
        with _CountAllReduce() as fwd:
            y = layer(x)
        with _CountAllReduce() as bwd:
            y.backward(_shard(g_full, sizes, rank).to(device))
        steps.append(
            {
                "y": y.detach().cpu(),
                "grad_x": x.grad.cpu(),
                "grad_w": None if layer.weight is None else layer.weight.grad.cpu(),
                "grad_b": None if layer.bias is None else layer.bias.grad.cpu(),
                "fwd_calls": fwd.calls,
                "bwd_calls": bwd.calls,
            }
        )
        if layer.weight is not None:
            layer.weight.grad = None
            if layer.bias is not None:
                layer.bias.grad = None
    return {"steps": steps, "state": {k: v.cpu().clone() for k, v in layer.state_dict().items()}}


def _reference(case, x_slices=None):
    """torch's BatchNorm on the concatenated batches: per step (y, grad_x, grad_w, grad_b)."""
    dim = 2 + len(case["tail"])
    ref = TORCH_BN[dim](case["c"], dtype=case["dtype"], **case["layer"])
    _init_affine(ref, case)
    out = []
    for step in range(case["steps"]):
        x_full, g_full = _batch(case, step)
        if x_slices is not None:
            x_full, g_full = x_full[x_slices], g_full[x_slices]
        x = x_full.clone().requires_grad_(True)
        y = ref(x)
        y.backward(g_full)
        grads = [None if p is None else p.grad.clone() for p in (ref.weight, ref.bias)]
        out.append((y.detach(), x.grad, *grads))
        for p in (ref.weight, ref.bias):
            if p is not None:
                p.grad = None
    return out, ref


def _check_case(case, results, tol=F64):
    """Every rank's slices, the summed parameter gradients and the buffers against torch."""
    reference, ref = _reference(case)
    sizes, c = case["sizes"], case["c"]
    packet = packet_dtype(case["dtype"])
    for step, (y, grad_x, grad_w, grad_b) in enumerate(reference):
        for rank, res in enumerate(results):
            got = res["steps"][step]
            torch.testing.assert_close(got["y"], _shard(y, sizes, rank), **tol)
            torch.testing.assert_close(got["grad_x"], _shard(grad_x, sizes, rank), **tol)
            # One packed all-reduce each way: (2C + 1) then 2C values, in the packet dtype.
            assert got["fwd_calls"] == [(2 * c + 1, packet)]
            assert got["bwd_calls"] == [(2 * c, packet)]
        for name, want in (("grad_w", grad_w), ("grad_b", grad_b)):
            if want is None:
                assert all(r["steps"][step][name] is None for r in results)
            else:
                total = sum(r["steps"][step][name] for r in results)
                torch.testing.assert_close(total, want, **tol)
    for res in results:
        state = res["state"]
        for key, want in ref.state_dict().items():
            if key == "num_batches_tracked":
                assert int(state[key]) == int(want)
            else:
                torch.testing.assert_close(state[key], want, **tol)


# --- workers (run in the spawned processes) -----------------------------------------------


def _cases_worker(rank, world_size, cases):
    return [_run_case(rank, case) for case in cases]


EVEN_CASES = [
    _case((4, 4)),
    _case((2, 2), tail=(3, 4), seed=1),
    _case((2, 2), tail=(3, 4), seed=2, momentum=None),
    _case((4, 4), seed=3, affine=False),
    _case((4, 4), tail=(5,), seed=4, track_running_stats=False),
    _case((3, 3), tail=(2, 3), seed=5, dtype=torch.float32),
]

UNEVEN_CASES = [
    _case((3, 5), seed=10),
    _case((3, 5), tail=(3, 2), seed=11),
    _case((1, 4), seed=12, momentum=None),
    _case((1, 4), tail=(2, 3), seed=13),
    _case((2, 3), tail=(4,), seed=14),
    _case((1, 2), tail=(2, 3, 2), seed=15),
]


def test_even_shards_match_batchnorm_on_concatenated_batch():
    results = run_distributed(_cases_worker, 2, EVEN_CASES)
    for i, case in enumerate(EVEN_CASES):
        tol = F64 if case["dtype"] == torch.float64 else F32
        _check_case(case, [r[i] for r in results], tol)


def test_uneven_shards_match_batchnorm_on_concatenated_batch():
    results = run_distributed(_cases_worker, 2, UNEVEN_CASES)
    for i, case in enumerate(UNEVEN_CASES):
        _check_case(case, [r[i] for r in results])


EMPTY_RANK_CASES = [
    _case((3, 0, 2), seed=20),
    _case((3, 0, 2), tail=(2, 3), seed=21),
    _case((0, 1, 1), tail=(3,), seed=22),
]
TOO_SMALL = _case((1, 0, 0), seed=23)
SUBGROUP = _case((3, 2, 4), tail=(2, 2), seed=24)


def _three_rank_worker(rank, world_size):
    out = {"cases": [_run_case(rank, case) for case in EMPTY_RANK_CASES]}

    # A single value per channel over all ranks: every rank raises, no state changes, and the
    # group is still usable afterwards (no rank is left inside a collective).
    layer = SyncBatchNorm(3, dtype=torch.float64)
    before = copy.deepcopy(layer.state_dict())
    x, _ = _batch(TOO_SMALL, 0)
    try:
        layer(_shard(x, TOO_SMALL["sizes"], rank).requires_grad_(True))
        out["too_small"] = None
    except BatchTooSmallError as err:
        out["too_small"] = str(err)
    out["too_small_state_kept"] = all(
        torch.equal(before[k], v) for k, v in layer.state_dict().items()
    )
    out["after_too_small"] = _run_case(rank, EMPTY_RANK_CASES[0])

    # process_group: ranks 0 and 1 synchronize together; rank 2 alone (a group of one rank is
    # the local path). Every rank creates every group.
    groups = [dist.new_group([0, 1]), dist.new_group([2])]
    out["subgroup"] = _run_case(rank, SUBGROUP, group=groups[0] if rank < 2 else groups[1])

    # Eval mode issues no collective and uses the running statistics.
    layer = SyncBatchNorm(3, dtype=torch.float64)
    case = EMPTY_RANK_CASES[1]
    x, _ = _batch(case, 0)
    layer(_shard(x, case["sizes"], rank))
    layer.eval()
    with _CountAllReduce() as calls:
        out["eval"] = (layer(x), copy.deepcopy(layer.state_dict()), calls.calls)
    return out


def test_three_ranks_empty_rank_too_small_subgroup_and_eval():
    results = run_distributed(_three_rank_worker, 3)
    for i, case in enumerate(EMPTY_RANK_CASES):
        ranks = [r["cases"][i] for r in results]
        empty = [k for k, n in enumerate(case["sizes"]) if n == 0]
        for k in empty:  # the empty rank returns empty outputs and gradients
            assert ranks[k]["steps"][0]["y"].shape == (0, case["c"], *case["tail"])
            assert ranks[k]["steps"][0]["grad_x"].shape == (0, case["c"], *case["tail"])
        _check_case(case, ranks)

    for r in results:
        assert r["too_small"] is not None and "got 1" in r["too_small"]
        assert r["too_small_state_kept"]
    _check_case(EMPTY_RANK_CASES[0], [r["after_too_small"] for r in results])

    # Subgroups: ranks 0 and 1 see the BN of their concatenation, rank 2 the BN of its own batch.
    sizes = SUBGROUP["sizes"]
    pair_ref, _ = _reference(SUBGROUP, slice(0, sizes[0] + sizes[1]))
    solo_ref, _ = _reference(SUBGROUP, slice(sizes[0] + sizes[1], None))
    for step in range(SUBGROUP["steps"]):
        for rank in (0, 1):
            got = results[rank]["subgroup"]["steps"][step]
            y, grad_x = pair_ref[step][:2]
            torch.testing.assert_close(got["y"], _shard(y, sizes[:2], rank), **F64)
            torch.testing.assert_close(got["grad_x"], _shard(grad_x, sizes[:2], rank), **F64)
        got = results[2]["subgroup"]["steps"][step]
        torch.testing.assert_close(got["y"], solo_ref[step][0], **F64)
        torch.testing.assert_close(got["grad_x"], solo_ref[step][1], **F64)
        assert got["fwd_calls"] == [] and got["bwd_calls"] == []
        pair_w = sum(results[k]["subgroup"]["steps"][step]["grad_w"] for k in (0, 1))
        torch.testing.assert_close(pair_w, pair_ref[step][2], **F64)

    # Eval: identical running statistics on every rank, torch's eval output, no collective.
    case = EMPTY_RANK_CASES[1]
    ref = nn.BatchNorm2d(3, dtype=torch.float64)
    x, _ = _batch(case, 0)
    ref(x)
    ref.eval()
    for r in results:
        y, state, calls = r["eval"]
        assert calls == []
        torch.testing.assert_close(state["running_mean"], ref.running_mean, **F64)
        torch.testing.assert_close(state["running_var"], ref.running_var, **F64)
        torch.testing.assert_close(y, ref(x), **F64)


# --- DDP ------------------------------------------------------------------------------------

DDP_SPLITS = [(3, 5), (0, 4)]


def _model(bn2d=nn.BatchNorm2d, bn1d=nn.BatchNorm1d):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        bn2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 6),
        bn1d(6),
        nn.ReLU(),
        nn.Linear(6, 2),
    ).double()


def _ddp_data(n, step):
    g = torch.Generator().manual_seed(500 + step)
    x = torch.randn(n, 3, 5, 5, generator=g, dtype=torch.float64) + 0.3
    t = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x, t


def _ddp_worker(rank, world_size, splits, steps):
    out = []
    for sizes in splits:
        model = SyncBatchNorm.convert_sync_batchnorm(_model())
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        states = []
        for step in range(steps):
            x, t = _ddp_data(sum(sizes), step)
            x, t = _shard(x, sizes, rank), _shard(t, sizes, rank)
            opt.zero_grad()
            # DDP averages gradients over ranks: scale so the average is d(mean loss)/d(theta).
            loss = ((ddp(x) - t) ** 2).sum() * world_size / sum(sizes)
            loss.backward()
            opt.step()
            states.append(copy.deepcopy(model.state_dict()))
        out.append(states)
    return out


def test_ddp_step_matches_single_process_on_concatenated_batch():
    steps = 2
    results = run_distributed(_ddp_worker, 2, DDP_SPLITS, steps)
    for i, sizes in enumerate(DDP_SPLITS):
        ref = _model()
        opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        for step in range(steps):
            x, t = _ddp_data(sum(sizes), step)
            opt.zero_grad()
            (((ref(x) - t) ** 2).sum() / sum(sizes)).backward()
            opt.step()
            for rank in range(2):
                state = results[rank][i][step]
                assert state.keys() == ref.state_dict().keys()
                for key, want in ref.state_dict().items():
                    torch.testing.assert_close(state[key], want, **F64, msg=f"{sizes} {key}")


# --- single process: no process group initialised ------------------------------------------


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 3, 2, 4), (2, 3, 2, 2, 3)])
def test_without_group_behaves_as_batchnorm(shape):
    assert not dist.is_initialized()
    g = torch.Generator().manual_seed(7)
    ref = TORCH_BN[len(shape)](3, dtype=torch.float64, momentum=None)
    layer = SyncBatchNorm(3, dtype=torch.float64, momentum=None)
    _init_affine(ref, {"c": 3, "seed": 0})
    layer.load_state_dict(ref.state_dict())
    for _ in range(2):
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
        xr, xl = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        grad = torch.randn(shape, generator=g, dtype=torch.float64)
        yr, yl = ref(xr), layer(xl)
        yr.backward(grad)
        yl.backward(grad)
        torch.testing.assert_close(yl, yr, **F64)
        torch.testing.assert_close(xl.grad, xr.grad, **F64)
        torch.testing.assert_close(layer.weight.grad, ref.weight.grad, **F64)
    for key, want in ref.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[key], want, **F64)
    layer.eval()
    ref.eval()
    torch.testing.assert_close(layer(x), ref(x), **F64)


@pytest.mark.parametrize("shape", [(5, 2), (3, 2, 2, 3)])
def test_gradcheck_without_group(shape):
    g = torch.Generator().manual_seed(3)
    layer = SyncBatchNorm(2, dtype=torch.float64)
    _init_affine(layer, {"c": 2, "seed": 1})
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    inputs = (x, layer.weight.detach().clone().requires_grad_(True), layer.bias.detach().clone())
    inputs[2].requires_grad_(True)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("shape", [(5, 2), (3, 2, 2, 3)])
def test_synchronized_function_gradcheck_single_process(shape):
    # With no group the packed all-reduces are identities: this checks the synchronized
    # backward formula itself (first order; it is once differentiable).
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True) + 3.0
    w = (torch.rand(2, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    shift = torch.tensor([2.5, -1.0], dtype=torch.float64)

    def f(x, w, b):
        return sync_batch_norm_train(x, w, b, 1e-3, None, shift)[0]

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradcheck(lambda x: sync_batch_norm_train(x, None, None)[0], (x,))
    y, mean, var, count = sync_batch_norm_train(x, w, b, 1e-3, None, shift)
    ref = torch.nn.functional.batch_norm(x, None, None, w, b, training=True, eps=1e-3)
    torch.testing.assert_close(y, ref, **F64)
    dims = [d for d in range(x.dim()) if d != 1]
    torch.testing.assert_close(mean, x.mean(dims), **F64)
    torch.testing.assert_close(var, x.var(dims, unbiased=False), **F64)
    assert count == x.numel() // 2


def test_batch_too_small_without_group_keeps_state():
    layer = SyncBatchNorm(3)
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(BatchTooSmallError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3))
    with pytest.raises(BatchTooSmallError, match="got 0"):
        sync_batch_norm_train(torch.randn(0, 3))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key])


def test_bad_input_raises_clear_errors():
    layer = SyncBatchNorm(3)
    with pytest.raises(ValueError, match="expected 2D or 3D or 4D or 5D input"):
        layer(torch.randn(3))
    with pytest.raises(ValueError, match="expected 3 channels"):
        layer(torch.randn(4, 2))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="num_features"):
        SyncBatchNorm(0)
    with pytest.raises(ValueError, match="one dtype and device"):
        all_reduce_packed([torch.zeros(2), torch.zeros(2, dtype=torch.float64)])
    with pytest.raises(ValueError, match="at least one tensor"):
        all_reduce_packed([])


def test_sync_moments_precision_and_packet_sizes():
    # float32 data far from zero: with the shift near the mean (what a layer passes, its running
    # mean) the variance keeps float32 accuracy; the float64 two-pass value is the oracle.
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(64, 4, 8, generator=g, dtype=torch.float64) + 1e4).float()
    dims = (0, 2)
    want_var = x.double().var(dims, unbiased=False)
    mean, var, count = sync_moments(x, shift=torch.full((4,), 1e4 + 0.1))
    assert mean.dtype == torch.float32 and count == 64 * 8
    torch.testing.assert_close(mean.double(), x.double().mean(dims), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), want_var, rtol=1e-4, atol=0)
    # Non-finite shifts are ignored (replaced by 0) rather than poisoning the statistics.
    xd = x.double()
    _, var_nan, _ = sync_moments(xd, shift=torch.full((4,), float("nan")))
    torch.testing.assert_close(var_nan, want_var, rtol=1e-6, atol=0)
    assert packet_dtype(torch.bfloat16) == torch.float32
    assert sync_bytes_per_step(10, torch.float64) == (21 * 8, 20 * 8)
    assert sync_bytes_per_step(10, torch.float16) == (21 * 4, 20 * 4)


# --- convert_sync_batchnorm ------------------------------------------------------------------


def test_convert_sync_batchnorm_keeps_everything():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, eps=1e-3, momentum=None),
        nn.Sequential(nn.Flatten(), nn.Linear(4, 5), BatchNorm1d(5, momentum=0.3)),
        nn.BatchNorm1d(5, affine=False),
        nn.BatchNorm1d(5, track_running_stats=False),
        nn.BatchNorm1d(5),  # bias removed below (torch's bias=False)
        BatchNorm2d(2),
        BatchNorm3d(2),
        nn.BatchNorm3d(2),
        nn.SyncBatchNorm(2),
        BatchRenorm2d(2),
    ).double()
    model[1].weight.requires_grad_(False)
    model[5].bias = None
    model[3].eval()
    for m in model.modules():
        if isinstance(getattr(m, "running_mean", None), torch.Tensor):
            with torch.no_grad():
                m.running_mean.uniform_(-1, 1)
                m.num_batches_tracked.fill_(3)
    old = dict(model.named_modules())
    old_params = dict(model.named_parameters())
    old_buffers = dict(model.named_buffers())
    out = SyncBatchNorm.convert_sync_batchnorm(model, process_group="pg")
    assert out is model
    new = dict(model.named_modules())
    converted = {"1", "2.2", "3", "4", "5", "6", "7", "8", "9"}
    for name, m in new.items():
        if name in converted:
            src = old[name]
            assert type(m) is SyncBatchNorm and m is not src, name
            assert m.process_group == "pg"
            for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
                assert getattr(m, attr) == getattr(src, attr), (name, attr)
            assert m.training == src.training
        else:
            assert m is old[name], name
    assert isinstance(new["10"], BatchRenorm2d)
    assert not new["3"].training and new["1"].training
    # Same Parameter and buffer objects (requires_grad, device and dtype follow).
    new_params = dict(model.named_parameters())
    assert new_params.keys() == old_params.keys()
    assert all(new_params[k] is v for k, v in old_params.items())
    assert not new["1"].weight.requires_grad
    assert new["5"].bias is None and new["5"].weight is old_params["5.weight"]
    new_buffers = dict(model.named_buffers())
    for key, value in old_buffers.items():
        assert new_buffers[key] is value, key
    assert new["4"].running_mean is None
    assert new["2.2"].running_mean.dtype == torch.float64

    # A batch-norm module itself is replaced; the converted layer computes what it replaced.
    bn = nn.BatchNorm1d(3, momentum=0.2).double()
    ref = copy.deepcopy(bn)
    sync = SyncBatchNorm.convert_sync_batchnorm(bn)
    assert type(sync) is SyncBatchNorm
    x = torch.randn(6, 3, dtype=torch.float64)
    torch.testing.assert_close(sync(x), ref(x), **F64)
    torch.testing.assert_close(sync.running_var, ref.running_var, **F64)


def test_convert_refuses_uninitialised_lazy_and_changes_nothing():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.LazyBatchNorm1d())
    first = model[0]
    with pytest.raises(ValueError, match="run one forward first"):
        SyncBatchNorm.convert_sync_batchnorm(model)
    assert model[0] is first
    with pytest.raises(TypeError, match="nn.Module"):
        SyncBatchNorm.convert_sync_batchnorm("model")


def test_twice_differentiable_is_false_and_reset_without_bias():
    layer = SyncBatchNorm(3, bias=False)
    assert layer.twice_differentiable is False
    assert layer.bias is None and layer.weight is not None
    with torch.no_grad():
        layer.weight.fill_(2)
    layer.reset_parameters()
    assert torch.equal(layer.weight, torch.ones(3))
    # The synchronized Function refuses a second differentiation instead of dropping terms.
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad((sync_batch_norm_train(x)[0] ** 3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


# --- CUDA tensors over gloo (both ranks on one GPU) ----------------------------------------

CUDA_CASES = [
    _case((3, 5), tail=(3, 2), seed=30, device="cuda"),
    _case((0, 4), seed=31, device="cuda", momentum=None),
    _case((2, 3), tail=(2, 3), seed=32, device="cuda", dtype=torch.float32),
]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_over_gloo_match_batchnorm():
    results = run_distributed(_cases_worker, 2, CUDA_CASES)
    for i, case in enumerate(CUDA_CASES):
        tol = F64 if case["dtype"] == torch.float64 else F32
        _check_case(case, [r[i] for r in results], tol)
