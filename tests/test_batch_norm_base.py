"""The shared base of normlab's normalization layers (normlab.nn._base) and what it promises.

Oracles: torch's BatchNorm (state dicts, initial values, repr, bias=False), float64
gradcheck/gradgradcheck, a plain-ops Batch Renorm with r and d detached (autograd's Hessian-vector
products), and the scalar schedule function renorm_limits for its tensor twin.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlab.nn import BatchNorm1d, BatchNorm2d, BatchRenorm1d, _base, batchnorm
from normlab.nn.renorm import _renorm_limits_tensor, renorm_limits

F64 = {"rtol": 1e-10, "atol": 1e-10}


def test_checks_importable_from_batchnorm():
    assert batchnorm.check_norm_args is _base.check_norm_args
    assert batchnorm.check_norm_input is _base.check_norm_input
    assert issubclass(batchnorm._BatchNorm, _base.NormBase)


class _MeanOnly(_base.NormBase):
    """A toy subclass written against the documented interface: subtracts a running mean,
    keeps one extra buffer."""

    _ndims = (2,)
    _shape_doc = "(N, C)"

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features, momentum=0.5, affine=False)
        self.register_buffer("seen", torch.zeros(()))

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if hasattr(self, "seen"):
            self.seen.zero_()

    def forward(self, x):
        self._check_input(x)
        mean, var = x.mean(0), x.var(0, unbiased=False)
        ok = self._finite_guard(x, var)
        with torch.no_grad():
            self._write_guarded(self.running_mean, self.running_mean.lerp(mean, 0.5), ok)
            self.seen.add_(1)
        return x - self.running_mean


def test_subclass_interface():
    layer = _MeanOnly(3)
    assert layer.twice_differentiable is False  # the base's conservative default
    with pytest.raises(AttributeError):
        layer.twice_differentiable = True  # read-only property
    with pytest.raises(ValueError, match=r"_MeanOnly expected 2D input \(N, C\), got 3D"):
        layer(torch.zeros(2, 3, 4))
    x = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])
    layer(x)
    torch.testing.assert_close(layer.running_mean, torch.tensor([1.0, 1.5, 2.0]))
    with pytest.raises(ValueError, match="non-finite"):  # CPU default: raise, before any update
        layer(torch.tensor([[float("nan"), 0.0, 0.0], [0.0, 0.0, 0.0]]))
    layer.raise_on_non_finite = False
    layer(torch.tensor([[float("nan"), 0.0, 0.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(layer.running_mean, torch.tensor([1.0, 1.5, 2.0]))
    assert int(layer.non_finite_batches) == 1
    layer.reset_running_stats()
    assert float(layer.seen) == 0 and int(layer.non_finite_batches) == 0
    assert torch.equal(layer.running_mean, torch.zeros(3))
    with pytest.raises(TypeError, match="_MeanOnly cannot be compiled by torch.jit.script"):
        layer.__prepare_scriptable__()


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_reset_repr_and_bias_false_like_torch(affine, bias):
    gen = torch.Generator().manual_seed(0)
    ref = nn.BatchNorm2d(3, affine=affine, bias=bias)
    ours = BatchNorm2d(3, affine=affine, bias=bias)
    assert repr(ours).split("(", 1)[1] == repr(ref).split("(", 1)[1]
    assert set(ours.state_dict()) == set(ref.state_dict())
    for key, value in ref.state_dict().items():  # initial values
        assert torch.equal(ours.state_dict()[key], value), key
    for layer in (ref, ours):
        layer.load_state_dict(ref.state_dict())
    for _ in range(2):
        x = torch.randn(4, 3, 2, 2, generator=gen) * 2 + 1
        torch.testing.assert_close(ours(x), ref(x))
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value)
    with torch.no_grad():
        for layer in (ref, ours):
            for p in layer.parameters():
                p.add_(1)
            layer.reset_parameters()
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_old_state_dict_without_counter_loads_like_torch():
    gen = torch.Generator().manual_seed(4)
    ref = nn.BatchNorm1d(3)
    ref(torch.randn(5, 3, generator=gen))
    state = ref.state_dict()
    del state["num_batches_tracked"]
    for version in (1, None):  # a checkpoint from before the counter existed
        if version is None:
            del state._metadata[""]["version"]
        else:
            state._metadata[""]["version"] = version
        counters = []
        for layer in (nn.BatchNorm1d(3), BatchNorm1d(3)):
            layer.num_batches_tracked.fill_(7)
            layer.load_state_dict(state)
            torch.testing.assert_close(layer.running_mean, ref.running_mean)
            counters.append(int(layer.num_batches_tracked))
        assert counters[0] == counters[1] == 7  # torch keeps the layer's own counter
    state._metadata[""]["version"] = 2  # a version-2 dict must have it
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        BatchNorm1d(3).load_state_dict(state)


# --- twice_differentiable -------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 3), (3, 3, 2, 2)], ids=["2D", "4D"])
def test_batchnorm_twice_differentiable_in_train_mode(shape):
    layer = (BatchNorm1d if len(shape) == 2 else BatchNorm2d)(3, dtype=torch.float64)
    assert layer.twice_differentiable is True
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, generator=gen, dtype=torch.float64).add_(0.5).requires_grad_(True)
    b = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def _fixed_limits_brn(r_max, d_max, running_mean, running_var):
    # momentum 0 keeps the running statistics (hence r and d) fixed across gradcheck's calls;
    # a schedule at its final limits from step 0 keeps the limits fixed.
    brn = BatchRenorm1d(
        3, momentum=0.0, r_max=r_max, d_max=d_max, warmup_steps=0, r_max_steps=0, d_max_steps=0
    ).double()
    with torch.no_grad():
        brn.running_mean.copy_(running_mean)
        brn.running_var.copy_(running_var)
    return brn


def test_renorm_twice_differentiable_where_clipped():
    # Far from the running statistics both r and d sit at their clip limits, so the
    # stop-gradient derivatives are the true ones: gradcheck and gradgradcheck apply as is.
    brn = _fixed_limits_brn(
        2.0, 1.0, torch.tensor([50.0, -50.0, 40.0]), torch.tensor([100.0, 100.0, 400.0])
    )
    assert brn.twice_differentiable is True
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, generator=gen, dtype=torch.float64).add_(0.5).requires_grad_(True)
    b = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return torch.func.functional_call(brn, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_renorm_second_derivatives_hold_r_and_d_constant():
    # Interior r and d: the Hessian-vector product equals that of the plain formula with r and d
    # detached (the stop-gradient the method prescribes).
    run_mean = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    run_var = torch.tensor([1.5, 0.8, 1.1], dtype=torch.float64)
    brn = _fixed_limits_brn(3.0, 5.0, run_mean, run_var)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(9, 3, generator=gen, dtype=torch.float64)
    c = torch.randn(9, 3, generator=gen, dtype=torch.float64)
    v = torch.randn(9, 3, generator=gen, dtype=torch.float64)

    def plain(x):
        mean, var = x.mean(0), x.var(0, unbiased=False)
        sigma_b, sigma = torch.sqrt(var + brn.eps), torch.sqrt(run_var + brn.eps)
        r = (sigma_b / sigma).clamp(1 / 3.0, 3.0).detach()
        d = ((mean - run_mean) / sigma).clamp(-5.0, 5.0).detach()
        assert ((r > 1 / 3.0) & (r < 3.0)).all() and (d.abs() < 5.0).all()  # interior
        return (x - mean) / sigma_b * r + d

    hvps = []
    for fn in (brn, plain):
        x = x0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((fn(x) ** 3 * c).sum(), x, create_graph=True)
        hvps.append(torch.autograd.grad(g, x, v)[0])
    torch.testing.assert_close(hvps[0], hvps[1], **F64)
    assert hvps[1].abs().max() > 1e-2


# --- Batch Renorm limits on the device ------------------------------------------------------


@pytest.mark.parametrize(
    "schedule",
    [
        {"r_max": 3.0, "d_max": 5.0, "warmup_steps": 10, "r_max_steps": 40, "d_max_steps": 25},
        {"r_max": 2.0, "d_max": 1.0, "warmup_steps": 5, "r_max_steps": 5, "d_max_steps": 0},
        {"r_max": 1.5, "d_max": 0.5, "warmup_steps": 0, "r_max_steps": 0, "d_max_steps": 3},
    ],
)
def test_tensor_limits_equal_scalar_limits(schedule):
    for step in range(0, 50):
        r_t, d_t = _renorm_limits_tensor(torch.tensor(step), **schedule)
        r, d = renorm_limits(step, **schedule)
        assert abs(float(r_t) - r) < 1e-12 and abs(float(d_t) - d) < 1e-12, step
