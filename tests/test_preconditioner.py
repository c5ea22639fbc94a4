"""Tests of Batch Normalization Preconditioning (BNP) against oracles.

Oracles: one SGD step on the input-normalized reparametrization of each layer, differentiated by
autograd and mapped back (docs/algorithms/bnp.md); the dense Hessian of linear least squares;
NumPy formulas for the pooled-variance EMA; torch's own ``Conv2d`` (with one-hot kernels) for the
patches a convolution sees; an uninterrupted run for the state-dict resume.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from normlab.functional import _fused
from normlab.functional.precondition import (
    RunningMoments,
    conv2d_channel_moments,
    conv2d_patch_moments,
    ema_moments,
    ema_rho,
    ema_update,
    linear_input_moments,
    precondition_conv2d,
    precondition_conv2d_,
    precondition_linear,
    precondition_linear_,
    preconditioner_factor,
    preconditioner_variance,
)
from normlab.optim.preconditioner import BNPreconditioner

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int, dtype=F64) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def _set_stats(precond: BNPreconditioner, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """Load fixed running statistics through the public state dict."""
    state = precond.state_dict()
    for name, (mean, var) in stats.items():
        state["layers"][name] = {
            "running": {"mean": mean, "var": var, "num_batches": 1},
            "before_step": None,
            "new_step": True,
        }
    precond.load_state_dict(state)


def _hook_counts(model: nn.Module) -> list[int]:
    # Forward pre-hooks (which stage an input's moments) and forward hooks (which record them).
    return [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()]


# --------------------------------------------------------------------------- running statistics


@pytest.mark.parametrize("batch", [1, 3])
def test_ema_moments_is_the_weighted_mixture(batch):
    # Closed form: after t batches the estimate is the moments of the mixture
    # rho^(t-1) P_1 + sum_{i>=2} (1-rho) rho^(t-i) Q_i, with P_1 = (m_1, v_1 or 1 if B=1).
    rho, steps, n = 0.8, 7, 4
    data = _randn(steps, batch, n, seed=0) * torch.tensor([0.5, 1.0, 3.0, 0.1], dtype=F64) + 2.0
    running = None
    for i in range(steps):
        running = ema_moments(running, linear_input_moments(data[i]), rho)
    x = data.numpy()
    weights = np.array(
        [rho ** (steps - 1)] + [(1 - rho) * rho ** (steps - i) for i in range(2, 1 + steps)]
    )
    assert np.isclose(weights.sum(), 1.0)
    first_var = x[0].var(0) if batch > 1 else np.ones(n)
    means = x.mean(1)  # (steps, n)
    mean = (weights[:, None] * means).sum(0)
    within = np.concatenate([first_var[None], x[1:].var(1)])  # (steps, n), biased
    var = (weights[:, None] * (within + (means - mean) ** 2)).sum(0)
    assert running.num_batches == steps
    np.testing.assert_allclose(running.mean.numpy(), mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(running.var.numpy(), var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch", [1, 3])
def test_debiased_ema_moments_average_the_batches_then_decay(batch):
    # debias: the (n+1)-th batch weighs max(1 - rho, 1/(n+1)); with rho = 0.8 the first 5
    # batches are averaged with equal weights (for batches of 3: the moments of their
    # concatenation), then each new batch weighs 0.2. Batch size 1 starts from variance 1.
    rho, steps, n = 0.8, 7, 4
    data = _randn(steps, batch, n, seed=1) * torch.tensor([0.5, 1.0, 3.0, 0.1], dtype=F64) - 1.0
    x = data.numpy()
    first_var = x[0].var(0) if batch > 1 else np.ones(n)
    means = x.mean(1)
    within = np.concatenate([first_var[None], x[1:].var(1)])
    running = None
    for t in range(1, steps + 1):
        running = ema_moments(running, linear_input_moments(data[t - 1]), rho, debias=True)
        equal = min(t, 5)
        weights = np.full(equal, 1.0 / equal)
        for _ in range(t - equal):
            weights = np.append(weights * rho, 1 - rho)
        mean = (weights[:, None] * means[:t]).sum(0)
        var = (weights[:, None] * (within[:t] + (means[:t] - mean) ** 2)).sum(0)
        assert running.num_batches == t
        np.testing.assert_allclose(running.mean.numpy(), mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(running.var.numpy(), var, rtol=1e-12, atol=1e-12)
        if batch > 1 and t <= 5:  # the plain moments of all samples so far
            seen = x[:t].reshape(-1, n)
            np.testing.assert_allclose(running.var.numpy(), seen.var(0), rtol=1e-12)
    assert ema_rho(rho, 10, debias=False) == rho and ema_rho(rho, 2, debias=True) == 2 / 3


def test_ema_moments_ignores_non_finite_features():
    start = RunningMoments(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]), 5)
    batch = linear_input_moments(torch.tensor([[float("nan"), 4.0], [1.0, 6.0]]))
    out = ema_moments(start, batch, 0.5)
    assert out.num_batches == 6
    assert out.mean[0] == 1.0 and out.var[0] == 3.0
    assert out.mean[1] == pytest.approx(0.5 * 2 + 0.5 * 5)
    assert out.var[1] == pytest.approx(0.5 * 4 + 0.5 * 1 + 0.25 * 9)
    init = ema_moments(None, batch, 0.5)
    assert init.mean.tolist() == [0.0, 5.0] and init.var.tolist() == [1.0, 1.0]


def test_input_moments_match_numpy():
    x = _randn(3, 5, 4, seed=1) * 2 + 1
    m = linear_input_moments(x)
    flat = x.reshape(-1, 4).numpy()
    np.testing.assert_allclose(m.mean.numpy(), flat.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.var.numpy(), flat.var(0), rtol=1e-12)
    assert m.count == 15
    img = _randn(2, 3, 5, 6, seed=2) * 3 - 1
    c = conv2d_channel_moments(img)
    arr = img.numpy().transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(c.mean.numpy(), arr.mean(1), rtol=1e-12)
    np.testing.assert_allclose(c.var.numpy(), arr.var(1), rtol=1e-12)
    assert c.count == 60
    # Unbatched inputs are one sample.
    assert torch.allclose(conv2d_channel_moments(img[0]).var, conv2d_channel_moments(img[:1]).var)


@pytest.mark.parametrize(
    "conv_kwargs",
    [
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": (2, 3), "padding": (1, 2), "stride": 2, "dilation": (2, 1)},
        {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
        {"kernel_size": (2, 2), "padding": "same", "dilation": 2},
        {"kernel_size": 3, "padding": 1, "padding_mode": "circular", "groups": 3},
    ],
)
def test_patch_statistics_are_those_of_the_patches_the_conv_sees(conv_kwargs):
    # Oracle: torch's own Conv2d with one-hot kernels outputs each patch entry (c, u, v) at every
    # position, with the layer's padding and padding mode.
    conv = nn.Conv2d(3, 6, **conv_kwargs, dtype=F64)
    precond = BNPreconditioner(conv, conv_stats="patch")
    x = _randn(2, 3, 7, 8, seed=3) + 0.5
    conv(x)
    stats = precond.statistics()[""]
    kh, kw = conv.kernel_size
    probe_kwargs = {k: v for k, v in conv_kwargs.items() if k != "groups"}
    probe = nn.Conv2d(3, 3 * kh * kw, **probe_kwargs, bias=False, dtype=F64)
    with torch.no_grad():
        probe.weight.copy_(torch.eye(3 * kh * kw, dtype=F64).reshape(3 * kh * kw, 3, kh, kw))
        patches = probe(x).transpose(0, 1).reshape(3 * kh * kw, -1)  # (C kh kw, N L)
    torch.testing.assert_close(stats.mean.flatten(), patches.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        stats.var.flatten(), patches.var(1, correction=0), rtol=1e-12, atol=1e-12
    )


# ------------------------------------------------------- reparametrization oracle (fixed stats)


def _sgd_step(params, grads, lr):
    return [p - lr * g for p, g in zip(params, grads, strict=True)]


def test_functional_linear_step_equals_reparametrized_sgd_step():
    m, n, lr, eps, floor = 4, 6, 0.3, 1e-3, 0.05
    w, b = _randn(m, n, seed=10), _randn(m, seed=11)
    h = _randn(9, n, seed=12) * 2 + 3
    target = _randn(9, m, seed=13)
    mean = _randn(n, seed=14)
    var = torch.rand(n, generator=_gen(15), dtype=F64) * 2  # some entries below the floor
    s2 = var.clamp_min(floor) + eps

    def loss_fn(z):
        return (torch.tanh(z) - target).pow(2).sum()

    w_ = w.clone().requires_grad_()
    b_ = b.clone().requires_grad_()
    loss_fn(h @ w_.T + b_).backward()
    gw, gb = precondition_linear(w_.grad, b_.grad, mean, var, eps=eps, floor=floor)
    w_new, b_new = w - lr * gw, b - lr * gb

    # Oracle: z = V D^{-1}(h - mu) + c with V = W D, c = b + W mu; SGD on (V, c); map back.
    s = s2.sqrt()
    v = (w * s).requires_grad_()
    c = (b + w @ mean).requires_grad_()
    loss_fn(((h - mean) / s) @ v.T + c).backward()
    v_new, c_new = _sgd_step([v.detach(), c.detach()], [v.grad, c.grad], lr)
    w_ref = v_new / s
    b_ref = c_new - w_ref @ mean
    torch.testing.assert_close(w_new, w_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(b_new, b_ref, rtol=0, atol=1e-10)
    assert (w_new - w).abs().max() > 1e-3  # the step is not trivially zero


def test_preconditioner_linear_step_equals_reparametrized_sgd_step():
    # Through the class: fixed loaded statistics, recording paused, two layers with a nonlinearity.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    eps, floor, lr = 1e-4, 0.0, 0.2
    precond = BNPreconditioner(model, eps=eps, floor=floor)
    stats = {
        "0": (_randn(5, seed=20) * 2, torch.rand(5, generator=_gen(21), dtype=F64) * 3 + 0.1),
        "2": (_randn(4, seed=22), torch.rand(4, generator=_gen(23), dtype=F64) + 0.2),
    }
    _set_stats(precond, stats)
    x, y = _randn(7, 5, seed=24) * 3 + 1, _randn(7, 3, seed=25)
    params0 = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with precond.paused():
        F.mse_loss(model(x), y).backward()
    assert precond.precondition_() == ["0", "2"]
    opt.step()

    # Oracle: both layers input-normalized, as leaves (V1, c1, V2, c2).
    s = {k: (v + eps).sqrt() for k, (_, v) in stats.items()}
    mu = {k: mean for k, (mean, _) in stats.items()}
    w1, b1, w2, b2 = params0
    leaves = [w1 * s["0"], b1 + w1 @ mu["0"], w2 * s["2"], b2 + w2 @ mu["2"]]
    leaves = [t.clone().requires_grad_() for t in leaves]
    v1, c1, v2, c2 = leaves
    hidden = torch.tanh(((x - mu["0"]) / s["0"]) @ v1.T + c1)
    out = ((hidden - mu["2"]) / s["2"]) @ v2.T + c2
    F.mse_loss(out, y).backward()
    v1n, c1n, v2n, c2n = _sgd_step([t.detach() for t in leaves], [t.grad for t in leaves], lr)
    w1n, w2n = v1n / s["0"], v2n / s["2"]
    expected = [w1n, c1n - w1n @ mu["0"], w2n, c2n - w2n @ mu["2"]]
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-10)


def _grouped_scale(w: torch.Tensor, s: torch.Tensor, groups: int) -> torch.Tensor:
    # w[o, c', u, v] * s[group(o) * Cg + c'], written as a loop over output channels.
    c_out, cg = w.shape[:2]
    out = torch.empty_like(w)
    for o in range(c_out):
        g = o // (c_out // groups)
        out[o] = w[o] * s[g * cg : (g + 1) * cg, None, None]
    return out


@pytest.mark.parametrize(
    "conv_kwargs",
    [
        {"kernel_size": 3},
        {"kernel_size": (2, 3), "stride": 2, "dilation": (1, 2)},
        {"kernel_size": 3, "groups": 2},
        {"kernel_size": 2, "groups": 4},  # depthwise
    ],
)
def test_conv_channel_step_equals_reparametrized_sgd_step(conv_kwargs):
    # Per-channel statistics, padding=0: SGD on conv(D^{-1}(x - mu), V) + c, mapped back.
    groups = conv_kwargs.get("groups", 1)
    conv = nn.Conv2d(4, 8, **conv_kwargs, dtype=F64)
    eps, lr = 1e-3, 0.1
    precond = BNPreconditioner(conv, eps=eps, floor=0.0)
    mean = _randn(4, seed=30) * 2
    var = torch.rand(4, generator=_gen(31), dtype=F64) * 4 + 0.1
    _set_stats(precond, {"": (mean, var)})
    x = _randn(3, 4, 8, 9, seed=32) * 2 + 1
    w0, b0 = conv.weight.detach().clone(), conv.bias.detach().clone()
    with precond.paused():
        weights = _randn(*conv(x).shape, seed=33)

    def loss_fn(z):
        return (torch.tanh(z) * weights).sum()

    with precond.paused():
        loss_fn(conv(x)).backward()
    precond.precondition_()
    torch.optim.SGD(conv.parameters(), lr=lr).step()

    s = (var + eps).sqrt()
    kh, kw = conv.kernel_size
    span = ((kh - 1) * conv.dilation[0] + 1, (kw - 1) * conv.dilation[1] + 1)
    mu_img = mean[None, :, None, None].expand(1, 4, *span)  # a constant image of mu_c

    def shift(w):  # sum_{c,u,v} W[o,c,u,v] mu_c, computed by the convolution itself
        return F.conv2d(mu_img, w, dilation=conv.dilation, groups=groups).reshape(-1)

    v = _grouped_scale(w0, s, groups).requires_grad_()
    c = (b0 + shift(w0)).requires_grad_()
    xhat = (x - mean[None, :, None, None]) / s[None, :, None, None]
    z = F.conv2d(xhat, v, c, stride=conv.stride, dilation=conv.dilation, groups=groups)
    loss_fn(z).backward()
    v_new, c_new = _sgd_step([v.detach(), c.detach()], [v.grad, c.grad], lr)
    w_ref = _grouped_scale(v_new, 1 / s, groups)
    b_ref = c_new - shift(w_ref)
    torch.testing.assert_close(conv.weight.detach(), w_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(conv.bias.detach(), b_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("padding", [0, 1])
def test_conv_patch_step_equals_reparametrized_sgd_step(padding):
    # Per-patch statistics: the conv is V D^{-1}(patch - mu) + c on every unfolded patch; exact for
    # padding 0 and also with zero padding (the padded zeros are part of the patches).
    conv = nn.Conv2d(3, 5, (3, 2), padding=padding, stride=(1, 2), dtype=F64)
    eps, lr = 1e-3, 0.1
    precond = BNPreconditioner(conv, eps=eps, floor=0.0, conv_stats="patch")
    mean = _randn(3, 3, 2, seed=40)
    var = torch.rand(3, 3, 2, generator=_gen(41), dtype=F64) * 3 + 0.05
    _set_stats(precond, {"": (mean, var)})
    x = _randn(2, 3, 7, 6, seed=42) * 2 - 1
    w0, b0 = conv.weight.detach().clone(), conv.bias.detach().clone()
    with precond.paused():
        out_shape = conv(x).shape
    weights = _randn(*out_shape, seed=43)

    def loss_fn(z):
        return (torch.tanh(z) * weights).sum()

    with precond.paused():
        loss_fn(conv(x)).backward()
    precond.precondition_()
    torch.optim.SGD(conv.parameters(), lr=lr).step()

    s = (var + eps).sqrt().flatten()  # (C kh kw,)
    mu = mean.flatten()
    cols = F.unfold(x, conv.kernel_size, padding=padding, stride=conv.stride)  # (N, C kh kw, L)
    xhat = (cols - mu[None, :, None]) / s[None, :, None]
    v = (w0.flatten(1) * s).requires_grad_()
    c = (b0 + w0.flatten(1) @ mu).requires_grad_()
    z = (v @ xhat + c[None, :, None]).reshape(out_shape)
    loss_fn(z).backward()
    v_new, c_new = _sgd_step([v.detach(), c.detach()], [v.grad, c.grad], lr)
    w_ref = v_new / s
    b_ref = c_new - w_ref @ mu
    torch.testing.assert_close(conv.weight.detach().flatten(1), w_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(conv.bias.detach(), b_ref, rtol=0, atol=1e-10)


def test_conv_per_channel_statistics_broadcast_like_per_patch():
    # Per-channel statistics are per-patch statistics constant over (u, v), groups included.
    gw, gb = _randn(6, 2, 3, 3, seed=50), _randn(6, seed=51)
    mean, var = _randn(4, seed=52), torch.rand(4, generator=_gen(53), dtype=F64) + 0.5
    a = precondition_conv2d(gw, gb, mean, var, eps=1e-5, floor=0.1, groups=2)
    patch_mean = mean[:, None, None].expand(4, 3, 3)
    patch_var = var[:, None, None].expand(4, 3, 3)
    b = precondition_conv2d(gw, gb, patch_mean, patch_var, eps=1e-5, floor=0.1, groups=2)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=1e-14, atol=1e-14)


# ---------------------------------------------------------------- degenerate case: mu=0, var=1


def _make_mlp(seed: int, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


@pytest.mark.parametrize("optim_name", ["sgd", "adam"])
def test_whitened_statistics_give_the_base_optimizer(optim_name):
    make_opt = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    }[optim_name]
    plain, bnp = _make_mlp(1), _make_mlp(1)
    opt_plain, opt_bnp = make_opt(plain.parameters()), make_opt(bnp.parameters())
    precond = BNPreconditioner(bnp, eps=1e-300, floor=0.0)  # eps underflows to 0 in float32
    _set_stats(precond, {n: (torch.zeros(k), torch.ones(k)) for n, k in (("0", 6), ("2", 8))})
    handle = precond.attach(opt_bnp) if optim_name == "adam" else None
    for step in range(4):
        x, y = _randn(5, 6, seed=60 + step, dtype=torch.float32), torch.tensor([0, 1, 2, 0, 1])
        for model, opt in ((plain, opt_plain), (bnp, opt_bnp)):
            opt.zero_grad()
            with precond.paused():
                F.cross_entropy(model(x), y).backward()
            if model is bnp and handle is None:
                assert precond.precondition_() == ["0", "2"]
            opt.step()
    for p, q in zip(plain.parameters(), bnp.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not torch.equal(plain[0].weight, _make_mlp(1)[0].weight)  # it did train


# ------------------------------------------------------------------------------- conditioning


def test_preconditioned_least_squares_hessian_is_better_conditioned():
    n, count = 5, 400
    means = torch.tensor([3.0, -1.0, 0.5, 10.0, 0.0], dtype=F64)
    scales = torch.tensor([0.1, 5.0, 1.0, 2.0, 0.3], dtype=F64)
    x = _randn(count, n, seed=70) * scales + means
    y = _randn(count, seed=71)
    layer = nn.Linear(n, 1, dtype=F64)
    precond = BNPreconditioner(layer)
    layer(x)  # one full batch: the statistics are the data's exact (biased) moments
    stats = precond.statistics()[""]

    def loss(theta):
        return 0.5 * (x @ theta[:n] + theta[n] - y).pow(2).mean()

    theta0 = torch.zeros(n + 1, dtype=F64)
    hess = torch.autograd.functional.hessian(loss, theta0)  # dense Hessian, (n+1, n+1)
    p = preconditioner_factor(stats.mean, stats.var, eps=1e-300, floor=0.0)
    hess_pre = p.T @ hess @ p

    def cond(mat):
        eig = torch.linalg.eigvalsh(mat)
        return (eig.max() / eig.min()).item()

    # Exact: P^T H P is the inputs' correlation matrix, augmented by a decoupled 1.
    cov = torch.from_numpy(np.cov(x.numpy(), rowvar=False, bias=True))
    d = cov.diagonal().rsqrt()
    expected = torch.zeros(n + 1, n + 1, dtype=F64)
    expected[:n, :n] = d[:, None] * cov * d[None, :]
    expected[n, n] = 1.0
    torch.testing.assert_close(hess_pre, expected, rtol=1e-9, atol=1e-9)
    assert cond(hess_pre) < cond(hess) / 100
    # P P^T is the preconditioner precondition_linear applies to each output unit's [w; b].
    g = _randn(3, n + 1, seed=72)
    gw, gb = precondition_linear(g[:, :n], g[:, n], stats.mean, stats.var, eps=1e-300, floor=0.0)
    torch.testing.assert_close(torch.cat([gw, gb[:, None]], 1), g @ (p @ p.T).T)


def test_preconditioner_factor_inverts_the_diagonal_augmented_second_moment():
    mean, var = _randn(4, seed=80), torch.rand(4, generator=_gen(81), dtype=F64) + 0.1
    p = preconditioner_factor(mean, var, eps=0.01, floor=0.3)
    s2 = preconditioner_variance(var, eps=0.01, floor=0.3)
    second = torch.zeros(5, 5, dtype=F64)
    second[:4, :4] = torch.diag(s2) + torch.outer(mean, mean)
    second[:4, 4] = second[4, :4] = mean
    second[4, 4] = 1.0
    torch.testing.assert_close(p @ p.T @ second, torch.eye(5, dtype=F64), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------ batch size 1


def test_batch_size_one_trains_and_statistics_converge():
    g = _gen(90)
    means = torch.tensor([3.0, -2.0, 0.5])
    stds = torch.tensor([0.2, 1.0, 5.0])
    data = torch.randn(600, 3, generator=g) * stds + means
    z = (data - means) / stds
    target = (torch.sin(z[:, :1]) + 0.5 * z[:, 1:2] * z[:, 2:3]).detach()
    torch.manual_seed(90)
    model = nn.Sequential(
        nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1)
    )
    precond = BNPreconditioner(model, rho=0.99)
    opt = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.5)
    precond.attach(opt)

    def full_loss():
        with torch.no_grad():
            return F.mse_loss(model(data), target).item()  # eval mode not needed: no BN layers

    with precond.paused():
        before = full_loss()
    for i in range(600):
        opt.zero_grad()
        loss = F.mse_loss(model(data[i : i + 1]), target[i : i + 1])
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    with precond.paused():
        after = full_loss()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert after < 0.6 * before
    stats = precond.statistics()
    assert set(stats) == {"0", "2", "4"}
    assert all(s.num_batches == 600 for s in stats.values())
    first = stats["0"]
    # EMA over ~200 effective samples: the mean is within ~0.07 std; 5 standard errors allowed.
    assert ((first.mean - data.mean(0)).abs() / data.std(0) < 0.35).all(), first.mean
    ratio = first.var / data.var(0, correction=0)
    assert ((ratio > 0.6) & (ratio < 1.6)).all(), ratio


def test_rho_default_depends_on_the_first_batch_size():
    for batch, rho in ((1, 0.999), (4, 0.999), (64, 0.99)):
        model = _make_mlp(0)
        precond = BNPreconditioner(model)
        assert precond.rho is None
        model(torch.zeros(batch, 6))
        assert precond.rho == rho
    precond = BNPreconditioner(_make_mlp(0), rho=0.9)
    assert precond.rho == 0.9


# ------------------------------------------------------------------- statistics used per step


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_use_current_batch_false_uses_only_earlier_batches(fused):
    with _fused.use(fused):
        _check_use_current_batch_false(fused)


def _check_use_current_batch_false(fused: bool) -> None:
    # The reference path gives the functional transform's bits; the fused kernel (float32)
    # agrees within 1e-6.
    tol = {"rtol": 1e-6, "atol": 1e-6} if fused else {"rtol": 0, "atol": 0}
    model = _make_mlp(3)
    precond = BNPreconditioner(model, rho=0.5, floor=1e-3, use_current_batch=False)
    x1, x2 = (
        _randn(4, 6, seed=100, dtype=torch.float32),
        _randn(4, 6, seed=101, dtype=torch.float32),
    )
    model(x1).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    assert precond.precondition_() == []  # no earlier batch yet: gradients untouched
    assert all(torch.equal(p.grad, q) for p, q in zip(model.parameters(), grads, strict=True))
    first = precond.statistics()["0"]
    model.zero_grad()
    model(x2).sum().backward()
    assert precond.statistics()["0"].num_batches == 2
    used = precond.statistics(for_step=True)["0"]
    assert used.num_batches == 1 and torch.equal(used.mean, first.mean)
    gw, gb = model[0].weight.grad.clone(), model[0].bias.grad.clone()
    precond.precondition_()
    ew, eb = precondition_linear(gw, gb, first.mean, first.var, eps=1e-5, floor=1e-3)
    torch.testing.assert_close(model[0].weight.grad, ew, **tol)
    torch.testing.assert_close(model[0].bias.grad, eb, **tol)
    # With the default, the current batch is folded in first.
    model_b = _make_mlp(3)
    precond_b = BNPreconditioner(model_b, rho=0.5)
    model_b(x1)
    model_b(x2)
    assert precond_b.statistics(for_step=True)["0"].num_batches == 2


def test_layers_without_grad_or_statistics_are_skipped():
    model = _make_mlp(4)
    precond = BNPreconditioner(model)
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    model(torch.randn(3, 6)).sum().backward()
    assert precond.precondition_() == ["2"]
    # A layer that never ran has no statistics: its gradient is left alone.
    fresh = _make_mlp(4)
    precond_fresh = BNPreconditioner(fresh)
    with precond_fresh.paused():
        fresh(torch.randn(3, 6)).sum().backward()
    grads = [p.grad.clone() for p in fresh.parameters()]
    assert precond_fresh.precondition_() == []
    assert all(torch.equal(p.grad, g) for p, g in zip(fresh.parameters(), grads, strict=True))


def test_layer_without_bias_warns_and_only_rescales(caplog):
    layer = nn.Linear(4, 3, bias=False, dtype=F64)
    with caplog.at_level(logging.WARNING, logger="normlab.optim.preconditioner"):
        precond = BNPreconditioner(layer, floor=0.0, eps=1e-5)
    assert any("no bias" in r.message for r in caplog.records)
    x = _randn(6, 4, seed=110) * 2 + 5
    layer(x).pow(2).sum().backward()
    grad = layer.weight.grad.clone()
    precond.precondition_()
    var = x.var(0, correction=0)
    torch.testing.assert_close(layer.weight.grad, grad / (var + 1e-5))


def test_preconditioning_keeps_grad_identity_and_dtype():
    model = _make_mlp(5)
    precond = BNPreconditioner(model)
    model(torch.randn(4, 6)).sum().backward()
    ids = [id(p.grad) for p in model.parameters()]
    precond.precondition_()
    assert ids == [id(p.grad) for p in model.parameters()]
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


# ------------------------------------------------------------------- once per backward


def _expected_sgd(params, grads, stats, lr, floor=0.0, eps=1e-5):
    # Oracle: plain SGD with precondition_linear applied once to each layer's raw gradients.
    w1, b1, w2, b2 = params
    g1 = precondition_linear(grads[0], grads[1], *stats["0"], eps=eps, floor=floor)
    g2 = precondition_linear(grads[2], grads[3], *stats["2"], eps=eps, floor=floor)
    return [p - lr * g for p, g in zip(params, (*g1, *g2), strict=True)]


def _raw(model):
    return [p.detach().clone() for p in model.parameters()], [
        p.grad.clone() for p in model.parameters()
    ]


def test_attach_plus_manual_call_preconditions_once(caplog):
    model = _make_mlp(11, F64)
    precond = BNPreconditioner(model, floor=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    precond.attach(opt)
    x, y = _randn(5, 6, seed=140) * 0.1 + 3, torch.tensor([0, 1, 2, 0, 1])
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    params, grads = _raw(model)
    stats = {k: (v.mean, v.var) for k, v in precond.statistics().items()}
    assert precond.precondition_() == ["0", "2"]
    with caplog.at_level(logging.DEBUG, logger="normlab.optim.preconditioner"):
        assert precond.precondition_() == []  # a second manual call: no-op
        opt.step()  # the step pre-hook's call: no-op
    assert any("already preconditioned" in r.message for r in caplog.records)
    expected = _expected_sgd(params, grads, stats, lr=0.1)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-12)


def test_gradient_accumulation_is_preconditioned_once_at_the_step():
    model = _make_mlp(12, F64)
    precond = BNPreconditioner(model, floor=0.0, rho=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    precond.attach(opt)
    x1, x2 = _randn(4, 6, seed=141) * 2 + 1, _randn(3, 6, seed=142) - 2
    opt.zero_grad()
    model(x1).pow(2).sum().backward()
    model(x2).pow(2).sum().backward()  # accumulated into the same .grad
    params, grads = _raw(model)
    stats = precond.statistics()
    assert stats["0"].num_batches == 2  # both micro-batches are in the statistics
    precond.precondition_()
    opt.step()
    expected = _expected_sgd(params, grads, {k: (v.mean, v.var) for k, v in stats.items()}, lr=0.05)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-12)


def test_new_gradients_in_the_same_tensors_are_preconditioned_again():
    # zero_grad(set_to_none=False) keeps the .grad tensors: each backward writes them anew.
    model = _make_mlp(13, F64)
    precond = BNPreconditioner(model, floor=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ids = None
    for step in range(3):
        opt.zero_grad(set_to_none=False)
        model(_randn(4, 6, seed=150 + step)).pow(2).sum().backward()
        params, grads = _raw(model)
        stats = {k: (v.mean, v.var) for k, v in precond.statistics().items()}
        assert precond.precondition_() == ["0", "2"]
        assert precond.precondition_() == []
        opt.step()
        expected = _expected_sgd(params, grads, stats, lr=0.05)
        for p, e in zip(model.parameters(), expected, strict=True):
            torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-12)
        if ids is not None:
            assert ids == [id(p.grad) for p in model.parameters()]
        ids = [id(p.grad) for p in model.parameters()]


def test_no_op_call_does_not_end_the_step():
    # use_current_batch=False: a skipped call must not mark the end of a step, so forwards before
    # and after it belong to the same step and the step keeps its statistics.
    model = _make_mlp(14, F64)
    precond = BNPreconditioner(model, rho=0.5, floor=0.0, use_current_batch=False)
    for seed in (160, 161):
        model.zero_grad()
        model(_randn(4, 6, seed=seed)).sum().backward()
        precond.precondition_()
    model(_randn(4, 6, seed=162))  # the first forward of the next step
    assert precond.precondition_() == []  # the gradients are still the preconditioned ones
    model(_randn(4, 6, seed=163))
    used = precond.statistics(for_step=True)["0"]
    assert used.num_batches == 2 and precond.statistics()["0"].num_batches == 4


# ------------------------------------------------------------------------------ default floor


def test_default_floor_bounds_the_amplification_of_constant_inputs():
    # Input 0 is constant (variance 0): its weight gradient is amplified 1 / (floor + eps) times,
    # with floor 0.1, the default the bnp method trains with (docs/algorithms/bnp.md).
    layer = nn.Linear(3, 2, dtype=F64)
    precond = BNPreconditioner(layer)
    assert precond.floor == 0.1
    x = _randn(8, 3, seed=170) * 2
    x[:, 0] = 1.0
    layer(x).pow(2).sum().backward()
    gw, gb = layer.weight.grad.clone(), layer.bias.grad.clone()
    precond.precondition_()
    var = x.var(0, correction=0)
    ew, eb = precondition_linear(gw, gb, x.mean(0), var, eps=1e-5, floor=0.1)
    torch.testing.assert_close(layer.weight.grad, ew, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, eb, rtol=1e-12, atol=1e-12)
    scale = 1 / (0.1 + 1e-5)
    torch.testing.assert_close(layer.weight.grad[:, 0], (gw[:, 0] - gb) * scale)


# ------------------------------------------------------------------- functional variants


def test_in_place_transforms_equal_the_out_of_place_ones():
    gw, gb = _randn(5, 7, seed=180), _randn(5, seed=181)
    mean, var = _randn(7, seed=182), torch.rand(7, generator=_gen(183), dtype=F64)
    ref_w, ref_b = precondition_linear(gw, gb, mean, var, eps=1e-4, floor=0.2)
    assert not torch.equal(ref_w, gw)  # the inputs of the out-of-place form are left alone
    w, b = gw.clone(), gb.clone()
    out = precondition_linear_(w, b, mean, var, eps=1e-4, floor=0.2)
    assert out[0] is w and out[1] is b
    assert torch.equal(w, ref_w) and torch.equal(b, ref_b)
    # Conv: a channels_last gradient gives the bits of a contiguous one, for per-channel and
    # per-patch statistics and grouped convolutions.
    for groups, patch in ((1, False), (2, True), (4, False)):
        cw, cb = _randn(8, 4 // groups, 3, 2, seed=184), _randn(8, seed=185)
        shape = (4, 3, 2) if patch else (4,)
        m = _randn(*shape, seed=186)
        v = torch.rand(*shape, generator=_gen(187), dtype=F64)
        ref = precondition_conv2d(cw, cb, m, v, eps=1e-4, floor=0.2, groups=groups)
        last = cw.clone().to(memory_format=torch.channels_last)
        bias = cb.clone()
        precondition_conv2d_(last, bias, m, v, eps=1e-4, floor=0.2, groups=groups)
        assert last.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(last, ref[0]) and torch.equal(bias, ref[1])


def test_ema_update_is_the_pooled_variance_formula_elementwise():
    rho = 0.7
    mean, var = _randn(2, 3, seed=190), torch.rand(2, 3, generator=_gen(191), dtype=F64)
    m_b, v_b = _randn(2, 3, seed=192), torch.rand(2, 3, generator=_gen(193), dtype=F64)
    m_b[1, 2] = float("inf")
    new_mean, new_var = ema_update(mean, var, m_b, v_b, rho)
    a, b, c, d = (t.numpy() for t in (mean, var, m_b, v_b))
    with np.errstate(invalid="ignore"):
        want_mean = rho * a + (1 - rho) * c
        want_var = rho * b + (1 - rho) * d + rho * (1 - rho) * (c - a) ** 2
    want_mean[1, 2], want_var[1, 2] = a[1, 2], b[1, 2]  # a non-finite entry keeps its value
    np.testing.assert_allclose(new_mean.numpy(), want_mean, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(new_var.numpy(), want_var, rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match="rho"):
        ema_update(mean, var, m_b, v_b, 1.0)
    with pytest.raises(ValueError, match="must match"):
        ema_update(mean, var, m_b[0], v_b[0], rho)


def test_linear_input_moments_of_an_input_that_requires_grad():
    x = (_randn(6, 3, seed=195) * 2 + 1).requires_grad_()
    m = linear_input_moments(x)
    ref = linear_input_moments(x.detach())
    torch.testing.assert_close(m.mean, ref.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.var, ref.var, rtol=1e-12, atol=1e-12)
    m.var.sum().backward()  # d/dx sum_j Var[x_j] = 2 (x - mean) / M
    torch.testing.assert_close(x.grad, 2 * (x.detach() - ref.mean) / 6)


# ----------------------------------------------------------------------- forward and inference


def test_forward_and_eval_outputs_are_unchanged():
    plain, hooked = _make_cnn(7), _make_cnn(7)
    precond = BNPreconditioner(hooked, conv_stats="patch")
    x = _randn(3, 2, 6, 6, seed=120, dtype=torch.float32)
    assert torch.equal(plain(x), hooked(x))  # training forward: recorded, output identical
    assert precond.statistics()["0"].num_batches == 1
    plain.eval(), hooked.eval()
    assert torch.equal(plain(x), hooked(x))
    assert precond.statistics()["0"].num_batches == 1  # eval forwards are never recorded
    assert [type(m) for m in plain.modules()] == [type(m) for m in hooked.modules()]


def test_paused_records_nothing_and_restores_on_exception():
    model = _make_mlp(8)
    precond = BNPreconditioner(model)
    with precond.paused():
        with precond.paused():
            model(torch.randn(2, 6))
        model(torch.randn(2, 6))
        assert not precond.recording
    assert precond.statistics() == {}
    with pytest.raises(RuntimeError, match="boom"):
        with precond.paused():
            raise RuntimeError("boom")
    assert precond.recording
    model(torch.randn(2, 6))
    assert precond.statistics()["0"].num_batches == 1


# ------------------------------------------------------------------------------- state dict


def _make_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )


@pytest.mark.parametrize(
    "options",
    [{}, {"use_current_batch": False, "conv_stats": "patch", "rho": 0.7, "debias": False}],
    ids=["default", "previous-batch-patch-plain-ema"],
)
def test_state_dict_resume_runs_in_lockstep(options):
    g = _gen(130)
    batches = [(torch.randn(4, 2, 6, 6, generator=g), torch.randint(0, 3, (4,), generator=g))]
    batches += [
        (torch.randn(4, 2, 6, 6, generator=g), torch.randint(0, 3, (4,), generator=g))
        for _ in range(9)
    ]

    def train(model, opt, precond, chunk):
        for x, y in chunk:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            precond.precondition_()
            opt.step()

    model = _make_cnn(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    precond = BNPreconditioner(model, **options)
    train(model, opt, precond, batches[:5])
    saved = copy.deepcopy(
        {"model": model.state_dict(), "opt": opt.state_dict(), "pre": precond.state_dict()}
    )
    train(model, opt, precond, batches[5:])

    resumed = _make_cnn(1)  # different initialization, default options: all comes from the state
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9)
    precond2 = BNPreconditioner(resumed)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    precond2.load_state_dict(saved["pre"])
    assert precond2.state_dict()["options"] == precond.state_dict()["options"]
    precond2.attach(opt2)  # the step pre-hook path, same semantics as precondition_()
    for x, y in batches[5:]:
        opt2.zero_grad()
        F.cross_entropy(resumed(x), y).backward()
        opt2.step()
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    for name, stats in precond.statistics().items():
        other = precond2.statistics()[name]
        assert torch.equal(stats.mean, other.mean) and torch.equal(stats.var, other.var)
        assert stats.num_batches == other.num_batches == 10


def test_state_dict_is_keyed_by_module_name_and_copies():
    model = _make_cnn(2)
    precond = BNPreconditioner(model, conv_stats="patch")
    model(torch.randn(2, 2, 6, 6))
    state = precond.state_dict()
    assert list(state["layers"]) == ["0", "2", "5", "7"]
    assert state["layers"]["0"]["running"]["mean"].shape == (2, 3, 3)
    assert state["layers"]["2"]["running"]["mean"].shape == (4, 3, 3)
    state["layers"]["0"]["running"]["mean"].add_(1.0)
    assert not torch.equal(precond.statistics()["0"].mean, state["layers"]["0"]["running"]["mean"])


def _bad_states(good: dict) -> list[tuple[dict, type[Exception]]]:
    out = []

    def variant(fn, exc):
        s = copy.deepcopy(good)
        fn(s)
        out.append((s, exc))

    variant(lambda s: s.pop("options"), ValueError)
    variant(lambda s: s.update(version=99), ValueError)
    variant(lambda s: s["options"].update(rho=1.5), ValueError)
    variant(lambda s: s["options"].update(conv_stats="pixel"), ValueError)
    variant(lambda s: s["options"].update(debias="yes"), TypeError)
    variant(lambda s: s["layers"].pop("0"), ValueError)
    variant(lambda s: s["layers"].update(extra=s["layers"]["0"]), ValueError)
    variant(lambda s: s["layers"]["7"]["running"].update(mean=torch.zeros(3)), ValueError)
    variant(lambda s: s["layers"]["7"]["running"].update(var=-torch.ones(8)), ValueError)
    variant(lambda s: s["layers"]["7"]["running"].update(num_batches=0), ValueError)
    variant(lambda s: s["layers"]["7"].update(new_step="yes"), TypeError)
    # Options switch the conv statistics to per patch: the per-channel tensors no longer fit.
    variant(lambda s: s["options"].update(conv_stats="patch"), ValueError)
    return out


def test_bad_load_state_dict_leaves_state_and_hooks_untouched():
    model = _make_cnn(3)
    precond = BNPreconditioner(model, rho=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    precond.attach(opt)
    model(torch.randn(2, 2, 6, 6))
    good = precond.state_dict()
    hooks = _hook_counts(model)
    step_hooks = len(opt._optimizer_step_pre_hooks)
    for bad, exc in _bad_states(good):
        with pytest.raises(exc):
            precond.load_state_dict(bad)
        after = precond.state_dict()
        assert after["options"] == good["options"] and after["rho_resolved"] == 0.9
        for name, entry in good["layers"].items():
            assert torch.equal(after["layers"][name]["running"]["mean"], entry["running"]["mean"])
        assert _hook_counts(model) == hooks
        assert len(opt._optimizer_step_pre_hooks) == step_hooks
    # strict=False loads the matching layers and reports the rest.
    partial = copy.deepcopy(good)
    partial["layers"].pop("0")
    partial["layers"]["7"]["running"]["mean"] += 1
    result = precond.load_state_dict(partial, strict=False)
    assert result.missing_keys == ["0"] and result.unexpected_keys == []
    torch.testing.assert_close(
        precond.statistics()["7"].mean, good["layers"]["7"]["running"]["mean"] + 1
    )
    # A missing conv layer whose statistics no longer fit the loaded conv_stats is cleared.
    patch = copy.deepcopy(partial)
    patch["options"]["conv_stats"] = "patch"
    patch["layers"]["2"]["running"] = None
    patch["layers"]["2"]["before_step"] = None
    precond.load_state_dict(patch, strict=False)
    assert set(precond.statistics()) == {"5", "7"}


# ------------------------------------------------------------------------------ hooks, errors


def test_remove_detaches_every_hook_and_keeps_foreign_ones():
    model = _make_cnn(4)
    foreign = model[0].register_forward_pre_hook(lambda m, a: None)
    before = _hook_counts(model)
    opt_a = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_b = torch.optim.Adam(model.parameters())
    precond = BNPreconditioner(model)
    assert _hook_counts(model) != before
    handle_a = precond.attach(opt_a)
    precond.attach(opt_b)
    with pytest.raises(ValueError, match="already attached"):
        precond.attach(opt_a)
    handle_a.remove()
    assert len(opt_a._optimizer_step_pre_hooks) == 0
    handle_a2 = precond.attach(opt_a)  # re-attaching after remove() is allowed
    handle_a.remove()  # a stale handle does not detach the new attachment
    with pytest.raises(ValueError, match="already attached"):
        precond.attach(opt_a)
    handle_a = handle_a2
    assert len(opt_a._optimizer_step_pre_hooks) == 1 == len(opt_b._optimizer_step_pre_hooks)
    precond.remove()
    precond.remove()  # idempotent
    assert _hook_counts(model) == before
    assert len(model[0]._forward_pre_hooks) == 1  # the foreign hook survives
    assert len(opt_a._optimizer_step_pre_hooks) == 0 == len(opt_b._optimizer_step_pre_hooks)
    handle_a.remove()  # removing an already removed handle is harmless
    model(torch.randn(2, 2, 6, 6))
    assert precond.statistics() == {}
    for call in (precond.precondition_, lambda: precond.attach(opt_a)):
        with pytest.raises(RuntimeError, match="remove"):
            call()
    foreign.remove()


def test_attach_handle_as_context_manager():
    model = _make_mlp(5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    precond = BNPreconditioner(model)
    with precond.attach(opt):
        assert len(opt._optimizer_step_pre_hooks) == 1
    assert len(opt._optimizer_step_pre_hooks) == 0


def test_failing_forward_leaks_no_hook_and_records_nothing():
    model = _make_mlp(6)
    precond = BNPreconditioner(model)
    hooks = _hook_counts(model)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):  # the layer's own error
        model(torch.randn(2, 5))
    assert precond.statistics() == {}
    assert _hook_counts(model) == hooks
    with pytest.raises(ValueError, match="in the middle"):
        with precond.paused():
            raise ValueError("in the middle")
    model(torch.randn(2, 6))
    assert precond.statistics()["0"].num_batches == 1
    precond.remove()
    assert sum(_hook_counts(model)) == 0


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"rho": 0.0}, ValueError, "rho"),
        ({"rho": 1.0}, ValueError, "rho"),
        ({"rho": float("nan")}, ValueError, "rho"),
        ({"eps": 0.0}, ValueError, "eps"),
        ({"eps": -1e-5}, ValueError, "eps"),
        ({"floor": -1.0}, ValueError, "floor"),
        ({"conv_stats": "pixel"}, ValueError, "conv_stats"),
        ({"use_current_batch": 1}, TypeError, "use_current_batch"),
        ({"modules": ["nope"]}, ValueError, "nope"),
        ({"modules": ["1"]}, TypeError, "ReLU"),
        ({"modules": []}, ValueError, "empty"),
        ({"modules": ["0", "0"]}, ValueError, "twice"),
        ({"modules": [nn.Linear(2, 2)]}, ValueError, "not part"),
        ({"modules": [3]}, TypeError, "int"),
    ],
)
def test_bad_arguments_raise_and_hook_nothing(kwargs, exc, match):
    model = _make_mlp(7)
    with pytest.raises(exc, match=match):
        BNPreconditioner(model, **kwargs)
    assert sum(_hook_counts(model)) == 0


def test_bad_models_raise():
    with pytest.raises(TypeError, match="nn.Module"):
        BNPreconditioner(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d"):
        BNPreconditioner(nn.Sequential(nn.ReLU(), nn.Conv1d(2, 2, 3)))
    shared = nn.Linear(3, 3)
    tied = nn.Linear(3, 3)
    tied.weight = shared.weight
    model = nn.Sequential(shared, tied)
    with pytest.raises(ValueError, match="share a parameter"):
        BNPreconditioner(model)
    assert sum(_hook_counts(model)) == 0
    BNPreconditioner(model, modules=["0"]).remove()
    with pytest.raises(TypeError, match="Optimizer"):
        BNPreconditioner(_make_mlp(0)).attach("sgd")  # type: ignore[arg-type]


def test_functional_argument_checks():
    gw, gb = torch.zeros(3, 4), torch.zeros(3)
    with pytest.raises(ValueError, match="mean of shape"):
        precondition_linear(gw, gb, torch.zeros(3), torch.ones(4))
    with pytest.raises(ValueError, match="grad_bias"):
        precondition_linear(gw, torch.zeros(4), torch.zeros(4), torch.ones(4))
    with pytest.raises(ValueError, match="eps"):
        precondition_linear(gw, gb, torch.zeros(4), torch.ones(4), eps=-1.0)
    with pytest.raises(ValueError, match="groups"):
        precondition_conv2d(torch.zeros(6, 2, 3, 3), None, torch.zeros(8), torch.ones(8), groups=4)
    with pytest.raises(ValueError, match="mean of shape"):
        precondition_conv2d(torch.zeros(6, 2, 3, 3), None, torch.zeros(2), torch.ones(2), groups=2)
    with pytest.raises(ValueError, match="2D|3D|4D"):
        conv2d_patch_moments(torch.zeros(2, 3), 2)
