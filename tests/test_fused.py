"""normlab's fused CPU kernels against the pure-PyTorch reference code (the oracle).

Every comparison runs the same call twice, fused and with the fused path switched off
(``_fused.use(False)``), and holds outputs, gradients and buffers to 1e-6 (float32) / 1e-12
(float64) / one rounding (float16, bfloat16). Plus gradcheck/gradgradcheck on the fused nodes,
torch's saved-tensor footprint as a bound, and the fallbacks. The fused checks are skipped where
the kernels cannot be built (no compiler); the fallback checks run everywhere.
"""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from _fused_helpers import close_or_closer, twin

from normlab.functional import _fused
from normlab.functional import full_norm as fnf
from normlab.functional._fused import _graph, _loader
from normlab.functional.batch_norm import batch_norm_eval, batch_norm_train
from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from normlab.nn.fullnorm import FullNorm1d, FullNorm2d, FullNorm3d

HAVE_FUSED = _fused.available()
needs_fused = pytest.mark.skipif(
    not HAVE_FUSED, reason=f"fused kernels unavailable: {_fused.load_error()}"
)

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
TOL = {
    F32: {"rtol": 1e-6, "atol": 1e-6},
    F64: {"rtol": 1e-12, "atol": 1e-12},
    F16: {"rtol": 2**-10, "atol": 2**-10},  # one rounding of the float32 result
    BF16: {"rtol": 2**-7, "atol": 2**-7},
}
ESTIMATORS = list(fnf.ESTIMATORS)
# One shape per class (2-D to 5-D) and the layouts the kernels read in place or copy.
CASES = [
    ((8, 5), "contiguous"),
    ((4, 3, 7), "contiguous"),
    ((3, 4, 5, 6), "contiguous"),
    ((2, 3, 4, 3, 5), "contiguous"),
    ((3, 4, 5, 6), "channels_last"),
    ((2, 3, 4, 3, 5), "channels_last"),
    ((3, 4, 5, 6), "strided"),
]
CASE_IDS = [f"{len(s)}d-{layout}" for s, layout in CASES]
# Large enough (>= 2**15 values) for the two-thread paths of every layout.
PARALLEL_CASES = [
    ((512, 96), "contiguous"),  # rows split between threads
    ((16, 2048), "contiguous"),  # columns split between threads
    ((8, 256, 4, 4), "channels_last"),  # rows, per-sample means of channels_last
    ((2, 2048, 4, 2), "channels_last"),  # columns, per-sample means
    ((2, 64, 16, 16), "contiguous"),  # whole channels per thread
    ((4, 3, 64, 64), "contiguous"),  # planes per thread, merged
    ((4, 8, 128, 130), "contiguous"),  # past 4 MiB: planes in memory order, even on one thread
    ((3, 5, 8, 16, 24), "contiguous"),
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _input(shape, layout="contiguous", dtype=F32, seed=0, shift=1.0, scale=2.0):
    if layout == "strided":  # every other channel of a wider tensor: not dense
        wide = list(shape)
        wide[1] *= 2
        x = torch.randn(wide, generator=_gen(seed), dtype=F64)[:, ::2]
    else:
        x = torch.randn(shape, generator=_gen(seed), dtype=F64)
    x = (x * scale + shift).to(dtype)
    if layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x.requires_grad_()


def _params(c, dtype, seed=1):
    w = (torch.rand(c, generator=_gen(seed), dtype=F64) + 0.5).to(dtype).requires_grad_()
    b = torch.randn(c, generator=_gen(seed + 1), dtype=F64).to(dtype).requires_grad_()
    return w, b


def _close(got, want, dtype, truth=None):
    close_or_closer(got, want, TOL[dtype], truth, "fused")


_twin = twin


def _check(run, *args, dtype):
    """Run ``run(*args)`` (a list of tensors) fused and with the reference, compare (with the
    float64 truth for lower precisions); return the fused results."""
    with _fused.use(True):
        got = run(*args)
    with _fused.use(False):
        want = run(*args)
        truth = None if dtype == F64 else run(*[_twin(a) for a in args])
    _close(got, want, dtype, truth)
    return got, want


def _check_two_threads_then_one(run):
    """``run()`` fused with two threads against the reference, then against itself on one."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two, _ref = _check(run, dtype=F64)
        torch.set_num_threads(1)
        with _fused.use(True):
            one = run()
    finally:
        torch.set_num_threads(threads)
    _close(two, one, F64)


def _node(t) -> str:
    return t.grad_fn.name() if t.grad_fn is not None else ""


def _fused_node(fn) -> str:
    with _fused.use(True):
        return _node(fn())


# --------------------------------------------------------------------------------- batch norm


def _bn_train_run(x, w, b, g):
    y, mean, var = batch_norm_train(x, w, b, 1e-5)
    params = [t for t in (x, w, b) if t is not None]
    return [y, mean, var, *torch.autograd.grad(y, params, g)]


@needs_fused
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize(("shape", "layout"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16], ids=str)
def test_batch_norm_train_matches_reference(dtype, shape, layout, affine):
    x = _input(shape, layout, dtype)
    w, b = _params(shape[1], dtype) if affine else (None, None)
    g = torch.randn(shape, generator=_gen(7), dtype=F64).to(dtype)
    assert "BNTrain" in _fused_node(lambda: batch_norm_train(x, w, b)[0])
    got, want = _check(_bn_train_run, x, w, b, g, dtype=dtype)
    assert got[0].stride() == want[0].stride() or layout == "strided"


@needs_fused
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize(("shape", "layout"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16], ids=str)
def test_batch_norm_eval_matches_reference(dtype, shape, layout, affine):
    c = shape[1]
    x = _input(shape, layout, dtype)
    w, b = _params(c, dtype) if affine else (None, None)
    stat = F32 if dtype in (F16, BF16) else dtype
    rm = torch.randn(c, generator=_gen(3), dtype=F64).to(stat)
    rv = (torch.rand(c, generator=_gen(4), dtype=F64) * 3 + 0.2).to(stat)
    g = torch.randn(shape, generator=_gen(7), dtype=F64).to(dtype)

    def run(x, rm, rv, w, b, g):
        y = batch_norm_eval(x, rm, rv, w, b, 1e-5)
        return [y, *torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], g)]

    assert "NormEval" in _fused_node(lambda: batch_norm_eval(x, rm, rv, w, b))
    _check(run, x, rm, rv, w, b, g, dtype=dtype)


@needs_fused
@pytest.mark.parametrize(("shape", "layout"), PARALLEL_CASES, ids=str)
def test_two_thread_paths_match_reference_and_one_thread(shape, layout):
    x = _input(shape, layout, dtype=F64)
    w, b = _params(shape[1], F64)
    g = torch.randn(shape, generator=_gen(7), dtype=F64)
    layer = FullNorm1d if len(shape) == 2 else (FullNorm2d if len(shape) == 4 else FullNorm3d)

    def run():
        fn = layer(shape[1], alpha=0.5, dtype=F64)
        fn(x.detach() * 0.5)  # a history, so that rho < 1 is possible
        out = fn(x)
        fn_grads = torch.autograd.grad(out, (x, fn.weight, fn.bias), g)
        return [*_bn_train_run(x, w, b, g), out, *fn_grads, fn.outer_factor]

    _check_two_threads_then_one(run)


@needs_fused
@pytest.mark.parametrize("cls", [BatchNorm1d, BatchNorm2d, BatchNorm3d])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_batch_norm_modules_match_reference(cls, momentum, dtype):
    shape = {BatchNorm1d: (6, 4, 5), BatchNorm2d: (3, 4, 5, 6), BatchNorm3d: (2, 4, 3, 4, 5)}[cls]
    base = cls(4, momentum=momentum, dtype=dtype)
    with torch.no_grad():
        base.weight.uniform_(0.5, 1.5, generator=_gen(1))
        base.bias.normal_(generator=_gen(2))
    xs = [_input(shape, dtype=dtype, seed=step) for step in range(4)]
    gs = [torch.randn(shape, generator=_gen(10 + step), dtype=dtype) for step in range(4)]

    def run(base, *data):
        bn, outs = copy.deepcopy(base), []
        for x, g in zip(data[:4], data[4:], strict=True):
            if len(outs) == 3 * 9:
                bn.eval()
            y = bn(x)
            outs += [y, *torch.autograd.grad(y, (x, bn.weight, bn.bias), g)]
            outs += [t.clone() for t in bn.buffers()]
        return outs

    assert "BNTrain" in _fused_node(lambda: copy.deepcopy(base)(xs[0]))
    _check(run, base, *xs, *gs, dtype=dtype)


@needs_fused
def test_batch_norm_one_value_per_channel_and_bias_without_weight():
    # One value per channel: var 0, y = bias, as the reference.
    x = _input((1, 3), dtype=F64)
    w, b = _params(3, F64)
    _check(lambda: list(batch_norm_train(x, w, b)), dtype=F64)
    # A bias without a weight: the bias gradient is sum(g), as torch's.
    x = _input((5, 3, 4), dtype=F64)
    y = batch_norm_train(x, None, b)[0]
    ref = F.batch_norm(x, None, None, None, b, training=True)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn(y.shape, generator=_gen(3), dtype=F64)
    want = torch.autograd.grad(ref, (x, b), g)
    _close(torch.autograd.grad(y, (x, b), g, retain_graph=True), want, F64)
    _close(torch.autograd.grad(y, (x, b), g, create_graph=True), want, F64)  # graph backward


@needs_fused
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_batches(bad):
    x = _input((4, 3, 5), dtype=F32)
    with torch.no_grad():
        x[1, 2, 3] = bad
    got, _ = _check(lambda x: list(batch_norm_train(x)[1:]), x, dtype=F32)
    assert torch.isfinite(got[1][:2]).all() and not torch.isfinite(got[1][2])
    bn = BatchNorm1d(3)
    with pytest.raises(ValueError, match="non-finite"):
        bn(x)
    assert bn.num_batches_tracked == 0 and torch.equal(bn.running_var, torch.ones(3))


# ------------------------------------------------------------------------ full normalization


def _fn_layer(shape):
    return {2: FullNorm1d, 3: FullNorm1d, 4: FullNorm2d, 5: FullNorm3d}[len(shape)]


def _fn_data(shape, layout, dtype, steps=3):
    xs = [_input(shape, layout, dtype, seed=s, shift=1.0 + s) for s in range(steps + 1)]
    gs = [torch.randn(shape, generator=_gen(20 + s), dtype=F64).to(dtype) for s in range(steps + 1)]
    return [*xs, *gs]


def _fn_run(base, *data):
    # Training steps on all but the last input, then eval on the last; every output, gradient
    # and buffer.
    steps = len(data) // 2
    fn, outs = copy.deepcopy(base), []
    for i, (x, g) in enumerate(zip(data[:steps], data[steps:], strict=True)):
        if i == steps - 1:
            fn.eval()
        out = fn(x)
        outs += [out, *torch.autograd.grad(out, [x, *fn.parameters()], g)]
        outs += [t.clone() for t in fn.buffers()]
    return outs


def _fn_base(shape, dtype=F64, **kw):
    base = _fn_layer(shape)(shape[1], dtype=dtype, **kw)
    if base.affine:
        with torch.no_grad():
            base.weight.uniform_(0.5, 1.5, generator=_gen(1))
            base.bias.normal_(generator=_gen(2))
    return base


@needs_fused
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize(("shape", "layout"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_full_norm_matches_reference(dtype, shape, layout, estimator):
    base = _fn_base(shape, dtype, alpha=0.3, estimator=estimator)
    data = _fn_data(shape, layout, dtype)
    assert "FNTrain" in _fused_node(lambda: copy.deepcopy(base)(data[0]))
    _check(_fn_run, base, *data, dtype=dtype)


@needs_fused
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("shape", [(1, 5), (1, 3, 4), (1, 4, 3, 3), (2, 3, 4)], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_full_norm_small_batches_match_reference(shape, estimator, affine):
    # One sample (no representativeness test), one value per channel (the prior variance).
    base = _fn_base(shape, affine=affine, alpha=0.4, estimator=estimator, debias=False)
    _check(_fn_run, base, *_fn_data(shape, "contiguous", F64), dtype=F64)


@needs_fused
@pytest.mark.parametrize("estimator", ["adaptive", "batch", "running"])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_full_norm_half_precision_matches_reference(dtype, estimator):
    shape = (4, 3, 5, 6)
    base = FullNorm2d(3, alpha=0.3, estimator=estimator).to(dtype)
    _check(_fn_run, base, *_fn_data(shape, "contiguous", dtype), dtype=dtype)


@needs_fused
@pytest.mark.parametrize("estimator", ["adaptive", "running"])
def test_full_norm_non_finite_gradient_keeps_the_outer_state(estimator):
    def run():
        fn = FullNorm1d(3, alpha=0.5, estimator=estimator, dtype=F64)
        for step in range(3):
            x = _input((6, 3), dtype=F64, seed=step)
            g = torch.randn(6, 3, generator=_gen(step), dtype=F64)
            if step == 1:
                g[2, 1] = float("nan")
            torch.autograd.grad(fn(x), x, g)
        return [fn.outer_factor.clone(), fn.outer_steps.clone()]

    got, _ = _check(run, dtype=F64)
    assert int(got[1]) == 2


# --------------------------------------------------------------------------- autograd checks


@needs_fused
@pytest.mark.parametrize("shape", [(6, 3), (3, 2, 3, 2)], ids=str)
def test_gradcheck_and_gradgradcheck_batch_norm(shape):
    x = _input(shape, dtype=F64)
    w, b = _params(shape[1], F64)
    rm, rv = torch.randn(shape[1], dtype=F64), torch.rand(shape[1], dtype=F64) + 0.5

    def train(*a):
        y = batch_norm_train(*a, eps=1e-3)[0]
        assert "BNTrain" in _node(y)
        return y

    def evaluate(*a):
        y = batch_norm_eval(a[0], rm, rv, *a[1:], eps=1e-3)
        assert "NormEval" in _node(y)
        return y

    for fn in (train, evaluate):
        assert torch.autograd.gradcheck(fn, (x, w, b))
        assert torch.autograd.gradgradcheck(fn, (x, w, b))


@needs_fused
@pytest.mark.parametrize("shape", [(6, 3), (2, 3, 2, 2)], ids=str)
def test_gradcheck_and_gradgradcheck_full_norm_autograd_estimator(shape):
    x = _input(shape, dtype=F64)
    w, b = _params(shape[1], F64)
    rm, rv = torch.randn(shape[1], dtype=F64), torch.rand(shape[1], dtype=F64) + 0.5

    def fn(*a):
        out = fnf.full_norm_train(a[0], rm, rv, *a[1:], alpha=0.3, eps=1e-3, estimator="autograd")
        assert "FNTrain" in _node(out[0])
        return out[0]

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@needs_fused
def test_double_backward_of_a_first_order_estimator_raises():
    fn = FullNorm1d(3, alpha=0.3, estimator="batch", dtype=F64)
    x = _input((5, 3), dtype=F64)
    (gx,) = torch.autograd.grad(fn(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="not twice differentiable"):
        torch.autograd.grad(gx.sum(), x)


@needs_fused
@pytest.mark.parametrize("name", _graph.NAMES)
def test_create_graph_backward_calls_the_registered_reference(name, monkeypatch):
    # The C++ nodes find their graph backward in _fused._graph, where the reference modules
    # registered it: a wrapper registered in its place is what runs under create_graph=True.
    calls = []
    original = _graph.backward(name)

    def wrapper(*args):
        calls.append(name)
        return original(*args)

    monkeypatch.setitem(_graph._backwards, name, wrapper)
    x = _input((6, 3, 2), dtype=F64)
    if name == "bn_train_backward":
        layer = BatchNorm1d(3, dtype=F64)
    elif name == "norm_eval_backward":
        layer = BatchNorm1d(3, dtype=F64).eval()
    else:
        layer = FullNorm1d(3, alpha=0.3, estimator="autograd", dtype=F64)
    (gx,) = torch.autograd.grad(layer(x).pow(3).sum(), x, create_graph=True)
    assert calls == [name]
    torch.autograd.grad(gx.sum(), x)  # and the result is differentiable


def test_graph_backward_registry_rejects_bad_input_and_names_what_is_missing(monkeypatch):
    before = dict(_graph._backwards)
    assert set(before) == set(_graph.NAMES)  # importing normlab.functional provided them all
    with pytest.raises(ValueError, match="bn_train_backwards"):
        _graph.provide(bn_train_backward=len, bn_train_backwards=len)
    with pytest.raises(TypeError, match="'fn_train_backward' must be callable, got int"):
        _graph.provide(norm_eval_backward=len, fn_train_backward=3)
    assert _graph._backwards == before  # nothing registered by a refused call
    monkeypatch.delitem(_graph._backwards, "fn_train_backward")
    with pytest.raises(RuntimeError, match="no graph backward 'fn_train_backward'"):
        _graph.backward("fn_train_backward")


@needs_fused
def test_expanded_upstream_gradient_and_no_grad():
    x = _input((3, 4, 5, 5), "channels_last", F32)
    _check(lambda x: list(torch.autograd.grad(batch_norm_train(x)[0].sum(), x)), x, dtype=F32)
    with torch.no_grad():
        got, _ = _check(lambda x: list(batch_norm_train(x)), x, dtype=F32)
    assert got[0].grad_fn is None


# ------------------------------------------------------------------------------------ memory


def _saved_bytes(fn) -> list[int]:
    sizes: list[int] = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sorted(sizes, reverse=True)


@needs_fused
@pytest.mark.parametrize("shape", [(64, 32), (8, 16, 6, 6)], ids=str)
def test_saved_tensors_are_no_more_than_torchs(shape):
    x = _input(shape, dtype=F32)
    w, b = _params(shape[1], F32)
    c = shape[1]
    ours = _saved_bytes(lambda: batch_norm_train(x, w, b))
    native = _saved_bytes(lambda: F.batch_norm(x, None, None, w, b, training=True))
    assert sum(ours) <= sum(native)
    fn = FullNorm1d(c) if len(shape) == 2 else FullNorm2d(c)
    fn_saved = _saved_bytes(lambda: fn(x))
    # The input once, then per-channel statistics (weight, mean, var) and the 0-dim rho.
    assert fn_saved[0] == x.numel() * 4 and sum(fn_saved[1:]) <= 3 * c * 4 + 4


# --------------------------------------------------------------------------------- fallbacks


@needs_fused
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torch_func_and_forward_ad_use_the_reference():
    x = _input((6, 3), dtype=F64).detach()
    w, b = _params(3, F64)
    w, b = w.detach(), b.detach()

    def loss(x):
        return batch_norm_train(x, w, b)[0].pow(3).sum()

    xg = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(loss(xg), xg)  # fused
    torch.testing.assert_close(torch.func.grad(loss)(x), want, rtol=1e-12, atol=1e-12)
    batched = torch.func.vmap(lambda t: batch_norm_train(t, w, b)[0])(torch.stack([x, 2 * x]))
    torch.testing.assert_close(batched[1], batch_norm_train(2 * x, w, b)[0])
    tangent = torch.randn(x.shape, dtype=F64, generator=_gen(5))
    with fwAD.dual_level():
        y = batch_norm_train(fwAD.make_dual(x, tangent), w, b)[0]
        jvp = fwAD.unpack_dual(y).tangent
    h = 1e-6  # central difference: error ~h^2, far below the tolerance
    diff = batch_norm_train(x + h * tangent, w, b)[0] - batch_norm_train(x - h * tangent, w, b)[0]
    torch.testing.assert_close(jvp, diff / (2 * h), rtol=1e-6, atol=1e-6)


def test_switch_forces_the_reference():
    x = _input((4, 3))
    with _fused.use(False):
        assert not _fused.enabled()
        assert "BatchNormTrainFn" in _node(batch_norm_train(x)[0])
        assert "BatchNormTrainFn" not in _node(batch_norm_eval(x, torch.zeros(3), torch.ones(3)))
    assert _fused.enabled() == _loader.env_enabled()
    with pytest.raises(TypeError, match="bool"):
        _fused.set_enabled(1)  # type: ignore[arg-type]


def test_env_var_forces_the_reference_in_a_new_process():
    code = (
        "import torch; from normlab.functional._fused import _loader;"
        "from normlab.functional.batch_norm import batch_norm_train;"
        "x = torch.randn(4, 3, requires_grad=True);"
        "print(batch_norm_train(x)[0].grad_fn.name(), _loader.load(), _loader.load_error())"
    )
    env = {**os.environ, _loader.ENV_VAR: "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert "BatchNormTrainFn" in out.stdout and "disabled by NORMLAB_FUSED" in out.stdout
    assert "WARNING" not in out.stderr and "unavailable" not in out.stderr


@pytest.fixture
def fresh_loader(monkeypatch):
    """A loader that has not tried yet (the real state is restored afterwards)."""
    monkeypatch.setattr(_loader, "_tried", False)
    monkeypatch.setattr(_loader, "_module", None)
    monkeypatch.setattr(_loader, "_error", None)
    monkeypatch.setenv(_loader.ENV_VAR, "1")
    return _loader


def test_failed_build_warns_once_and_falls_back(fresh_loader, monkeypatch, caplog):
    def broken():
        raise RuntimeError("Error building extension 'normlab_fused'")

    monkeypatch.setattr(fresh_loader, "_build", broken)
    with caplog.at_level(logging.WARNING, logger="normlab.functional._fused"):
        assert fresh_loader.load() is None
        assert fresh_loader.load() is None
        x = _input((5, 3))
        y = batch_norm_train(x)[0]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Error building extension" in warnings[0].getMessage()
    assert "BatchNormTrainFn" in _node(y)
    assert "RuntimeError" in (fresh_loader.load_error() or "")


def test_missing_compiler_is_reported_without_building(fresh_loader, monkeypatch, caplog):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with caplog.at_level(logging.WARNING, logger="normlab.functional._fused"):
        assert fresh_loader.load() is None
    assert "no C++ compiler" in (fresh_loader.load_error() or "")
    assert any("no C++ compiler" in r.getMessage() for r in caplog.records)


def test_wrong_weight_shape_falls_back_to_the_reference_error():
    x = _input((4, 3))
    with pytest.raises(RuntimeError):
        batch_norm_train(x, torch.ones(4))


def test_ninja_from_the_pip_package_is_put_on_path_for_the_build(monkeypatch, tmp_path):
    real_which = _loader.shutil.which
    (tmp_path / "ninja").write_text("")
    (tmp_path / "ninja").chmod(0o755)

    def which(cmd, path=None):
        if cmd == "ninja":
            return real_which(cmd, path=path) if path is not None else None
        return real_which(cmd) if path is None else real_which(cmd, path=path)

    monkeypatch.setattr(_loader.shutil, "which", which)
    monkeypatch.setattr(_loader, "_ninja_dir", lambda: str(tmp_path))
    monkeypatch.setenv("CXX", "c++")
    before = os.environ["PATH"]
    if real_which("c++") is not None:
        assert _loader._missing_tool() is None
    with _loader._ninja_on_path():
        assert os.environ["PATH"].split(os.pathsep)[0] == str(tmp_path)
    assert os.environ["PATH"] == before
    monkeypatch.setattr(_loader, "_ninja_dir", lambda: None)
    if real_which("c++") is not None:
        assert "ninja" in (_loader._missing_tool() or "")


@needs_fused
@pytest.mark.parametrize("cls", [BatchNorm1d, FullNorm1d])
def test_buffer_writes_bump_the_version_counter(cls):
    # A graph that saved the running statistics (torch's eval-mode batch norm does) must refuse
    # to run its backward after a training step rewrote them, as after torch's in-place update.
    layer = cls(3, dtype=F64)
    x = _input((6, 3), dtype=F64)
    y = F.batch_norm(x, layer.running_mean, layer.running_var, training=False)
    buffers = (layer.running_mean, layer.running_var)
    versions = [b._version for b in buffers]
    with _fused.use(True):
        layer(x.detach())
    assert all(b._version > v for b, v in zip(buffers, versions, strict=True))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@needs_fused
@pytest.mark.parametrize("estimator", ["adaptive", "batch"])
@pytest.mark.parametrize(
    "shape", [(6, 4), (3, 4, 5, 6), (4, 3, 64, 64), (512, 384), (16, 2048)], ids=str
)
def test_parameter_gradients_without_an_input_gradient(shape, estimator):
    # x does not require grad: the backward computes only the per-channel sums (and the state).
    x = _input(shape, dtype=F64).detach()
    g = torch.randn(shape, generator=_gen(3), dtype=F64)

    def run(base):
        bn, fn = copy.deepcopy(base[0]), copy.deepcopy(base[1])
        outs = []
        for layer in (bn, fn):
            for _ in range(2):
                outs += list(torch.autograd.grad(layer(x), (layer.weight, layer.bias), g))
        return [*outs, fn.outer_factor.clone(), fn.outer_steps.clone()]

    bn_cls = {2: BatchNorm1d, 4: BatchNorm2d}[len(shape)]
    base = (bn_cls(shape[1], dtype=F64), _fn_base(shape, alpha=0.5, estimator=estimator))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _check(run, base, dtype=F64)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------- FN with per-sample standardization first


def _no_separate_standardization(out) -> bool:
    # The fused node takes x itself: nothing (no layer_norm node) between the leaf and FN.
    return "FNTrain" in _node(out) and all(
        f is None or f.name().endswith("AccumulateGrad") for f, _ in out.grad_fn.next_functions
    )


@needs_fused
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize(("shape", "layout"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_full_norm_sample_norm_matches_reference(dtype, shape, layout, estimator):
    # The reference: layer_norm over each flattened sample, then FN (normlab.functional).
    base = _fn_base(shape, dtype, alpha=0.3, estimator=estimator, sample_norm=True)
    data = _fn_data(shape, layout, dtype)
    with _fused.use(True):
        assert _no_separate_standardization(copy.deepcopy(base)(data[0]))
    _check(_fn_run, base, *data, dtype=dtype)


@needs_fused
@pytest.mark.parametrize("estimator", ["adaptive", "batch", "running"])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
@pytest.mark.parametrize(
    ("shape", "layout"),
    [((4, 3, 5, 6), "contiguous"), ((6, 40), "contiguous"), ((4, 3, 5, 6), "channels_last")],
    ids=str,
)
def test_full_norm_sample_norm_half_precision_matches_reference(dtype, estimator, shape, layout):
    base = _fn_layer(shape)(shape[1], alpha=0.3, estimator=estimator, sample_norm=True).to(dtype)
    _check(_fn_run, base, *_fn_data(shape, layout, dtype), dtype=dtype)


@needs_fused
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("shape", [(1, 5), (1, 3, 4), (1, 4, 3, 3), (2, 3, 4)], ids=str)
def test_full_norm_sample_norm_small_batches_match_reference(shape, estimator):
    base = _fn_base(shape, alpha=0.4, estimator=estimator, debias=False, sample_norm=True)
    _check(_fn_run, base, *_fn_data(shape, "contiguous", F64), dtype=F64)


@needs_fused
@pytest.mark.parametrize(("shape", "layout"), PARALLEL_CASES, ids=str)
def test_full_norm_sample_norm_two_thread_paths_match_reference_and_one_thread(shape, layout):
    x = _input(shape, layout, dtype=F64)
    g = torch.randn(shape, generator=_gen(7), dtype=F64)

    def run():
        fn = _fn_layer(shape)(shape[1], alpha=0.5, sample_norm=True, dtype=F64)
        fn(x.detach() * 0.5 + 0.1)  # a history, so that rho < 1 is possible
        out = fn(x)
        grads = torch.autograd.grad(out, (x, fn.weight, fn.bias), g)
        return [out, *grads, fn.outer_factor, fn.running_mean, fn.running_var]

    _check_two_threads_then_one(run)


@needs_fused
@pytest.mark.parametrize("estimator", ["adaptive", "batch"])
@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5, 6), (512, 384)], ids=str)
def test_full_norm_sample_norm_parameter_gradients_without_an_input_gradient(shape, estimator):
    x = _input(shape, dtype=F64).detach()
    g = torch.randn(shape, generator=_gen(3), dtype=F64)

    def run(base):
        fn = copy.deepcopy(base)
        outs = []
        for _ in range(2):
            outs += list(torch.autograd.grad(fn(x), (fn.weight, fn.bias), g))
        return [*outs, fn.outer_factor.clone(), fn.outer_steps.clone()]

    _check(run, _fn_base(shape, alpha=0.5, estimator=estimator, sample_norm=True), dtype=F64)


@needs_fused
@pytest.mark.parametrize(
    ("shape", "layout"),
    [((6, 3), "contiguous"), ((2, 3, 2, 2), "contiguous"), ((2, 3, 2, 2), "channels_last")],
    ids=str,
)
def test_gradcheck_and_gradgradcheck_full_norm_sample_norm(shape, layout):
    # The autograd estimator: the fused node's first-order backward, and under create_graph
    # the reference chained through sample_standardize, against finite differences.
    layer = _fn_layer(shape)(shape[1], estimator="autograd", sample_norm=True, dtype=F64)
    x = _input(shape, layout, dtype=F64)

    def fresh(inp):
        layer.reset_running_stats()
        out = layer(inp)
        assert _no_separate_standardization(out)
        return out

    assert torch.autograd.gradcheck(fresh, (x,))
    assert torch.autograd.gradgradcheck(fresh, (x,))


@needs_fused
@pytest.mark.parametrize("shape", [(64, 32), (8, 16, 6, 6)], ids=str)
def test_full_norm_sample_norm_saves_only_the_input(shape):
    # The standardized input is neither written nor saved: the node keeps x and per-channel
    # statistics (as without sample_norm), plus the samples' mean and 1/std (2 N float64
    # values, held by the node outside the saved-tensor hooks).
    x = _input(shape, dtype=F32)
    layer = _fn_layer(shape)(shape[1], sample_norm=True)
    plain = _saved_bytes(lambda: _fn_layer(shape)(shape[1])(x))
    assert _saved_bytes(lambda: layer(x)) == plain


@needs_fused
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_full_norm_sample_norm_non_finite_batch_leaves_the_layer_unchanged(bad):
    layer = FullNorm2d(3, sample_norm=True)
    layer(_input((4, 3, 5, 5), dtype=F32).detach())
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = _input((4, 3, 5, 5), dtype=F32).detach()
    x[1, 2, 3, 3] = bad
    with pytest.raises(ValueError, match="non-finite"):
        layer(x)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
