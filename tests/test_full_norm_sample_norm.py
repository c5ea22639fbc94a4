"""FullNorm's ``sample_norm``: per-sample standardization before the estimates.

Oracles: a NumPy formula for :func:`sample_standardize`, the exact identity "FullNorm with
``sample_norm`` == FullNorm without it applied to the standardized input" (outputs, input
gradients and buffers, train and eval), float64 ``gradcheck``/``gradgradcheck``, exact population
statistics of the standardized input for ``recompute_statistics``, and the per-sample scale
invariance the option exists for."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from normlab.functional.full_norm import sample_standardize
from normlab.methods import get_method
from normlab.nn import FullNorm1d, FullNorm2d, recompute_statistics
from normlab.train import build_model_for

F64 = torch.float64


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def _numpy_standardize(x: np.ndarray, eps: float) -> np.ndarray:
    flat = x.reshape(x.shape[0], -1)
    mean = flat.mean(axis=1, keepdims=True)
    var = ((flat - mean) ** 2).mean(axis=1, keepdims=True)
    return ((flat - mean) / np.sqrt(var + eps)).reshape(x.shape)


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 6), (2, 3, 4, 5), (2, 2, 2, 3, 3)])
@pytest.mark.parametrize("eps", [0.0, 1e-5, 0.5])
def test_sample_standardize_matches_numpy(shape, eps):
    x = _randn(*shape, seed=1, scale=3.0) + 2.0
    got = sample_standardize(x, eps)
    np.testing.assert_allclose(got.numpy(), _numpy_standardize(x.numpy(), eps), rtol=0, atol=1e-12)


def test_sample_standardize_removes_a_per_sample_scale():
    x = _randn(4, 3, 5, seed=2)
    c = torch.tensor([1e-2, 0.5, 7.0, 1e2], dtype=F64).view(4, 1, 1)
    torch.testing.assert_close(sample_standardize(x * c, 0.0), sample_standardize(x, 0.0))


@pytest.mark.parametrize(("shape", "match"), [((6,), "(N, C, \\*)"), ((3, 1), "1 value")])
def test_sample_standardize_rejects_what_it_cannot_standardize(shape, match):
    with pytest.raises(ValueError, match=match):
        sample_standardize(torch.zeros(shape))


def _pair(cls, c, estimator, seed=0):
    torch.manual_seed(seed)
    a = cls(c, estimator=estimator, sample_norm=True, dtype=F64)
    b = cls(c, estimator=estimator, sample_norm=False, dtype=F64)
    with torch.no_grad():
        for layer in (a, b):
            layer.weight.copy_(1.0 + 0.1 * torch.arange(c, dtype=F64))
            layer.bias.copy_(0.05 * torch.arange(c, dtype=F64))
    return a, b


@pytest.mark.parametrize("estimator", ["adaptive", "batch", "running", "autograd", "none"])
@pytest.mark.parametrize(("cls", "shape"), [(FullNorm1d, (6, 4)), (FullNorm2d, (3, 4, 2, 3))])
def test_sample_norm_is_full_norm_of_the_standardized_input(estimator, cls, shape):
    a, b = _pair(cls, shape[1], estimator)
    for step in range(4):
        x = _randn(*shape, seed=10 + step, scale=1.0 + step) + step
        g = _randn(*shape, seed=20 + step)
        xa = x.clone().requires_grad_(True)
        xb = x.clone().requires_grad_(True)
        ya = a(xa)
        yb = b(sample_standardize(xb, b.eps))
        torch.testing.assert_close(ya, yb, rtol=0, atol=1e-12)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=1e-12)
        torch.testing.assert_close(a.weight.grad, b.weight.grad, rtol=0, atol=1e-12)
    for name, buf in b.named_buffers():
        torch.testing.assert_close(a.get_buffer(name), buf, rtol=0, atol=1e-12)
    a.eval()
    b.eval()
    x = _randn(*shape, seed=99, scale=5.0)
    torch.testing.assert_close(a(x), b(sample_standardize(x, b.eps)), rtol=0, atol=1e-12)


def test_sample_norm_gradcheck_and_gradgradcheck():
    layer = FullNorm2d(3, estimator="autograd", sample_norm=True, dtype=F64)
    x = _randn(2, 3, 2, 2, seed=3, scale=2.0).requires_grad_(True)

    def fresh(inp):  # every call from the same estimates: a pure function of the input
        layer.reset_running_stats()
        return layer(inp)

    assert torch.autograd.gradcheck(fresh, (x,))
    assert torch.autograd.gradgradcheck(fresh, (x,))


def test_sample_norm_argument_and_input_errors_leave_the_layer_unchanged():
    with pytest.raises(TypeError, match="sample_norm must be a bool"):
        FullNorm1d(3, sample_norm=1)
    layer = FullNorm1d(1, sample_norm=True)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="more than 1 value per sample"):
        layer(torch.randn(4, 1))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert "sample_norm=True" in repr(layer)
    assert "sample_norm" not in repr(FullNorm1d(3))


def test_recompute_statistics_uses_the_standardized_input():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 4, bias=False, dtype=F64), FullNorm1d(4, sample_norm=True, dtype=F64)
    )
    x = _randn(30, 5, seed=4, scale=3.0)
    recompute_statistics(model, [x[:7], x[7:20], x[20:]])
    with torch.no_grad():
        z = _numpy_standardize(model[0](x).numpy(), 1e-5)
    np.testing.assert_allclose(model[1].running_mean.numpy(), z.mean(0), atol=1e-12)
    np.testing.assert_allclose(model[1].running_var.numpy(), z.var(0), atol=1e-12)


def test_fn_method_standardizes_by_default_and_the_layer_does_not():
    assert get_method("fn").defaults["sample_norm"] is True
    assert FullNorm1d(3).sample_norm is False
    assert get_method("fn").norm_layer()(3, "1d").sample_norm is True
    assert get_method("fn").norm_layer({"sample_norm": False})(3, "1d").sample_norm is False


def test_fn_model_ignores_a_per_sample_input_scale():
    # The fn method's Linear layers carry no bias, so a positive per-sample factor on the input
    # reaches the first FN slot unchanged, where sample_norm removes it (exactly but for eps,
    # made negligible here).
    torch.manual_seed(0)
    model = build_model_for("mlp", (6,), 3, "fn", {"eps": 1e-12}, widths=(8, 8)).double()
    for _ in range(5):
        model(_randn(16, 6, seed=5))
    model.eval()
    x = _randn(10, 6, seed=6)
    c = torch.logspace(-1, 2, 10, dtype=F64).view(10, 1)
    torch.testing.assert_close(model(x * c), model(x), rtol=1e-9, atol=1e-9)
    off = build_model_for(
        "mlp", (6,), 3, "fn", {"eps": 1e-12, "sample_norm": False}, widths=(8, 8)
    ).double()
    off.eval()
    assert not torch.allclose(off(x * c), off(x), rtol=1e-2, atol=1e-2)


def test_convert_keeps_sample_norm_off_where_statistics_are_carried():
    # A BN slot's running statistics are those of the raw input: the FN layer that inherits them
    # must normalize the raw input too. Slots without statistics get the method's default.
    from normlab.methods import convert

    bn_model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4))
    convert(bn_model, "fn")
    assert bn_model[1].sample_norm is False
    assert convert(bn_model, "fn", {"sample_norm": True})[1].sample_norm is True
    assert convert(bn_model, "fn")[1].sample_norm is True  # carried from the FullNorm it replaces
    plain = build_model_for("mlp", (6,), 3, "none", widths=(8,))
    convert(plain, "fn")
    assert [m.sample_norm for m in plain.modules() if isinstance(m, FullNorm1d)] == [True]
