"""Generated bad-input suite: every layer, BNPreconditioner, convert, fold_batchnorm and
recompute_statistics on generated inputs (hypothesis, derandomized).

Inputs: batch sizes 0 and 1 included, float16/bfloat16/float32/float64, NaN or +-Inf in one
sample, zero-variance channels, means of 1e4 with std 1e-2, non-contiguous and channels_last
layouts, wrong channel counts, wrong dimensionality, integer/bool/complex dtypes, non-tensors.

Each case ends in one documented outcome: equal to torch within tolerance (torch.nn.BatchNorm*
outputs, gradients and buffers, train and eval), a documented result checked by invariants
(shape and dtype kept, finite output and gradients for finite input, eval deterministic and
stateless), or a ValueError/TypeError whose message names what was expected and what was
received and which changed nothing (every parameter, buffer, hook and train/eval flag, and the
preconditioner's state_dict, compared bitwise). Cases hitting a known bug are counted as xfail;
each bug has a minimal reproduction below marked xfail(strict=True).

Oracles: torch's layers; float64 recomputation (population statistics, folding); the same layer
run in float32 on the same half-precision values; and the documented invariants.
Counts per category and outcome: set NORMLAB_BAD_INPUT_REPORT=path to write them as JSON, and see
docs/bad_input.md for the table and the command that produced it.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os

import pytest
import torch
from _bad_input_cases import (
    BASE_TOL,
    DOCUMENTED,
    FAULTS,
    FLOATS,
    HALF,
    MATCHED,
    NON_FINITE,
    RAN,
    REPORT_ENV,
    TYPE_ERROR,
    VALUE_ERROR,
    VALUE_KINDS,
    Expected,
    Spec,
    assert_rejects,
    assert_same_state,
    compute_eps,
    error_outcome,
    expected_error,
    faulty_input,
    float64_stats,
    hsettings,
    make_tensor,
    record,
    report,
    same_tensor,
    snapshot,
    specs,
    upstream_grad,
)
from hypothesis import example, given
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn import functional as F

import normlab
from normlab.functional.full_norm import ESTIMATORS
from normlab.methods import group_count
from normlab.nn import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    FullNorm1d,
    FullNorm2d,
    FullNorm3d,
    MABN1d,
    MABN2d,
    NoNorm,
    OnlineNorm1d,
    OnlineNorm2d,
    SyncBatchNorm,
    fold_batchnorm,
    recompute_statistics,
)
from normlab.nn._base import NormBase
from normlab.nn.fullnorm import _FullNorm
from normlab.nn.online_norm import _OnlineNorm
from normlab.optim import BNPreconditioner


@pytest.fixture(autouse=True, scope="module")
def _write_report():
    yield
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(report(), fh, indent=2)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomize_affine(layers: list[nn.Module], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    c = layers[0].num_features
    w = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    w[::2] *= -1
    b = torch.randn(c, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        for layer in layers:
            if getattr(layer, "weight", None) is not None:
                layer.weight.copy_(w)
            if getattr(layer, "bias", None) is not None:
                layer.bias.copy_(b)


# =============================================================================================
# 1. normlab BatchNorm1d/2d/3d and SyncBatchNorm (no process group) against torch.nn.BatchNorm*
# =============================================================================================

CAT_BN = "BatchNorm1d/2d/3d, SyncBatchNorm vs torch"
TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


@st.composite
def bn_cases(draw):
    cls = draw(st.sampled_from((BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm)))
    ndim = draw(st.sampled_from(cls._ndims))
    c = draw(st.sampled_from((1, 2, 3, 5)))
    spec = draw(specs(ndim, c))
    fault = draw(st.sampled_from(FAULTS))
    return {
        "cls": cls,
        "ndim": ndim,
        "c": c,
        "spec": spec,
        "x": draw(faulty_input(cls._ndims, c, spec, fault)),
        # torch accepts half input in a float32 layer (not float32 in float64, or the reverse)
        "mixed": spec.dtype in HALF and draw(st.booleans()),
        "momentum": draw(st.sampled_from((0.1, None, 0.0, 1.0))),
        "affine": draw(st.booleans()),
        "track": draw(st.booleans()),
        "policy": draw(st.sampled_from((None, None, True, False))),
        "warm": draw(st.integers(0, 2)),
    }


def _bn_tolerances(layer: nn.Module, x: Tensor, dtype: torch.dtype, batch_stats: bool, unit: float):
    """(rtol, per-channel atol of outputs, atol of running buffers, per-channel atol of the
    input gradient per unit of upstream gradient).

    A normalized value (x - m) / s carries the rounding error of x - m, of order
    u * (|x| + |m|) / s with u the unit roundoff of the arithmetic: with |mean| >> std it is
    large whichever implementation is right, so each channel's tolerance grows with it. The input
    gradient is a difference of terms of size |gamma| / s times the upstream gradient (with
    cancellation: with two values per channel it is nearly zero), so its tolerance is the
    output's relative one times that size. ``unit``: the unit roundoff of the arithmetic
    (float32 for half inputs in normlab; torch's CPU kernels centre half inputs in half).
    """
    base = BASE_TOL[dtype]
    c = layer.num_features
    xs = x.detach().to(torch.float64)
    if xs.numel() == 0:
        full = torch.full((c,), base, dtype=torch.float64)
        return base, full, base, full
    x0 = torch.where(torch.isfinite(xs), xs, 0.0)
    dims = (0, *range(2, xs.dim()))
    max_abs = x0.abs().amax(dims)
    u = 8 * unit
    w = 1.0 if layer.weight is None else layer.weight.detach().double().abs()
    if batch_stats:
        var = x0.var(dims, unbiased=False)
        mean_err = u * max_abs
        out = base + 2 * w * mean_err / torch.sqrt(var + layer.eps)
        buffers = base + float((4 * var.sqrt() * mean_err + mean_err).max())
    else:
        rm, rv = layer.running_mean.detach().double(), layer.running_var.detach().double()
        var = rv
        out = base + 2 * w * u * (max_abs + rm.abs()) / torch.sqrt(rv + layer.eps)
        buffers = base
    grad = 4 * (out + base) * w / torch.sqrt(var + layer.eps) + base
    return base, out, buffers, grad


def _close(a: Tensor, b: Tensor, rtol: float, atol: float | Tensor, what: str) -> None:
    """|a - b| <= rtol |b| + atol elementwise (atol a float or per channel, dimension 1), with
    NaN and infinities in the same places."""
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} and {tuple(b.shape)}"
    assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaN in different places\n{a}\n{b}"
    inf = a.isinf() | b.isinf()
    assert torch.equal(a[inf], b[inf]), f"{what}: infinities differ\n{a}\n{b}"
    if isinstance(atol, Tensor) and a.dim() >= 2:
        atol = atol.reshape((1, -1) + (1,) * (a.dim() - 2))
    ok = ((a - b).abs() <= rtol * b.abs() + atol) | a.isnan() | inf
    assert bool(ok.all()), f"{what}: max |diff| {float((a - b)[~ok].abs().max())}\n{a}\n{b}"


def _overflows(value: Tensor, dtype: torch.dtype) -> bool:
    return bool((value.abs() > torch.finfo(dtype).max).any())


def _float64_reference(layer: nn.Module, x: Tensor, batch_stats: bool, update: bool):
    """torch.nn.functional.batch_norm in float64 on the same values and state: the output, and
    the running (mean, var) after the update when ``update`` (else None)."""
    x64 = x.detach().to(torch.float64)
    if x64.numel() == 0:
        return x64, None
    w, b = (None if t is None else t.detach().double() for t in (layer.weight, layer.bias))
    if batch_stats:
        y = F.batch_norm(x64, None, None, w, b, True, 0.0, layer.eps)
    else:
        rm, rv = layer.running_mean.double(), layer.running_var.double()
        y = F.batch_norm(x64, rm, rv, w, b, False, 0.0, layer.eps)
    if not update or not bool(torch.isfinite(x64).all()):
        return y, None
    n = x64.numel() // x64.shape[1]
    mean, var = float64_stats(x64)
    tracked = int(layer.num_batches_tracked) + 1
    factor = layer.momentum if layer.momentum is not None else 1.0 / tracked
    rm, rv = layer.running_mean.double(), layer.running_var.double()
    return y, (rm + factor * (mean - rm), rv + factor * (var * n / (n - 1) - rv))


def _bn_example(cls, shape, values, momentum=0.1, layout="contiguous", warm=1) -> dict:
    """An explicit case of bn_cases (run on every session, whatever hypothesis draws)."""
    spec = Spec(shape, torch.float16, values, layout, seed=11)
    return {
        "cls": cls,
        "ndim": len(shape),
        "c": shape[1],
        "spec": spec,
        "x": make_tensor(spec),
        "mixed": False,
        "momentum": momentum,
        "affine": True,
        "track": True,
        "policy": None,
        "warm": warm,
    }


@hsettings(max_examples=450)
@given(case=bn_cases())
# float16 variances above 65504: running_var inf as torch's, and kept inf (not NaN) after it
@example(case=_bn_example(BatchNorm1d, (4, 2), "wide"))
@example(case=_bn_example(BatchNorm1d, (4, 3), "wide", momentum=None, warm=2))
@example(case=_bn_example(BatchNorm2d, (2, 3, 2, 2), "wide", layout="channels_last"))
def test_batchnorm_matches_torch(case):
    """normlab BatchNorm* / SyncBatchNorm against torch.nn.BatchNorm*: outputs, gradients and
    buffers after the step, train then eval; or a documented rejection changing nothing."""
    category = CAT_BN
    cls, c, spec, x = case["cls"], case["c"], case["spec"], case["x"]
    dtype = torch.float32 if case["mixed"] else spec.dtype
    opts = {"momentum": case["momentum"], "affine": case["affine"]}
    opts["track_running_stats"] = case["track"]
    ours = cls(c, **opts).to(dtype)
    ours.raise_on_non_finite = case["policy"]
    ref = TORCH_BN[case["ndim"]](c, **opts).to(dtype)
    _randomize_affine([ours, ref], spec.seed)
    warm = make_tensor(Spec((4, c, *spec.shape[2:]), spec.dtype, "normal", seed=spec.seed + 7))
    for _ in range(case["warm"]):
        ours(warm)
    for train in (True, False):
        ref.load_state_dict(ours.state_dict())
        ours.train(train)
        ref.train(train)
        expected = expected_error(ours, x, train)
        if expected is not None:
            assert_rejects(ours, lambda: ours(x), expected)  # noqa: B023
            record(category, error_outcome(expected.exc))
            continue
        batch_stats = train or not case["track"]
        y64, buffers64 = _float64_reference(ours, x, batch_stats, train and case["track"])
        before = snapshot(ours)
        xo = x.detach().requires_grad_(True)
        xr = x.detach().requires_grad_(True)
        yo = ours(xo)
        yr = ref(xr)
        assert yo.shape == x.shape and yo.dtype == x.dtype
        rtol, atol, atol_buf, _ = _bn_tolerances(
            ours, x, spec.dtype, batch_stats, compute_eps(spec.dtype)
        )
        _close(yo, y64, rtol, atol, "output vs float64")
        _, atol_t, atol_buf_t, atol_grad = _bn_tolerances(
            ours, x, spec.dtype, batch_stats, torch.finfo(spec.dtype).eps
        )
        _close(yo, yr, rtol, atol_t, "output vs torch")
        skipped = train and case["track"] and spec.values in NON_FINITE and x.numel() > 0
        if skipped:
            # raise_on_non_finite=False: torch folds NaN into its statistics; normlab skips the
            # update and counts the batch (NormBase's documented policy).
            assert int(ours.non_finite_batches) == int(before["buffer non_finite_batches"]) + 1
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                assert same_tensor(getattr(ours, name), before[f"buffer {name}"]), name
        elif case["track"]:
            _close(ours.running_mean, ref.running_mean, rtol, atol_buf_t, "running_mean")
            _close(ours.running_var, ref.running_var, rtol, atol_buf_t, "running_var")
            assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)
            if buffers64 is not None:
                _close(ours.running_mean, buffers64[0], rtol, atol_buf, "running_mean vs float64")
                var64 = buffers64[1]
                if _overflows(var64, ours.running_var.dtype):
                    # A float16 running_var above 65504 is inf, as torch writes it (compared
                    # above); the other channels are compared with float64.
                    over = var64.to(ours.running_var.dtype).isinf()
                    assert bool(torch.isposinf(ours.running_var[over]).all()), "overflow not inf"
                    ours_var, var64 = ours.running_var[~over], var64[~over]
                else:
                    ours_var = ours.running_var
                _close(ours_var, var64, rtol, atol_buf, "running_var vs float64")
        if not train:
            assert_same_state(before, snapshot(ours), "eval call")
            assert same_tensor(ours(x), yo.detach()), "eval is not deterministic"
        if spec.finite and yo.numel() > 0:
            assert bool(torch.isfinite(yo).all()), "non-finite output from finite input"
            g = upstream_grad(yo, spec.seed)
            params_o = [p for p in (ours.weight, ours.bias) if p is not None]
            params_r = [p for p in (ref.weight, ref.bias) if p is not None]
            go = torch.autograd.grad(yo, [xo, *params_o], g)
            gr = torch.autograd.grad(yr, [xr, *params_r], g)
            for name, a, b in zip(("x", "weight", "bias"), go, gr, strict=False):
                gmax = float(g.detach().abs().double().max())
                if name == "x":
                    tol = atol_grad * gmax
                else:  # a sum over the count values of a channel
                    tol = float(atol_t.max()) * (x.numel() // c) * gmax
                _close(a, b, rtol, tol, f"grad {name}")
                assert bool(torch.isfinite(a).all()), f"non-finite grad {name}"
        record(category, DOCUMENTED if skipped else MATCHED)


# =============================================================================================
# 2. BatchRenorm, FullNorm (each estimator), OnlineNorm (each ecm), MABN: invariants
# =============================================================================================

CAT_LAYERS = "BatchRenorm, FullNorm[estimator], OnlineNorm, MABN"


def _layer_table() -> dict[str, tuple[dict[int, type], dict]]:
    short_brn = {"momentum": 0.1, "warmup_steps": 0, "r_max_steps": 3, "d_max_steps": 3}
    mabn = {"buffer_size": 2, "warmup_iters": 0, "renorm_iters": 1}
    table = {
        "BatchRenorm": ({1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d}, short_brn),
        "MABN": ({1: MABN1d, 2: MABN2d}, mabn),
        "MABN[mean_free]": ({1: MABN1d, 2: MABN2d}, {**mabn, "mean_free": True}),
    }
    for est in ESTIMATORS:
        table[f"FullNorm[{est}]"] = (
            {1: FullNorm1d, 2: FullNorm2d, 3: FullNorm3d},
            {"estimator": est},
        )
    for ecm in ("ls", "ac", None):
        table[f"OnlineNorm[{ecm}]"] = ({1: OnlineNorm1d, 2: OnlineNorm2d}, {"ecm": ecm})
    return table


LAYER_TABLE = _layer_table()
MODULE_DTYPES = {
    torch.float16: (torch.float16, torch.float32),
    torch.bfloat16: (torch.bfloat16, torch.float32),
    torch.float32: (torch.float32, torch.float64),
    torch.float64: (torch.float64,),
}


@st.composite
def layer_cases(draw):
    name = draw(st.sampled_from(sorted(LAYER_TABLE, key=str)))
    classes, kwargs = LAYER_TABLE[name]
    cls = classes[draw(st.sampled_from(sorted(classes)))]
    ndim = draw(st.sampled_from(cls._ndims))
    c = draw(st.sampled_from((1, 2, 3, 5)))
    spec = draw(specs(ndim, c))
    fault = draw(st.sampled_from(FAULTS))
    return {
        "name": name,
        "cls": cls,
        "kwargs": {**kwargs, "affine": draw(st.booleans())},
        "c": c,
        "spec": spec,
        "x": draw(faulty_input(cls._ndims, c, spec, fault)),
        "module_dtype": draw(st.sampled_from(MODULE_DTYPES[spec.dtype])),
        "policy": draw(st.sampled_from((None, None, True, False))),
        "warm": draw(st.integers(0, 3)),
    }


def _train_step(layer: nn.Module, x: Tensor, seed: int) -> None:
    xx = x.detach().requires_grad_(True)
    y = layer(xx)
    torch.autograd.backward(y, upstream_grad(y, seed))


def _check_layer_call(case, layer: nn.Module, x: Tensor, train: bool) -> str:
    """Run one accepted call and check its documented invariants; returns the outcome."""
    spec = case["spec"]
    before = snapshot(layer)
    twin = None
    if spec.dtype in HALF and spec.finite:
        twin = copy.deepcopy(layer).float()
    xo = x.detach().requires_grad_(True)
    y = layer(xo)
    assert isinstance(y, Tensor) and y.shape == x.shape, "shape not kept"
    assert y.dtype == x.dtype, f"output dtype {y.dtype} for input dtype {x.dtype}"
    params = [p for p in layer.parameters() if p.requires_grad]
    if y.numel() > 0:
        grads = torch.autograd.grad(y, [xo, *params], upstream_grad(y, spec.seed))
    else:
        grads = ()
    skipped = train and layer.raise_on_non_finite is False and not spec.finite and x.numel() > 0
    if spec.finite:
        assert bool(torch.isfinite(y).all()), "non-finite output from finite input"
        for g in grads:
            assert bool(torch.isfinite(g).all()), "non-finite gradient from finite input"
        for name, b in layer.named_buffers():
            if b.is_floating_point():
                assert bool(torch.isfinite(b).all()), f"buffer {name} not finite"
    if skipped:
        # NormBase's policy False: the batch is counted, no state changes, backward included.
        after = snapshot(layer)
        counter = "buffer non_finite_batches"
        assert int(after[counter]) == int(before[counter]) + 1
        after[counter] = before[counter]
        assert_same_state(before, after, "non-finite batch with raise_on_non_finite=False")
    if not train:
        assert_same_state(before, snapshot(layer), "eval call")  # backward included
        assert same_tensor(layer(x), y.detach()), "eval is not deterministic"
    if twin is not None:
        # The same values in float32: half precision changes roundings, not results.
        yt = twin(x.detach().float())
        tol = 2 * BASE_TOL[spec.dtype]
        scale = max([1.0, *yt.detach().abs().reshape(-1).tolist()])
        _close(y, yt, tol, tol * scale, "float32 twin")
    return DOCUMENTED


def _layer_example(name, ndim, values, dtype=torch.float16, module_dtype=None, warm=1) -> dict:
    """An explicit case of layer_cases (run on every session, whatever hypothesis draws)."""
    classes, kwargs = LAYER_TABLE[name]
    cls = classes[ndim]
    shape = (4, 3) if cls._ndims[0] == 2 else (2, 3, 2, 2)
    spec = Spec(shape, dtype, values, seed=5)
    return {
        "name": name,
        "cls": cls,
        "kwargs": {**kwargs, "affine": True},
        "c": 3,
        "spec": spec,
        "x": make_tensor(spec),
        "module_dtype": module_dtype or dtype,
        "policy": None,
        "warm": warm,
    }


@hsettings(max_examples=450)
@given(case=layer_cases())
# The fixed bugs' cases: output dtype (brn-dtype), layer scaling in float16 (online-ls-half),
# float16 statistics above 65504 (half-overflow).
@example(case=_layer_example("BatchRenorm", 1, "normal", module_dtype=torch.float32))
@example(case=_layer_example("BatchRenorm", 1, "normal", torch.float32, torch.float64))
@example(case=_layer_example("BatchRenorm", 2, "wide"))
@example(case=_layer_example("OnlineNorm[ls]", 1, "big_mean"))
@example(case=_layer_example("OnlineNorm[ls]", 2, "wide", warm=3))
@example(case=_layer_example("MABN[mean_free]", 1, "big_mean", warm=3))
@example(case=_layer_example("MABN", 2, "wide", warm=3))
def test_normalization_layers_invariants(case):
    """Batch Renorm, FullNorm (every estimator), OnlineNorm (every ecm), MABN (and mean_free) on
    generated inputs: documented rejection changing nothing, or output of the input's shape and
    dtype, finite output, gradients and buffers for finite input, eval stateless and
    deterministic, the non-finite policy, and agreement with a float32 copy for half inputs."""
    spec, x = case["spec"], case["x"]
    layer = case["cls"](case["c"], **case["kwargs"]).to(case["module_dtype"])
    layer.raise_on_non_finite = case["policy"]
    _randomize_affine([layer], spec.seed)
    warm = make_tensor(
        Spec((4, case["c"], *spec.shape[2:]), spec.dtype, "normal", seed=spec.seed + 7)
    )
    for _ in range(case["warm"]):
        _train_step(layer, warm, spec.seed)
    for train in (True, False):
        layer.train(train)
        expected = expected_error(layer, x, train)
        if expected is not None:
            assert_rejects(layer, lambda: layer(x), expected)  # noqa: B023
            record(CAT_LAYERS, error_outcome(expected.exc))
            continue
        record(CAT_LAYERS, _check_layer_call(case, layer, x, train))


# =============================================================================================
# 3. convert: every registered method (the baselines gn, ln, none, online-norm, mabn included)
# =============================================================================================

CAT_CONVERT = "convert + converted models (every method)"
CAT_CONVERT_ARGS = "convert: rejected arguments"

# (producer factory (c_in, c) -> module, torch BN class, normlab BN class, kind, spatial dims)
ARCHS = {
    "linear": (lambda ci, c: nn.Linear(ci, c), nn.BatchNorm1d, BatchNorm1d, "1d", 0),
    "conv1d": (lambda ci, c: nn.Conv1d(ci, c, 3, padding=1), nn.BatchNorm1d, BatchNorm1d, "1d", 1),
    "conv2d": (lambda ci, c: nn.Conv2d(ci, c, 3, padding=1), nn.BatchNorm2d, BatchNorm2d, "2d", 2),
    "conv3d": (lambda ci, c: nn.Conv3d(ci, c, 1), nn.BatchNorm3d, BatchNorm3d, "3d", 3),
}
NO_3D = ("online-norm", "mabn")  # methods without a 3d layer


def _model(arch: str, ci: int, c: int, torch_bn: bool, dtype: torch.dtype, seed: int):
    make, tbn, nbn, _kind, _sp = ARCHS[arch]
    torch.manual_seed(seed)
    model = nn.Sequential(make(ci, c), (tbn if torch_bn else nbn)(c), nn.ReLU())
    return model.to(dtype)


@st.composite
def convert_cases(draw):
    arch = draw(st.sampled_from(sorted(ARCHS)))
    ci, c = draw(st.sampled_from((1, 2, 3))), draw(st.sampled_from((1, 2, 4, 6)))
    spatial = ARCHS[arch][4]
    spec = draw(specs(2 + spatial, ci, values=VALUE_KINDS))
    return {
        "arch": arch,
        "ci": ci,
        "c": c,
        "spec": spec,
        "method": draw(st.sampled_from(normlab.list_methods())),
        "torch_bn": draw(st.booleans()),
        "warm": draw(st.integers(0, 2)),
    }


def _slot_expected(slot: nn.Module, z: Tensor, train: bool) -> Expected | None:
    """The documented rejection of a converted slot's layer on its input ``z``."""
    if isinstance(slot, NoNorm):
        return None
    count = z.numel() // z.shape[1]
    if isinstance(slot, nn.GroupNorm):  # torch: one value per group and sample
        if z.shape[0] * z.shape[1] // slot.num_groups * math.prod(z.shape[2:]) == 1:
            return Expected(ValueError, ("Expected more than 1 value per channel",))
        return None
    if isinstance(slot, nn.modules.batchnorm._BatchNorm) and not isinstance(slot, NormBase):
        if (train or not slot.track_running_stats) and count == 1:
            return Expected(ValueError, ("Expected more than 1 value per channel",))
        return None
    return expected_error(slot, z, train)


def _convert_example(arch: str, method: str, values: str) -> dict:
    """An explicit float16 case of convert_cases."""
    ci = 3
    shape = (4, ci) if arch == "linear" else (2, ci, 3, 3)
    spec = Spec(shape, torch.float16, values, seed=3)
    return {"arch": arch, "ci": ci, "c": 4, "spec": spec, "method": method, "torch_bn": False}


@hsettings(max_examples=160)
@given(case=convert_cases())
@example(case={**_convert_example("linear", "bn", "wide"), "warm": 1})
@example(case={**_convert_example("linear", "torch-bn", "wide"), "warm": 1})
@example(case={**_convert_example("conv2d", "online-norm", "big_mean"), "warm": 2})
@example(case={**_convert_example("conv2d", "brn", "wide"), "warm": 1})
@example(case={**_convert_example("linear", "mabn", "wide"), "warm": 2})
def test_convert_every_method(case):
    """convert fills the slot with each registered method's layer (or refuses a kind it has no
    layer for, changing nothing); the converted model keeps the documented invariants on
    generated inputs: finite output and gradients for finite input, output shape, eval stateless
    and deterministic, and clean rejections (one value per channel, non-finite batches)."""
    spec, method = case["spec"], case["method"]
    model = _model(case["arch"], case["ci"], case["c"], case["torch_bn"], spec.dtype, spec.seed)
    kind = ARCHS[case["arch"]][3]
    if kind == "3d" and method in NO_3D:
        expected = Expected(ValueError, (f"method {method!r} has no layer for '3d' slots",))
        assert_rejects(model, lambda: normlab.convert(model, method), expected)
        record(CAT_CONVERT, VALUE_ERROR)
        return
    assert normlab.convert(model, method) is model
    slot = model[1]
    if normlab.get_method(method).bias:
        assert isinstance(slot, NoNorm) and model[0].bias is not None
    x = make_tensor(spec)
    warm = make_tensor(Spec((4, *spec.shape[1:]), spec.dtype, "normal", seed=spec.seed + 7))
    for _ in range(case["warm"]):
        model.train()
        _train_step(model, warm, spec.seed)
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            z = model[0](x)
        expected = _slot_expected(slot, z, train)
        if expected is not None and train and type(slot) in TORCH_BN.values():
            # torch's BatchNorm counts the batch in num_batches_tracked before its size check
            # raises (torch's own behaviour): everything else is unchanged.
            before = snapshot(model)
            with pytest.raises(expected.exc, match=expected.fragments[0]):
                model(x)
            after = snapshot(model)
            key = "buffer 1.num_batches_tracked"
            if key in before:
                assert int(after[key]) == int(before[key]) + 1
                after[key] = before[key]
            assert_same_state(before, after, "model")
            record(CAT_CONVERT, error_outcome(expected.exc))
            continue
        if expected is not None:
            assert_rejects(model, lambda: model(x), expected)  # noqa: B023
            record(CAT_CONVERT, error_outcome(expected.exc))
            continue
        _check_model_call(model, x, z, spec, train)
        record(CAT_CONVERT, DOCUMENTED)


def _torch_overflow(model: nn.Module, name: str, buffer: Tensor) -> bool:
    """Whether ``buffer`` is the float16 ``running_var`` of a torch-convention BatchNorm (torch's
    or normlab's drop-in) holding +inf where a variance above 65504 overflowed: torch's own
    behaviour, kept by normlab's BatchNorm (docs/bad_input.md). NaN is never allowed."""
    owner = model.get_submodule(name.rpartition(".")[0])
    torch_bn = isinstance(owner, nn.modules.batchnorm._BatchNorm) or type(owner) in (
        BatchNorm1d,
        BatchNorm2d,
        BatchNorm3d,
        SyncBatchNorm,
    )
    return (
        torch_bn
        and name.endswith("running_var")
        and buffer.dtype == torch.float16
        and not bool(buffer.isnan().any())
    )


def _check_model_call(model: nn.Module, x: Tensor, z: Tensor, spec: Spec, train: bool) -> None:
    """One accepted call of a converted model (``z``: its slot's input) and its invariants."""
    before = snapshot(model)
    twin = copy.deepcopy(model).float() if x.dtype in HALF and spec.finite else None
    xo = x.detach().requires_grad_(True)
    y = model(xo)
    assert y.shape == z.shape and y.dtype == x.dtype
    params = [p for p in model.parameters() if p.requires_grad]
    g_up = upstream_grad(y, spec.seed)
    grads = torch.autograd.grad(y, [xo, *params], g_up, allow_unused=True)
    if spec.finite:
        assert bool(torch.isfinite(y).all()), "non-finite output from finite input"
        if twin is not None and not all(g is None or bool(g.isfinite().all()) for g in grads):
            # A half-precision gradient may overflow where its true value does (a weight
            # gradient sums g * x with |x| ~ 1e4): a gradient tensor may hold inf only when the
            # float32 model's gradient of the same tensor comes within a factor 2 of the dtype's
            # largest value (per tensor: a ReLU at a tie can move it to another entry).
            xt = x.detach().float().requires_grad_(True)
            yt = twin(xt)
            pt = [p for p in twin.parameters() if p.requires_grad]
            ref = torch.autograd.grad(yt, [xt, *pt], g_up.float(), allow_unused=True)
            big = torch.finfo(x.dtype).max / 2
            for g, r in zip(grads, ref, strict=True):
                if g is not None and not bool(g.isfinite().all()):
                    assert not bool(g.isnan().any()), f"NaN gradient {g}"
                    assert r is not None and float(r.abs().max()) > big, f"overflow {g} ({r})"
            grads = ()
        for g in grads:
            assert g is None or bool(torch.isfinite(g).all()), "non-finite gradient"
        for name, b in model.named_buffers():
            if b.is_floating_point() and not _torch_overflow(model, name, b):
                assert bool(torch.isfinite(b).all()), f"buffer {name} not finite"
    if not train:
        after = snapshot(model)
        for key in [k for k in after if k.startswith("grad ")]:
            after[key] = before[key]  # autograd.grad leaves .grad alone; be explicit anyway
        assert_same_state(before, after, "eval call")
        assert same_tensor(model(x), y.detach()), "eval is not deterministic"
    for name, m in model.named_modules():
        assert m.training == train, f"{name} mode changed"


# Bad arguments: (method or None for "any", bad option mapping, exception, fragments)
BAD_OPTIONS = (
    ("bn", {"eps": -1.0}, ValueError, ("eps must be a float > 0", "-1.0")),
    ("bn", {"eps": math.nan}, ValueError, ("eps must be a float > 0", "nan")),
    ("bn", {"momentum": 2.0}, ValueError, ("momentum", "2.0")),
    ("brn", {"r_max": 0.5}, ValueError, ("r_max must be >= 1", "0.5")),
    ("brn", {"d_max": -1.0}, ValueError, ("d_max must be >= 0", "-1.0")),
    ("brn", {"warmup_steps": -1}, ValueError, ("warmup_steps", "-1")),
    ("brn", {"momentum": None}, ValueError, ("momentum", "None")),
    ("fn", {"alpha": 0.0}, ValueError, ("alpha must be a float in (0, 1]", "0.0")),
    ("fn", {"alpha_decay": -1.0}, ValueError, ("alpha_decay", "-1.0")),
    ("fn", {"estimator": "exact"}, ValueError, ("estimator must be one of", "'exact'")),
    ("fn", {"outer_momentum": 0.0}, ValueError, ("outer_momentum", "0.0")),
    ("fn", {"affine": 1}, TypeError, ("affine must be a bool", "1")),
    ("fn", {"eps": 0.0}, ValueError, ("eps must be a float > 0", "0.0")),
    ("online-norm", {"alpha_fwd": 1.0}, ValueError, ("alpha_fwd must be a float in [0, 1)", "1.0")),
    ("online-norm", {"alpha_bkw": -0.5}, ValueError, ("alpha_bkw", "-0.5")),
    ("online-norm", {"ecm": "bn"}, ValueError, ("ecm must be one of", "'bn'")),
    ("online-norm", {"ls_eps": 0.0}, ValueError, ("ls_eps must be a float > 0", "0.0")),
    ("online-norm", {"clamp_value": -1.0}, ValueError, ("clamp_value", "-1.0")),
    ("mabn", {"buffer_size": 0}, ValueError, ("buffer_size must be an int >= 1", "0")),
    ("mabn", {"warmup_iters": -1}, ValueError, ("warmup_iters", "-1")),
    ("mabn", {"r_max": 0.5}, ValueError, ("r_max must be a float >= 1", "0.5")),
    ("mabn", {"d_max": -1.0}, ValueError, ("d_max", "-1.0")),
    ("mabn", {"momentum": None}, ValueError, ("momentum", "None")),
    ("fn-batch", {"alpha": 2.0}, ValueError, ("alpha", "2.0")),
    # torch's GroupNorm / BatchNorm check none of these: the method factories do.
    ("gn", {"eps": -1.0}, ValueError, ("eps must be a float > 0", "-1.0")),
    ("ln", {"eps": -1.0}, ValueError, ("eps must be a float > 0", "-1.0")),
    ("gn", {"eps": "small"}, ValueError, ("eps must be a float > 0", "'small'")),
    ("gn", {"eps": math.inf}, ValueError, ("eps must be a float > 0", "inf")),
    ("gn", {"affine": 1}, TypeError, ("affine must be a bool", "int")),
    ("torch-bn", {"eps": -1.0}, ValueError, ("'torch-bn'", "eps must be a float > 0", "-1.0")),
    ("torch-bn", {"momentum": 2.0}, ValueError, ("momentum", "2.0")),
    ("torch-bn", {"track_running_stats": None}, TypeError, ("track_running_stats", "NoneType")),
    ("gn", {"max_groups": 0}, ValueError, ("max_groups must be an int >= 1", "got 0")),
    ("gn", {"max_groups": -1}, ValueError, ("max_groups must be an int >= 1", "-1")),
    ("gn", {"max_groups": 2.5}, ValueError, ("max_groups must be an int >= 1", "2.5")),
    ("gn", {"max_groups": True}, ValueError, ("max_groups must be an int >= 1", "True")),
)


@st.composite
def convert_bad_args(draw):
    what = draw(
        st.sampled_from(
            ("unknown_method", "method_type", "options_type", "unknown_option", "bad_value")
            + ("bad_value", "model_type")
        )
    )
    valid = normlab.list_methods()
    arch = draw(st.sampled_from(("linear", "conv2d")))
    base = {"arch": arch, "what": what, "seed": draw(st.integers(0, 1000))}
    if what == "unknown_method":
        name = draw(st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=8))
        name = name if name not in valid else name + "-x"
        return {**base, "args": (name, None), "exc": ValueError}
    if what == "method_type":
        bad = draw(st.sampled_from((3, 2.5, None, ["bn"], b"bn")))
        return {**base, "args": (bad, None), "exc": TypeError}
    if what == "options_type":
        bad = draw(st.sampled_from(([("eps", 1e-3)], "eps=1e-3", 3, ("eps",))))
        return {**base, "args": (draw(st.sampled_from(valid)), bad), "exc": TypeError}
    if what == "unknown_option":
        method = draw(st.sampled_from(valid))
        key = draw(st.sampled_from(("lr", "momentun", "epsilon", "groups", "estimater")))
        return {**base, "args": (method, {key: 1}), "exc": ValueError}
    if what == "bad_value":
        method, options, exc, fragments = draw(st.sampled_from(BAD_OPTIONS))
        return {**base, "args": (method, options), "exc": exc, "fragments": fragments}
    bad = draw(st.sampled_from(("model", None, [nn.Linear(2, 2)], nn.Linear)))
    return {**base, "args": (draw(st.sampled_from(valid)), None), "model": bad}


@hsettings(max_examples=90)
@given(case=convert_bad_args())
def test_convert_rejects_bad_arguments(case):
    """Unknown or mistyped methods and options, out-of-range option values and non-modules:
    a ValueError/TypeError naming the expected and the received, and the model unchanged."""
    model = _model(case["arch"], 3, 4, True, torch.float32, case["seed"])
    method, options = case["args"]
    what = case["what"]
    if what == "model_type":
        bad = case["model"]
        expected = Expected(TypeError, ("convert expected an nn.Module", type(bad).__name__))
        assert_rejects(None, lambda: normlab.convert(bad, method, options), expected)
        record(CAT_CONVERT_ARGS, TYPE_ERROR)
        return
    if what == "unknown_method":
        fragments = ("unknown method", repr(method), "valid methods", "bn")
    elif what == "method_type":
        fragments = ("method must be a name (str) or Method", type(method).__name__)
    elif what == "options_type":
        fragments = ("options must be a mapping", type(options).__name__)
    elif what == "unknown_option":
        fragments = ("unknown option", next(iter(options)), "valid:")
    else:
        fragments = case["fragments"]
    expected = Expected(case["exc"], fragments)
    assert_rejects(model, lambda: normlab.convert(model, method, options), expected)
    record(CAT_CONVERT_ARGS, error_outcome(case["exc"]))


# =============================================================================================
# 4. BNPreconditioner: recorded statistics and preconditioned gradients on generated batches
# =============================================================================================

CAT_BNP = "BNPreconditioner: training steps"
CAT_BNP_ARGS = "BNPreconditioner: rejected arguments and states"


def _bnp_model(arch: str, f: int, dtype: torch.dtype, seed: int, padding_mode: str) -> nn.Module:
    torch.manual_seed(seed)
    if arch == "mlp":
        model = nn.Sequential(nn.Linear(f, 5), nn.ReLU(), nn.Linear(5, 2))
    else:
        conv = nn.Conv2d(f, 4, 3, padding=1, padding_mode=padding_mode)
        model = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(4, 2, 1))
    return model.to(dtype)


def _bnp_stats(precond: BNPreconditioner) -> dict:
    return {n: e["running"] for n, e in precond.state_dict()["layers"].items()}


@st.composite
def bnp_cases(draw):
    arch = draw(st.sampled_from(("mlp", "conv")))
    f = draw(st.sampled_from((1, 2, 3)))
    ndim = 2 if arch == "mlp" else 4
    spec = draw(specs(ndim, f))
    fault = draw(st.sampled_from(FAULTS))
    return {
        "arch": arch,
        "f": f,
        "spec": spec,
        "fault": fault,
        "x": draw(faulty_input((ndim,), f, spec, fault)),
        "padding_mode": draw(st.sampled_from(("zeros", "reflect", "circular"))),
        # mostly the input's dtype; else a model of another dtype, which rejects the input
        "model_dtype": draw(st.sampled_from((spec.dtype,) * 5 + FLOATS)),
        "options": {
            "rho": draw(st.sampled_from((None, 0.9))),
            "floor": draw(st.sampled_from((0.0, 0.1))),
            "conv_stats": draw(st.sampled_from(("channel", "patch"))),
            "use_current_batch": draw(st.booleans()),
        },
        "warm": draw(st.integers(0, 2)),
    }


def _loss(y: Tensor) -> Tensor:
    return y.float().square().sum() / max(1, y.shape[0] if y.dim() else 1)


@hsettings(max_examples=200)
@given(case=bnp_cases())
def test_preconditioner_steps(case):
    """BNPreconditioner on generated batches: finite statistics always (non-finite batch
    moments keep the previous values), finite preconditioned gradients from finite gradients,
    nothing recorded from an empty batch or in eval mode, and an input the hooked layer rejects
    raises the layer's own error with no statistics recorded and no hook left behind."""
    spec, x = case["spec"], case["x"]
    dtype = case["model_dtype"]
    model = _bnp_model(case["arch"], case["f"], dtype, spec.seed, case["padding_mode"])
    precond = BNPreconditioner(model, **case["options"])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    shape = (4, case["f"]) if case["arch"] == "mlp" else (4, case["f"], 4, 4)
    warm = make_tensor(Spec(shape, dtype, "normal", seed=spec.seed + 7))
    for _ in range(case["warm"]):
        opt.zero_grad()
        _loss(model(warm)).backward()
        precond.precondition_()
        opt.step()
    for train in (True, False):
        model.train(train)
        opt.zero_grad()
        before, stats = snapshot(model), _bnp_stats(precond)
        try:
            y = model(x)
        except (RuntimeError, TypeError, ValueError):
            # An input the hooked layer rejects (wrong features, dimensionality or dtype; a
            # reflect/circular padding larger than the input): the layer's own error, and
            # nothing recorded.
            assert_same_state(before, snapshot(model), "model")
            assert_same_state(stats, _bnp_stats(precond), "preconditioner statistics")
            record(CAT_BNP, DOCUMENTED)
            continue
        _loss(y).backward()
        raw = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        precond.precondition_()
        after = _bnp_stats(precond)
        for name, entry in after.items():
            if entry is not None:
                assert bool(torch.isfinite(entry["mean"]).all()), f"{name} mean not finite"
                assert bool(torch.isfinite(entry["var"]).all()), f"{name} var not finite"
                assert bool((entry["var"] >= 0).all()), f"{name} var negative"
        if not train or x.numel() == 0:
            assert_same_state(stats, after, "statistics after an unrecorded forward")
        finite_in = case["fault"] == "none" and spec.finite
        if finite_in and all(bool(torch.isfinite(g).all()) for g in raw.values()):
            for n, p in model.named_parameters():
                assert p.grad is None or bool(torch.isfinite(p.grad).all()), f"grad {n}"
        now = snapshot(model)
        for key in before:
            if key.split(" ")[0] in ("_forward_pre_hooks", "_forward_hooks", "training", "type"):
                assert before[key] == now[key], f"{key} changed"
        record(CAT_BNP, DOCUMENTED)


def _bnp_bad_option(draw) -> tuple[dict, type[Exception], tuple[str, ...]]:
    name, value, exc, fragment = draw(
        st.sampled_from(
            (
                ("rho", 1.5, ValueError, "rho must be None or a float in (0, 1)"),
                ("rho", 0.0, ValueError, "rho must be None or a float in (0, 1)"),
                ("rho", math.nan, ValueError, "rho must be None or a float in (0, 1)"),
                ("rho", True, ValueError, "rho must be None or a float in (0, 1)"),
                ("rho", "0.9", ValueError, "rho must be None or a float in (0, 1)"),
                ("eps", 0.0, ValueError, "eps must be a finite float > 0"),
                ("eps", -1e-5, ValueError, "eps must be a finite float > 0"),
                ("eps", math.inf, ValueError, "eps must be a finite float > 0"),
                ("floor", -0.1, ValueError, "floor must be a finite float >= 0"),
                ("floor", math.nan, ValueError, "floor must be a finite float >= 0"),
                ("conv_stats", "pixel", ValueError, "conv_stats must be 'channel' or 'patch'"),
                ("use_current_batch", 1, TypeError, "use_current_batch must be a bool"),
                ("process_group", 3, TypeError, "process_group must be None or"),
                ("modules", ["missing"], ValueError, "is not a submodule name of the model"),
                ("modules", [], ValueError, "modules is empty"),
                ("modules", "0", TypeError, "not a single one"),
                ("modules", [3], TypeError, "modules must contain nn.Module or str"),
                ("modules", ["1"], TypeError, "BNP supports nn.Linear and nn.Conv2d"),
                ("modules", [nn.Linear(2, 2)], ValueError, "not part of the model"),
                ("modules", ["0", "0"], ValueError, "given twice"),
            )
        )
    )
    received = {
        "rho": repr(value),
        "eps": repr(value),
        "floor": repr(value),
        "conv_stats": repr(value),
        "use_current_batch": type(value).__name__,
        "process_group": type(value).__name__,
    }.get(name, "")
    return {name: value}, exc, (fragment, received)


def _corrupt_state(draw, state: dict) -> tuple[dict, type[Exception], tuple[str, ...]]:
    """A corrupted copy of a valid state_dict: (state, exception, fragments)."""
    bad = copy.deepcopy(state)
    layer = draw(st.sampled_from(sorted(bad["layers"])))
    entry = bad["layers"][layer]
    how = draw(
        st.sampled_from(
            (
                "not_dict",
                "missing_key",
                "version",
                "options",
                "rho_resolved",
                "layer_names",
                "entry_keys",
                "new_step",
                "shape",
                "negative_var",
                "int_tensor",
                "num_batches",
                "nan_var",
                "inf_mean",
            )
        )
    )
    stats = entry["running"]
    if how == "not_dict":
        return [bad], TypeError, ("expected a dict", "list")
    if how == "missing_key":
        key = draw(st.sampled_from(("version", "options", "rho_resolved", "layers")))
        del bad[key]
        return bad, ValueError, ("missing", repr(key))
    if how == "version":
        bad["version"] = 99
        return bad, ValueError, ("version 1 expected", "99")
    if how == "options":
        bad["options"]["floor"] = -1.0
        return bad, ValueError, ("floor must be a finite float >= 0", "-1.0")
    if how == "rho_resolved":
        bad["rho_resolved"] = 1.5
        return bad, ValueError, ("rho_resolved", "1.5")
    if how == "layer_names":
        bad["layers"]["nonexistent"] = entry
        return bad, ValueError, ("layer names do not match", "nonexistent")
    if how == "entry_keys":
        del entry["new_step"]
        return bad, ValueError, (repr(layer), "'running', 'before_step', 'new_step'")
    if how == "new_step":
        entry["new_step"] = 1
        return bad, TypeError, (repr(layer), "new_step must be a bool")
    if how == "shape":
        stats["mean"] = torch.zeros(stats["mean"].numel() + 1)
        return bad, ValueError, (repr(layer), "expected", str(tuple(stats["mean"].shape)))
    if how == "negative_var":
        stats["var"] = -stats["var"] - 1
        return bad, ValueError, (repr(layer), "negative")
    if how == "int_tensor":
        stats["mean"] = stats["mean"].long()
        return bad, TypeError, (repr(layer), "must be a floating tensor")
    if how == "num_batches":
        stats["num_batches"] = draw(st.sampled_from((0, -1, True, 1.5)))
        return bad, ValueError, (repr(layer), "num_batches must be an int >= 1")
    if how == "nan_var":
        stats["var"] = torch.full_like(stats["var"], math.nan)
        return bad, ValueError, (repr(layer), "var must be finite", "NaN or Inf")
    stats["mean"] = torch.full_like(stats["mean"], math.inf)
    return bad, ValueError, (repr(layer), "mean must be finite", "NaN or Inf")


@hsettings(max_examples=110)
@given(data=st.data())
def test_preconditioner_rejects_bad_arguments(data):
    """BNPreconditioner's constructor (bad options, modules, model) and load_state_dict
    (corrupted states): a clean ValueError/TypeError naming the problem, nothing hooked on the
    model, and the preconditioner's state_dict unchanged."""
    arch = data.draw(st.sampled_from(("mlp", "conv")))
    model = _bnp_model(arch, 3, torch.float32, data.draw(st.integers(0, 100)), "zeros")
    target = data.draw(st.sampled_from(("constructor", "model", "load_state_dict")))
    if target == "constructor":
        options, exc, fragments = _bnp_bad_option(data.draw)
        assert_rejects(model, lambda: BNPreconditioner(model, **options), Expected(exc, fragments))
        record(CAT_BNP_ARGS, error_outcome(exc))
        return
    if target == "model":
        bad = data.draw(st.sampled_from(("model", None, [nn.Linear(2, 2)], nn.ReLU())))
        if isinstance(bad, nn.Module):
            expected = Expected(ValueError, ("found no nn.Linear or nn.Conv2d layer", "ReLU"))
        else:
            expected = Expected(TypeError, ("expected an nn.Module", type(bad).__name__))
        assert_rejects(None, lambda: BNPreconditioner(bad), expected)
        record(CAT_BNP_ARGS, error_outcome(expected.exc))
        return
    precond = BNPreconditioner(model)
    x = torch.randn((4, 3) if arch == "mlp" else (4, 3, 4, 4))
    _loss(model(x)).backward()
    precond.precondition_()
    state, exc, fragments = _corrupt_state(data.draw, precond.state_dict())
    assert_rejects(
        model,
        lambda: precond.load_state_dict(state),
        Expected(exc, fragments),
        extra_state=precond.state_dict,
    )
    record(CAT_BNP_ARGS, error_outcome(exc))


# =============================================================================================
# 5. fold_batchnorm and recompute_statistics
# =============================================================================================

CAT_FOLD = "fold_batchnorm"
CAT_RECOMPUTE = "recompute_statistics"

# producer class -> (factory (ci, c), input spatial dims, BN kind)
PRODUCERS = {
    "Linear": (lambda ci, c, bias: nn.Linear(ci, c, bias=bias), 0, 1),
    "Conv1d": (lambda ci, c, bias: nn.Conv1d(ci, c, 3, padding=1, bias=bias), 1, 1),
    "Conv2d": (lambda ci, c, bias: nn.Conv2d(ci, c, 3, padding=1, bias=bias), 2, 2),
    "Conv3d": (lambda ci, c, bias: nn.Conv3d(ci, c, 1, bias=bias), 3, 3),
}
# BN classes by kind; the foldable ones (exact classes) and others that fold_batchnorm keeps.
FOLDABLE = {  # FullNorm's eval map is BN's
    1: (nn.BatchNorm1d, BatchNorm1d, BatchRenorm1d, SyncBatchNorm, FullNorm1d),
    2: (nn.BatchNorm2d, BatchNorm2d, BatchRenorm2d, SyncBatchNorm, FullNorm2d),
    3: (nn.BatchNorm3d, BatchNorm3d, BatchRenorm3d, SyncBatchNorm, FullNorm3d),
}
KEPT = {1: (MABN1d, OnlineNorm1d), 2: (MABN2d, OnlineNorm2d), 3: ()}
STAT_KINDS = ("normal", "zero_var", "big_mean", "zero_gamma")


def _set_stats(bn: nn.Module, kind: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    c = bn.num_features
    mean = torch.randn(c, generator=gen, dtype=torch.float64)
    var = torch.rand(c, generator=gen, dtype=torch.float64) + 0.1
    if kind == "zero_var":
        var[0] = 0.0
    elif kind == "big_mean":
        mean, var = 1e4 + mean, torch.full_like(var, 1e-4)
    with torch.no_grad():
        if getattr(bn, "running_mean", None) is not None:
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
        if kind == "zero_gamma" and getattr(bn, "weight", None) is not None:
            bn.weight[0] = 0.0


@st.composite
def fold_cases(draw):
    producer = draw(st.sampled_from(sorted(PRODUCERS)))
    make, spatial, kind = PRODUCERS[producer]
    bn_cls = draw(st.sampled_from(FOLDABLE[kind] + KEPT[kind]))
    ci, c = draw(st.sampled_from((1, 2, 3))), draw(st.sampled_from((1, 2, 4)))
    values = ("normal", "zero_var_channel", "big_mean", "wide", "constant", "nan")
    return {
        "producer": producer,
        "bn_cls": bn_cls,
        "ci": ci,
        "c": c,
        "bias": draw(st.booleans()),
        "stats": draw(st.sampled_from(STAT_KINDS)),
        "mode": draw(st.sampled_from(("eval", "eval", "train", "no_stats"))),
        "relu": draw(st.booleans()),
        "spec": draw(specs(2 + spatial, ci, values=values)),
        "fault": draw(st.sampled_from(("none",) * 8 + ("lazy", "not_module"))),
    }


def _fold_model(case) -> nn.Module:
    make, _spatial, _kind = PRODUCERS[case["producer"]]
    spec = case["spec"]
    torch.manual_seed(spec.seed)
    cls, c = case["bn_cls"], case["c"]
    if case["mode"] == "no_stats" and "track_running_stats" in inspect.signature(cls).parameters:
        bn = cls(c, track_running_stats=False)
    else:
        bn = cls(c)
    _randomize_affine([bn], spec.seed)
    _set_stats(bn, case["stats"], spec.seed)
    layers = [make(case["ci"], c, case["bias"]), bn] + ([nn.ReLU()] if case["relu"] else [])
    model = nn.Sequential(*layers).to(spec.dtype)
    return model.train(case["mode"] == "train")


@hsettings(max_examples=160)
@given(case=fold_cases())
def test_fold_batchnorm(case):
    """fold_batchnorm on generated models and inputs: the model is left unchanged (every
    parameter, buffer, hook and mode); an eval-mode BN of a folded class after a Linear/Conv is
    replaced by Identity and the folded model computes the original function (float64 oracle,
    tolerance from the conditioning of the fold); anything else is kept."""
    spec = case["spec"]
    model = _fold_model(case)
    if case["fault"] == "lazy":  # an uninitialized LazyLinear cannot be copied
        model[0] = nn.LazyLinear(case["c"])
        expected = Expected(ValueError, ("uninitialized lazy module", "run one forward pass"))
        assert_rejects(model, lambda: fold_batchnorm(model), expected)
        record(CAT_FOLD, VALUE_ERROR)
        return
    if case["fault"] == "not_module":  # a list of the model's modules
        before = snapshot(model)
        expected = Expected(TypeError, ("fold_batchnorm expected an nn.Module", "got list"))
        assert_rejects(None, lambda: fold_batchnorm(list(model)), expected)
        assert_same_state(before, snapshot(model), "model")
        record(CAT_FOLD, TYPE_ERROR)
        return
    before = snapshot(model)
    folded = fold_batchnorm(model)
    assert_same_state(before, snapshot(model), "model after fold_batchnorm")
    bn = model[1]
    foldable = (
        type(bn) in FOLDABLE[1] + FOLDABLE[2] + FOLDABLE[3]
        and not bn.training
        and bn.running_mean is not None
    )
    assert isinstance(folded[1], nn.Identity) == foldable, type(folded[1]).__name__
    for name, m in folded.named_modules():  # the Identity in a folded BN's place included
        assert m.training == (case["mode"] == "train"), f"{name} mode"
    x = make_tensor(spec)
    if foldable:
        with torch.no_grad():
            y, yf = model(x), folded(x)
            ref = copy.deepcopy(model).double()(x.double())
        assert yf.shape == y.shape and yf.dtype == y.dtype
        if spec.finite and y.numel() > 0:
            # Rounding of W' = s W and b' = s (b - mean) + beta: relative u to terms of size
            # |s| (|W x| + |b| + |mean|) + |beta|.
            with torch.no_grad():
                s = bn.weight.double() if bn.weight is not None else torch.ones(case["c"])
                s = s.abs() / torch.sqrt(bn.running_var.double() + bn.eps)
            with torch.no_grad():
                z = copy.deepcopy(model[0]).double()(x.double())
            size = s.max() * (z.abs().max() + bn.running_mean.double().abs().max() + 1)
            tol = BASE_TOL[spec.dtype] * (1 + float(size)) * 4
            # Values beyond the dtype's range overflow in the original model too: not compared.
            fits = ref.abs() <= torch.finfo(spec.dtype).max / 2
            _close(yf[fits], ref[fits], BASE_TOL[spec.dtype], tol, "folded vs float64")
            _close(y[fits], ref[fits], BASE_TOL[spec.dtype], tol, "original vs float64")
            assert bool(torch.isfinite(yf[fits]).all()), "non-finite folded output"
    record(CAT_FOLD, DOCUMENTED)


@st.composite
def recompute_cases(draw):
    producer = draw(st.sampled_from(sorted(PRODUCERS)))
    _make, spatial, kind = PRODUCERS[producer]
    ci = draw(st.sampled_from((1, 2, 3)))
    dtype = draw(st.sampled_from(FLOATS))
    batches = []
    values = ("normal",) * 3 + ("zero_var_channel", "big_mean", "wide", "constant", "nan", "inf")
    for _ in range(draw(st.integers(1, 3))):
        spec = draw(specs(2 + spatial, ci, dtypes=(dtype,), values=values))
        batches.append(spec)
    return {
        "producer": producer,
        "bn_cls": draw(st.sampled_from(FOLDABLE[kind])),
        "ci": ci,
        "c": draw(st.sampled_from((1, 2, 4))),
        "dtype": dtype,
        "batches": batches,
        "tuples": draw(st.booleans()),
        "train": draw(st.booleans()),
        "fault": draw(
            st.sampled_from(
                ("none",) * 7 + ("empty", "iterator", "not_tensor", "channels", "not_module")
            )
        ),
    }


@hsettings(max_examples=200)
@given(case=recompute_cases())
def test_recompute_statistics(case):
    """recompute_statistics on generated data: running statistics equal the float64
    population mean and unbiased variance of the layer's input, with everything else (weights,
    num_batches_tracked, modes, hooks) unchanged; or a clean error (no batch, a one-shot
    iterator, a non-tensor batch, fewer than 2 values per channel, NaN/Inf) with the model
    unchanged, the running statistics already written restored."""
    make, _spatial, _kind = PRODUCERS[case["producer"]]
    dtype, c = case["dtype"], case["c"]
    torch.manual_seed(case["batches"][0].seed)
    bn = case["bn_cls"](c)
    model = nn.Sequential(make(case["ci"], c, True), bn, nn.ReLU()).to(dtype)
    model.train(case["train"])
    xs = [make_tensor(spec) for spec in case["batches"]]
    batches: list = [(x, torch.zeros(x.shape[0])) for x in xs] if case["tuples"] else xs
    fault = case["fault"]
    expected = None
    if fault == "empty":
        batches = []
        expected = Expected(ValueError, ("expected at least one batch", "got none"))
    elif fault == "iterator":
        batches = iter(batches)
        expected = Expected(TypeError, ("re-iterable collection", "list_iterator"))
    elif fault == "not_tensor":
        batches = [*batches, "batch"]
        expected = Expected(TypeError, ("a Tensor or a tuple/list", "str"))
    elif fault == "channels":
        spec = case["batches"][0]
        bad = Spec((2, case["ci"] + 1, *spec.shape[2:]), dtype, seed=spec.seed)
        batches = [*batches, make_tensor(bad)]
    else:
        count = sum(x.numel() // x.shape[1] for x in xs)
        name = f"{type(bn).__name__}({c})"
        if count < 2:
            expected = Expected(ValueError, ("at least 2 values per channel", name, f"got {count}"))
        elif not all(spec.finite for spec in case["batches"] if math.prod(spec.shape) > 0):
            expected = Expected(ValueError, ("expected finite inputs", name))
    if fault == "not_module":  # a list of the model's modules
        before = snapshot(model)
        expected = Expected(TypeError, ("recompute_statistics expected an nn.Module", "got list"))
        assert_rejects(None, lambda: recompute_statistics(list(model), batches), expected)
        assert_same_state(before, snapshot(model), "model")
        record(CAT_RECOMPUTE, TYPE_ERROR)
        return
    if fault == "channels":
        # The producer's own error; the statistics already written are restored.
        before = snapshot(model)
        with pytest.raises(RuntimeError):
            recompute_statistics(model, batches)
        assert_same_state(before, snapshot(model), "model")
        record(CAT_RECOMPUTE, DOCUMENTED)
        return
    if expected is not None:
        assert_rejects(model, lambda: recompute_statistics(model, batches), expected)
        record(CAT_RECOMPUTE, error_outcome(expected.exc))
        return
    with torch.no_grad():  # every value of each channel of the BN's input, in float64
        z = torch.cat([model[0](x).double().movedim(1, 0).reshape(c, -1) for x in xs], dim=1)
    # Unbiased for BN; biased for FN and Online Normalization (the variance they estimate).
    mean, var = z.mean(1), z.var(1, unbiased=not isinstance(bn, (_FullNorm, _OnlineNorm)))
    # float64 summation error (any order) of the mean, and its effect on the centred variance
    mean_err = 4 * torch.finfo(torch.float64).eps * z.shape[1] * z.abs().amax(1)
    var_err = 2 * var.sqrt() * mean_err + mean_err**2
    # The buffers' dtype: the model's, but float32 for a half-precision Batch Renorm.
    stat_dtype = bn.running_var.dtype
    if not all(bool(torch.isfinite(t.to(stat_dtype)).all()) for t in (mean, var)):
        # Statistics beyond the buffers' range (a variance above 65504 in float16): refused.
        name = f"{type(bn).__name__}({c})"
        expected = Expected(ValueError, (name, str(stat_dtype), "cast the layer to float32"))
        assert_rejects(model, lambda: recompute_statistics(model, batches), expected)
        record(CAT_RECOMPUTE, VALUE_ERROR)
        return
    before = snapshot(model)
    recompute_statistics(model, batches)
    after = snapshot(model)
    for name in ("running_mean", "running_var"):
        after[f"buffer 1.{name}"] = before[f"buffer 1.{name}"]
    assert_same_state(before, after, "everything but the running statistics")
    u = torch.finfo(stat_dtype).eps
    _close(bn.running_mean, mean.to(stat_dtype), 2 * u, mean_err, "running_mean")
    _close(bn.running_var, var.to(stat_dtype), 2 * u, var_err, "running_var")
    assert bool(torch.isfinite(bn.running_var).all()), "running_var overflow"
    record(CAT_RECOMPUTE, DOCUMENTED)


# =============================================================================================
# Bugs the suite found, now fixed: minimal reproductions kept as regression tests
# (docs/bad_input.md lists them; each was marked xfail(strict=True) until its fix)
# =============================================================================================


def test_bug_batchrenorm_training_output_dtype():
    """brn-dtype: a float16 batch in a float32 BatchRenorm1d (affine) gives a float16 training
    output, as its eval output and BatchNorm1d's; a float32 batch in a float64 layer gives
    float32. Oracle: torch's batch_norm in float64 (in warm-up Batch Renorm is BatchNorm)."""
    gen = torch.Generator().manual_seed(0)
    for layer_dtype, dtype in ((torch.float32, torch.float16), (torch.float64, torch.float32)):
        layer = BatchRenorm1d(3, dtype=layer_dtype)
        _randomize_affine([layer], 3)
        x = torch.randn(4, 3, generator=gen).to(dtype)
        assert BatchNorm1d(3, dtype=layer_dtype)(x).dtype == dtype
        y = layer.train()(x)
        assert y.dtype == dtype and layer.eval()(x).dtype == dtype
        w, b = layer.weight.double(), layer.bias.double()
        ref = F.batch_norm(x.double(), None, None, w, b, True, 0.0, layer.eps)
        tol = 2 * BASE_TOL[dtype]
        torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)


def test_bug_online_norm_layer_scaling_half_gradient():
    """online-ls-half: OnlineNorm1d(3) (ecm="ls") on an all-zero float16 batch: the input
    gradient is finite and equals the float32 layer's (about 316), where the rsqrt backward,
    (mean square + ls_eps)^-1.5 = 3e7, used to overflow float16 into NaN."""
    grads = []
    for dtype in (torch.float16, torch.float32):
        x = torch.zeros(2, 3, dtype=dtype, requires_grad=True)
        OnlineNorm1d(3)(x).float().sum().backward()
        grads.append(x.grad.float())
    assert bool(torch.isfinite(grads[0]).all()), grads[0]
    torch.testing.assert_close(grads[0], grads[1], rtol=2e-3, atol=2e-3)


def test_bug_online_norm_layer_scaling_half_output():
    """online-ls-half: OnlineNorm1d(3) on a float16 batch of 300s gives the float32 output (1
    everywhere), where the first sample's mean square, 9e4, used to overflow float16 into 0."""
    x = torch.full((2, 3), 300.0)
    expected = OnlineNorm1d(3)(x)
    got = OnlineNorm1d(3)(x.half())
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), expected, rtol=2e-3, atol=2e-3)


def test_bug_mabn_mean_free_half_overflow():
    """half-overflow: MABN1d(mean_free=True) in float16 on a batch of mean 1e4: the mean square
    1e8 stays finite in the float32 running_var and var_window, equal to the float32 layer's on
    the same values, and every output is finite."""
    opts = {"buffer_size": 2, "warmup_iters": 0, "renorm_iters": 1, "mean_free": True}
    layer, twin = MABN1d(2, **opts).half(), MABN1d(2, **opts)
    gen = torch.Generator().manual_seed(0)
    x = (1e4 + 1e-2 * torch.randn(4, 2, generator=gen)).half()
    for _ in range(3):
        y, yt = layer(x), twin(x.float())
        assert y.dtype == torch.float16 and bool(torch.isfinite(y).all()), y
        torch.testing.assert_close(y.float(), yt, rtol=4e-3, atol=4e-3)
    for name in ("running_var", "var_window", "grad_proj_window"):
        assert getattr(layer, name).dtype == torch.float32, name
    torch.testing.assert_close(layer.running_var, twin.running_var, rtol=1e-6, atol=0)
    torch.testing.assert_close(layer.var_window, twin.var_window, rtol=1e-6, atol=0)


def test_bug_online_norm_half_overflow_rejects_finite_batches():
    """half-overflow: OnlineNorm1d(2) in float16 on a batch of mean 1e4: the variance stream
    (about 4e5) stays finite in its float32 running_var, equal to the float32 layer's, and later
    training steps accept the finite batch (they used to raise "non-finite values")."""
    layer, twin = OnlineNorm1d(2).half(), OnlineNorm1d(2)
    gen = torch.Generator().manual_seed(0)
    x = (1e4 + 1e-2 * torch.randn(4, 2, generator=gen)).half()
    for _ in range(3):
        y, yt = layer(x), twin(x.float())
        torch.testing.assert_close(y.float(), yt, rtol=4e-3, atol=4e-3)
    assert layer.running_var.dtype == torch.float32
    assert float(layer.running_var.max()) > torch.finfo(torch.float16).max
    torch.testing.assert_close(layer.running_var, twin.running_var, rtol=1e-6, atol=0)
    torch.testing.assert_close(layer.running_mean, twin.running_mean, rtol=1e-6, atol=0)


@pytest.mark.parametrize("momentum", [0.1, None, 0.0])
def test_bug_batchnorm_half_overflow_diverges_from_torch(momentum):
    """half-overflow: BatchNorm1d(2) in float16 on batches of std 1e3: running_var overflows to
    inf at the first step and stays inf at the next ones (it used to become NaN, the lerp from
    inf), as torch's; the eval output equals torch's."""
    ours = BatchNorm1d(2, momentum=momentum).half()
    ref = nn.BatchNorm1d(2, momentum=momentum).half()
    x = (1e3 * torch.randn(4, 2, generator=torch.Generator().manual_seed(0))).half()
    for _ in range(3):
        ours(x)
        ref(x)
        assert same_tensor(ours.running_var, ref.running_var), (ours.running_var, ref.running_var)
        torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=2e-3, atol=2e-3)
    assert not bool(torch.isnan(ours.running_var).any())
    torch.testing.assert_close(ours.eval()(x), ref.eval()(x), rtol=2e-3, atol=2e-3)


def test_bug_recompute_statistics_half_overflow():
    """recompute-overflow: recompute_statistics on a float16 model whose BN input has variance
    ~1e6 (float64 statistics finite, too large for the float16 running_var) raises a ValueError
    naming the layer and the dtype, with the model unchanged; a half-precision BatchRenorm,
    whose statistics buffers are float32, gets the float64 population statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), BatchNorm1d(2)).half()
    batches = [(1e3 * torch.randn(8, 2)).half()]
    expected = Expected(ValueError, ("BatchNorm1d(2)", "torch.float16", "float32"))
    assert_rejects(model, lambda: recompute_statistics(model, batches), expected)
    model[1] = BatchRenorm1d(2).half()
    recompute_statistics(model, batches)
    with torch.no_grad():
        z = model[0](batches[0]).double()
    torch.testing.assert_close(model[1].running_var, z.var(0).float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(model[1].running_mean, z.mean(0).float(), rtol=1e-6, atol=1e-6)


def test_bug_fold_batchnorm_rejects_non_module():
    """not-a-module: fold_batchnorm("model") raises a TypeError naming nn.Module and str (it
    used to raise AttributeError: 'str' object has no attribute 'named_modules')."""
    with pytest.raises(TypeError, match="expected an nn.Module, got str"):
        fold_batchnorm("model")  # type: ignore[arg-type]


def test_bug_recompute_statistics_rejects_non_module():
    """not-a-module: recompute_statistics("model", [x]) raises a TypeError naming nn.Module and
    str (it used to raise AttributeError: 'str' object has no attribute 'modules')."""
    with pytest.raises(TypeError, match="expected an nn.Module, got str"):
        recompute_statistics("model", [torch.randn(4, 3)])  # type: ignore[arg-type]


@pytest.mark.parametrize(("key", "value"), [("var", math.nan), ("mean", math.inf)])
def test_bug_preconditioner_loads_non_finite_statistics(key, value):
    """bnp-load-nonfinite: BNPreconditioner.load_state_dict rejects a NaN variance or an
    infinite mean with a ValueError naming the layer and the entry, state unchanged; the next
    precondition_() keeps the gradients finite (it used to write NaN into them)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    precond = BNPreconditioner(model)
    _loss(model(torch.randn(4, 3))).backward()
    precond.precondition_()
    state = precond.state_dict()
    state["layers"]["0"]["running"][key] = torch.full((3,), value)
    expected = Expected(ValueError, ("layer '0'", f"running {key} must be finite", "3 NaN or Inf"))
    assert_rejects(
        model, lambda: precond.load_state_dict(state), expected, extra_state=precond.state_dict
    )
    model.zero_grad()
    _loss(model(torch.randn(4, 3))).backward()
    precond.precondition_()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


@pytest.mark.parametrize("how", ["dtype", "reflect_padding"])
def test_bug_preconditioner_records_rejected_input(how):
    """bnp-records-rejected: an input its layer rejects (a float64 batch into a float32 Linear;
    a (8, 3, 1, 5) batch into a reflect-padded Conv2d, padding larger than the input) records
    nothing: statistics, num_batches and the resolved rho unchanged. The next accepted batch
    (2 samples) is the first recorded and resolves rho from its own size."""
    torch.manual_seed(0)
    if how == "dtype":
        model = nn.Sequential(nn.Linear(3, 4))
        x, good = torch.randn(8, 3, dtype=torch.float64), torch.randn(2, 3)
    else:
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
        x, good = torch.randn(8, 3, 1, 5), torch.randn(2, 3, 4, 4)
    precond = BNPreconditioner(model)
    before = precond.state_dict()
    with pytest.raises(RuntimeError):
        model(x)
    assert_same_state(before, precond.state_dict(), "preconditioner state")
    model(good)
    stats = precond.statistics()["0"]
    assert stats.num_batches == 1
    assert precond.rho == 0.999  # from the 2-sample batch (0.99 from 8 samples)
    dims = (0,) if how == "dtype" else (0, 2, 3)
    torch.testing.assert_close(stats.mean, good.mean(dims), rtol=1e-5, atol=1e-6)


def test_bug_convert_group_norm_negative_eps():
    """unvalidated-options: convert(model, "gn" / "ln" / "torch-bn", {"eps": -1.0}) raises a
    ValueError naming eps and the value, model unchanged (torch's layers do not check eps: the
    converted model used to output NaN for a constant input)."""
    for method in ("gn", "ln", "torch-bn"):
        model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        expected = Expected(ValueError, (repr(method), "eps must be a float > 0", "got -1.0"))
        assert_rejects(model, lambda: normlab.convert(model, method, {"eps": -1.0}), expected)  # noqa: B023


@pytest.mark.parametrize("value", [0, -1, 2.5])
def test_bug_convert_group_norm_max_groups_message(value):
    """unvalidated-options: convert(model, "gn", {"max_groups": value}) raises a ValueError
    naming max_groups, what it must be and the value (it used to raise "max() arg is an empty
    sequence", or a TypeError about a float)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    expected = Expected(ValueError, ("max_groups must be an int >= 1", f"got {value!r}"))
    assert_rejects(model, lambda: normlab.convert(model, "gn", {"max_groups": value}), expected)
    with pytest.raises(ValueError, match=f"max_groups must be an int >= 1, got {value!r}"):
        group_count(4, "2d", value)


def test_bug_fold_batchnorm_identity_mode():
    """fold-identity-mode: the nn.Identity fold_batchnorm puts in an eval-mode BN's place is in
    eval mode, as every other module of the copy."""
    model = nn.Sequential(nn.Linear(3, 4), BatchNorm1d(4)).eval()
    folded = fold_batchnorm(model)
    assert isinstance(folded[1], nn.Identity)
    assert [m.training for m in folded.modules()] == [False] * 3


@pytest.mark.parametrize(
    "make",
    [
        lambda: BatchRenorm1d(2),
        lambda: OnlineNorm1d(2),
        lambda: MABN1d(2, buffer_size=2),
        lambda: MABN1d(2, buffer_size=2, mean_free=True),
    ],
)
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_layers_keep_float32_statistics(make, half):
    """The statistics buffers of Batch Renorm, OnlineNorm and MABN stay float32 in a half
    layer: built with dtype=, or cast by .half() / .to(dtype) from float32 values (kept exactly,
    1e5 included) or float64 ones (rounded once); parameters follow the cast; .double() and
    .float() convert them as usual."""
    layer = make()
    names = [n for n in type(layer)._float32_buffers if getattr(layer, n) is not None]
    with torch.no_grad():
        for name in names:
            getattr(layer, name).fill_(1e5 + 0.25)
    cast = layer.to(half)
    assert cast.weight.dtype == half
    for name in names:
        b = getattr(cast, name)
        assert b.dtype == torch.float32 and bool((b == 1e5 + 0.25).all()), (name, b)
    assert all(getattr(layer.double(), n).dtype == torch.float64 for n in names)
    assert all(getattr(layer.to(half), n).dtype == torch.float32 for n in names)
    assert all(getattr(layer.float(), n).dtype == torch.float32 for n in names)
    fresh = type(layer)(2, **{k: getattr(layer, k) for k in _ctor_keys(layer)}, dtype=half)
    assert all(getattr(fresh, n).dtype == torch.float32 for n in names)
    assert fresh.weight.dtype == half


def _ctor_keys(layer: nn.Module) -> list[str]:
    # Constructor options a layer stores under the same name (enough to rebuild its buffers).
    params = inspect.signature(type(layer).__init__).parameters
    return [k for k in ("buffer_size", "mean_free") if k in params]


# =============================================================================================
# Summary
# =============================================================================================

GENERATED = {
    CAT_BN,
    CAT_LAYERS,
    CAT_CONVERT,
    CAT_CONVERT_ARGS,
    CAT_BNP,
    CAT_BNP_ARGS,
    CAT_FOLD,
    CAT_RECOMPUTE,
}
MIN_CASES = 1000


def test_zz_case_count():
    """At least MIN_CASES generated cases ran (checked when every generated test ran)."""
    if not GENERATED <= RAN:
        pytest.skip(f"only {sorted(RAN)} of the generated categories ran")
    total = report()["total"]
    assert total >= MIN_CASES, f"{total} generated cases, expected at least {MIN_CASES}"
