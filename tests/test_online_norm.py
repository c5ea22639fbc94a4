"""Online Normalization (normlab.nn.OnlineNorm1d/2d) against its oracles.

Oracles: a plain NumPy implementation of the paper's equations written below with explicit
sample-by-sample loops (forward streams, control-process backward, layer scaling and activation
clamping with hand-written backwards); the exact identity "a batch of N equals N batches of 1";
float64 gradcheck where the backward is a true gradient (eval mode; weight and bias in
training); a sequential loop for the prefix scan.

Tolerances: float64 rtol=1e-10, atol=1e-12 (the batched scan sums in a different order).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from normlab.functional.online_norm import (
    activation_clamp,
    layer_scaling,
    linear_scan,
    online_norm_train,
)
from normlab.nn.online_norm import OnlineNorm1d, OnlineNorm2d

TOL = {"rtol": 1e-10, "atol": 1e-12}
F64 = torch.float64


# --- NumPy reference: the paper's equations, one sample at a time ---------------------------


class NumpyOnlineNorm:
    """Online Normalization written from the paper's equations with sample loops."""

    def __init__(self, c, alpha_fwd, alpha_bkw, eps, ecm, ls_eps, clamp_value, weight, bias):
        self.af, self.ab, self.eps = alpha_fwd, alpha_bkw, eps
        self.ecm, self.ls_eps, self.clamp = ecm, ls_eps, clamp_value
        self.weight, self.bias = weight, bias  # (C,) arrays or None
        self.mu = np.zeros(c)
        self.var = np.ones(c)
        self.eps_y = np.zeros(c)  # epsilon^(y)
        self.eps_1 = np.zeros(c)  # epsilon^(1)

    def _bcast(self, v, x):  # (C,) against one sample of shape (C, *)
        return v.reshape((-1,) + (1,) * (x.ndim - 1))

    def forward(self, x):
        n = x.shape[0]
        y = np.empty_like(x)
        sigmas = []
        for t in range(n):
            xt = x[t]
            flat = xt.reshape(xt.shape[0], -1)
            mu_x = flat.mean(1)
            var_x = ((flat - mu_x[:, None]) ** 2).mean(1)
            sigma = np.sqrt(self.var + self.eps)
            y[t] = (xt - self._bcast(self.mu, xt)) / self._bcast(sigma, xt)
            sigmas.append(sigma)
            new_var = (
                self.af * self.var
                + (1 - self.af) * var_x
                + self.af * (1 - self.af) * (mu_x - self.mu) ** 2
            )
            self.mu = self.af * self.mu + (1 - self.af) * mu_x
            self.var = new_var
        return self._head(y, sigmas)

    def eval_forward(self, x):
        s = np.sqrt(self.var + self.eps)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return self._head((x - self.mu.reshape(shape)) / s.reshape(shape), None)

    def _head(self, y, sigmas):
        shape = (1, -1) + (1,) * (y.ndim - 2)
        a = y if self.weight is None else y * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.ecm == "ls":
            axes = tuple(range(1, y.ndim))
            s = np.sqrt((a**2).mean(axis=axes, keepdims=True) + self.ls_eps)
            z = a / s
            self.cache = (y, sigmas, a, z, s)
        elif self.ecm == "ac":
            z = np.clip(a, -self.clamp, self.clamp)
            self.cache = (y, sigmas, a, z, None)
        else:
            z = a
            self.cache = (y, sigmas, a, z, None)
        return z

    def backward(self, gz):
        y, sigmas, a, z, s = self.cache
        axes = tuple(range(1, y.ndim))
        if self.ecm == "ls":  # d/da of a / sqrt(mean(a^2) + eps), per sample
            ga = (gz - z * (gz * z).mean(axis=axes, keepdims=True)) / s
        elif self.ecm == "ac":
            ga = np.where(np.abs(a) > self.clamp, 0.0, gz)
        else:
            ga = gz
        shape = (1, -1) + (1,) * (y.ndim - 2)
        red = (0, *range(2, y.ndim))
        gw = gb = None
        gy = ga
        if self.weight is not None:
            gw = (ga * y).sum(axis=red)
            gb = ga.sum(axis=red)
            gy = ga * self.weight.reshape(shape)
        gx = np.empty_like(gy)
        b = 1 - self.ab
        for t in range(y.shape[0]):
            yt = y[t].reshape(y.shape[1], -1)
            gt = gy[t].reshape(y.shape[1], -1)
            x_tilde = gt - b * self.eps_y[:, None] * yt
            self.eps_y = self.eps_y + (x_tilde * yt).mean(1)
            x_dot = x_tilde / sigmas[t][:, None]
            x_prime = x_dot - b * self.eps_1[:, None]
            self.eps_1 = self.eps_1 + x_prime.mean(1)
            gx[t] = x_prime.reshape(gy[t].shape)
        return gx, gw, gb


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
    return NumpyOnlineNorm(
        layer.num_features,
        layer.alpha_fwd,
        layer.alpha_bkw,
        layer.eps,
        layer.ecm,
        layer.ls_eps,
        layer.clamp_value,
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
    torch.testing.assert_close(layer.running_mean, torch.from_numpy(ref.mu), **TOL)
    torch.testing.assert_close(layer.running_var, torch.from_numpy(ref.var), **TOL)
    torch.testing.assert_close(layer.control_y, torch.from_numpy(ref.eps_y), **TOL)
    torch.testing.assert_close(layer.control_1, torch.from_numpy(ref.eps_1), **TOL)


SHAPES = [
    ("NC-b1", OnlineNorm1d, (1, 3)),
    ("NC-b6", OnlineNorm1d, (6, 3)),
    ("NCL-b1", OnlineNorm1d, (1, 3, 5)),
    ("NCL-b4", OnlineNorm1d, (4, 3, 5)),
    ("NCHW-b1", OnlineNorm2d, (1, 3, 4, 3)),
    ("NCHW-b5", OnlineNorm2d, (5, 3, 4, 3)),
]


# --- the scan -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 8, 13])
def test_linear_scan_matches_sequential_loop(n):
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(n, 4, generator=gen, dtype=F64)
    a[n // 2, 1] = 0.0  # a zero coefficient resets the state: no division anywhere
    b = torch.randn(n, 4, generator=gen, dtype=F64)
    h0 = torch.randn(4, generator=gen, dtype=F64)
    h, expected = h0, []
    for t in range(n):
        h = a[t] * h + b[t]
        expected.append(h)
    torch.testing.assert_close(linear_scan(a, b, h0), torch.stack(expected), **TOL)
    # constant coefficient given as a float
    h, expected = h0, []
    for t in range(n):
        h = 0.9 * h + b[t]
        expected.append(h)
    torch.testing.assert_close(linear_scan(0.9, b, h0), torch.stack(expected), **TOL)


def test_linear_scan_is_differentiable():
    gen = torch.Generator().manual_seed(3)
    args = [
        torch.randn(s, generator=gen, dtype=F64, requires_grad=True) for s in ((6, 2), (6, 2), (2,))
    ]
    assert torch.autograd.gradcheck(linear_scan, args)


# --- against the NumPy reference ------------------------------------------------------------


@pytest.mark.parametrize("alphas", [(0.999, 0.99), (0.8, 0.6)], ids=["paper", "fast"])
@pytest.mark.parametrize("ecm", ["ls", "ac", None], ids=["ls", "ac", "none"])
@pytest.mark.parametrize("case", SHAPES, ids=[c[0] for c in SHAPES])
def test_matches_numpy_reference(case, ecm, alphas):
    _name, cls, shape = case
    gen = torch.Generator().manual_seed(hash((shape, ecm, alphas)) % 2**31)
    layer = _layer(
        cls, shape[1], gen, alpha_fwd=alphas[0], alpha_bkw=alphas[1], ecm=ecm, clamp_value=1.2
    )
    ref = _reference(layer)
    clamped = 0
    for step in range(4):  # several steps: streams and control states carry over
        x = torch.randn(shape, generator=gen, dtype=F64) * (1.0 + step) + 0.5 * step
        g = torch.randn(shape, generator=gen, dtype=F64)
        y, grads = _step(layer, x, g)
        y_ref = ref.forward(x.numpy())
        gx_ref, gw_ref, gb_ref = ref.backward(g.numpy())
        torch.testing.assert_close(y, torch.from_numpy(y_ref), **TOL)
        torch.testing.assert_close(grads[0], torch.from_numpy(gx_ref), **TOL)
        torch.testing.assert_close(grads[1], torch.from_numpy(gw_ref), **TOL)
        torch.testing.assert_close(grads[2], torch.from_numpy(gb_ref), **TOL)
        _assert_buffers_match(layer, ref)
        assert int(layer.num_batches_tracked) == step + 1
        clamped += int((y.abs() == 1.2).sum())
    if ecm == "ac":
        assert clamped > 0  # the clamp was exercised
    # eval: the streams normalize, no state changes
    layer.eval()
    snap = _snapshot(layer)
    x = torch.randn(shape, generator=gen, dtype=F64) * 2
    torch.testing.assert_close(layer(x), torch.from_numpy(ref.eval_forward(x.numpy())), **TOL)
    _assert_state_equal(layer, snap)


def test_no_affine_matches_reference():
    gen = torch.Generator().manual_seed(5)
    layer = _layer(OnlineNorm2d, 2, gen, affine=False, alpha_fwd=0.7, alpha_bkw=0.5, ecm=None)
    assert layer.weight is None and layer.bias is None
    ref = _reference(layer)
    for _ in range(3):
        x = torch.randn(3, 2, 3, 3, generator=gen, dtype=F64) + 1
        g = torch.randn(3, 2, 3, 3, generator=gen, dtype=F64)
        y, (gx,) = _step(layer, x, g)
        torch.testing.assert_close(y, torch.from_numpy(ref.forward(x.numpy())), **TOL)
        torch.testing.assert_close(gx, torch.from_numpy(ref.backward(g.numpy())[0]), **TOL)
        _assert_buffers_match(layer, ref)


@pytest.mark.parametrize("ecm", ["ls", None])
@pytest.mark.parametrize("cls,shape", [(OnlineNorm1d, (5, 3)), (OnlineNorm2d, (4, 3, 2, 3))])
def test_batch_of_n_equals_n_batches_of_one(cls, shape, ecm):
    """The paper's semantics: a batch is the stream of its samples, in order."""
    gen = torch.Generator().manual_seed(17)
    batched = _layer(cls, shape[1], gen, alpha_fwd=0.8, alpha_bkw=0.7, ecm=ecm)
    single = _layer(cls, shape[1], gen, alpha_fwd=0.8, alpha_bkw=0.7, ecm=ecm)
    single.load_state_dict(batched.state_dict())
    for _ in range(2):
        x = torch.randn(shape, generator=gen, dtype=F64) * 2 + 1
        g = torch.randn(shape, generator=gen, dtype=F64)
        y, grads = _step(batched, x, g)
        ys, gxs, gws, gbs = [], [], [], []
        for t in range(shape[0]):
            yt, (gx, gw, gb) = _step(single, x[t : t + 1], g[t : t + 1])
            ys.append(yt)
            gxs.append(gx)
            gws.append(gw)
            gbs.append(gb)
        torch.testing.assert_close(y, torch.cat(ys), **TOL)
        torch.testing.assert_close(grads[0], torch.cat(gxs), **TOL)
        torch.testing.assert_close(grads[1], sum(gws), **TOL)
        torch.testing.assert_close(grads[2], sum(gbs), **TOL)
        for name in ("running_mean", "running_var", "control_y", "control_1"):
            torch.testing.assert_close(getattr(batched, name), getattr(single, name), **TOL)


# --- gradients: where the backward is and is not the gradient ------------------------------


@pytest.mark.parametrize("ecm", ["ls", "ac", None])
@pytest.mark.parametrize("cls,shape", [(OnlineNorm1d, (3, 4)), (OnlineNorm2d, (2, 3, 2, 2))])
def test_gradcheck_eval_mode(cls, shape, ecm):
    gen = torch.Generator().manual_seed(23)
    layer = _layer(cls, shape[1], gen, ecm=ecm, clamp_value=1.5)
    with torch.no_grad():  # non-trivial streams
        layer.running_mean.normal_(generator=gen)
        layer.running_var.uniform_(0.5, 2.0, generator=gen)
    layer.eval()
    x = torch.randn(shape, generator=gen, dtype=F64, requires_grad=True)

    def fn(x, w, b):
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("ecm", ["ls", None])
def test_gradcheck_training_weight_and_bias(ecm):
    """In training the affine parameters and the error compensation get true gradients."""
    gen = torch.Generator().manual_seed(29)
    layer = _layer(OnlineNorm2d, 3, gen, ecm=ecm, alpha_fwd=0.8)
    x = torch.randn(3, 3, 2, 2, generator=gen, dtype=F64)
    snap = _snapshot(layer)

    def fn(w, b):
        layer.load_state_dict(snap)  # the same streams at every evaluation
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (w, b))


def _autograd_stream_forward(x, mean0, var0, alpha, eps):
    # The forward written in differentiable ops, sample by sample (for the contrast below).
    mu, var, ys = mean0, var0, []
    for t in range(x.shape[0]):
        flat = x[t].reshape(x.shape[1], -1)
        mu_x = flat.mean(1)
        var_x = ((flat - mu_x[:, None]) ** 2).mean(1)
        shape = (-1,) + (1,) * (x.dim() - 2)
        ys.append((x[t] - mu.reshape(shape)) / torch.sqrt(var + eps).reshape(shape))
        var = alpha * var + (1 - alpha) * var_x + alpha * (1 - alpha) * (mu_x - mu) ** 2
        mu = alpha * mu + (1 - alpha) * mu_x
    return torch.stack(ys)


def test_training_input_gradient_is_the_control_process_not_autograd():
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(6, 2, 3, generator=gen, dtype=F64, requires_grad=True)
    g = torch.randn(6, 2, 3, generator=gen, dtype=F64)
    mean0 = torch.zeros(2, dtype=F64)
    var0 = torch.ones(2, dtype=F64)
    y = online_norm_train(
        x,
        mean0,
        var0,
        torch.zeros(2, dtype=F64),
        torch.zeros(2, dtype=F64),
        alpha_fwd=0.5,
        alpha_bkw=0.5,
    )[0]
    (gx,) = torch.autograd.grad(y, x, g)
    y_auto = _autograd_stream_forward(x, mean0, var0, 0.5, 1e-5)
    torch.testing.assert_close(y, y_auto, **TOL)  # same forward ...
    (gx_auto,) = torch.autograd.grad(y_auto, x, g)
    assert (gx - gx_auto).abs().max() > 1e-2  # ... a different backward (documented)


def test_not_twice_differentiable():
    layer = OnlineNorm1d(3, dtype=F64)
    assert layer.twice_differentiable is False
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


# --- bad input, non-finite batches, state ---------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "cls,bad,err",
    [
        (OnlineNorm1d, torch.randn(4, 2, dtype=F64), ValueError),  # channels
        (OnlineNorm1d, torch.randn(4, 3, 2, 2, dtype=F64), ValueError),  # ndim
        (OnlineNorm2d, torch.randn(4, 3, 2, dtype=F64), ValueError),  # ndim
        (OnlineNorm2d, torch.ones(2, 3, 2, 2, dtype=torch.long), TypeError),  # dtype
        (OnlineNorm1d, [[1.0, 2.0, 3.0]], TypeError),  # not a tensor
    ],
)
def test_bad_input_raises_and_leaves_state(cls, bad, err, training):
    layer = cls(3, dtype=F64)
    layer(torch.randn((2, 3) if cls is OnlineNorm1d else (2, 3, 2, 2), dtype=F64)).sum().backward()
    layer.train(training)
    snap = _snapshot(layer)
    with pytest.raises(err, match="OnlineNorm"):
        layer(bad)
    _assert_state_equal(layer, snap)
    assert layer.training is training


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
@pytest.mark.parametrize("cls,shape", [(OnlineNorm1d, (3, 3)), (OnlineNorm2d, (2, 3, 2, 2))])
def test_non_finite_batch_raises_and_leaves_state(cls, shape, bad_value):
    layer = cls(3, dtype=F64)
    layer(torch.randn(shape, dtype=F64)).sum().backward()
    snap = _snapshot(layer)
    x = torch.randn(shape, dtype=F64)
    x.view(-1)[2] = bad_value
    with pytest.raises(ValueError, match="non-finite"):
        layer(x)
    _assert_state_equal(layer, snap)


def test_non_finite_batch_guarded_without_raising():
    """The accelerator policy (``raise_on_non_finite=False``): skip on the device and count."""
    layer = OnlineNorm2d(3, dtype=F64)
    layer.raise_on_non_finite = False
    layer(torch.randn(2, 3, 2, 2, dtype=F64))
    snap = _snapshot(layer)
    x = torch.randn(2, 3, 2, 2, dtype=F64)
    x[0, 1, 1, 0] = float("nan")
    assert not torch.isfinite(layer(x)).all()
    _assert_state_equal(layer, snap)
    assert int(layer.non_finite_batches) == 1
    layer(torch.randn(2, 3, 2, 2, dtype=F64))
    assert int(layer.num_batches_tracked) == 2


def test_non_finite_gradient_leaves_control_state():
    layer = OnlineNorm1d(3, dtype=F64, alpha_bkw=0.5)
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    layer(x).backward(torch.randn(4, 3, dtype=F64))
    before = layer.control_y.clone(), layer.control_1.clone()
    assert before[0].abs().sum() > 0 and before[1].abs().sum() > 0
    g = torch.randn(4, 3, dtype=F64)
    g[1, 0] = float("nan")
    layer(x).backward(g)
    assert not torch.isfinite(x.grad).all()
    assert torch.equal(layer.control_y, before[0])
    assert torch.equal(layer.control_1, before[1])


def test_state_dict_round_trip():
    gen = torch.Generator().manual_seed(41)
    a = _layer(OnlineNorm2d, 3, gen, alpha_fwd=0.9, alpha_bkw=0.8)
    for _ in range(3):
        _step(
            a,
            torch.randn(2, 3, 3, 3, generator=gen, dtype=F64),
            torch.randn(2, 3, 3, 3, generator=gen, dtype=F64),
        )
    keys = {
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
        "control_y",
        "control_1",
    }
    assert set(a.state_dict()) == keys
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = OnlineNorm2d(3, alpha_fwd=0.9, alpha_bkw=0.8, dtype=F64)
    b.load_state_dict(torch.load(buf))
    _assert_state_equal(b, _snapshot(a))
    x = torch.randn(2, 3, 3, 3, generator=gen, dtype=F64)
    g = torch.randn(2, 3, 3, 3, generator=gen, dtype=F64)
    ya, ga = _step(a, x, g)
    yb, gb = _step(b, x, g)
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    for u, v in zip(ga, gb, strict=True):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    _assert_state_equal(b, _snapshot(a))
    b.reset_running_stats()
    assert (
        float(b.control_y.abs().sum() + b.control_1.abs().sum() + b.running_mean.abs().sum()) == 0
    )
    assert torch.equal(b.running_var, torch.ones(3, dtype=F64))


def test_empty_batch_changes_nothing():
    layer = OnlineNorm1d(3)
    snap = _snapshot(layer)
    assert layer(torch.randn(0, 3)).shape == (0, 3)
    _assert_state_equal(layer, snap)


def test_half_precision_output_dtype():
    layer = OnlineNorm2d(3)
    x = torch.randn(2, 3, 4, 4).to(torch.bfloat16).requires_grad_(True)
    y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert layer.running_mean.dtype == torch.float32


@pytest.mark.parametrize("value", [0.0, 300.0, 3e4])
def test_layer_scaling_half_precision_matches_float32(value):
    # float16 values whose mean square (9e4, 9e8) or rsqrt backward ((0 + 1e-5)^-1.5 = 3e7)
    # leave float16's range: computed in float32, the output and the input gradient are the
    # float32 ones rounded once (oracle: the float64 computation on the same values).
    x = torch.full((2, 3, 2), value, dtype=torch.float16)
    x[1] *= -0.5
    x16 = x.clone().requires_grad_(True)
    x64 = x.double().requires_grad_(True)
    z16, z64 = layer_scaling(x16), layer_scaling(x64)
    g = torch.linspace(-1, 1, x.numel()).reshape(x.shape)
    z16.backward(g.half())
    z64.backward(g.double())
    assert z16.dtype == torch.float16 and x16.grad.dtype == torch.float16
    torch.testing.assert_close(z16.double(), z64, rtol=1e-3, atol=1e-3)
    scale = float(x64.grad.abs().max().clamp_min(1.0))
    torch.testing.assert_close(x16.grad.double() / scale, x64.grad / scale, rtol=2e-3, atol=2e-3)


def test_half_layer_eval_after_large_streams():
    # A float16 layer whose streams left float16's range (mean 1e4): statistics kept in float32
    # and the eval output equals the float32 layer's on the same values.
    gen = torch.Generator().manual_seed(4)
    x = (1e4 + torch.randn(6, 3, generator=gen)).half()
    layer, twin = OnlineNorm1d(3).half(), OnlineNorm1d(3)
    for _ in range(4):
        layer(x)
        twin(x.float())
    assert layer.running_var.dtype == torch.float32 and layer.control_y.dtype == torch.float32
    torch.testing.assert_close(layer.running_var, twin.running_var, rtol=1e-6, atol=0)
    y, yt = layer.eval()(x), twin.eval()(x.float())
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), yt, rtol=2e-3, atol=2e-3)


def test_functional_error_compensation():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 5, generator=gen, dtype=F64) * 3
    z = layer_scaling(x, eps=0.0)
    torch.testing.assert_close(z.square().mean((1, 2)), torch.ones(3, dtype=F64), **TOL)
    assert torch.equal(activation_clamp(x, 1.0), x.clamp(-1.0, 1.0))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"alpha_fwd": 1.0},
        {"alpha_fwd": -0.1},
        {"alpha_bkw": 1.5},
        {"alpha_bkw": True},
        {"ecm": "bn"},
        {"ls_eps": 0.0},
        {"clamp_value": -1.0},
        {"eps": 0.0},
    ],
)
def test_constructor_validation(kwargs):
    with pytest.raises(ValueError):
        OnlineNorm1d(3, **kwargs)


def test_extra_repr():
    assert repr(OnlineNorm2d(4)) == (
        "OnlineNorm2d(4, alpha_fwd=0.999, alpha_bkw=0.99, eps=1e-05, affine=True, ecm='ls', "
        "ls_eps=1e-05)"
    )
    assert "clamp_value=2.0" in repr(OnlineNorm1d(4, ecm="ac", clamp_value=2.0))
    assert repr(OnlineNorm1d(4, ecm=None)).endswith("ecm=None)")


# --- batch size 1 trains --------------------------------------------------------------------


def _two_blobs(gen, n):
    centres = torch.tensor([[2.0, -1.0, 0.5, 1.0], [-1.0, 2.0, -0.5, -1.0]])
    labels = torch.randint(0, 2, (n,), generator=gen)
    return centres[labels] + torch.randn(n, 4, generator=gen), labels


@pytest.mark.parametrize("ecm", ["ls", "ac"])
def test_batch_size_one_trains_mlp(ecm):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x, labels = _two_blobs(gen, 600)
    model = nn.Sequential(nn.Linear(4, 16), OnlineNorm1d(16, ecm=ecm), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    model.eval()
    with torch.no_grad():
        before = loss_fn(model(x), labels).item()
    model.train()
    for i in range(500):  # one sample per step
        opt.zero_grad()
        loss_fn(model(x[i : i + 1]), labels[i : i + 1]).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(x)
        after = loss_fn(logits, labels).item()
        accuracy = (logits.argmax(1) == labels).float().mean().item()
    assert after < 0.5 * before
    assert accuracy > 0.9


def test_batch_size_one_trains_conv():
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(1)
    n = 300
    labels = torch.randint(0, 2, (n,), generator=gen)
    # class 0: bright top half, class 1: bright bottom half
    x = torch.randn(n, 1, 6, 6, generator=gen) * 0.5
    x[labels == 0, :, :3] += 1.5
    x[labels == 1, :, 3:] += 1.5
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), OnlineNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    for i in range(n):
        opt.zero_grad()
        loss_fn(model(x[i : i + 1]), labels[i : i + 1]).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.9
