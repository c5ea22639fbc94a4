"""The ``bnp`` method on the training platform, the BNP Hessian tools, and the experiments'
learning-rate rule.

Oracles: the ``none`` method's network (BNP builds the same plain network); the layer maths
written out by hand after ``convert``; a hand-written training loop around ``BNPreconditioner``
for what ``normlab.train.train`` does with method ``bnp``; an uninterrupted run for resume;
``ema_moments`` of the functional module for the preconditioner's batched statistics;
``BNPreconditioner.precondition_`` for the parametrization matrix P; the closed-form softmax
regression Hessian; NumPy eigenvalues for the condition number.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from normlab._io import save_checkpoint
from normlab.data import get_scenario, load_dataset
from normlab.diagnostics import (
    ParameterLayout,
    bnp_reparametrization,
    dense_hessian,
    layer_input_moments,
    matrix_condition_number,
)
from normlab.experiments.bnp_conditioning import hessian_conditioning, php_key
from normlab.experiments.common import scaled_lr
from normlab.functional.precondition import (
    conv2d_channel_moments,
    ema_moments,
    linear_input_moments,
    precondition_linear,
)
from normlab.methods import convert, get_method, list_methods
from normlab.methods.bnp import BNP_OPTIONS
from normlab.nn.convert import NoNorm, find_norm_slots
from normlab.optim.preconditioner import BNPreconditioner
from normlab.train import TrainConfig, build_optimizer, train
from normlab.train import build_model_for as build_model

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pre_hook_count(model: nn.Module) -> int:
    # forward pre-hooks and forward hooks (BNPreconditioner registers one forward hook per layer)
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _set_stats(precond: BNPreconditioner, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    state = precond.state_dict()
    for name, (mean, var) in stats.items():
        state["layers"][name] = {
            "running": {"mean": mean, "var": var, "num_batches": 1},
            "before_step": None,
            "new_step": True,
        }
    precond.load_state_dict(state)


# ------------------------------------------------------------------------------- registration


@pytest.mark.parametrize("model_name,shape", [("mlp", (1, 8, 8)), ("cnn", (1, 8, 8))])
def test_bnp_builds_the_plain_network_with_biases(model_name, shape):
    method = get_method("bnp")
    assert "bnp" in list_methods()
    assert method.bias and not method.batch_dependent
    assert method.make_hook is not None and set(method.hook_options) == set(BNP_OPTIONS) | {"sync"}
    torch.manual_seed(3)
    model = build_model(model_name, shape, 10, "bnp")
    torch.manual_seed(3)
    plain = build_model(model_name, shape, 10, "none")
    slots = find_norm_slots(model)
    assert slots and all(isinstance(m, NoNorm) for _, m in slots)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert layers and all(m.bias is not None for m in layers)
    assert not any(
        "norm" in type(m).__name__.lower() for m in model.modules() if m not in dict(slots).values()
    )
    # Oracle: the "none" network. Same parameters, same function: BNP adds no layer.
    state, plain_state = model.state_dict(), plain.state_dict()
    assert list(state) == list(plain_state)
    assert all(torch.equal(state[k], plain_state[k]) for k in state)
    x = torch.rand(5, *shape, generator=_gen(1))
    assert torch.equal(model(x), plain(x))


def test_convert_to_bnp_removes_batch_norm_and_adds_zero_biases():
    torch.manual_seed(4)
    mlp = nn.Sequential(nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    cnn = nn.Sequential(
        nn.Conv2d(2, 4, 3, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 2),
    )
    for model in (mlp, cnn):
        convert(model, "bnp")
        assert isinstance(model[1], NoNorm)
        assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules())
        assert model[0].bias is not None and torch.equal(
            model[0].bias, torch.zeros(model[0].bias.shape)
        )
    x = torch.randn(4, 6, generator=_gen(2))
    expected = F.linear(F.relu(F.linear(x, mlp[0].weight)), mlp[3].weight, mlp[3].bias)
    torch.testing.assert_close(mlp(x), expected, rtol=0, atol=0)
    img = torch.randn(3, 2, 5, 5, generator=_gen(3))
    expected = F.linear(F.relu(F.conv2d(img, cnn[0].weight)).flatten(1), cnn[4].weight, cnn[4].bias)
    torch.testing.assert_close(cnn(img), expected, rtol=0, atol=0)
    convert(mlp, "bn")  # the slot is kept, so it converts back
    assert type(mlp[1]).__name__ == "BatchNorm1d"


def test_training_hook_options_are_the_preconditioner_keywords():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    bnp = get_method("bnp")
    hook = bnp.training_hook(
        model,
        {
            "rho": 0.9,
            "eps": 1e-6,
            "floor": 1e-2,
            "use_current_batch": False,
            "modules": ["2"],
            "debias": False,
        },
    )
    assert (hook.rho, hook.eps, hook.floor, hook.use_current_batch) == (0.9, 1e-6, 1e-2, False)
    assert hook.debias is False and bnp.hook_options["debias"] is True
    assert hook.layer_names == ("2",)
    hook.remove()
    assert _pre_hook_count(model) == 0
    with pytest.raises(ValueError, match="'bnp' got unknown option.*lr.*valid: rho"):
        bnp.training_hook(model, {"lr": 0.1})
    with pytest.raises(ValueError, match="floor"):
        bnp.training_hook(model, {"floor": -1.0})
    assert _pre_hook_count(model) == 0
    assert set(BNP_OPTIONS) <= set(BNPreconditioner.__init__.__code__.co_varnames)


def test_before_step_is_precondition():
    model = nn.Sequential(nn.Linear(4, 3, dtype=F64))
    hook = get_method("bnp").training_hook(model, {"floor": 0.0})
    x = torch.randn(7, 4, generator=_gen(5), dtype=F64) * 3 + 2
    model(x).pow(2).sum().backward()
    gw, gb = model[0].weight.grad.clone(), model[0].bias.grad.clone()
    hook.before_step()
    ew, eb = precondition_linear(gw, gb, x.mean(0), x.var(0, correction=0), eps=1e-5, floor=0.0)
    torch.testing.assert_close(model[0].weight.grad, ew, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model[0].bias.grad, eb, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- the train loop


def _hand_loop(cfg: TrainConfig, steps: int) -> nn.Module:
    """What train() should do for method bnp, written out around BNPreconditioner."""
    torch.manual_seed(cfg.seed)
    scenario = get_scenario(cfg.scenario)
    data = scenario.apply(load_dataset(cfg.dataset, seed=cfg.seed), cfg.seed)
    model = build_model(
        "mlp", data.x_train.shape[1:], 10, "bnp", widths=cfg.widths, activation=cfg.activation
    )
    optimizer = build_optimizer(cfg, model.parameters())
    precond = BNPreconditioner(model, **cfg.method_options)
    sampler = scenario.make_sampler(data.y_train, cfg.seed)
    sampler.set_epoch(0)
    for step, idx in enumerate(sampler):
        if step == steps:
            break
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        precond.precondition_()
        optimizer.step()
    precond.remove()
    return model


def test_train_with_bnp_at_batch_size_one_is_the_preconditioned_loop(tmp_path):
    cfg = TrainConfig(
        method="bnp",
        scenario="online",
        widths=(12,),
        epochs=1,
        max_steps=150,
        lr=0.01,
        optimizer="momentum",
        log_every=0,
        eval_train=False,
        method_options={"rho": 0.99},
    )
    seen: list[nn.Module] = []

    def capture(model, record):
        seen.append(model)
        assert _pre_hook_count(model) == 2  # one per Linear while training
        return {}

    result = train(cfg, tmp_path / "bnp", on_eval=capture)
    assert result.steps == 150 and math.isfinite(result.final["test_loss"])
    model = seen[-1]
    assert _pre_hook_count(model) == 0  # removed when train() returns
    ckpt = torch.load(tmp_path / "bnp" / "checkpoint.pt", weights_only=False)
    hand = _hand_loop(cfg, 150).state_dict()
    assert list(ckpt["model"]) == list(hand)
    for key, value in hand.items():
        torch.testing.assert_close(ckpt["model"][key], value, rtol=0, atol=0)
    layers = ckpt["hook"]["layers"]
    assert set(layers) == {"1.0", "2"}
    assert all(entry["running"]["num_batches"] == 150 for entry in layers.values())
    # ... and the preconditioning changed the run: the same loop without it differs.
    train(cfg.replace(method="none", method_options={}), tmp_path / "none")
    plain = torch.load(tmp_path / "none" / "checkpoint.pt", weights_only=False)["model"]
    assert not torch.equal(plain["2.weight"], ckpt["model"]["2.weight"])


def _records(path):
    return [
        {k: v for k, v in json.loads(line).items() if k != "time"}
        for line in path.read_text().splitlines()
    ]


@pytest.mark.parametrize(
    "options", [{}, {"use_current_batch": False, "rho": 0.9}, {"weight_norm": "scaled"}]
)
def test_train_resume_with_bnp_is_exact(tmp_path, options):
    cfg = TrainConfig(
        method="bnp",
        widths=(16,),
        epochs=2,
        batch_size=64,
        eval_every=7,
        checkpoint_every=5,
        optimizer="momentum",
        lr=0.01,
        eval_train=False,
        method_options=options,
    )
    full = train(cfg, tmp_path / "full")

    class Interrupt(Exception):
        pass

    def stop(step, record):
        if step == 33:
            raise Interrupt

    for name in ("resumed", "stateless"):
        with pytest.raises(Interrupt):
            train(cfg, tmp_path / name, on_step=stop)
    ckpt_path = tmp_path / "stateless" / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert ckpt["step"] == 30
    assert all(e["running"]["num_batches"] == 30 for e in ckpt["hook"]["layers"].values())
    resumed = train(cfg, tmp_path / "resumed")
    assert _records(tmp_path / "resumed" / "metrics.jsonl") == _records(
        tmp_path / "full" / "metrics.jsonl"
    )
    assert resumed.steps == full.steps
    # Control: the same checkpoint without the preconditioner's statistics resumes differently.
    for entry in ckpt["hook"]["layers"].values():
        entry.update(running=None, before_step=None, new_step=True)
    save_checkpoint(ckpt, ckpt_path)
    train(cfg, tmp_path / "stateless")
    assert _records(tmp_path / "stateless" / "metrics.jsonl") != _records(
        tmp_path / "full" / "metrics.jsonl"
    )


# ------------------------------------------------- batched statistics of the preconditioner


@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("use_current_batch", [True, False])
def test_recorded_statistics_follow_the_functional_ema(use_current_batch, debias):
    # The preconditioner folds all layers' batches together when it steps; the oracle folds
    # each recorded input with ema_moments as it arrives.
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, dtype=F64),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(12, 5, dtype=F64),
        nn.ReLU(),
        nn.Linear(5, 4, dtype=F64),
    )
    rho = 0.8
    precond = BNPreconditioner(model, rho=rho, use_current_batch=use_current_batch, debias=debias)
    inputs: dict[str, list[torch.Tensor]] = {"0": [], "3": [], "5": []}
    for name in inputs:
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, a, name=name: inputs[name].append(a[0].detach().clone())
        )
    g = _gen(7)
    expected: dict[str, object] = {name: None for name in inputs}
    before: dict[str, object] = dict(expected)
    plan = [[4], [1], [3, 2], [5], [1, 1, 2]]  # forwards per step, by batch size
    for step, sizes in enumerate(plan):
        for b in sizes:
            x = torch.randn(b, 2, 4, 4, generator=g, dtype=F64) * 2 + 1
            if step == 3:
                x[:, 1] = float("nan")  # channel 1 of the conv: keeps its statistics
            model(x).sum().backward()
        before = dict(expected)
        for name, xs in inputs.items():
            for h in xs:
                moments = conv2d_channel_moments(h) if name == "0" else linear_input_moments(h)
                expected[name] = ema_moments(expected[name], moments, rho, debias=debias)
            xs.clear()
        got = precond.statistics()
        for name, stats in expected.items():
            assert got[name].num_batches == stats.num_batches
            torch.testing.assert_close(got[name].mean, stats.mean, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got[name].var, stats.var, rtol=1e-12, atol=1e-12)
        used = precond.statistics(for_step=True)
        for name in inputs:
            ref = expected[name] if use_current_batch else before[name]
            if ref is None:
                assert name not in used
            else:
                torch.testing.assert_close(used[name].var, ref.var, rtol=1e-12, atol=1e-12)
        precond.precondition_()
        model.zero_grad()
    assert torch.isfinite(precond.statistics()["0"].var).all()


def test_half_precision_inputs_get_float32_statistics():
    layer = nn.Linear(6, 3).to(torch.bfloat16)
    precond = BNPreconditioner(layer)
    x = torch.randn(5, 6, generator=_gen(8)).to(torch.bfloat16)
    layer(x)
    stats = precond.statistics()[""]
    ref = linear_input_moments(x)
    assert stats.mean.dtype == torch.float32
    torch.testing.assert_close(stats.mean, ref.mean)
    torch.testing.assert_close(stats.var, ref.var)


# -------------------------------------------------------------- bnp-conditioning's tools


def _small_mlp() -> nn.Sequential:
    torch.manual_seed(9)
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def _uneven_inputs(n: int = 40) -> torch.Tensor:
    g = _gen(10)
    return torch.randn(n, 5, generator=g) * torch.tensor([0.1, 1.0, 3.0, 0.5, 2.0]) + torch.tensor(
        [2.0, -1.0, 0.0, 5.0, 1.0]
    )


def test_parametrization_matrix_gives_the_preconditioned_gradient():
    model = _small_mlp().double()
    x, y = _uneven_inputs().double(), torch.arange(40) % 3
    moments = layer_input_moments(model, x, mode="train", dtype=F64)
    assert set(moments) == {"0", "2"}
    torch.testing.assert_close(moments["0"][1], x.var(0, correction=0))
    layout = ParameterLayout.of(list(model.named_parameters()))
    apply_p, _ = bnp_reparametrization(layout, moments, eps=1e-5, floor=1e-3)
    p = apply_p(torch.eye(layout.dim, dtype=F64))
    F.cross_entropy(model(x), y).backward()
    g = torch.cat([q.grad.reshape(-1) for q in model.parameters()])
    precond = BNPreconditioner(model, eps=1e-5, floor=1e-3)
    _set_stats(precond, moments)
    precond.precondition_()
    expected = torch.cat([q.grad.reshape(-1) for q in model.parameters()])
    torch.testing.assert_close(p @ p.T @ g, expected, rtol=1e-10, atol=1e-12)


def test_loss_hessian_of_softmax_regression_is_the_closed_form():
    torch.manual_seed(11)
    model = nn.Linear(5, 3)
    x, y = _uneven_inputs(30), torch.arange(30) % 3
    hess = dense_hessian(model, F.cross_entropy, (x, y), mode="train", dtype=F64)
    xd = x.double()
    probs = F.softmax(model.double()(xd), -1)  # (N, 3)
    aug = torch.cat([xd, torch.ones(30, 1, dtype=F64)], 1)  # (N, 6): [x; 1]
    curv = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]  # (N, 3, 3)
    full = torch.einsum("sij,sa,sb->iajb", curv, aug, aug) / 30  # (3, 6, 3, 6)
    # Parameter order: W (3x5, row-major), then b (3).
    order = [i * 6 + a for i in range(3) for a in range(5)] + [i * 6 + 5 for i in range(3)]
    expected = full.reshape(18, 18)[order][:, order]
    torch.testing.assert_close(hess, expected, rtol=1e-10, atol=1e-12)


def test_condition_number_matches_numpy_eigenvalues():
    g = np.random.default_rng(12)
    eig = np.array([5.0, 2.0, 0.5, 1e-3, -0.25, 0.0, 1e-14])
    q, _ = np.linalg.qr(g.standard_normal((7, 7)))
    matrix = torch.from_numpy(q @ np.diag(eig) @ q.T)
    got = matrix_condition_number(matrix)
    assert got.cond == pytest.approx(5.0 / 1e-3, rel=1e-6)
    assert got.cond_pos == pytest.approx(5.0 / 1e-3, rel=1e-6)
    assert got.lambda_max == pytest.approx(5.0)
    assert got.negative_fraction == pytest.approx(1 / 7)
    assert matrix_condition_number(matrix, rel_tol=1e-3).cond == pytest.approx(5.0 / 0.25, rel=1e-6)
    with pytest.raises(ValueError, match="square"):
        matrix_condition_number(torch.zeros(2, 3))


def test_bnp_conditions_the_hessian_of_uneven_inputs():
    model = _small_mlp()
    x, y = _uneven_inputs(), torch.arange(40) % 3
    eps = get_method("bnp").hook_options["eps"]  # the eps the bnp method trains with
    result = hessian_conditioning(model, x, y, eps=eps, floors=(1e-3, 0.1))
    assert set(result) == {"all", "0", "2"}
    assert all(set(r) == {"H", php_key(1e-3), php_key(0.1)} for r in result.values())
    assert result["0"][php_key(1e-3)]["cond"] < result["0"]["H"]["cond"] / 10
    assert result["all"][php_key(1e-3)]["cond"] < result["all"]["H"]["cond"]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # untouched


def test_learning_rate_rule():
    assert scaled_lr(0.1, 64) == pytest.approx(0.1)
    assert scaled_lr(0.1, 16) == pytest.approx(0.05)
    assert scaled_lr(0.1, 1, exponent=1.0) == pytest.approx(0.1 / 64)
