"""normlab's Triton batch norm kernels against the pure-PyTorch reference code (the oracle).

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors,
routed there by the private testing hook ``_fused._route_cpu_to_triton``; every comparison runs
the same call through the kernels and with the fused path off (``_fused.use(False)``) and holds
outputs, gradients and buffers to 1e-6 (float32) / 1e-12 (float64) / one rounding (float16,
bfloat16); where a float32 sum differs by more, the kernel must be at least as close as the
reference to the float64 truth. Plus gradcheck/gradgradcheck, the saved-tensor footprint, the
fallbacks, and on CUDA (skipped without one) torch's own ``F.batch_norm`` and ``nn.BatchNorm2d``.
Skipped entirely where Triton is not importable.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from _fused_helpers import close_or_closer, twin

from normlab.functional import _fused
from normlab.functional._fused import _loader, _triton
from normlab.functional.batch_norm import batch_norm_eval, batch_norm_train
from normlab.nn import BatchNorm1d, BatchNorm2d

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


def _import_triton() -> None:
    # Triton decides when its language library is imported whether that library runs in the
    # interpreter (TRITON_INTERPRET=1) or is compiled; the two do not mix in one process. Without
    # a GPU only the interpreter runs here, so import it in that mode now, at collection, before
    # another test imports it (torch.func does); with a GPU, compiled, for the CUDA tests.
    if "triton" in sys.modules or importlib.util.find_spec("triton") is None:
        return
    previous = os.environ.get("TRITON_INTERPRET")
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        importlib.import_module("triton.language")
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def _interpreter_mode() -> bool:
    # Whether Triton's language library was imported for the interpreter (see _import_triton).
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


_import_triton()

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
TOL = {
    F32: {"rtol": 1e-6, "atol": 1e-6},
    F64: {"rtol": 1e-12, "atol": 1e-12},
    F16: {"rtol": 2**-10, "atol": 2**-10},  # one rounding of the float32 result
    BF16: {"rtol": 2**-7, "atol": 2**-7},
}
# Layouts read in place (planes, rows, channels_last) or through a strided view; the last two
# need several channel blocks and several splits of the reduction in the interpreter's grid.
CASES = [
    ((8, 5), "contiguous"),
    ((4, 3, 7), "contiguous"),
    ((3, 4, 5, 6), "contiguous"),
    ((2, 3, 4, 3, 5), "contiguous"),
    ((3, 4, 5, 6), "channels_last"),
    ((3, 4, 5, 6), "strided"),
    ((64, 10), "contiguous"),
    ((8, 2, 4, 4), "contiguous"),
]
CASE_IDS = [f"{'x'.join(map(str, s))}-{layout}" for s, layout in CASES]
NODE = "BNTrainTritonBackward"


@pytest.fixture
def interpret(monkeypatch):
    """CPU tensors go to the Triton kernels, run by Triton's interpreter."""
    if not _interpreter_mode():
        pytest.skip(
            "Triton was imported compiled in this process (a GPU is present, or another module "
            "imported it first): its interpreter cannot run here; run this file on its own "
            "without a GPU"
        )
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with _fused._route_cpu_to_triton():
        yield


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _input(shape, layout="contiguous", dtype=F32, seed=0, device="cpu"):
    if layout == "strided":  # every other channel of a wider tensor: not dense
        wide = list(shape)
        wide[1] *= 2
        x = torch.randn(wide, generator=_gen(seed), dtype=F64)
    else:
        x = torch.randn(shape, generator=_gen(seed), dtype=F64)
    x = (x * 2.0 + 1.0).to(dtype=dtype, device=device)
    if layout == "strided":
        x = x[:, ::2]
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


def _params(c, dtype, device="cpu"):
    w = (torch.rand(c, generator=_gen(1), dtype=F64) + 0.5).to(dtype=dtype, device=device)
    b = torch.randn(c, generator=_gen(2), dtype=F64).to(dtype=dtype, device=device)
    return w.requires_grad_(), b.requires_grad_()


def _close(got, want, dtype, truth=None):
    close_or_closer(got, want, TOL[dtype], truth, "kernel")


_twin = twin


def _check(run, *args, dtype):
    """``run(*args)`` through the kernels and with the reference; returns the kernels' node
    name (first result's grad_fn) after comparing."""
    with _fused.use(True):
        got = run(*args)
    with _fused.use(False), _fused._route_cpu_to_triton():
        want = run(*args)
        truth = None if dtype == F64 else run(*[_twin(a) for a in args])
    _close(got, want, dtype, truth)
    return got


def _bn_train_run(x, w, b, g):
    y, mean, var = batch_norm_train(x, w, b, 1e-5)
    params = [t for t in (x, w, b) if t is not None]
    node = y.grad_fn.name()
    return [y, mean, var, *torch.autograd.grad(y, params, g)], node


# ------------------------------------------------------------------------- interpreter


# Half precision on two layouts only (the interpreter is slow).
TRAIN_CASES = [(d, *case) for d in (F32, F64) for case in CASES] + [
    (d, *case) for d in (F16, BF16) for case in CASES if case[0] in ((3, 4, 5, 6), (64, 10))
]
TRAIN_IDS = [f"{str(d)[6:]}-{'x'.join(map(str, s))}-{layout}" for d, s, layout in TRAIN_CASES]


@pytest.mark.parametrize("affine", ["affine", "plain"])
@pytest.mark.parametrize(("dtype", "shape", "layout"), TRAIN_CASES, ids=TRAIN_IDS)
def test_train_matches_reference(interpret, dtype, shape, layout, affine):
    x = _input(shape, layout, dtype)
    w, b = _params(shape[1], dtype)
    w, b = (w, b) if affine == "affine" else (None, None)
    g = torch.randn(shape, generator=_gen(3), dtype=F64).to(dtype)
    nodes = []

    def run(*a):
        out, node = _bn_train_run(*a)
        nodes.append(node)
        return out

    _check(run, x, w, b, g, dtype=dtype)
    assert nodes[0] == NODE and nodes[1] != NODE  # the kernels ran, then the reference


@pytest.mark.parametrize(
    ("shape", "layout"), [((4, 3, 5, 6), "channels_last"), ((6, 5), "contiguous")]
)
def test_expanded_upstream_gradient_and_no_grad(interpret, shape, layout):
    # y.sum().backward() hands the backward a gradient with zero strides.
    x = _input(shape, layout)
    w, b = _params(shape[1], F32)

    def run(x, w, b):
        y = batch_norm_train(x, w, b)[0]
        with torch.no_grad():
            y_ng = batch_norm_train(x, w, b)[0]
        return [y_ng, *torch.autograd.grad(y.sum(), (x, w, b))]

    _check(run, x, w, b, dtype=F32)


def test_cases_cover_the_single_launch_and_the_split_paths():
    # The comparisons above run both kernel paths: whole channels per program in one launch
    # (small reductions), and partial moments per split merged by a second kernel.
    plans = [_triton._Plan([_input(s, layout).detach()], cuda=False) for s, layout in CASES]
    assert any(p.single for p in plans)
    assert any(not p.single and p.nsplit > 1 and p.grid[0] > 1 for p in plans)
    assert any(not p.single and p.block_c > 1 for p in plans)  # the rows layout


def test_one_value_per_channel_and_bias_without_weight(interpret):
    # One value per channel: var 0, y = bias, as the reference.
    x = _input((1, 3), dtype=F64)
    w, b = _params(3, F64)
    _check(lambda: list(batch_norm_train(x, w, b)), dtype=F64)
    # A bias without a weight: the bias gradient is sum(g), as torch's (the reference omits it).
    x = _input((5, 3, 4), dtype=F64)
    y = batch_norm_train(x, None, b)[0]
    assert y.grad_fn.name() == NODE
    ref = F.batch_norm(x, None, None, None, b, training=True)
    torch.testing.assert_close(y, ref, **TOL[F64])
    g = torch.randn(y.shape, generator=_gen(3), dtype=F64)
    want = torch.autograd.grad(ref, (x, b), g)
    _close(torch.autograd.grad(y, (x, b), g, retain_graph=True), want, F64)
    _close(torch.autograd.grad(y, (x, b), g, create_graph=True), want, F64)  # graph backward


@pytest.mark.parametrize(("shape", "layout"), CASES[:6], ids=CASE_IDS[:6])
@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=str)
def test_eval_matches_reference(interpret, dtype, shape, layout):
    c = shape[1]
    x = _input(shape, layout, dtype)
    w, b = _params(c, dtype)
    stat = F32 if dtype == BF16 else dtype
    rm = torch.randn(c, generator=_gen(4), dtype=F64).to(stat)
    rv = (torch.rand(c, generator=_gen(5), dtype=F64) + 0.5).to(stat)
    g = torch.randn(shape, generator=_gen(3), dtype=F64).to(dtype)

    def run(x, rm, rv, w, b, g):
        y = batch_norm_eval(x, rm.detach(), rv.detach(), w, b, 1e-5)
        return [y, *torch.autograd.grad(y, (x, w, b), g)]

    with _fused.use(True):
        assert batch_norm_eval(x, rm, rv, w, b).grad_fn.name() == "NormEvalTritonBackward"
    _check(run, x, rm, rv, w, b, g, dtype=dtype)


def _module_run(base, *xs):
    layer = copy.deepcopy(base)
    out = []
    for x in xs:
        x = x.detach().clone().requires_grad_()
        y = layer(x)
        out += [
            y,
            *torch.autograd.grad(y, (x, layer.weight, layer.bias), torch.cos(3 * x.detach())),
        ]
    return out + [layer.running_mean, layer.running_var, layer.num_batches_tracked.double()]


@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
@pytest.mark.parametrize(("cls", "shape", "dtype"), [
    (BatchNorm2d, (4, 3, 5, 5), F32),
    (BatchNorm2d, (4, 3, 5, 5), F64),
    (BatchNorm1d, (16, 6), F32),
    (BatchNorm2d, (4, 3, 5, 5), BF16),  # half input, float32 layer
])  # fmt: skip
def test_module_steps_match_reference(interpret, cls, shape, dtype, momentum):
    layer = cls(shape[1], momentum=momentum).to(F64 if dtype == F64 else F32)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=_gen(6))
        layer.bias.normal_(generator=_gen(7))
    xs = [_input(shape, dtype=dtype, seed=s).detach() for s in range(3)]
    got = _check(_module_run, layer, *xs, dtype=dtype)
    assert got[-1].item() == 3


def test_non_finite_batch_leaves_the_buffers(interpret):
    layer = BatchNorm2d(3)
    x = _input((4, 3, 5, 5)).detach()
    x[0, 1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):  # CPU policy: raise, nothing written
        layer(x)
    assert layer.num_batches_tracked.item() == 0
    layer.raise_on_non_finite = False  # accelerator policy: skip the update, count the batch
    layer(x)
    torch.testing.assert_close(layer.running_mean, torch.zeros(3), rtol=0, atol=0)
    torch.testing.assert_close(layer.running_var, torch.ones(3), rtol=0, atol=0)
    assert layer.num_batches_tracked.item() == 0 and layer.non_finite_batches.item() == 1
    layer(x.nan_to_num())
    assert layer.num_batches_tracked.item() == 1 and layer.non_finite_batches.item() == 1


@pytest.mark.parametrize(
    ("shape", "layout"),
    [((4, 6, 5, 5), "contiguous"), ((4, 6, 5, 5), "channels_last"), ((8, 6), "contiguous")],
)
def test_counting_policy_runs_in_the_forward_launch(interpret, shape, layout):
    # The accelerator policy (raise_on_non_finite False) on the kernels: the running update and
    # the non-finite count happen in the forward's launch (no separate kernel, no host check),
    # over several channel blocks (a ticket decides the last program), and each step leaves the
    # ticket at zero for the next; against the same steps on the reference path.
    layers = [BatchNorm2d(6) if len(shape) == 4 else BatchNorm1d(6) for _ in range(2)]
    xs = [_input(shape, layout, seed=s).detach() for s in range(4)]
    xs[2][0, 3] = float("inf")
    for layer, fused in zip(layers, (True, False), strict=True):
        layer.raise_on_non_finite = False
        with _fused.use(fused):
            for x in xs:
                layer(x)
    ours, ref = layers
    assert ours.non_finite_batches.item() == ref.non_finite_batches.item() == 1
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 3
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), **TOL[F32])
    assert not _triton._scratch(torch.device("cpu"))[:2].any()  # the ticket was reset


def test_cuda_plans_use_a_fixed_set_of_tiles(monkeypatch):
    # Few compiled variants: whatever the sizes, the CUDA tiles come from a fixed set (the
    # plan is built for a CPU tensor with the device's SM count patched in).
    monkeypatch.setitem(_triton._SMS, None, 132)
    shapes = [(64, 4), (8, 4, 5, 5), (4, 4, 3, 4, 5), (256, 1024), (1024, 100), (3, 4, 5, 6)]
    shapes += [(64, 64, 32, 32), (8, 256, 14, 14), (2, 3), (1000, 17)]
    tiles = set()
    for shape in shapes:
        for layout in ("contiguous", "channels_last") if len(shape) == 4 else ("contiguous",):
            x = _input(shape, layout).detach()
            plan = _triton._Plan([x, torch.empty_like(x)], cuda=True)
            tiles.add((plan.block_r, plan.block_c))
            assert plan.nsplit * plan.r_per_prog >= plan.M > (plan.nsplit - 1) * plan.r_per_prog
    assert tiles <= {(2048, 1), (128, 16), (32, 64)}


def test_buffer_writes_bump_the_version_counter(interpret):
    layer = BatchNorm2d(3)
    before = [t._version for t in (layer.running_mean, layer.running_var)]
    layer(_input((4, 3, 5, 5)).detach())
    after = [t._version for t in (layer.running_mean, layer.running_var)]
    assert all(a > b for a, b in zip(after, before, strict=True))


@pytest.mark.parametrize("shape", [(6, 3), (3, 2, 2, 3)])
def test_gradcheck_and_gradgradcheck(interpret, shape):
    x = _input(shape, dtype=F64)
    w, b = _params(shape[1], F64)

    def train(*a):
        return batch_norm_train(*a, 1e-5)[0]

    assert train(x, w, b).grad_fn.name() == NODE
    torch.autograd.gradcheck(train, (x, w, b))
    torch.autograd.gradgradcheck(train, (x, w, b))


def test_saved_tensors_are_no_more_than_torchs(interpret):
    x = _input((4, 3, 5, 5))
    w, b = _params(3, F32)

    def saved(fn):
        sizes = []

        def pack(t):
            sizes.append(t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(sizes)

    ours = saved(lambda: batch_norm_train(x, w, b, 1e-5))
    native = saved(lambda: F.batch_norm(x, None, None, w, b, training=True))
    assert ours <= native


def test_hook_needs_the_interpreter(monkeypatch):
    # Without TRITON_INTERPRET=1 the hook changes nothing: CPU tensors keep their dispatch.
    # (The C++ kernels are marked unavailable so that no build runs: the reference stands in.)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(_loader, "_tried", True)
    monkeypatch.setattr(_loader, "_module", None)
    x = _input((4, 3))
    with _fused._route_cpu_to_triton():
        node = batch_norm_train(x)[0].grad_fn.name()
        assert _fused._ops(x) is None
    assert node == "BatchNormTrainFnBackward"
    assert batch_norm_train(x)[0].grad_fn.name() == node
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # with it, the hook routes to the kernels
    with _fused._route_cpu_to_triton():
        assert _fused._ops(x) is _triton
    assert _fused._ops(x) is None  # and only inside the hook


def test_switch_forces_the_reference(interpret):
    x = _input((4, 3, 2))
    with _fused.use(False):
        assert batch_norm_train(x)[0].grad_fn.name() == "BatchNormTrainFnBackward"
    assert batch_norm_train(x)[0].grad_fn.name() == NODE


def test_missing_triton_logs_once_and_falls_back(interpret, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    monkeypatch.setattr(_triton, "_tried", False)
    monkeypatch.setattr(_triton, "_error", None)
    x = _input((4, 3))
    with caplog.at_level(logging.WARNING, logger="normlab.functional._fused"):
        y1 = batch_norm_train(x)[0]
        y2 = batch_norm_train(x)[0]
    warnings = [r for r in caplog.records if "Triton is unavailable" in r.getMessage()]
    assert len(warnings) == 1
    assert y1.grad_fn.name() == y2.grad_fn.name() == "BatchNormTrainFnBackward"
    with _fused.use(False):
        torch.testing.assert_close(y1, batch_norm_train(x)[0], rtol=0, atol=0)


def test_functorch_transforms_use_the_reference(interpret):
    x = _input((4, 3), dtype=F64).detach()
    grad = torch.func.grad(lambda t: batch_norm_train(t)[0].pow(3).sum())(x)
    with _fused.use(False):
        want = torch.func.grad(lambda t: batch_norm_train(t)[0].pow(3).sum())(x)
    torch.testing.assert_close(grad, want, **TOL[F64])


# -------------------------------------------------------------------------------- CUDA

CUDA = "cuda"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA_SHAPES = [(256, 1024), (1024, 100), (64, 64, 32, 32), (8, 256, 14, 14), (3, 4, 5, 6)]
CUDA_CASES = [(s, "contiguous") for s in CUDA_SHAPES] + [
    ((8, 256, 14, 14), "channels_last"),
    ((3, 4, 5, 6), "strided"),
]
CUDA_TOL = {F32: {"rtol": 1e-4, "atol": 1e-4}, BF16: {"rtol": 2e-2, "atol": 2e-2}}
# Against the float64 truth computed from the same rounded inputs: one rounding of a bf16 result
# (y, grad_input), and float32 accumulation for the float32 per-channel sums (grad_weight,
# grad_bias: a relative error of 1e-4 of the largest magnitude).
TRUTH_TOL = {BF16: 2**-7, F32: 1e-4}


def _truth_check(got, torch_res, truth, name):
    # The kernel's result within one rounding of its dtype of the float64 truth, and at least as
    # close as torch's native kernel (plus that rounding): torch's bf16 kernels on CUDA round
    # the per-channel sums more coarsely than float32 accumulation, so torch is no oracle there.
    t = truth.double()
    tol = TRUTH_TOL[got.dtype] * (t.abs() + t.abs().max())
    err = (got.double() - t).abs()
    err_torch = (torch_res.double() - t).abs()
    assert (err <= tol).all(), f"{name}: error {(err - tol).max().item():.3g} beyond tolerance"
    assert (err <= err_torch + tol).all(), f"{name}: further from the truth than torch"


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize(("shape", "layout"), CUDA_CASES, ids=str)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_cuda_matches_torch_and_reference(dtype, shape, layout):
    x = _input(shape, layout, dtype, device=CUDA)
    w, b = _params(shape[1], F32, device=CUDA)
    g = torch.randn(shape, generator=_gen(3), dtype=F64).to(dtype=dtype, device=CUDA)
    got, node = _bn_train_run(x, w, b, g)
    assert node == NODE
    y = F.batch_norm(x, None, None, w, b, training=True, eps=1e-5)
    want = [y, *torch.autograd.grad(y, (x, w, b), g)]
    x64, w64, b64 = (_twin(t) for t in (x, w, b))
    y64 = F.batch_norm(x64, None, None, w64, b64, training=True, eps=1e-5)
    truth = [y64, *torch.autograd.grad(y64, (x64, w64, b64), g.double())]
    names = ["y", "grad_input", "grad_weight", "grad_bias"]
    for a, r, t, name in zip([got[0], *got[3:]], want, truth, names, strict=True):
        if dtype == F32:
            torch.testing.assert_close(a, r, **CUDA_TOL[dtype])
        else:  # half input: float64 truth (see _truth_check)
            _truth_check(a, r, t, name)
    with _fused.use(False):
        ref, _ = _bn_train_run(x, w, b, g)
    for i, (a, r) in enumerate(zip(got, ref, strict=True)):
        if dtype == F32 or i < 3:  # y, mean, var
            torch.testing.assert_close(a.float(), r.float(), **CUDA_TOL[dtype])
        else:
            _truth_check(a, r, truth[i - 2], names[i - 2])


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
def test_cuda_module_matches_torch_without_host_sync(momentum):
    ours = BatchNorm2d(16, momentum=momentum).to(CUDA)
    ref = torch.nn.BatchNorm2d(16, momentum=momentum).to(CUDA)
    xs = [_input((8, 16, 7, 7), seed=s, device=CUDA).detach() for s in range(3)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = [ours(x) for x in xs]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = [ref(x) for x in xs]
    for a, r in zip(got, want, strict=True):
        torch.testing.assert_close(a, r, **CUDA_TOL[F32])
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), **CUDA_TOL[F32])
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(xs[0]), ref(xs[0]), **CUDA_TOL[F32])
    bad = xs[0].clone()
    bad[0, 0, 0, 0] = float("nan")
    ours.train()
    before = ours.running_mean.clone()
    ours(bad)
    torch.testing.assert_close(ours.running_mean, before, rtol=0, atol=0)
    assert ours.non_finite_batches.item() == 1
