"""Moving Average Batch Normalization (normlab.nn.MABN1d/2d) and CenConv2d against oracles.

Oracles: a NumPy implementation written below from the paper's equations, which keeps the last
``m`` raw batches and computes the moving statistics from their concatenation (independent of
the layer's pooled-moments formula); torch.nn.BatchNorm (MABN is BatchNorm while it uses batch
statistics with r = 1, d = 0); float64 gradcheck there; F.conv2d with a centred kernel.

Tolerances: float64 rtol=1e-10, atol=1e-12.
"""

from __future__ import annotations

import io
from collections import deque

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.gradcheck import GradcheckError

from normlab.errors import BatchTooSmallError
from normlab.functional.mabn import pooled_moments
from normlab.nn.mabn import CenConv2d, MABN1d, MABN2d

TOL = {"rtol": 1e-10, "atol": 1e-12}
F64 = torch.float64


# --- NumPy reference ------------------------------------------------------------------------


class NumpyMABN:
    """MABN from the paper's equations, one training step at a time."""

    def __init__(self, c, eps, momentum, m, warmup, renorm, r_max, d_max, mean_free, w, b):
        self.c, self.eps, self.momentum, self.m = c, eps, momentum, m
        self.warmup, self.renorm, self.r_max, self.d_max = warmup, renorm, r_max, d_max
        self.mean_free, self.w, self.b = mean_free, w, b
        self.t = 0
        self.running_mean = np.zeros(c)
        self.running_var = np.ones(c)
        self.batches = deque(maxlen=m)  # last m raw batches, as (C, values)
        self.grad_stats = deque(maxlen=m)  # last m (g_B, Psi_B)
        # ring buffers as the layer stores them (row t % m), for comparison only
        self.windows = {k: np.zeros((m, c)) for k in ("mean", "var", "grad_mean", "grad_proj")}
        self.clipped = 0

    def _shape(self, x):
        return (1, -1) + (1,) * (x.ndim - 2)

    def forward(self, x):
        self.t += 1
        slot = self.t % self.m
        flat = np.moveaxis(x, 1, 0).reshape(self.c, -1)  # (C, values)
        self.batches.append(flat)
        if self.mean_free:
            self.windows["var"][slot] = (flat**2).mean(1)
        else:
            self.windows["mean"][slot] = flat.mean(1)
            self.windows["var"][slot] = flat.var(1)
        self.use_window = self.t > self.m and self.t >= self.warmup
        pool = np.concatenate(list(self.batches), 1) if self.use_window else flat
        if self.mean_free:
            mean, var = np.zeros(self.c), (pool**2).mean(1)
        else:
            mean, var = pool.mean(1), pool.var(1)
        if self.t > max(self.renorm, self.warmup):
            run_std = np.sqrt(self.running_var + self.eps)
            r_raw = np.sqrt(var + self.eps) / run_std
            r = np.clip(r_raw, 1 / self.r_max, self.r_max)
            d_raw = (mean - self.running_mean) / run_std
            d = np.zeros(self.c) if self.mean_free else np.clip(d_raw, -self.d_max, self.d_max)
            self.clipped += int((r != r_raw).sum() + (d != d_raw).sum() * (not self.mean_free))
        else:
            r, d = np.ones(self.c), np.zeros(self.c)
        s = self._shape(x)
        xhat = (x - mean.reshape(s)) / np.sqrt(var + self.eps).reshape(s)
        y = r.reshape(s) * xhat + d.reshape(s)
        self.cache = (xhat, y, r, var, slot)
        if not self.mean_free:
            self.running_mean = (1 - self.momentum) * self.running_mean + self.momentum * mean
        self.running_var = (1 - self.momentum) * self.running_var + self.momentum * var
        if self.w is None:
            return y
        return self.w.reshape(s) * y + self.b.reshape(s)

    def backward(self, gy):
        xhat, y, r, var, slot = self.cache
        s = self._shape(gy)
        red = (0, *range(2, gy.ndim))
        w = np.ones(self.c) if self.w is None else self.w
        ghat = gy * (w * r).reshape(s)
        g_b = ghat.mean(red)
        psi_b = (ghat * xhat).mean(red)
        self.grad_stats.append((g_b, psi_b))
        self.windows["grad_proj"][slot] = psi_b
        if not self.mean_free:
            self.windows["grad_mean"][slot] = g_b
        if self.use_window:
            g = np.mean([gs[0] for gs in self.grad_stats], 0)
            psi = np.mean([gs[1] for gs in self.grad_stats], 0)
        else:
            g, psi = g_b, psi_b
        if self.mean_free:
            g = np.zeros(self.c)
        gx = (ghat - g.reshape(s) - xhat * psi.reshape(s)) / np.sqrt(var + self.eps).reshape(s)
        if self.w is None:
            return gx, None, None
        return gx, (gy * y).sum(red), gy.sum(red)


# --- helpers --------------------------------------------------------------------------------


def _layer(cls, c, gen, affine=True, **kw):
    layer = cls(c, affine=affine, dtype=F64, **kw)
    if affine:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5, generator=gen)
            layer.bias.normal_(generator=gen)
    return layer


def _reference(layer):
    w = None if layer.weight is None else layer.weight.detach().numpy().copy()
    b = None if layer.bias is None else layer.bias.detach().numpy().copy()
    return NumpyMABN(
        layer.num_features,
        layer.eps,
        layer.momentum,
        layer.buffer_size,
        layer.warmup_iters,
        layer.renorm_iters,
        layer.r_max,
        layer.d_max,
        layer.mean_free,
        w,
        b,
    )


def _step(layer, x, g):
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    grads = torch.autograd.grad(y, [x, *params], g)
    return y.detach(), grads


def _snapshot(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


def _assert_state_equal(layer, snap):
    state = layer.state_dict()
    assert set(state) == set(snap)
    for k, v in snap.items():
        assert torch.equal(state[k], v), k


def _assert_buffers_match(layer, ref):
    t = torch.from_numpy
    torch.testing.assert_close(layer.running_mean, t(ref.running_mean), **TOL)
    torch.testing.assert_close(layer.running_var, t(ref.running_var), **TOL)
    assert int(layer.num_batches_tracked) == ref.t
    torch.testing.assert_close(layer.var_window, t(ref.windows["var"]), **TOL)
    torch.testing.assert_close(layer.grad_proj_window, t(ref.windows["grad_proj"]), **TOL)
    if ref.mean_free:
        assert layer.mean_window is None and layer.grad_mean_window is None
    else:
        torch.testing.assert_close(layer.mean_window, t(ref.windows["mean"]), **TOL)
        torch.testing.assert_close(layer.grad_mean_window, t(ref.windows["grad_mean"]), **TOL)


SHAPES = [
    ("NC", MABN1d, (4, 3)),
    ("NCL", MABN1d, (2, 3, 4)),
    ("NCHW-b1", MABN2d, (1, 3, 3, 2)),
    ("NCHW-b2", MABN2d, (2, 3, 3, 2)),
]


# --- against the NumPy reference ------------------------------------------------------------


@pytest.mark.parametrize("mean_free", [False, True], ids=["centred", "mean_free"])
@pytest.mark.parametrize("case", SHAPES, ids=[c[0] for c in SHAPES])
def test_matches_numpy_reference(case, mean_free):
    """Warmup (batch statistics), windows, then clipped renormalization: 12 steps."""
    _name, cls, shape = case
    gen = torch.Generator().manual_seed(hash((shape, mean_free)) % 2**31)
    layer = _layer(
        cls,
        shape[1],
        gen,
        buffer_size=3,
        warmup_iters=5,
        renorm_iters=7,
        r_max=1.1,
        d_max=0.1,
        momentum=0.3,
        mean_free=mean_free,
    )
    ref = _reference(layer)
    for step in range(12):
        scale = 1.0 + 0.5 * (step % 4)
        x = torch.randn(shape, generator=gen, dtype=F64) * scale + 0.3 * step
        g = torch.randn(shape, generator=gen, dtype=F64)
        y, grads = _step(layer, x, g)
        y_ref = ref.forward(x.numpy())
        gx_ref, gw_ref, gb_ref = ref.backward(g.numpy())
        torch.testing.assert_close(y, torch.from_numpy(y_ref), **TOL)
        torch.testing.assert_close(grads[0], torch.from_numpy(gx_ref), **TOL)
        torch.testing.assert_close(grads[1], torch.from_numpy(gw_ref), **TOL)
        torch.testing.assert_close(grads[2], torch.from_numpy(gb_ref), **TOL)
        _assert_buffers_match(layer, ref)
    assert ref.clipped > 0  # the renormalization clip was exercised
    layer.eval()
    snap = _snapshot(layer)
    x = torch.randn(shape, generator=gen, dtype=F64)
    s = (1, -1) + (1,) * (len(shape) - 2)
    expected = (x - layer.running_mean.reshape(s)) / torch.sqrt(layer.running_var + 1e-5).reshape(
        s
    ) * layer.weight.reshape(s) + layer.bias.reshape(s)
    torch.testing.assert_close(layer(x).detach(), expected.detach(), **TOL)
    _assert_state_equal(layer, snap)


def test_no_affine_matches_reference():
    gen = torch.Generator().manual_seed(3)
    layer = _layer(MABN2d, 2, gen, affine=False, buffer_size=2, warmup_iters=0, renorm_iters=2)
    ref = _reference(layer)
    for _ in range(5):
        x = torch.randn(2, 2, 2, 3, generator=gen, dtype=F64) + 1
        g = torch.randn(2, 2, 2, 3, generator=gen, dtype=F64)
        y, (gx,) = _step(layer, x, g)
        torch.testing.assert_close(y, torch.from_numpy(ref.forward(x.numpy())), **TOL)
        torch.testing.assert_close(gx, torch.from_numpy(ref.backward(g.numpy())[0]), **TOL)
        _assert_buffers_match(layer, ref)


def test_pooled_moments_are_the_moments_of_the_union():
    gen = torch.Generator().manual_seed(4)
    batches = [torch.randn(3, 5, generator=gen, dtype=F64) * (i + 1) + i for i in range(4)]
    means = torch.stack([b.mean(0) for b in batches])
    vars_ = torch.stack([b.var(0, unbiased=False) for b in batches])
    mean, var = pooled_moments(means, vars_)
    union = torch.cat(batches)
    torch.testing.assert_close(mean, union.mean(0), **TOL)
    torch.testing.assert_close(var, union.var(0, unbiased=False), **TOL)


# --- BatchNorm while batch statistics are used; where the backward is a gradient ------------


@pytest.mark.parametrize(
    "cls,torch_cls,shape",
    [(MABN1d, nn.BatchNorm1d, (5, 3)), (MABN2d, nn.BatchNorm2d, (2, 3, 3, 3))],
)
def test_warmup_is_batch_norm(cls, torch_cls, shape):
    gen = torch.Generator().manual_seed(8)
    ours = _layer(cls, 3, gen, warmup_iters=4, buffer_size=2)
    ref = torch_cls(3, dtype=F64)
    with torch.no_grad():
        ref.weight.copy_(ours.weight)
        ref.bias.copy_(ours.bias)
    for _ in range(3):  # steps 1..3 (< warmup_iters): batch statistics, r = 1, d = 0
        x = torch.randn(shape, generator=gen, dtype=F64) * 2 + 1
        g = torch.randn(shape, generator=gen, dtype=F64)
        y, grads = _step(ours, x, g)
        y_ref, grads_ref = _step(ref, x, g)
        torch.testing.assert_close(y, y_ref, **TOL)
        for a, b in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("mean_free", [False, True])
@pytest.mark.parametrize("steps_before", [0, 3], ids=["warmup", "window1"])
def test_gradcheck_where_backward_is_the_gradient(steps_before, mean_free):
    """Batch statistics with r = 1, d = 0 (warmup, or a window of one batch): true gradient."""
    gen = torch.Generator().manual_seed(9)
    layer = _layer(
        MABN2d,
        3,
        gen,
        buffer_size=1,
        warmup_iters=2,
        renorm_iters=100,
        mean_free=mean_free,
        eps=1e-3,
    )
    for _ in range(steps_before):
        x = torch.randn(2, 3, 2, 2, generator=gen, dtype=F64)
        layer(x.requires_grad_()).sum().backward()
    snap = _snapshot(layer)
    x = torch.randn(2, 3, 2, 2, generator=gen, dtype=F64, requires_grad=True)
    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)

    def fn(x, w, b):
        layer.load_state_dict(snap)
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_mean_free_warmup_is_rms_normalization():
    gen = torch.Generator().manual_seed(10)
    layer = _layer(MABN1d, 3, gen, mean_free=True)
    x = torch.randn(1, 3, generator=gen, dtype=F64, requires_grad=True)  # one value per channel
    y = layer(x)
    expected = x / torch.sqrt(x.square().mean(0) + 1e-5) * layer.weight + layer.bias
    torch.testing.assert_close(y, expected, **TOL)
    g = torch.randn(1, 3, generator=gen, dtype=F64)
    torch.testing.assert_close(
        torch.autograd.grad(y, x, g)[0], torch.autograd.grad(expected, x, g)[0], **TOL
    )


def test_window_backward_is_not_the_gradient():
    gen = torch.Generator().manual_seed(12)
    layer = _layer(MABN1d, 2, gen, buffer_size=3, warmup_iters=0, renorm_iters=100)
    assert layer.twice_differentiable is False
    for _ in range(4):
        layer(torch.randn(4, 2, generator=gen, dtype=F64, requires_grad=True)).pow(
            3
        ).sum().backward()
    snap = _snapshot(layer)
    x = torch.randn(4, 2, generator=gen, dtype=F64, requires_grad=True)

    params = {"weight": layer.weight.detach().clone(), "bias": layer.bias.detach().clone()}

    def fn(x):
        layer.load_state_dict(snap)
        return torch.func.functional_call(layer, params, (x,))

    with pytest.raises(GradcheckError):
        torch.autograd.gradcheck(fn, (x,))
    (gx,) = torch.autograd.grad(fn(x).pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


# --- bad input, non-finite batches, state ---------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "cls,bad,err",
    [
        (MABN1d, torch.randn(4, 2, dtype=F64), ValueError),
        (MABN1d, torch.randn(4, 3, 2, 2, dtype=F64), ValueError),
        (MABN2d, torch.randn(4, 3, 2, dtype=F64), ValueError),
        (MABN2d, torch.ones(2, 3, 2, 2, dtype=torch.int32), TypeError),
    ],
)
def test_bad_input_raises_and_leaves_state(cls, bad, err, training):
    layer = cls(3, dtype=F64, buffer_size=2, warmup_iters=0)
    for _ in range(3):
        x = torch.randn((2, 3) if cls is MABN1d else (2, 3, 2, 2), dtype=F64, requires_grad=True)
        layer(x).pow(2).sum().backward()
    layer.train(training)
    snap = _snapshot(layer)
    with pytest.raises(err, match="MABN"):
        layer(bad)
    _assert_state_equal(layer, snap)
    assert layer.training is training


def test_one_value_per_channel_raises_unless_mean_free():
    layer = MABN1d(3, dtype=F64)
    snap = _snapshot(layer)
    with pytest.raises(BatchTooSmallError):
        layer(torch.randn(1, 3, dtype=F64))
    _assert_state_equal(layer, snap)
    assert MABN1d(3, mean_free=True)(torch.randn(1, 3)).shape == (1, 3)


def test_empty_batch_changes_nothing():
    layer = MABN2d(3)
    snap = _snapshot(layer)
    assert layer(torch.randn(0, 3, 2, 2)).shape == (0, 3, 2, 2)
    _assert_state_equal(layer, snap)


@pytest.mark.parametrize("mean_free", [False, True])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_batch_raises_and_leaves_state(bad_value, mean_free):
    layer = MABN2d(3, dtype=F64, buffer_size=2, warmup_iters=0, mean_free=mean_free)
    for _ in range(3):
        layer(torch.randn(2, 3, 2, 2, dtype=F64, requires_grad=True)).pow(2).sum().backward()
    snap = _snapshot(layer)
    x = torch.randn(2, 3, 2, 2, dtype=F64)
    x[1, 2, 0, 1] = bad_value
    with pytest.raises(ValueError, match="non-finite"):
        layer(x)
    _assert_state_equal(layer, snap)


def test_non_finite_batch_guarded_without_raising():
    """The accelerator policy (``raise_on_non_finite=False``): skip on the device and count."""
    layer = MABN2d(3, dtype=F64, buffer_size=2, warmup_iters=0)
    layer.raise_on_non_finite = False
    for _ in range(3):
        layer(torch.randn(2, 3, 2, 2, dtype=F64))
    snap = _snapshot(layer)
    x = torch.randn(2, 3, 2, 2, dtype=F64)
    x[0, 1, 1, 0] = float("inf")
    assert not torch.isfinite(layer(x)).all()
    _assert_state_equal(layer, snap)
    assert int(layer.non_finite_batches) == 1


def test_non_finite_gradient_leaves_gradient_windows():
    layer = MABN1d(3, dtype=F64, buffer_size=2, warmup_iters=0)
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    layer(x).backward(torch.randn(4, 3, dtype=F64))
    before = layer.grad_mean_window.clone(), layer.grad_proj_window.clone()
    assert before[1].abs().sum() > 0
    g = torch.randn(4, 3, dtype=F64)
    g[0, 1] = float("nan")
    layer(x).backward(g)  # step 2 writes row 0; must keep it
    assert torch.equal(layer.grad_mean_window, before[0])
    assert torch.equal(layer.grad_proj_window, before[1])


@pytest.mark.parametrize("mean_free", [False, True])
def test_state_dict_round_trip(mean_free):
    gen = torch.Generator().manual_seed(21)
    kw = {"buffer_size": 2, "warmup_iters": 1, "renorm_iters": 2, "mean_free": mean_free}
    a = _layer(MABN2d, 3, gen, **kw)
    for _ in range(4):
        _step(
            a,
            torch.randn(2, 3, 2, 2, generator=gen, dtype=F64),
            torch.randn(2, 3, 2, 2, generator=gen, dtype=F64),
        )
    keys = {
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
        "var_window",
        "grad_proj_window",
    }
    if not mean_free:
        keys |= {"mean_window", "grad_mean_window"}
    assert set(a.state_dict()) == keys
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = MABN2d(3, dtype=F64, **kw)
    b.load_state_dict(torch.load(buf))
    _assert_state_equal(b, _snapshot(a))
    x = torch.randn(2, 3, 2, 2, generator=gen, dtype=F64)
    g = torch.randn(2, 3, 2, 2, generator=gen, dtype=F64)
    ya, ga = _step(a, x, g)
    yb, gb = _step(b, x, g)
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    for u, v in zip(ga, gb, strict=True):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    _assert_state_equal(b, _snapshot(a))
    b.reset_running_stats()
    assert int(b.num_batches_tracked) == 0 and float(b.grad_proj_window.abs().sum()) == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"momentum": None},
        {"momentum": 1.5},
        {"buffer_size": 0},
        {"buffer_size": 2.0},
        {"warmup_iters": -1},
        {"renorm_iters": -1},
        {"r_max": 0.5},
        {"d_max": -1.0},
        {"eps": -1.0},
    ],
)
def test_constructor_validation(kwargs):
    with pytest.raises(ValueError):
        MABN2d(3, **kwargs)


def test_extra_repr():
    assert repr(MABN2d(4)) == (
        "MABN2d(4, eps=1e-05, momentum=0.02, affine=True, buffer_size=16, warmup_iters=100, "
        "renorm_iters=1000, r_max=5.0, d_max=5.0, mean_free=False)"
    )


def test_half_precision_output_dtype():
    layer = MABN2d(3, buffer_size=1, warmup_iters=0)
    for _ in range(2):
        x = torch.randn(2, 3, 4, 4).to(torch.bfloat16).requires_grad_(True)
        y = layer(x)
        y.float().pow(2).sum().backward()
        assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert layer.running_var.dtype == torch.float32


# --- CenConv2d ------------------------------------------------------------------------------


def test_cen_conv2d():
    gen = torch.Generator().manual_seed(13)
    conv = CenConv2d(3, 4, 3, padding=1, bias=False, dtype=F64)
    assert set(conv.state_dict()) == set(nn.Conv2d(3, 4, 3, bias=False).state_dict())
    x = torch.randn(2, 3, 5, 5, generator=gen, dtype=F64)
    w = conv.weight - conv.weight.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(conv(x), F.conv2d(x, w, None, 1, 1), **TOL)
    valid = CenConv2d(3, 4, 3, bias=False, dtype=F64)
    const = torch.full((1, 3, 5, 5), 2.5, dtype=F64)
    assert valid(const).abs().max() < 1e-12  # centred kernels annihilate constants
    # the raw weight's gradient goes through the centring
    valid(x).sum().backward()
    w = valid.weight.detach().clone().requires_grad_(True)
    F.conv2d(x, w - w.mean(dim=(1, 2, 3), keepdim=True)).sum().backward()
    torch.testing.assert_close(valid.weight.grad, w.grad, **TOL)
    assert valid.weight.grad.sum(dim=(1, 2, 3)).abs().max() < 1e-10  # no component along the mean
