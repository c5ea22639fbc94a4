"""Fused batch norm kernels for CUDA tensors, written in Triton (imported on first use).

The dispatch in :mod:`normlab.functional._fused` sends plain strided CUDA tensors here; the
functions below mirror the C++ CPU kernels' entry points (``bn_train``, ``norm_eval``,
``bn_train_module``) and return ``None`` where they do not apply (the caller then runs the
pure-PyTorch reference):

* :func:`bn_train` ``(x, weight, bias, eps) -> (y, mean, var)``: training forward, ``mean`` and
  the biased ``var`` of shape ``(C,)`` in the statistics' dtype (float32 for half inputs);
  recorded as one :class:`BNTrainTriton` autograd node whose backward is the fused first-order
  kernel, or the reference formulas when a graph of the backward is recorded.
* :func:`norm_eval` ``(x, mean, var, weight, bias, eps) -> y``: eval forward.
* :func:`bn_train_module`: a BatchNorm layer's training step, the running statistics updated on
  the device by the forward's launch (torch's unbiased running variance, ``momentum`` ``< 0``:
  cumulative average), nothing written when a statistic is not finite, then the layer's
  non-finite counter incremented when given; returns ``(y, var, ok)``, ``ok`` false when no
  counter was given (the layer applies its policy itself).

Not applicable (``None``): Triton missing or failing (logged once at WARNING), more than
``2**31 - 1`` elements, per-channel tensors of another dtype than the input's or float32.
Kernels, grids, compiled variants and accuracy: docs/performance.md ("CUDA kernels").

Testing: :func:`kernels` builds interpreter versions (``TRITON_INTERPRET=1``) for CPU tensors,
so the same code runs without a GPU (tests/test_fused_triton.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from normlab.functional._fused import _graph

__all__ = [
    "BNTrainTriton",
    "NormEvalTriton",
    "available",
    "bn_train",
    "bn_train_module",
    "kernels",
    "load_error",
    "norm_eval",
]

_log = logging.getLogger("normlab.functional._fused")

_HALF = (torch.float16, torch.bfloat16)
_INT32_MAX = 2**31 - 1

triton: Any = None  # the modules, bound by _import()
tl: Any = None
_lock = threading.Lock()
_tried = False
_error: str | None = None
_kernels: dict[bool, SimpleNamespace] = {}


def _import() -> bool:
    # Import Triton once; a failure is logged once at WARNING and leaves the reference in place.
    global triton, tl, _tried, _error
    if _tried:
        return _error is None
    with _lock:
        if not _tried:
            try:
                import triton as _triton_mod
                import triton.language as _tl

                triton, tl = _triton_mod, _tl
            except Exception as exc:  # ImportError, or a broken installation
                _error = f"{type(exc).__name__}: {exc}"
                _log.warning(
                    "Triton is unavailable (%s); normlab's batch norm on CUDA uses the slower "
                    "pure-PyTorch reference code",
                    _error,
                )
            _tried = True
    return _error is None


def available() -> bool:
    """Whether Triton imports (importing it on the first call)."""
    return _import()


def load_error() -> str | None:
    """Why the Triton kernels are unavailable (import or first-launch failure), or ``None``."""
    return _error


def _disable(exc: BaseException) -> None:
    # A kernel failed to compile or launch: use the reference from now on, say so once.
    global _error
    if _error is None:
        _error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1:] or ''}"
        _log.warning(
            "normlab's Triton batch norm kernels failed (%s); using the pure-PyTorch reference",
            _error,
        )


# ------------------------------------------------------------------------------------ kernels
#
# Every tensor is seen as (N, C, S) with strides (sn, sc, ss); the per-channel reduction runs
# over r = n * S + s < M = N * S. A program owns BLOCK_C channels and a range of R_PER_PROG
# values of r (one split), read in tiles of BLOCK_R x BLOCK_C. Partial results per split go to
# a (2, NSPLIT, C) workspace in the accumulation dtype ACC (float32, float64 for float64).
#
# The kernels (_k_*) share device functions (_d_*): the compiler inlines them, the interpreter
# calls them (see _bind_device_functions).


def _d_channels(pid_c, C, BLOCK_C: tl.constexpr):
    # The channels of channel block pid_c, and their mask.
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return cols, cols < C


def _d_split(pid_r, R_PER_PROG, M):
    # The rows [r_start, r_end) of split pid_r of the reduction.
    r_start = pid_r * R_PER_PROG
    return r_start, tl.minimum(r_start + R_PER_PROG, M)


def _d_tile(r0, r_end, S, cmask, BLOCK_R: tl.constexpr):
    # The tile of rows r0 .. r0 + BLOCK_R - 1: (n, s) of each row, and the mask of the
    # tile's elements (rows below r_end, this program's channels).
    rows = r0 + tl.arange(0, BLOCK_R)
    rmask = rows < r_end
    n = rows // S
    s = rows - n * S
    return n, s, rmask[:, None] & cmask[None, :]


def _d_offsets(n, s, cols, sn, sc, ss):
    # The tile's element offsets in a tensor of strides (sn, sc, ss).
    return (n * sn + s * ss)[:, None] + (cols * sc)[None, :]


def _d_load(P, n, s, cols, sn, sc, ss, mask, ACC: tl.constexpr):
    # A tile of P in the accumulation dtype, 0 where masked.
    return tl.load(P + _d_offsets(n, s, cols, sn, sc, ss), mask=mask, other=0.0).to(ACC)


def _d_store(P, value, n, s, cols, sn, sc, ss, mask):
    # A tile stored into P, in P's dtype.
    tl.store(P + _d_offsets(n, s, cols, sn, sc, ss), value.to(P.dtype.element_ty), mask=mask)


def _d_store_split(PART, first, second, pid_r, C, cols, cmask):
    # Split pid_r's two partial results into the (2, NSPLIT, C) workspace.
    nsplit = tl.num_programs(1)
    tl.store(PART + pid_r * C + cols, first, mask=cmask)
    tl.store(PART + (nsplit + pid_r) * C + cols, second, mask=cmask)


def _d_chan(total, mean, m2, cnt, bsum, bmean, bm2, bc):
    # Chan's pairwise update of (sum, mean, centred sum of squares, count) with a part of bc
    # values of sum bsum, mean bmean and centred sum of squares bm2.
    tot = cnt + bc
    delta = bmean - mean
    mean = mean + delta * (bc / tot)
    m2 = m2 + bm2 + delta * delta * (cnt * (bc / tot))
    return total + bsum, mean, m2, tot


def _d_moments(
    X, cols, cmask, S, sxn, sxc, sxs, r_start, r_end,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # The sum and the centred sum of squares of each channel over the rows [r_start, r_end),
    # merged tile by tile with Chan's formula (each tile's own mean, then the pairwise update).
    total = tl.zeros([BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    cnt = tl.zeros([BLOCK_C], dtype=ACC)
    for r0 in range(r_start, r_end, BLOCK_R):
        n, s, mask = _d_tile(r0, r_end, S, cmask, BLOCK_R)
        v = _d_load(X, n, s, cols, sxn, sxc, sxs, mask, ACC)
        bc = tl.minimum(r_end - r0, BLOCK_R).to(ACC)
        bsum = tl.sum(v, axis=0)
        bmean = bsum / bc
        d = tl.where(mask, v - bmean[None, :], 0.0)
        bm2 = tl.sum(d * d, axis=0)
        total, mean, m2, cnt = _d_chan(total, mean, m2, cnt, bsum, bmean, bm2, bc)
    return total, m2


def _d_grad_sums(
    X, G, mean, cols, cmask, S, sxn, sxc, sxs, sgn, sgc, sgs, r_start, r_end,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # sum(g) and sum(g * (x - mean)) of each channel over the rows [r_start, r_end).
    sum_g = tl.zeros([BLOCK_C], dtype=ACC)
    sum_gx = tl.zeros([BLOCK_C], dtype=ACC)
    for r0 in range(r_start, r_end, BLOCK_R):
        n, s, mask = _d_tile(r0, r_end, S, cmask, BLOCK_R)
        v = _d_load(X, n, s, cols, sxn, sxc, sxs, mask, ACC)
        g = _d_load(G, n, s, cols, sgn, sgc, sgs, mask, ACC)
        xc = tl.where(mask, v - mean[None, :], 0.0)
        sum_g = sum_g + tl.sum(g, axis=0)
        sum_gx = sum_gx + tl.sum(g * xc, axis=0)
    return sum_g, sum_gx


def _d_invstd(var, eps, ACC: tl.constexpr):
    # 1 / sqrt(var + eps), computed in float64, in the accumulation dtype.
    return (1.0 / tl.sqrt(var.to(tl.float64) + eps)).to(ACC)


def _d_times_weight(a, W, cols, cmask, HAS_W: tl.constexpr, ACC: tl.constexpr):
    # a * weight per channel (a itself without a weight).
    if HAS_W:
        a = a * tl.load(W + cols, mask=cmask, other=1.0).to(ACC)
    return a


def _k_stats(
    X, PART, C, S, sxn, sxc, sxs, M, R_PER_PROG,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # Per split: the sum and the centred sum of squares of each channel (_d_moments).
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    cols, cmask = _d_channels(pid_c, C, BLOCK_C)
    r_start, r_end = _d_split(pid_r, R_PER_PROG, M)
    total, m2 = _d_moments(
        X, cols, cmask, S, sxn, sxc, sxs, r_start, r_end, ACC, BLOCK_R, BLOCK_C
    )  # fmt: skip
    _d_store_split(PART, total, m2, pid_r, C, cols, cmask)


def _k_forward(
    X, Y, PART, W, B, MEAN, VAR, RM, RV, TRACKED, NONFIN, TICKET,
    C, S, sxn, sxc, sxs, syn, syc, sys, M, R_PER_PROG,
    eps: tl.float64, momentum: tl.float64, unbias: tl.float64,
    ACC: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SINGLE: tl.constexpr,
    UPDATE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    RUN_BLOCK: tl.constexpr = 256,
):  # fmt: skip
    # Merge the splits' partial moments (Chan), then y = (x - mean) * (invstd * w) + b over
    # this program's range; the first split's programs store mean and the biased var.
    # SINGLE (one split): the moments are computed here as in _k_stats, and PART is unused.
    # UPDATE (a layer's step): the last first-split program to finish (a ticket in TICKET[0],
    # the count of non-finite variances in TICKET[1]) updates the running statistics when
    # every var is finite, else adds 1 to NONFIN; it then resets both to 0.
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    cols, cmask = _d_channels(pid_c, C, BLOCK_C)
    nsplit = tl.num_programs(1)
    if SINGLE:
        total, m2 = _d_moments(X, cols, cmask, S, sxn, sxc, sxs, 0, M, ACC, BLOCK_R, BLOCK_C)
    else:
        total = tl.zeros([BLOCK_C], dtype=ACC)
        mean = tl.zeros([BLOCK_C], dtype=ACC)
        m2 = tl.zeros([BLOCK_C], dtype=ACC)
        cnt = tl.zeros([BLOCK_C], dtype=ACC)
        for k in range(0, nsplit):
            ck = tl.minimum(R_PER_PROG, M - k * R_PER_PROG).to(ACC)
            sk = tl.load(PART + k * C + cols, mask=cmask, other=0.0)
            qk = tl.load(PART + (nsplit + k) * C + cols, mask=cmask, other=0.0)
            total, mean, m2, cnt = _d_chan(total, mean, m2, cnt, sk, sk / ck, qk, ck)
    mean = total / M  # the plain mean: an infinite value gives an infinite mean
    var = m2 / M
    scale = _d_times_weight(_d_invstd(var, eps, ACC), W, cols, cmask, HAS_W, ACC)
    if HAS_B:
        bias = tl.load(B + cols, mask=cmask, other=0.0).to(ACC)
    else:
        bias = tl.zeros([BLOCK_C], dtype=ACC)
    if pid_r == 0:
        tl.store(MEAN + cols, mean.to(MEAN.dtype.element_ty), mask=cmask)
        tl.store(VAR + cols, var.to(VAR.dtype.element_ty), mask=cmask)
        if UPDATE:
            finite = tl.abs(var.to(tl.float64)) <= 1.7976931348623157e308  # NaN, Inf: false
            bad = tl.sum(tl.where(cmask, tl.where(finite, 0, 1), 0), axis=0)
            tl.debug_barrier()  # every thread's stores precede the release below
            tl.atomic_add(TICKET + 1, bad.to(tl.int64))
            ticket = tl.atomic_add(TICKET, 1)
            if ticket == tl.num_programs(0) - 1:
                # No var counted non-finite: num_batches_tracked += 1 and the running statistics
                # move towards the batch's (torch's lerp, from the far end for weights of 0.5
                # and more; the unbiased var; momentum < 0: weight 1 / count). Else NONFIN += 1.
                # Then the ticket resets for the next step.
                tl.debug_barrier()
                nbad = tl.atomic_add(TICKET + 1, 0)
                if nbad == 0:
                    count = tl.load(TRACKED) + 1
                    tl.store(TRACKED, count)
                    wt = tl.where(momentum < 0, 1.0 / count.to(tl.float64), momentum)
                    small = wt < 0.5
                    for c0 in range(0, C, RUN_BLOCK):
                        rc = c0 + tl.arange(0, RUN_BLOCK)
                        rcm = rc < C
                        bm = tl.load(MEAN + rc, mask=rcm, other=0.0, cache_modifier=".cg")
                        bv = tl.load(VAR + rc, mask=rcm, other=0.0, cache_modifier=".cg")
                        bm = bm.to(tl.float64)
                        bv = bv.to(tl.float64) * unbias
                        rm = tl.load(RM + rc, mask=rcm, other=0.0).to(tl.float64)
                        rv = tl.load(RV + rc, mask=rcm, other=0.0).to(tl.float64)
                        rm = tl.where(small, rm + wt * (bm - rm), bm - (bm - rm) * (1.0 - wt))
                        rv = tl.where(small, rv + wt * (bv - rv), bv - (bv - rv) * (1.0 - wt))
                        tl.store(RM + rc, rm.to(RM.dtype.element_ty), mask=rcm)
                        tl.store(RV + rc, rv.to(RV.dtype.element_ty), mask=rcm)
                else:
                    tl.atomic_add(NONFIN, 1)
                tl.atomic_xchg(TICKET + 1, 0)
                tl.atomic_xchg(TICKET, 0)
    r_start, r_end = _d_split(pid_r, R_PER_PROG, M)
    for r0 in range(r_start, r_end, BLOCK_R):
        n, s, mask = _d_tile(r0, r_end, S, cmask, BLOCK_R)
        v = _d_load(X, n, s, cols, sxn, sxc, sxs, mask, ACC)
        out = (v - mean[None, :]) * scale[None, :] + bias[None, :]
        _d_store(Y, out, n, s, cols, syn, syc, sys, mask)


def _k_backward_sums(
    X, G, MEAN, PART, C, S, sxn, sxc, sxs, sgn, sgc, sgs, M, R_PER_PROG,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # Per split: sum(g) and sum(g * (x - mean)) of each channel (_d_grad_sums).
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    cols, cmask = _d_channels(pid_c, C, BLOCK_C)
    mean = tl.load(MEAN + cols, mask=cmask, other=0.0).to(ACC)
    r_start, r_end = _d_split(pid_r, R_PER_PROG, M)
    sum_g, sum_gx = _d_grad_sums(
        X, G, mean, cols, cmask, S, sxn, sxc, sxs, sgn, sgc, sgs, r_start, r_end,
        ACC, BLOCK_R, BLOCK_C,
    )  # fmt: skip
    _d_store_split(PART, sum_g, sum_gx, pid_r, C, cols, cmask)


def _k_backward(
    X, G, DX, W, MEAN, VAR, PART, DW, DB, NSPLIT, C, S, sxn, sxc, sxs, sgn, sgc, sgs,
    sdn, sdc, sds, M, R_PER_PROG,
    eps: tl.float64,
    ACC: tl.constexpr, HAS_W: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DW: tl.constexpr,
    WRITE_DB: tl.constexpr, SINGLE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # Sum the splits' partial sums (in split order: deterministic), then
    # dx = a g + b (x - mean) + k with a = w invstd, b = -a invstd sum(g xhat) / M,
    # k = -a sum(g) / M; the first split's programs store dw = sum(g xhat), db = sum(g).
    # SINGLE (one split): the sums are computed here as in _k_backward_sums; PART is unused.
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    cols, cmask = _d_channels(pid_c, C, BLOCK_C)
    mean = tl.load(MEAN + cols, mask=cmask, other=0.0).to(ACC)
    if SINGLE:
        sum_g, sum_gx = _d_grad_sums(
            X, G, mean, cols, cmask, S, sxn, sxc, sxs, sgn, sgc, sgs, 0, M,
            ACC, BLOCK_R, BLOCK_C,
        )  # fmt: skip
    else:
        sum_g = tl.zeros([BLOCK_C], dtype=ACC)
        sum_gx = tl.zeros([BLOCK_C], dtype=ACC)
        for k in range(0, NSPLIT):
            sum_g = sum_g + tl.load(PART + k * C + cols, mask=cmask, other=0.0)
            sum_gx = sum_gx + tl.load(PART + (NSPLIT + k) * C + cols, mask=cmask, other=0.0)
    var = tl.load(VAR + cols, mask=cmask, other=1.0).to(ACC)
    invstd = _d_invstd(var, eps, ACC)
    sum_gxhat = sum_gx * invstd
    if pid_r == 0:
        if WRITE_DW:
            tl.store(DW + cols, sum_gxhat.to(DW.dtype.element_ty), mask=cmask)
        if WRITE_DB:
            tl.store(DB + cols, sum_g.to(DB.dtype.element_ty), mask=cmask)
    if WRITE_DX:
        a = _d_times_weight(invstd, W, cols, cmask, HAS_W, ACC)
        kk = -a / M
        bcoef = kk * invstd * sum_gxhat
        ccoef = kk * sum_g
        r_start, r_end = _d_split(pid_r, R_PER_PROG, M)
        for r0 in range(r_start, r_end, BLOCK_R):
            n, s, mask = _d_tile(r0, r_end, S, cmask, BLOCK_R)
            v = _d_load(X, n, s, cols, sxn, sxc, sxs, mask, ACC)
            g = _d_load(G, n, s, cols, sgn, sgc, sgs, mask, ACC)
            dx = a[None, :] * g + bcoef[None, :] * (v - mean[None, :]) + ccoef[None, :]
            _d_store(DX, dx, n, s, cols, sdn, sdc, sds, mask)


def _k_eval(
    X, Y, RM, RV, W, B, C, S, sxn, sxc, sxs, syn, syc, sys, M, R_PER_PROG,
    eps: tl.float64,
    ACC: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # y = x * scale + shift, scale = w / sqrt(var + eps), shift = b - mean * scale.
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    cols, cmask = _d_channels(pid_c, C, BLOCK_C)
    mean = tl.load(RM + cols, mask=cmask, other=0.0).to(ACC)
    var = tl.load(RV + cols, mask=cmask, other=1.0).to(ACC)
    scale = _d_times_weight(_d_invstd(var, eps, ACC), W, cols, cmask, HAS_W, ACC)
    shift = -mean * scale
    if HAS_B:
        shift = tl.load(B + cols, mask=cmask, other=0.0).to(ACC) - mean * scale
    r_start, r_end = _d_split(pid_r, R_PER_PROG, M)
    for r0 in range(r_start, r_end, BLOCK_R):
        n, s, mask = _d_tile(r0, r_end, S, cmask, BLOCK_R)
        v = _d_load(X, n, s, cols, sxn, sxc, sxs, mask, ACC)
        _d_store(Y, v * scale[None, :] + shift[None, :], n, s, cols, syn, syc, sys, mask)


_SOURCES = ("_k_stats", "_k_forward", "_k_backward_sums", "_k_backward", "_k_eval")
_DEVICE_FUNCTIONS = (
    "_d_channels", "_d_split", "_d_tile", "_d_offsets", "_d_load", "_d_store", "_d_store_split",
    "_d_chan", "_d_moments", "_d_grad_sums", "_d_invstd", "_d_times_weight",
)  # fmt: skip


def _bind_device_functions() -> None:
    # The kernels call the device functions by their names in this module, where they are plain
    # functions until Triton is imported: bind each name to a jit function, which the compiler
    # inlines and which a kernel run by the interpreter calls (jit functions refuse plain calls).
    from triton.runtime.interpreter import InterpretedFunction

    class DeviceFunction(triton.JITFunction):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return self.interpreted(*args, **kwargs)

    scope = globals()
    for name in _DEVICE_FUNCTIONS:
        fn = scope[name]
        if not isinstance(fn, triton.JITFunction):
            device_fn = DeviceFunction(fn)
            device_fn.interpreted = InterpretedFunction(fn)
            scope[name] = device_fn


# Arguments left out of Triton's specialization (on the value 1 and on divisibility by 16), for
# fewer compiled variants: each specialized argument multiplies them. S keeps it (S = 1 turns
# the division r // S into nothing: the rows layout), and so do the channel and spatial strides
# (a unit stride is the contiguous axis); the rest gain little: in the planes layout the
# division by S already rules out vector loads, and in the rows layout coalesced scalar loads
# are within a few percent of 128-bit ones for these memory-bound kernels.
_NO_SPECIALIZE = ("C", "M", "R_PER_PROG", "NSPLIT", "sxn", "syn", "sgn", "sdn")


def _jit(fn: Any) -> Any:
    import inspect

    names = inspect.signature(fn).parameters
    return triton.jit(fn, do_not_specialize=[n for n in _NO_SPECIALIZE if n in names])


def kernels(interpret: bool) -> SimpleNamespace:
    """The kernels compiled for the GPU (``interpret`` false) or run by Triton's interpreter
    (CPU tensors, for tests); built once each."""
    ns = _kernels.get(interpret)
    if ns is None:
        _bind_device_functions()
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction

            ns = SimpleNamespace(
                **{name[3:]: InterpretedFunction(globals()[name]) for name in _SOURCES}
            )
        else:
            ns = SimpleNamespace(**{name[3:]: _jit(globals()[name]) for name in _SOURCES})
        _kernels[interpret] = ns
    return ns


# ------------------------------------------------------------------------------------ layouts


def _acc(dtype: torch.dtype) -> tuple[torch.dtype, Any]:
    # The accumulation dtype: float64 for float64, float32 otherwise (torch's opmath type).
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    # The smallest power of two >= n (n >= 1).
    return 1 << (n - 1).bit_length()


def _sms(device: torch.device) -> int:
    sms = _SMS.get(device.index)
    if sms is None:
        sms = _SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return sms


_SMS: dict[int | None, int] = {}


def _view3(t: Tensor) -> Tensor | None:
    # t as (N, C, S), a view, or None when the strides do not allow one.
    n, c = t.shape[0], t.shape[1]
    try:
        return t.view(n, c, -1) if t.dim() != 2 else t.unsqueeze(-1)
    except RuntimeError:
        return None


class _Plan:
    """Views of same-shaped tensors as (N, C, S) (copying to contiguous where no view exists),
    merged to (N * S, C, 1) when every tensor allows it, and the grid of the kernels.

    On CUDA the tiles come from a fixed set (BLOCK_C 1, 16 or 64; BLOCK_R = 2048 / BLOCK_C),
    whatever the sizes, so that few kernel variants are compiled."""

    def __init__(self, ts: list[Tensor], cuda: bool) -> None:
        views, self.copied = [], []
        for t in ts:
            v = _view3(t)
            self.copied.append(v is None)
            if v is None:
                v = _view3(t.contiguous())
            views.append(v)
        self.any_copied = any(self.copied)
        n, c, s = views[0].shape
        strides = [list(v.stride()) for v in views]
        if s > 1 and all(st[0] == s * st[2] for st in strides):
            n, s = n * s, 1
            for st in strides:
                st[0], st[2] = st[2], 0
        self.views = views
        self.strides = strides
        self.N, self.C, self.S, self.M = n, c, s, n * s
        rows = strides[0][1] == 1 and c > 1
        if cuda:
            block_c = (16 if c <= 16 else 64) if rows else 1
            block_r = 2048 // block_c
            target = 4 * _sms(ts[0].device)
            single = _SINGLE_MAX
            self.num_warps = 4
        else:  # the interpreter: small tiles, so that small tests cover several tiles and splits
            block_c = min(4, _pow2(c)) if rows else 1
            block_r = min(16, max(1, _pow2(self.M)))
            target = 6
            single = 64
            self.num_warps = 1
        n_cblocks = _cdiv(c, block_c)
        tiles = _cdiv(self.M, block_r)
        # Small reductions: one split, whose programs read their channels whole twice (stats,
        # then output) in one launch instead of two (the launches cost more than the reads).
        self.single = self.M * block_c <= single
        nsplit = 1 if self.single else max(1, min(tiles, target // n_cblocks))
        self.r_per_prog = _cdiv(tiles, nsplit) * block_r
        self.nsplit = _cdiv(self.M, self.r_per_prog)
        self.block_r, self.block_c = block_r, block_c
        self.grid = (n_cblocks, self.nsplit)
        self.common = {"BLOCK_R": block_r, "BLOCK_C": block_c, "num_warps": self.num_warps}
        self.sizes = (c, s)  # C, S: the arguments before the strides

    def st(self, i: int) -> list[int]:
        return self.strides[i]


# Plans of tensors that need no copy, by (device, (shape, stride) of each tensor): a step
# reuses its launch parameters instead of recomputing them (the views are not needed: the
# kernels take the tensors' data pointers and the cached strides).
_PLANS: dict[tuple, _Plan] = {}
_PLANS_MAX = 512


def _plan(ts: list[Tensor], cuda: bool) -> tuple[_Plan, list[Tensor]]:
    # (plan, tensors to pass to the kernels): the tensors themselves, or the plan's views when
    # a tensor had to be copied (never cached).
    key = (cuda, ts[0].device, *[(*t.shape, -1, *t.stride()) for t in ts])
    plan = _PLANS.get(key)
    if plan is not None:
        return plan, ts
    plan = _Plan(ts, cuda)
    if plan.any_copied:
        return plan, plan.views
    if len(_PLANS) >= _PLANS_MAX:
        _PLANS.clear()
    _PLANS[key] = plan
    return plan, ts


# Largest M * BLOCK_C read by one program in the single-launch path on CUDA.
_SINGLE_MAX = 32768


def _fits(x: Tensor) -> bool:
    # Every element offset fits the kernels' 32-bit index arithmetic.
    span = sum((n - 1) * abs(st) for n, st in zip(x.shape, x.stride(), strict=True))
    return x.numel() <= _INT32_MAX and span <= _INT32_MAX


def _per_channel_ok(x: Tensor, *ps: Tensor | None) -> bool:
    # Per-channel tensors of the input's dtype or of the statistics' dtype (float32 for half).
    allowed = (x.dtype, torch.float32 if x.dtype in _HALF else x.dtype)
    return all(p is None or p.dtype in allowed for p in ps)


# ----------------------------------------------------------------------------- launches


def _scratch(device: torch.device) -> Tensor:
    # The module step's ticket and non-finite count (int64, zero between steps: the last
    # program of each step resets them), one per device, and a sink for a step that counts
    # nothing. Launches on one device run in stream order; steps on several streams of one
    # device at once would share them (not supported).
    t = _SCRATCH.get(device)
    if t is None:
        t = _SCRATCH[device] = torch.zeros(3, dtype=torch.long, device=device)
    return t


_SCRATCH: dict[torch.device, Tensor] = {}


def _forward(
    x: Tensor, w: Tensor | None, b: Tensor | None, eps: float, step: tuple | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    # step: (running_mean, running_var, tracked, non_finite or None, momentum, unbias) for a
    # layer's step: the running statistics are updated by the forward's last program.
    cuda = x.is_cuda
    k = kernels(not cuda)
    acc_t, acc = _acc(x.dtype)
    y = torch.empty_like(x)
    plan, (xv, yv) = _plan([x, y], cuda)
    c = plan.C
    mean = torch.empty(c, dtype=acc_t, device=x.device)
    var = torch.empty(c, dtype=acc_t, device=x.device)
    sx, sy = plan.strides
    if plan.single:
        part = mean  # unused
    else:
        part = torch.empty((2, plan.nsplit, c), dtype=acc_t, device=x.device)
        k.stats[plan.grid](
            xv, part, *plan.sizes, *sx, plan.M, plan.r_per_prog, ACC=acc, **plan.common
        )
    if step is None:
        rm = rv = tracked = nonfin = ticket = mean
        momentum = unbias = 0.0
    else:
        rm, rv, tracked, nonfin, momentum, unbias = step
        ticket = _scratch(x.device)
        if nonfin is None:
            nonfin = ticket[2:]
    k.forward[plan.grid](
        xv, yv, part, w if w is not None else mean, b if b is not None else mean, mean, var,
        rm, rv, tracked, nonfin, ticket, *plan.sizes, *sx, *sy, plan.M, plan.r_per_prog,
        eps, momentum, unbias,
        ACC=acc, HAS_W=w is not None, HAS_B=b is not None, SINGLE=plan.single,
        UPDATE=step is not None, **plan.common,
    )  # fmt: skip
    return (yv.view(x.shape) if yv is not y else y), mean, var


def _backward(
    g: Tensor, x: Tensor, w: Tensor | None, mean: Tensor, var: Tensor, eps: float,
    need_dx: bool, need_dw: bool, need_db: bool, db_dtype: torch.dtype | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
    cuda = x.is_cuda
    k = kernels(not cuda)
    acc_t, acc = _acc(x.dtype)
    if not _fits(g):
        g = g.contiguous()
    dx = torch.empty_like(x) if need_dx else None
    plan, ts = _plan([x, g] if dx is None else [x, g, dx], cuda)
    xv, gv = ts[0], ts[1]
    dxv = ts[2] if dx is not None else xv
    sdx = plan.strides[2] if dx is not None else plan.strides[0]
    c = plan.C
    if plan.single:
        part = mean  # unused
    else:
        part = torch.empty((2, plan.nsplit, c), dtype=acc_t, device=x.device)
        k.backward_sums[plan.grid](
            xv, gv, mean, part, *plan.sizes, *plan.strides[0], *plan.strides[1], plan.M,
            plan.r_per_prog, ACC=acc, **plan.common,
        )  # fmt: skip
    pdtype = w.dtype if w is not None else acc_t
    dw = torch.empty(c, dtype=pdtype, device=x.device) if need_dw else None
    db = torch.empty(c, dtype=db_dtype or pdtype, device=x.device) if need_db else None
    grid = plan.grid if need_dx else (plan.grid[0], 1)
    k.backward[grid](
        xv, gv, dxv, w if w is not None else mean, mean, var, part,
        dw if dw is not None else mean, db if db is not None else mean, plan.nsplit,
        *plan.sizes, *plan.strides[0], *plan.strides[1], *sdx, plan.M, plan.r_per_prog, eps,
        ACC=acc, HAS_W=w is not None, WRITE_DX=need_dx, WRITE_DW=need_dw, WRITE_DB=need_db,
        SINGLE=plan.single, **plan.common,
    )  # fmt: skip
    if dx is not None and dxv is not dx:
        dx = dxv.view(x.shape)
    return dx, dw, db


def _eval(x: Tensor, rm: Tensor, rv: Tensor, w: Tensor | None, b: Tensor | None, eps: float):
    cuda = x.is_cuda
    k = kernels(not cuda)
    _, acc = _acc(x.dtype)
    y = torch.empty_like(x)
    plan, (xv, yv) = _plan([x, y], cuda)
    k.eval[plan.grid](
        xv, yv, rm, rv, w if w is not None else rm, b if b is not None else rm,
        *plan.sizes, *plan.strides[0], *plan.strides[1], plan.M, plan.r_per_prog, eps,
        ACC=acc, HAS_W=w is not None, HAS_B=b is not None, **plan.common,
    )  # fmt: skip
    return yv.view(x.shape) if yv is not y else y


# ------------------------------------------------------------------------ autograd nodes


class BNTrainTriton(torch.autograd.Function):
    """Training batch norm on the Triton kernels: ``(x, weight, bias, eps) -> (y, mean, var)``.

    Saves ``x``, ``weight`` and the two ``(C,)`` statistics (torch's footprint). The backward is
    the fused first-order kernel; under ``create_graph=True`` it runs the reference formulas
    (the graph backward ``"bn_train_backward"`` of :mod:`normlab.functional._fused._graph`), so
    double backward is exact.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, step=None):  # type: ignore[override]
        y, mean, var = _forward(x, weight, bias, eps, step)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)
        ctx.eps = eps
        ctx.b_dtype = None if bias is None else bias.dtype
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var):  # type: ignore[override]
        if grad_y is None:
            return None, None, None, None, None
        x, weight, mean, var = ctx.saved_tensors
        nx, nw, nb = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            gx, gw, gb = _graph.backward("bn_train_backward")(grad_y, x, weight, ctx.eps)
        else:
            with _on_device(x):
                gx, gw, gb = _backward(
                    grad_y,
                    x,
                    weight,
                    mean,
                    var,
                    ctx.eps,
                    nx,
                    nw and weight is not None,
                    nb,
                    ctx.b_dtype,
                )
        return gx if nx else None, gw if nw else None, gb if nb else None, None, None


class NormEvalTriton(torch.autograd.Function):
    """Eval batch norm on the Triton kernel: ``(x, weight, bias, mean, var, eps) -> y``; the
    statistics are constants. Backward: the graph backward ``"norm_eval_backward"`` of
    :mod:`normlab.functional._fused._graph` (differentiable operations)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, eps):  # type: ignore[override]
        y = _eval(x, mean, var, weight, bias, eps)
        acc_t = _acc(x.dtype)[0]
        coef = torch.stack((mean.to(acc_t), torch.rsqrt(var.to(acc_t) + eps)))
        save_x = weight is not None and weight.requires_grad
        ctx.save_for_backward(x if save_x else None, weight, coef)
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        if grad_y is None:
            return None, None, None, None, None, None
        x, weight, coef = ctx.saved_tensors
        gx, gw, gb = _graph.backward("norm_eval_backward")(grad_y, x, weight, coef)
        nx, nw, nb = ctx.needs_input_grad[:3]
        if nb and gb is None:  # a bias without a weight: sum(g)
            gs = grad_y.float() if grad_y.dtype in _HALF else grad_y
            gb = gs.sum((0, *range(2, grad_y.dim())))
        return gx if nx else None, gw if nw else None, gb if nb else None, None, None, None


# --------------------------------------------------------------------- entry points


def _on_device(x: Tensor) -> Any:
    # Triton launches on the current CUDA device: make it x's.
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _recording(*ts: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def bn_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, _step: tuple | None = None
) -> tuple[Tensor, Tensor, Tensor] | None:
    """Training forward ``(y, mean, var)`` (see the module docstring), or ``None``."""
    if _error is not None or not _fits(x) or not _per_channel_ok(x, weight, bias):
        return None
    try:
        with _on_device(x):
            if _recording(x, weight, bias):
                return BNTrainTriton.apply(x, weight, bias, eps, _step)
            return _forward(x, weight, bias, eps, _step)
    except Exception as exc:  # compile or launch failure: the reference, logged once
        _disable(exc)
        return None


def norm_eval(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor | None:
    """Eval forward ``y``, or ``None``."""
    if _error is not None or not _fits(x) or not _per_channel_ok(x, weight, bias, mean, var):
        return None
    try:
        with _on_device(x):
            if _recording(x, weight, bias):
                return NormEvalTriton.apply(x, weight, bias, mean, var, eps)
            return _eval(x, mean, var, weight, bias, eps)
    except Exception as exc:
        _disable(exc)
        return None


def bn_train_module(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    buffers: tuple[Tensor, Tensor, Tensor],
    momentum: float,
    non_finite: Tensor | None = None,
) -> tuple[Tensor, Tensor, bool] | None:
    """:func:`bn_train` and the update of ``buffers`` = ``(running_mean, running_var,
    num_batches_tracked)`` on the device (``momentum < 0``: cumulative average), in the
    forward's launch: nothing written when a statistic is not finite, and then ``non_finite`` (a
    long scalar on the device) incremented when given. Returns ``(y, var, ok)``: ``ok`` true
    when ``non_finite`` was given (the policy is applied), false otherwise (the layer applies its
    non-finite policy); or ``None``."""
    running_mean, running_var, tracked = buffers
    acc_t = torch.float64 if x.dtype == torch.float64 else torch.float32
    if running_mean.dtype != acc_t or running_var.dtype != acc_t:
        return None  # unreachable through the dispatch (it checks the buffers' dtype)
    count = x.numel() // x.shape[1]
    unbias = count / (count - 1) if count > 1 else math.inf
    out = bn_train(
        x, weight, bias, eps, (running_mean, running_var, tracked, non_finite, momentum, unbias)
    )
    if out is None:
        return None
    _bump(running_mean, running_var, tracked)
    if non_finite is None:
        return out[0], out[2], False
    _bump(non_finite)
    return out[0], out[2], True


def _bump(*ts: Tensor) -> None:
    # Buffers written by a kernel: bump their version counters, as an in-place op does.
    for t in ts:
        torch.autograd.graph.increment_version(t)
