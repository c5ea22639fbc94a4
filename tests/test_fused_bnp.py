"""The fused CPU kernels of BNP (normlab/functional/_fused/csrc/bnp.cpp) against the reference.

Oracles: the functional BNP math (``linear_input_moments`` + ``ema_update``,
``precondition_linear_`` / ``precondition_conv2d_``) and ``BNPreconditioner`` run with the fused
kernels switched off; float32 within 1e-6 (or closer than the reference to the float64 truth),
float64 within 1e-12.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from normlab.functional import _fused
from normlab.functional.precondition import (
    conv2d_channel_moments,
    ema_moments,
    ema_update,
    linear_input_moments,
    precondition_conv2d,
    precondition_linear,
)
from normlab.models import MLP, SmallCNN
from normlab.optim.preconditioner import BNPreconditioner
from tests._fused_helpers import close_or_closer

needs_fused = pytest.mark.skipif(
    not _fused.available(), reason=f"fused kernels unavailable: {_fused.load_error()}"
)
pytestmark = needs_fused

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: {"rtol": 1e-6, "atol": 1e-6}, torch.float64: {"rtol": 1e-12, "atol": 1e-12}}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference_fold(xs, means, variances, mean, var, rho):
    parts_m, parts_v = [], []
    for x, m, v in zip(xs, means, variances, strict=True):
        if x is not None:
            moments = linear_input_moments(x)
            m, v = moments.mean, moments.var
        parts_m.append(m)
        parts_v.append(v)
    return ema_update(mean, var, torch.cat(parts_m), torch.cat(parts_v), rho)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize("rho", [0.5, 0.99])
def test_fold_equals_ema_update_of_the_segments_moments(dtype, rows, rho):
    g = _gen(rows)
    # (the first segment: 45 columns, two full chunks of the kernel, one of 8 and 5 left; the
    # last: a mean far from zero against its spread, where the centring matters)
    xs = [torch.randn(rows, 45, generator=g, dtype=dtype) * 3 + 2, None,
          torch.randn(rows, 5, generator=g, dtype=dtype) * 1e-2 + 30]  # fmt: skip
    means = [None, torch.randn(6, generator=g, dtype=dtype), None]
    variances = [None, torch.rand(6, generator=g, dtype=dtype), None]
    mean = torch.randn(56, generator=g, dtype=dtype)
    var = torch.rand(56, generator=g, dtype=dtype) + 0.1
    before = (mean.clone(), var.clone())
    got = _fused.try_bnp_fold(xs, means, variances, mean, var, rho)
    assert got is not None
    new_mean, new_var, mean_parts, var_parts = got
    want = _reference_fold(xs, means, variances, mean, var, rho)
    truth = _reference_fold(
        [None if x is None else x.double() for x in xs],
        [None if m is None else m.double() for m in means],
        [None if v is None else v.double() for v in variances],
        mean.double(), var.double(), rho,
    )  # fmt: skip
    close_or_closer([new_mean, new_var], list(want), TOL[dtype], truth=truth)
    assert torch.equal(mean, before[0]) and torch.equal(var, before[1])  # new tensors
    # The per-segment views, in order.
    assert [p.numel() for p in mean_parts] == [45, 6, 5] == [p.numel() for p in var_parts]
    assert torch.equal(torch.cat(mean_parts), new_mean) and torch.equal(
        torch.cat(var_parts), new_var
    )
    assert all(p.data_ptr() >= new_mean.data_ptr() for p in mean_parts)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fold_keeps_entries_whose_batch_moments_are_not_finite(dtype):
    g = _gen(3)
    x = torch.randn(4, 5, generator=g, dtype=dtype)
    x[1, 2] = float("nan")
    x[0, 4] = float("inf")
    m_b = torch.randn(3, dtype=dtype, generator=g)
    m_b[0] = float("nan")
    v_b = torch.rand(3, dtype=dtype, generator=g)
    mean, var = torch.randn(8, generator=g, dtype=dtype), torch.rand(8, generator=g, dtype=dtype)
    new_mean, new_var, _, _ = _fused.try_bnp_fold(
        [x, None], [None, m_b], [None, v_b], mean, var, 0.9
    )
    want = _reference_fold([x, None], [None, m_b], [None, v_b], mean, var, 0.9)
    torch.testing.assert_close(new_mean, want[0], **TOL[dtype])
    torch.testing.assert_close(new_var, want[1], **TOL[dtype])
    for i in (2, 4, 5):  # kept
        assert new_mean[i] == mean[i] and new_var[i] == var[i]


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_fold_reads_half_inputs_into_float32_statistics(half):
    # As linear_input_moments: half-precision inputs, moments in float32.
    g = _gen(4)
    xs = [(torch.randn(37, 9, generator=g) * 2 + 1).to(half), None]
    means, variances = [None, torch.randn(3, generator=g)], [None, torch.rand(3, generator=g)]
    mean, var = torch.randn(12, generator=g), torch.rand(12, generator=g) + 0.5
    got = _fused.try_bnp_fold(xs, means, variances, mean, var, 0.9)
    assert got is not None and got[0].dtype == torch.float32
    want = _reference_fold(xs, means, variances, mean, var, 0.9)
    close_or_closer(list(got[:2]), list(want), TOL[torch.float32])


def test_fold_declines_what_it_does_not_take():
    mean, var = torch.zeros(4), torch.ones(4)
    x = torch.randn(3, 4)
    cases = [
        ([x.double()], [None], [None], mean, var),  # another dtype than the statistics'
        ([torch.randn(4, 3).T], [None], [None], mean, var),  # not contiguous
        ([x], [None], [None], mean.half(), var.half()),  # half statistics
        ([x.half()], [None], [None], mean.double(), var.double()),  # half x, float64 statistics
        ([None], [torch.zeros(4, dtype=torch.float64)], [torch.ones(4)], mean, var),
    ]
    for xs, ms, vs, m, v in cases:
        assert _fused.try_bnp_fold(xs, ms, vs, m, v, 0.9) is None
    with _fused.use(False):
        assert _fused.try_bnp_fold([x], [None], [None], mean, var, 0.9) is None


@pytest.mark.parametrize(
    ("shape", "dtype", "layout"),
    [
        ((6, 5, 7, 9), torch.float32, "planes"),
        ((6, 5, 7, 9), torch.float64, "planes"),
        ((3, 8, 4, 4), torch.float32, "channels_last"),
        ((5, 7, 3), torch.float32, "unbatched"),
        ((4, 3, 6, 6), torch.bfloat16, "planes"),
        ((4, 3, 6, 6), torch.float16, "planes"),
        ((64, 16, 28, 28), torch.float32, "planes"),  # channels split over the threads
    ],
)
def test_conv_channel_moments_use_the_batch_norm_kernels(shape, dtype, layout):
    g = _gen(9)
    x = (torch.randn(*shape, generator=g) * 3 + 5).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    calls = _Spy(_fused.try_channel_moments)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_fused, "try_channel_moments", calls)
        got = conv2d_channel_moments(x)
    assert calls.taken == 1
    with _fused.use(False):
        want = conv2d_channel_moments(x)
    truth = conv2d_channel_moments(x.double())
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.mean.dtype == stat and got.count == want.count
    close_or_closer([got.mean, got.var], [want.mean, want.var], TOL[stat], truth=truth[:2])


def test_conv_channel_moments_of_an_input_that_needs_grad_stay_differentiable():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    moments = conv2d_channel_moments(x)
    assert moments.var.grad_fn is not None  # the reference's operations, not the kernel
    with torch.no_grad():
        assert conv2d_channel_moments(x).var.grad_fn is None


def _layers(dtype: torch.dtype, g: torch.Generator):
    # (grad_w, grad_b, mean, var, functional transform) for a dense layer with and without
    # bias, a convolution with per-channel statistics, one with per-entry (patch) statistics
    # and a 1x1 convolution.
    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    def stats(*shape):
        var = torch.rand(*shape, generator=g, dtype=dtype) * 2
        var.view(-1)[0] = 1e-4  # below the floor
        return rnd(*shape), var

    return [
        (rnd(5, 7), rnd(5), *stats(7), "linear"),
        (rnd(3, 9), None, *stats(9), "linear"),
        (rnd(6, 4, 3, 3), rnd(6), *stats(4), "conv"),
        (rnd(4, 2, 2, 3), rnd(4), *stats(2, 2, 3), "conv"),
        (rnd(8, 3, 1, 1), None, *stats(3), "conv"),
    ]


def _reference_transform(layers, eps, floor):
    out = []
    for gw, gb, m, v, kind in layers:
        fn = precondition_linear if kind == "linear" else precondition_conv2d
        out.extend(fn(gw, gb, m, v, eps=eps, floor=floor))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_precondition_equals_the_functional_transforms(dtype):
    layers = _layers(dtype, _gen(5))
    eps, floor = 1e-5, 0.1
    want = _reference_transform(layers, eps, floor)
    truth = _reference_transform(
        [(gw.double(), None if gb is None else gb.double(), m.double(), v.double(), k)
         for gw, gb, m, v, k in layers], eps, floor,
    )  # fmt: skip
    grads_w = [layer[0].clone() for layer in layers]
    grads_b = [None if layer[1] is None else layer[1].clone() for layer in layers]
    versions = [t._version for t in grads_w]
    assert _fused.try_bnp_precondition_(
        grads_w, grads_b, [layer[2] for layer in layers], [layer[3] for layer in layers], eps, floor
    )
    got = [t for pair in zip(grads_w, grads_b, strict=True) for t in pair]
    close_or_closer(got, want, TOL[dtype], truth=truth)
    # Written in place, as an in-place op: the version counters moved.
    assert all(t._version > v for t, v in zip(grads_w, versions, strict=True))


def test_precondition_declines_without_writing():
    g = _gen(6)
    layers = _layers(torch.float32, g)
    means = [layer[2] for layer in layers]
    variances = [layer[3] for layer in layers]
    for bad in ("channels_last", "dtype"):
        grads_w = [layer[0].clone() for layer in layers]
        grads_b = [None if layer[1] is None else layer[1].clone() for layer in layers]
        if bad == "channels_last":
            grads_w[2] = grads_w[2].contiguous(memory_format=torch.channels_last)
        else:
            grads_b[0] = grads_b[0].double()
        before = [t.clone() for t in grads_w]
        assert not _fused.try_bnp_precondition_(grads_w, grads_b, means, variances, 1e-5, 0.1)
        assert all(torch.equal(a, b) for a, b in zip(grads_w, before, strict=True)), bad


def _dense_step_case(dtype: torch.dtype, g: torch.Generator):
    # Inputs, weight and bias gradients (one layer without bias) and flat statistics of three
    # dense layers, one with a single input row.
    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    xs = [rnd(9, 7) * 3 + 5, rnd(9, 4), rnd(1, 6)]
    grads_w = [rnd(5, 7), rnd(3, 4), rnd(2, 6)]
    grads_b = [rnd(5), None, rnd(2)]
    mean, var = rnd(17), torch.rand(17, generator=g, dtype=dtype) * 2
    return xs, grads_w, grads_b, mean, var


@pytest.mark.parametrize("dtype", DTYPES)
def test_step_equals_the_fold_then_the_transform_to_the_last_bit(dtype):
    xs, grads_w, grads_b, mean, var = _dense_step_case(dtype, _gen(11))
    rho, eps, floor = 0.9, 1e-5, 0.1
    want_w, want_b = [t.clone() for t in grads_w], [t if t is None else t.clone() for t in grads_b]
    none = [None] * len(xs)
    fold = _fused.try_bnp_fold(xs, none, none, mean, var, rho)
    assert fold is not None and _fused.try_bnp_precondition_(
        want_w, want_b, fold[2], fold[3], eps, floor
    )
    mean_before, var_before = mean.clone(), var.clone()
    out_mean, out_var = torch.full_like(mean, float("nan")), torch.full_like(var, float("nan"))
    versions = out_mean._version, out_var._version
    assert _fused.try_bnp_step_(xs, grads_w, grads_b, mean, var, out_mean, out_var, rho, eps, floor)
    assert torch.equal(out_mean, fold[0]) and torch.equal(out_var, fold[1])
    assert (out_mean._version, out_var._version) > versions  # written as an in-place op is
    for a, b in zip([*grads_w, *grads_b], [*want_w, *want_b], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    # The new statistics go to out_mean/out_var; the ones passed in are not written.
    assert torch.equal(mean, mean_before) and torch.equal(var, var_before)
    got = (out_mean, out_var, fold[2], fold[3])
    # And the fold is the functional one's, the transform the functional transform's.
    ref_mean, ref_var = _reference_fold(xs, none, none, mean, var, rho)
    torch.testing.assert_close(got[0], ref_mean, **TOL[dtype])
    torch.testing.assert_close(got[1], ref_var, **TOL[dtype])
    grads = _dense_step_case(dtype, _gen(11))
    ref = [
        t
        for gw, gb, m, v in zip(grads[1], grads[2], got[2], got[3], strict=True)
        for t in precondition_linear(gw, gb, m, v, eps=eps, floor=floor)
    ]
    pairs = zip(grads_w, grads_b, strict=True)
    for a, b in zip([t for pair in pairs for t in pair], ref, strict=True):
        assert (a is None and b is None) or torch.allclose(a, b, **TOL[dtype])


@pytest.mark.parametrize(
    "bad", ["input dtype", "gradient dtype", "bias layout", "statistics", "output layout"]
)
def test_step_declines_without_writing(bad):
    xs, grads_w, grads_b, mean, var = _dense_step_case(torch.float32, _gen(12))
    if bad == "input dtype":
        xs[1] = xs[1].double()
    elif bad == "gradient dtype":
        grads_w[2] = grads_w[2].double()
    elif bad == "bias layout":
        grads_b[0] = torch.randn(10, generator=_gen(1))[::2]
    else:
        mean, var = mean.double(), var.double()
    out_mean, out_var = torch.zeros_like(mean), torch.zeros_like(var)
    if bad == "output layout":
        out_var = torch.zeros(2 * var.numel(), dtype=var.dtype)[::2]
    before = [t.clone() for t in (*grads_w, grads_b[0], mean, var, out_mean, out_var)]
    step = (xs, grads_w, grads_b, mean, var, out_mean, out_var, 0.9, 1e-5, 0.1)
    assert _fused.try_bnp_step_(*step) is False
    after = (*grads_w, grads_b[0], mean, var, out_mean, out_var)
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True)), bad


@pytest.mark.parametrize("bad", ["aliased output", "output size", "gradient shape"])
def test_step_rejects_malformed_arguments_without_writing(bad):
    xs, grads_w, grads_b, mean, var = _dense_step_case(torch.float32, _gen(13))
    out_mean, out_var = torch.zeros_like(mean), torch.zeros_like(var)
    if bad == "aliased output":
        out_var = mean
    elif bad == "output size":
        out_mean = torch.zeros(mean.numel() + 1)
    else:
        grads_w[1] = grads_w[1].reshape(-1, 1).contiguous()
    before = [t.clone() for t in (*grads_w, mean, var, out_mean, out_var)]
    with pytest.raises(RuntimeError, match="bnp_step|overlap|unsupported operation"):
        _fused.try_bnp_step_(xs, grads_w, grads_b, mean, var, out_mean, out_var, 0.9, 1e-5, 0.1)
    after = (*grads_w, mean, var, out_mean, out_var)
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True)), bad


def _train(model: nn.Module, xs, fused: bool, **options):
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with _fused.use(fused):
        precond = BNPreconditioner(model, **options)
        for x, y in xs:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            precond.precondition_()
            opt.step()
        stats = precond.statistics()
    return list(model.parameters()), stats


def _data(dtype, shape, steps=6):
    g = _gen(7)
    labels = (shape[0],)
    return [
        (torch.randn(*shape, generator=g, dtype=dtype), torch.randint(0, 10, labels, generator=g))
        for _ in range(steps)
    ]


class _Spy:
    # Counts the calls of a fused entry point that returned a result.
    def __init__(self, fn):
        self.fn, self.taken, self.calls = fn, 0, 0

    def __call__(self, *args):
        out = self.fn(*args)
        self.calls += 1
        self.taken += out is not None and out is not False
        return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("arch", "options"),
    [
        ("mlp", {}),
        ("mlp", {"debias": False, "use_current_batch": False}),
        ("cnn", {}),
        ("cnn", {"conv_stats": "patch", "rho": 0.9}),
    ],
    ids=["mlp", "mlp-plain-ema-earlier-batches", "cnn", "cnn-patch"],
)
def test_preconditioner_trains_as_with_the_reference(dtype, arch, options, monkeypatch):
    torch.manual_seed(0)
    if arch == "mlp":
        model, shape = MLP(12, (16, 16), 10), (5, 12)
    else:
        model, shape = SmallCNN(2, 10, channels=(4, 6)), (3, 2, 8, 8)
    model = model.to(dtype)
    xs = _data(dtype, shape)
    fold, transform = _Spy(_fused.try_bnp_fold), _Spy(_fused.try_bnp_precondition_)
    step = _Spy(_fused.try_bnp_step_)
    monkeypatch.setattr(_fused, "try_bnp_fold", fold)
    monkeypatch.setattr(_fused, "try_bnp_precondition_", transform)
    monkeypatch.setattr(_fused, "try_bnp_step_", step)
    got_params, got_stats = _train(model, xs, True, **options)
    # Every fold after the first batch's and every step's transform took the kernels (the first
    # step has no statistics to use without the current batch); with the current batch's
    # statistics, the dense model's steps from the third on (once a fold has left the flat
    # buffer) take both in one call.
    first = options.get("use_current_batch", True)
    combined = len(xs) - 2 if arch == "mlp" and first else 0
    assert step.taken == combined
    assert (fold.taken + step.taken, transform.taken + step.taken) == (
        len(xs) - 1,
        len(xs) - (not first),
    )
    want_params, want_stats = _train(model, xs, False, **options)
    tol = {torch.float32: {"rtol": 1e-5, "atol": 1e-6}, torch.float64: TOL[torch.float64]}[dtype]
    for a, b in zip(got_params, want_params, strict=True):
        torch.testing.assert_close(a, b, **tol)
    assert got_stats.keys() == want_stats.keys()
    for name in got_stats:
        torch.testing.assert_close(got_stats[name].mean, want_stats[name].mean, **tol)
        torch.testing.assert_close(got_stats[name].var, want_stats[name].var, **tol)
        assert got_stats[name].num_batches == want_stats[name].num_batches == len(xs)


def test_gradients_the_kernel_declines_get_the_reference_transform(monkeypatch):
    # channels_last convolution weights have channels_last gradients: the transform kernel
    # declines them and the class transforms layer by layer, as with the kernels off.
    torch.manual_seed(3)
    model = SmallCNN(2, 10, channels=(4, 6)).double().to(memory_format=torch.channels_last)
    xs = _data(torch.float64, (3, 2, 8, 8), steps=3)
    transform = _Spy(_fused.try_bnp_precondition_)
    monkeypatch.setattr(_fused, "try_bnp_precondition_", transform)
    got_params, got_stats = _train(model, xs, True)
    assert transform.taken == 0 and transform.calls == len(xs)  # declined every step
    want_params, want_stats = _train(model, xs, False)
    for a, b in zip(got_params, want_params, strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    for name in got_stats:
        torch.testing.assert_close(got_stats[name].var, want_stats[name].var, **TOL[torch.float64])


def test_preconditioner_under_bfloat16_autocast_trains_as_with_the_reference(monkeypatch):
    # The hidden layers' inputs are bfloat16 under CPU autocast; their statistics float32.
    torch.manual_seed(2)
    model = MLP(12, (16, 16), 10)
    xs = _data(torch.float32, (6, 12))
    fold, step = _Spy(_fused.try_bnp_fold), _Spy(_fused.try_bnp_step_)
    monkeypatch.setattr(_fused, "try_bnp_fold", fold)
    monkeypatch.setattr(_fused, "try_bnp_step_", step)
    results = []
    for fused in (True, False):
        net = copy.deepcopy(model)
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        with _fused.use(fused):
            precond = BNPreconditioner(net)
            for x, y in xs:
                opt.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = net(x)
                F.cross_entropy(out.float(), y).backward()
                precond.precondition_()
                opt.step()
            results.append((list(net.parameters()), precond.statistics()))
    assert (fold.taken, step.taken) == (1, len(xs) - 2)  # bfloat16 inputs in the one-call step too
    (p_got, s_got), (p_want, s_want) = results
    assert all(s.mean.dtype == torch.float32 for s in s_got.values())
    for a, b in zip(p_got, p_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for name in s_got:
        torch.testing.assert_close(s_got[name].mean, s_want[name].mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s_got[name].var, s_want[name].var, rtol=1e-5, atol=1e-6)


def test_the_fused_fold_starts_from_the_first_ema_step():
    # The first batch initializes the statistics (reference); every later fold is fused and
    # equals ema_moments step by step.
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    precond = BNPreconditioner(model, rho=0.8, debias=False)
    g = _gen(8)
    running = None
    for _ in range(4):
        x = torch.randn(5, 6, generator=g, dtype=torch.float64)
        model(x).sum().backward()
        running = ema_moments(running, linear_input_moments(x), 0.8)
        stats = precond.statistics()["0"]
        torch.testing.assert_close(stats.mean, running.mean, **TOL[torch.float64])
        torch.testing.assert_close(stats.var, running.var, **TOL[torch.float64])


@pytest.mark.parametrize("entry", ["try_bnp_step_", "try_bnp_fold"])
def test_a_failing_fold_kernel_keeps_the_round(entry, monkeypatch):
    # Nothing is lost or half-folded when the kernel call raises, in the one-call step or (that
    # one declining) in the fold: the round goes back to the pending batches and the next fold
    # takes it.
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    precond = BNPreconditioner(model, rho=0.8, debias=False)
    g = _gen(10)
    inputs = [torch.randn(5, 6, generator=g) for _ in range(3)]
    for x in inputs[:2]:
        model(x).sum().backward()
        precond.precondition_()
    before = {k: (v.mean.clone(), v.var.clone()) for k, v in precond.statistics().items()}
    model(inputs[2]).sum().backward()

    def broken(*args):
        raise RuntimeError("kernel failure")

    if entry == "try_bnp_fold":
        monkeypatch.setattr(_fused, "try_bnp_step_", lambda *args: None)
    monkeypatch.setattr(_fused, entry, broken)
    with pytest.raises(RuntimeError, match="kernel failure"):
        precond.precondition_()
    monkeypatch.undo()
    layers = {layer.name: layer for layer in precond._layers}  # (statistics() would fold)
    for name, (mean, var) in before.items():
        running = layers[name].running
        assert running.num_batches == 2 and len(layers[name].pending) == 1
        assert torch.equal(running.mean, mean) and torch.equal(running.var, var)
    stats = precond.statistics()  # folds the kept round
    running = None
    for x in inputs:
        running = ema_moments(running, linear_input_moments(x), 0.8)
    torch.testing.assert_close(stats["0"].mean, running.mean, **TOL[torch.float32])
    assert stats["0"].num_batches == 3


def test_the_one_call_step_keeps_each_steps_state_as_the_reference_does(monkeypatch):
    # The one-call step writes the new statistics into buffers of its own, three in turn: after
    # every step the state (running statistics and before_step) is the reference path's.
    torch.manual_seed(5)
    model = MLP(12, (16, 16), 10)
    xs = _data(torch.float32, (5, 12), steps=8)
    step = _Spy(_fused.try_bnp_step_)
    monkeypatch.setattr(_fused, "try_bnp_step_", step)
    runs = []
    for fused in (True, False):
        net = copy.deepcopy(model)
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        states = []
        with _fused.use(fused):
            precond = BNPreconditioner(net)
            for x, y in xs:
                opt.zero_grad()
                F.cross_entropy(net(x), y).backward()
                precond.precondition_()
                opt.step()
                states.append(precond.state_dict())
        runs.append(states)
    assert step.taken == len(xs) - 2
    for got, want in zip(*runs, strict=True):
        for name, entry in want["layers"].items():
            for which in ("running", "before_step"):
                a, b = got["layers"][name][which], entry[which]
                assert (a is None) == (b is None), (name, which)
                if b is None:
                    continue
                assert a["num_batches"] == b["num_batches"]
                torch.testing.assert_close(a["mean"], b["mean"], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(a["var"], b["var"], rtol=1e-5, atol=1e-6)
