"""BNP's weight-normalization option (``weight_norm``).

Oracles: the exact identity that the projected reparametrized gradient is orthogonal to
``v_i = D w_i``; autograd through the scale-invariant reparametrization
``z = ||v0_i|| v_i / ||v_i|| D^-1 (h - mu) + c`` (float64); the transform written out in NumPy
(float64) for dense, grouped and per-patch convolutions; idempotence of the projection; the
option switched off (in every spelling) giving the bits of the default.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from normlab.functional.precondition import (
    conv2d_patch_moments,
    precondition_conv2d,
    precondition_conv2d_,
    precondition_linear,
    precondition_linear_,
    weight_norm_mode,
)
from normlab.methods import get_method
from normlab.optim.preconditioner import BNPreconditioner

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _numpy_transform(gw, gb, w, mean, var, eps, floor, groups, mode):
    """The BNP transform with the weight-norm projection, row by row in float64 NumPy.

    gw, w: (C_out, K); gb: (C_out,) or None; mean, var: (groups * K,) per fan-in entry."""
    gw, w = np.array(gw, dtype=np.float64), np.array(w, dtype=np.float64)
    gb = None if gb is None else np.array(gb, dtype=np.float64)
    mean, var = np.array(mean, dtype=np.float64), np.array(var, dtype=np.float64)
    c_out, k = gw.shape
    per_group = c_out // groups
    s2 = np.maximum(var, floor) + eps
    for o in range(c_out):
        g = o // per_group
        mu, s2g = mean[g * k : (g + 1) * k], s2[g * k : (g + 1) * k]
        row = gw[o] if gb is None else gw[o] - gb[o] * mu
        row = row / s2g
        if mode != "off":
            norm2 = float(np.sum(s2g * w[o] ** 2))  # |v_o|^2, v_o = D w_o
            if norm2 > 0:
                row = row - np.sum(s2g * w[o] * row) / norm2 * w[o]
                if mode == "scaled":
                    row = row / np.sqrt(norm2)
        gw[o] = row
        if gb is not None:
            gb[o] = gb[o] - row @ mu
    return gw, gb


def _rand(shape, seed, scale=1.0, shift=0.0):
    return torch.randn(shape, generator=_gen(seed), dtype=F64) * scale + shift


# ------------------------------------------------------------------------------- the maths


@pytest.mark.parametrize("mode", [True, "project", "scaled"])
@pytest.mark.parametrize("bias", [True, False])
def test_projected_reparametrized_gradient_is_orthogonal_to_v(mode, bias):
    m, n = 7, 11
    gw, w = _rand((m, n), 0), _rand((m, n), 1)
    gb = _rand((m,), 2) if bias else None
    mean, var = _rand((n,), 3, 2.0, 1.0), _rand((n,), 4).abs() * 3 + 0.05
    new_w, _ = precondition_linear(
        gw, gb, mean, var, eps=1e-5, floor=0.1, weight_norm=mode, weight=w
    )
    s = (var.clamp_min(0.1) + 1e-5).sqrt()
    v, g_v = w * s, new_w * s  # the reparametrized weight and its gradient, row by row
    cos = (v * g_v).sum(1) / (v.norm(dim=1) * g_v.norm(dim=1))
    assert cos.abs().max() < 1e-12
    # without the option the reparametrized gradient is not orthogonal to v
    plain, _ = precondition_linear(gw, gb, mean, var, eps=1e-5, floor=0.1)
    assert ((v * plain * s).sum(1) / (v.norm(dim=1) * (plain * s).norm(dim=1))).abs().min() > 1e-3


def test_projection_is_the_gradient_of_the_scale_invariant_reparametrization():
    # BN's weight normalization: z = ||v0|| v / ||v|| D^-1 (h - mu) + c is invariant to the scale
    # of each row v; its gradient at v0, mapped back to (W, b) as BNP maps the input-normalized
    # step, is what weight_norm=True computes.
    m, n, batch = 4, 6, 9
    x = _rand((batch, n), 0, 3.0, 2.0)
    target = _rand((batch, m), 1)
    w0, b0 = _rand((m, n), 2), _rand((m,), 3)
    mean, var = x.mean(0), x.var(0, correction=0)
    d = var.sqrt()

    def loss(w, b):
        return ((x @ w.T + b - target) ** 2).sum() / batch + (x @ w.T + b).sin().sum()

    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    loss(w, b).backward()
    v0 = (w0 * d).detach()
    v, c = v0.clone().requires_grad_(), (b0 + w0 @ mean).detach().requires_grad_()
    v_eff = v0.norm(dim=1, keepdim=True) * v / v.norm(dim=1, keepdim=True)
    w_of_v = v_eff / d
    loss(w_of_v, c - w_of_v @ mean).backward()
    expected_w = v.grad / d  # the (V, c) step mapped back: W = V D^-1, b = c - W mu
    expected_b = c.grad - expected_w @ mean
    got_w, got_b = precondition_linear(
        w.grad, b.grad, mean, var, eps=0.0, floor=0.0, weight_norm=True, weight=w0
    )
    torch.testing.assert_close(got_w, expected_w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_b, expected_b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["off", "project", "scaled"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_transform_equals_the_numpy_formula(mode, bias):
    m, n = 5, 8
    gw, w = _rand((m, n), 10), _rand((m, n), 11)
    w[2] = 0.0  # a zero row: nothing to project against, left as the plain transform
    gb = _rand((m,), 12) if bias else None
    mean, var = _rand((n,), 13, 1.5, -1.0), _rand((n,), 14).abs() + 0.01
    got_w, got_b = precondition_linear(
        gw, gb, mean, var, eps=1e-4, floor=0.05, weight_norm=mode, weight=w
    )
    exp_w, exp_b = _numpy_transform(
        gw.numpy(),
        None if gb is None else gb.numpy(),
        w.numpy(),
        mean.numpy(),
        var.numpy(),
        1e-4,
        0.05,
        1,
        mode,
    )
    np.testing.assert_allclose(got_w.numpy(), exp_w, rtol=1e-12, atol=1e-13)
    if bias:
        np.testing.assert_allclose(got_b.numpy(), exp_b, rtol=1e-12, atol=1e-13)
    else:
        assert got_b is None


@pytest.mark.parametrize("mode", ["project", "scaled"])
@pytest.mark.parametrize(
    "groups,stats,bias",
    [(1, "channel", True), (2, "channel", True), (3, "patch", True), (1, "patch", False)],
)
def test_conv_transform_is_per_output_channel_numpy_formula(mode, groups, stats, bias):
    c_in, c_out, kh, kw = 6, 6, 3, 2
    gw, w = _rand((c_out, c_in // groups, kh, kw), 20), _rand((c_out, c_in // groups, kh, kw), 21)
    gb = _rand((c_out,), 22) if bias else None
    if stats == "channel":
        mean, var = _rand((c_in,), 23, 1.0, 0.5), _rand((c_in,), 24).abs() + 0.02
        mean_row = mean.repeat_interleave(kh * kw)
        var_row = var.repeat_interleave(kh * kw)
    else:
        x = _rand((2, c_in, 5, 4), 25, 2.0, 1.0)
        mean, var, _ = conv2d_patch_moments(x, (kh, kw), padding=1)
        mean_row, var_row = mean.reshape(-1), var.reshape(-1)
    got_w, got_b = precondition_conv2d(
        gw, gb, mean, var, eps=1e-5, floor=0.0, groups=groups, weight_norm=mode, weight=w
    )
    exp_w, exp_b = _numpy_transform(
        gw.reshape(c_out, -1).numpy(),
        None if gb is None else gb.numpy(),
        w.reshape(c_out, -1).numpy(),
        mean_row.numpy(),
        var_row.numpy(),
        1e-5,
        0.0,
        groups,
        mode,
    )
    np.testing.assert_allclose(got_w.reshape(c_out, -1).numpy(), exp_w, rtol=1e-11, atol=1e-12)
    if bias:
        np.testing.assert_allclose(got_b.numpy(), exp_b, rtol=1e-11, atol=1e-12)


def test_conv_channels_last_gradient_and_weight_give_the_contiguous_result():
    gw, w = _rand((4, 3, 3, 3), 30), _rand((4, 3, 3, 3), 31)
    gb = _rand((4,), 32)
    mean, var = _rand((3,), 33), _rand((3,), 34).abs() + 0.1
    expected = precondition_conv2d(gw, gb, mean, var, weight_norm=True, weight=w)
    gw_cl = gw.clone().to(memory_format=torch.channels_last)
    w_cl = w.clone().to(memory_format=torch.channels_last)
    got = precondition_conv2d_(gw_cl, gb.clone(), mean, var, weight_norm=True, weight=w_cl)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-13, atol=1e-14)


def test_projection_is_idempotent():
    # With mu = 0 and s^2 = 1 the transform is the projection alone: applying it twice is
    # applying it once, and the bias gradient is untouched.
    m, n = 6, 9
    gw, gb, w = _rand((m, n), 40), _rand((m,), 41), _rand((m, n), 42)
    zeros, ones = torch.zeros(n, dtype=F64), torch.ones(n, dtype=F64)
    kw = dict(eps=0.0, floor=0.0, weight_norm=True, weight=w)
    once = precondition_linear(gw, gb, zeros, ones, **kw)
    twice = precondition_linear(*once, zeros, ones, **kw)
    torch.testing.assert_close(twice[0], once[0], rtol=1e-13, atol=1e-14)
    assert torch.equal(once[1], gb) and torch.equal(twice[1], gb)
    assert not torch.allclose(once[0], gw)


# ----------------------------------------------------------------------- the option switched off


def _mlp_and_cnn() -> list[tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    cnn = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, groups=2),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 4),
    )
    return [(mlp, torch.randn(3, 5, 10) * 2 + 1), (cnn, torch.randn(3, 4, 3, 5, 5) + 1)]


def _train_grads(model: nn.Module, xs: torch.Tensor, **options) -> list[torch.Tensor]:
    model = copy.deepcopy(model)
    precond = BNPreconditioner(model, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    grads = []
    for x in xs:
        opt.zero_grad()
        model(x).square().mean().backward()
        precond.precondition_()
        grads += [p.grad.clone() for p in model.parameters()]
        opt.step()
    return grads


@pytest.mark.parametrize("which", [0, 1])
def test_option_off_gives_the_bits_of_the_default(which):
    model, xs = _mlp_and_cnn()[which]
    default = _train_grads(model, xs)
    for off in (False, "off"):
        got = _train_grads(model, xs, weight_norm=off)
        assert all(torch.equal(a, b) for a, b in zip(default, got, strict=True))
    # on, but for no layer: the same bits too
    names = BNPreconditioner(copy.deepcopy(model)).layer_names
    got = _train_grads(model, xs, weight_norm=True, weight_norm_modules=[])
    assert all(torch.equal(a, b) for a, b in zip(default, got, strict=True))
    on = _train_grads(model, xs, weight_norm=True, weight_norm_modules=names)
    assert not all(torch.equal(a, b) for a, b in zip(default, on, strict=True))


def test_preconditioner_applies_the_functional_transform_to_the_chosen_layers():
    model, xs = _mlp_and_cnn()[1]
    model = model.double()
    precond = BNPreconditioner(model, weight_norm="scaled", floor=0.0)
    # default: every hooked layer but the model's last Linear/Conv2d (the output layer)
    assert precond.weight_norm_layers == ("0", "2")
    x = xs[0].double()
    model(x).square().mean().backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    stats = precond.statistics(for_step=True)
    precond.precondition_()
    for name, module in (("0", model[0]), ("2", model[2])):
        exp = precondition_conv2d(
            raw[f"{name}.weight"],
            raw[f"{name}.bias"],
            stats[name].mean,
            stats[name].var,
            floor=0.0,
            groups=module.groups,
            weight_norm="scaled",
            weight=module.weight,
        )
        assert torch.equal(module.weight.grad, exp[0]) and torch.equal(module.bias.grad, exp[1])
    exp = precondition_linear(
        raw["4.weight"], raw["4.bias"], stats["4"].mean, stats["4"].var, floor=0.0
    )
    # The output layer has no projection: the fused CPU kernel (float64: within 1e-12).
    torch.testing.assert_close(model[4].weight.grad, exp[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model[4].bias.grad, exp[1], rtol=1e-12, atol=1e-12)


def test_state_dict_carries_the_option_and_old_states_load():
    model, _ = _mlp_and_cnn()[0]
    precond = BNPreconditioner(model, weight_norm="scaled")
    state = precond.state_dict()
    assert state["options"]["weight_norm"] == "scaled"
    other = BNPreconditioner(nn.Sequential(*[m for m in model]))
    assert other.weight_norm is False
    other.load_state_dict(state)
    assert other.weight_norm == "scaled"
    old = {**state, "options": {k: v for k, v in state["options"].items() if k != "weight_norm"}}
    other.load_state_dict(old)  # saved before the option existed: off
    assert other.weight_norm is False
    assert "weight_norm='scaled'" in repr(precond)
    assert precond.debias is True and state["options"]["debias"] is True
    older = {k: v for k, v in old["options"].items() if k != "debias"}
    other.load_state_dict({**state, "options": older})  # before debias existed: the plain EMA
    assert other.debias is False and "debias=False" in repr(other)


# ------------------------------------------------------------------------------ bad values


@pytest.mark.parametrize("value", ["true", "yes", 1, 0, None, 1.0])
def test_bad_option_values_raise_value_error_and_hook_nothing(value):
    model, _ = _mlp_and_cnn()[0]
    with pytest.raises(ValueError, match="weight_norm must be False, True, 'off'"):
        BNPreconditioner(model, weight_norm=value)
    with pytest.raises(ValueError, match="weight_norm must be"):
        get_method("bnp").training_hook(model, {"weight_norm": value})
    with pytest.raises(ValueError, match="weight_norm must be"):
        weight_norm_mode(value)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_bad_weight_norm_modules_raise_and_hook_nothing():
    model, _ = _mlp_and_cnn()[0]
    with pytest.raises(ValueError, match="weight_norm_modules: 'nope' is not one of the hooked"):
        BNPreconditioner(model, weight_norm=True, weight_norm_modules=["nope"])
    with pytest.raises(ValueError, match="is not one of the hooked layers"):
        BNPreconditioner(model, modules=["0"], weight_norm=True, weight_norm_modules=["2"])
    with pytest.raises(TypeError, match="not a single one"):
        BNPreconditioner(model, weight_norm=True, weight_norm_modules="0")
    with pytest.raises(TypeError, match="nn.Module or str"):
        BNPreconditioner(model, weight_norm=True, weight_norm_modules=[0])
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert BNPreconditioner(model, weight_norm_modules=[model[2]]).weight_norm_layers == ("2",)


def test_bad_load_state_dict_option_leaves_the_state_untouched():
    model, xs = _mlp_and_cnn()[0]
    precond = BNPreconditioner(model, weight_norm=True)
    model(xs[0])
    before = precond.state_dict()
    bad = {**before, "options": {**before["options"], "weight_norm": "sometimes"}}
    with pytest.raises(ValueError, match="weight_norm must be"):
        precond.load_state_dict(bad)
    after = precond.state_dict()
    assert after["options"] == before["options"]
    for name, entry in before["layers"].items():
        assert torch.equal(entry["running"]["mean"], after["layers"][name]["running"]["mean"])


def test_functional_checks_come_before_any_write():
    gw, gb, w = _rand((3, 4), 50), _rand((3,), 51), _rand((3, 4), 52)
    mean, var = _rand((4,), 53), _rand((4,), 54).abs()
    gw0, gb0 = gw.clone(), gb.clone()
    with pytest.raises(ValueError, match="needs the layer's weight"):
        precondition_linear_(gw, gb, mean, var, weight_norm=True)
    with pytest.raises(ValueError, match="weight of the gradient's shape"):
        precondition_linear_(gw, gb, mean, var, weight_norm=True, weight=w.T)
    with pytest.raises(ValueError, match="weight_norm must be"):
        precondition_linear_(gw, gb, mean, var, weight_norm="on", weight=w)
    with pytest.raises(ValueError, match="needs the layer's weight"):
        precondition_conv2d_(gw.view(3, 4, 1, 1), gb, mean, var, weight_norm="scaled")
    assert torch.equal(gw, gw0) and torch.equal(gb, gb0)


# ------------------------------------------------------------------------------ the method


def test_bnp_method_option_reaches_the_preconditioner():
    model, xs = _mlp_and_cnn()[0]
    hook = get_method("bnp").training_hook(model, {"weight_norm": True})
    assert hook.weight_norm is True and hook.weight_norm_layers == ("0", "2")
    hook.remove()
    hook = get_method("bnp").training_hook(
        model, {"weight_norm": "scaled", "weight_norm_modules": ["4"]}
    )
    assert hook.weight_norm == "scaled" and hook.weight_norm_layers == ("4",)
    hook.remove()
    assert get_method("bnp").defaults["weight_norm"] is False
