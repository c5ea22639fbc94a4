"""Reference batch normalization against its oracles.

Oracles: torch.nn.BatchNorm1d/2d (outputs, gradients, buffers, state dicts), float64
gradcheck/gradgradcheck, autograd of a plain-ops formula, the dense Hessian of the same network
built on torch.nn.functional.batch_norm, and float64 moments.

Tolerances: float32 rtol=1e-5, atol=1e-5 (values and gradients are O(1); the two implementations
sum in different orders); float64 rtol=1e-10, atol=1e-10.
"""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

from normlab.functional.batch_norm import (
    batch_norm_backward,
    batch_norm_eval,
    batch_norm_train,
    moments,
)
from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d

TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float64: {"rtol": 1e-10, "atol": 1e-10}}

# (name, input shape, normlab class, torch class, channels_last)
SHAPES = [
    ("NC", (8, 3), BatchNorm1d, nn.BatchNorm1d, False),
    ("NCL", (6, 3, 5), BatchNorm1d, nn.BatchNorm1d, False),
    ("NCHW", (4, 3, 5, 6), BatchNorm2d, nn.BatchNorm2d, False),
    ("1x1", (5, 3, 1, 1), BatchNorm2d, nn.BatchNorm2d, False),
    ("channels_last", (4, 3, 5, 6), BatchNorm2d, nn.BatchNorm2d, True),
]


def _pair(nl_cls, torch_cls, dtype, generator, **kwargs):
    """A torch layer and a normlab layer with identical (random, non-trivial) parameters."""
    ref = torch_cls(3, dtype=dtype, **kwargs)
    ours = nl_cls(3, dtype=dtype, **kwargs)
    if ref.affine:
        with torch.no_grad():
            ref.weight.copy_(torch.rand(3, generator=generator, dtype=dtype) + 0.5)
            ref.bias.copy_(torch.randn(3, generator=generator, dtype=dtype))
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _batch(shape, dtype, generator, channels_last):
    x = torch.randn(shape, generator=generator, dtype=dtype) * 2.0 + 0.7
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x


def _step(layer, x, grad_out):
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    grads = torch.autograd.grad(y, [x, *params], grad_out)
    return y.detach(), grads


def _assert_buffers_equal(ours, ref, tol):
    if ref.track_running_stats:
        torch.testing.assert_close(ours.running_mean, ref.running_mean, **tol)
        torch.testing.assert_close(ours.running_var, ref.running_var, **tol)
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)
    else:
        assert ours.running_mean is None and ours.running_var is None
        assert ours.num_batches_tracked is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("case", SHAPES, ids=[c[0] for c in SHAPES])
def test_module_matches_torch(case, affine, momentum, track, dtype):
    _name, shape, nl_cls, torch_cls, channels_last = case
    tol = TOL[dtype]
    gen = torch.Generator().manual_seed(1234)
    ref, ours = _pair(
        nl_cls, torch_cls, dtype, gen, affine=affine, momentum=momentum, track_running_stats=track
    )
    for _ in range(3):  # several training steps: outputs, gradients, buffers
        x = _batch(shape, dtype, gen, channels_last)
        g = torch.randn(shape, generator=gen, dtype=dtype)
        y_ref, grads_ref = _step(ref, x, g)
        y, grads = _step(ours, x, g)
        torch.testing.assert_close(y, y_ref, **tol)
        assert y.is_contiguous(memory_format=torch.channels_last) == y_ref.is_contiguous(
            memory_format=torch.channels_last
        )
        assert len(grads) == len(grads_ref) == (3 if affine else 1)
        for grad, grad_ref in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(grad, grad_ref, **tol)
        _assert_buffers_equal(ours, ref, tol)
    ref.eval()
    ours.eval()
    x = _batch(shape, dtype, gen, channels_last)
    g = torch.randn(shape, generator=gen, dtype=dtype)
    y_ref, grads_ref = _step(ref, x, g)
    y, grads = _step(ours, x, g)
    torch.testing.assert_close(y, y_ref, **tol)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, grad_ref, **tol)
    _assert_buffers_equal(ours, ref, tol)  # eval leaves the buffers alone


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_state_dict_round_trip(affine):
    gen = torch.Generator().manual_seed(7)
    ref = nn.BatchNorm2d(3, affine=affine)
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5, generator=gen)
            ref.bias.normal_(generator=gen)
    for _ in range(2):
        ref(torch.randn(4, 3, 2, 2, generator=gen) * 3 + 1)
    # torch -> normlab
    ours = BatchNorm2d(3, affine=affine)
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    x = torch.randn(4, 3, 2, 2, generator=gen)
    torch.testing.assert_close(ours.eval()(x), ref.eval()(x))
    # normlab (after more training) -> torch
    ours.train()
    for _ in range(2):
        ours(torch.randn(4, 3, 2, 2, generator=gen) - 2)
    back = nn.BatchNorm2d(3, affine=affine)
    back.load_state_dict(ours.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert int(back.num_batches_tracked) == 4
    torch.testing.assert_close(back.eval()(x), ours.eval()(x))


# --- moments -------------------------------------------------------------------------------


def test_moments_accurate_for_badly_scaled_float32():
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4096, 3, generator=gen, dtype=torch.float64) + 1e4).to(torch.float32)
    exact = x.double().var(0, unbiased=False)  # float64 oracle on the same float32 values
    m = moments(x)
    assert m.count == 4096
    torch.testing.assert_close(m.mean.double(), x.double().mean(0), rtol=1e-7, atol=0)
    assert ((m.var.double() - exact).abs() / exact).max() < 1e-3
    _y, _mean, var = batch_norm_train(x)  # the Function's own forward statistics
    assert ((var.double() - exact).abs() / exact).max() < 1e-3
    bn = BatchNorm1d(3, momentum=1.0)
    bn(x)
    assert ((bn.running_var.double() - exact * 4096 / 4095).abs() / exact).max() < 1e-3
    # Contrast: the naive E[x^2] - E[x]^2 in float32 fails the same bound.
    naive = (x * x).mean(0) - x.mean(0) ** 2
    assert ((naive.double() - exact).abs() / exact).max() > 1e-3


def test_moments_4d_per_channel():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, 3, 2, generator=gen, dtype=torch.float64) * 3 + 1
    m = moments(x)
    flat = x.transpose(0, 1).reshape(4, -1)  # (C, N*H*W)
    torch.testing.assert_close(m.mean, flat.mean(1))
    torch.testing.assert_close(m.var, flat.var(1, unbiased=False))
    assert m.count == 5 * 3 * 2


# --- autograd: gradcheck, explicit backward, Hessian ---------------------------------------


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("shape", [(5, 3), (3, 2, 2, 3)], ids=["2D", "4D"])
def test_gradcheck_and_gradgradcheck(shape, affine):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    inputs = [x]
    if affine:
        c = shape[1]
        inputs.append(torch.randn(c, generator=gen, dtype=torch.float64, requires_grad=True))
        inputs.append(torch.randn(c, generator=gen, dtype=torch.float64, requires_grad=True))

    def fn(*args):
        return batch_norm_train(*args, eps=1e-3)[0]

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def _plain_batch_norm(x, weight, bias, eps):
    dims = (0, *range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.reshape(shape) + bias.reshape(shape)
    return y


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 2, 5)], ids=["2D", "4D"])
def test_explicit_backward_equals_autograd_of_plain_ops(shape, affine):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 3
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    c = shape[1]
    w = torch.randn(c, generator=gen, dtype=torch.float64) if affine else None
    b = torch.randn(c, generator=gen, dtype=torch.float64) if affine else None
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b) if t is not None]
    args = leaves if affine else [leaves[0], None, None]
    expected = torch.autograd.grad(_plain_batch_norm(*args, 1e-5), leaves, g)
    grad_x, grad_w, grad_b = batch_norm_backward(g, x, w, 1e-5)
    torch.testing.assert_close(grad_x, expected[0], **TOL[torch.float64])
    if affine:
        torch.testing.assert_close(grad_w, expected[1], **TOL[torch.float64])
        torch.testing.assert_close(grad_b, expected[2], **TOL[torch.float64])
    else:
        assert grad_w is None and grad_b is None
    # The Function's fast backward (saved statistics, no double-backward graph) agrees too.
    fn_grads = torch.autograd.grad(batch_norm_train(*args, eps=1e-5)[0], leaves, g)
    for got, want in zip(fn_grads, expected, strict=True):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


def _mlp_loss(params, x, target, bn):
    """Linear -> BN (train mode) -> tanh -> Linear, squared error; params is a flat vector."""
    sizes = [(4, 5), (4,), (4,), (4,), (2, 4), (2,)]
    chunks, i = [], 0
    for size in sizes:
        n = int(torch.tensor(size).prod())
        chunks.append(params[i : i + n].reshape(size))
        i += n
    w1, b1, gamma, beta, w2, b2 = chunks
    h = bn(F.linear(x, w1, b1), gamma, beta)
    out = F.linear(torch.tanh(h), w2, b2)
    return ((out - target) ** 2).sum()


def test_hessian_vector_product_equals_dense_hessian():
    gen = torch.Generator().manual_seed(2)
    dt = torch.float64
    x = torch.randn(7, 5, generator=gen, dtype=dt)
    target = torch.randn(7, 2, generator=gen, dtype=dt)
    n_params = 4 * 5 + 4 + 4 + 4 + 2 * 4 + 2
    theta = torch.randn(n_params, generator=gen, dtype=dt)
    v = torch.randn(n_params, generator=gen, dtype=dt)

    # normlab: the module in train mode, parameters plugged in with functional_call.
    bn = BatchNorm1d(4, dtype=dt).train()

    def normlab_bn(h, gamma, beta):
        return torch.func.functional_call(bn, {"weight": gamma, "bias": beta}, (h,))

    p = theta.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_mlp_loss(p, x, target, normlab_bn), p, create_graph=True)
    (hvp,) = torch.autograd.grad(grad @ v, p)

    def torch_bn(h, gamma, beta):
        return F.batch_norm(h, None, None, gamma, beta, training=True)

    hessian = torch.autograd.functional.hessian(lambda q: _mlp_loss(q, x, target, torch_bn), theta)
    torch.testing.assert_close(hvp, hessian @ v, rtol=1e-9, atol=1e-9)
    assert hvp.abs().max() > 1e-3  # a real, non-degenerate check


def test_torch_func_transforms():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(6, 3, 2, generator=gen, dtype=torch.float64)
    w = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(3, generator=gen, dtype=torch.float64)
    c = torch.randn(6, 3, 2, generator=gen, dtype=torch.float64)

    def loss_ours(x):
        return (batch_norm_train(x, w, b)[0] ** 3 * c).sum()

    def loss_ref(x):
        return (F.batch_norm(x, None, None, w, b, training=True) ** 3 * c).sum()

    grad = torch.func.grad(loss_ours)(x)
    leaf = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(loss_ref(leaf), leaf)
    torch.testing.assert_close(grad, expected, **TOL[torch.float64])
    hessian = torch.func.jacrev(torch.func.grad(loss_ours))(x)  # reverse-over-reverse
    dense = torch.autograd.functional.hessian(loss_ref, x)
    torch.testing.assert_close(hessian, dense, rtol=1e-9, atol=1e-9)


def test_eval_function_matches_torch():
    gen = torch.Generator().manual_seed(4)
    for shape, cl in [((5, 3), False), ((2, 3, 4, 4), False), ((2, 3, 4, 4), True)]:
        x = torch.randn(shape, generator=gen)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        mean, var = torch.randn(3, generator=gen), torch.rand(3, generator=gen) + 0.1
        w, b = torch.randn(3, generator=gen), torch.randn(3, generator=gen)
        y = batch_norm_eval(x, mean, var, w, b, 1e-5)
        expected = F.batch_norm(x, mean, var, w, b, training=False, eps=1e-5)
        torch.testing.assert_close(y, expected, **TOL[torch.float32])


# --- property test -------------------------------------------------------------------------


@settings(deadline=None, derandomize=True, max_examples=25)
@given(shape=hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=5))
def test_property_matches_torch_over_shapes(shape):
    nl_cls, torch_cls = (
        (BatchNorm2d, nn.BatchNorm2d) if len(shape) == 4 else (BatchNorm1d, nn.BatchNorm1d)
    )
    gen = torch.Generator().manual_seed(sum(shape))
    c = shape[1]
    ref = torch_cls(c, dtype=torch.float64)
    ours = nl_cls(c, dtype=torch.float64)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3 - 1
    if x.numel() // c <= 1:  # one value per channel: both refuse to train
        with pytest.raises(ValueError):
            ref(x)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            ours(x)
        assert int(ours.num_batches_tracked) == 0
        return
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    y_ref, grads_ref = _step(ref, x, g)
    y, grads = _step(ours, x, g)
    tol = TOL[torch.float64]
    torch.testing.assert_close(y, y_ref, **tol)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, grad_ref, **tol)
    _assert_buffers_equal(ours, ref, tol)


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "shape", "match"),
    [
        (
            BatchNorm1d(3),
            (2, 3, 4, 4),
            r"expected 2D or 3D input .*got 4D input with shape \(2, 3, 4, 4\)",
        ),
        (BatchNorm1d(3), (3,), r"expected 2D or 3D input .*got 1D"),
        (BatchNorm2d(3), (2, 3, 4), r"expected 4D input \(N, C, H, W\), got 3D input with shape"),
    ],
)
def test_wrong_ndim(layer, shape, match):
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(shape))


def test_wrong_channel_count():
    with pytest.raises(ValueError, match=r"expected 3 channels \(dimension 1\), got 4"):
        BatchNorm2d(3)(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"expected 3 channels .*got 5 in input of shape \(2, 5\)"):
        BatchNorm1d(3)(torch.randn(2, 5))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_dtype(dtype):
    with pytest.raises(TypeError, match=f"expected a floating-point tensor, got dtype {dtype}"):
        BatchNorm1d(3)(torch.zeros(4, 3, dtype=dtype))


def test_one_value_per_channel_in_training():
    bn = BatchNorm2d(3)
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\(1, 3, 1, 1\)"):
        bn(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\(1, 3\)"):
        BatchNorm1d(3)(torch.randn(1, 3))
    assert int(bn.num_batches_tracked) == 0
    assert bn.eval()(torch.randn(1, 3, 1, 1)).shape == (1, 3, 1, 1)  # eval is fine


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan")])
def test_invalid_eps(eps):
    with pytest.raises(ValueError, match=rf"eps must be a float > 0, got {eps!r}"):
        BatchNorm1d(3, eps=eps)


@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan")])
def test_invalid_momentum(momentum):
    with pytest.raises(
        ValueError, match=rf"momentum must be None or a float in \[0, 1\], got {momentum!r}"
    ):
        BatchNorm2d(3, momentum=momentum)


@pytest.mark.parametrize("num_features", [0, -2, 2.5, True])
def test_invalid_num_features(num_features):
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        BatchNorm1d(num_features)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
def test_non_finite_batch_leaves_state_unchanged(bad, momentum):
    gen = torch.Generator().manual_seed(6)
    bn = BatchNorm2d(3, momentum=momentum)
    bn(torch.randn(4, 3, 2, 2, generator=gen) + 1)  # some history
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(4, 3, 2, 2, generator=gen)
    x[1, 2, 0, 1] = bad
    with pytest.raises(ValueError, match="non-finite"):
        bn(x)
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert int(bn.num_batches_tracked) == 1


def test_inf_in_every_channel_and_mixed_signs():
    bn = BatchNorm1d(2)
    x = torch.tensor([[float("inf"), 1.0], [float("-inf"), 2.0], [0.0, 3.0]])
    with pytest.raises(ValueError, match="non-finite"):
        bn(x)
    assert torch.equal(bn.running_mean, torch.zeros(2))
    assert torch.equal(bn.running_var, torch.ones(2))


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5, 5)])
@pytest.mark.parametrize("fused", [False, True])
def test_bias_without_weight_gets_its_gradient(shape, fused):
    # A bias with no weight is a valid call (torch accepts it); its gradient is sum(grad_y).
    from normlab.functional import _fused

    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    with _fused.use(fused):
        y = batch_norm_train(x, None, b, 1e-5)[0]
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, b), g)
    ref = F.batch_norm(x, None, None, None, b, True, 0.1, 1e-5)
    expected = torch.autograd.grad(ref, (x, b), g)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)
