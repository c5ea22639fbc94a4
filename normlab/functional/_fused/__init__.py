"""Fused kernels of batch norm and Full Normalization (C++ on CPU, Triton on CUDA), and the
dispatch to them.

The readable reference code in :mod:`normlab.functional.batch_norm` and
:mod:`normlab.functional.full_norm` calls the ``try_*`` functions here first; each returns the
fused result, or ``None`` when the call must go to the reference:

* the kernels are unavailable (no compiler, a failed build; on CUDA no Triton or a failed
  kernel build: logged once at WARNING), switched off by ``NORMLAB_FUSED=0`` or by
  :func:`set_enabled` / :func:`use` (both devices);
* an input is not a plain strided CPU or CUDA tensor of a floating dtype (meta, sparse, tensor
  subclasses, ``torch.func`` transforms, forward-mode AD, dispatch or function modes, tracing and
  ``torch.compile``), or a per-channel tensor has another shape than ``(C,)`` or another device;
* Full Normalization with a process group, or on CUDA (batch norm only there);
* BNP (:func:`try_bnp_fold`, :func:`try_bnp_precondition_`, called by
  :class:`normlab.optim.BNPreconditioner`): anything but contiguous float32/float64 CPU tensors
  of one dtype (and float16/bfloat16 layer inputs with float32 statistics).

CPU tensors go to the C++ kernels, CUDA tensors to the Triton kernels of
:mod:`normlab.functional._fused._triton` (same contract; their module step writes the running
statistics on the device and counts a non-finite batch in the layer's counter when given one,
without a host synchronisation).

Results equal the reference's up to rounding (tests/test_fused.py and, for the Triton kernels,
tests/test_fused_triton.py hold them to 1e-6 in float32 and 1e-12 in float64). The fused
backward is first-order; when a graph of the backward is recorded (``create_graph=True``) it
runs the reference formulas, so double backward stays exact. Design and measurements:
docs/performance.md.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
import torch.autograd.forward_ad as _fwad
from torch import Tensor

from normlab.functional._fused import _loader, _triton

__all__ = [
    "ESTIMATOR_CODES",
    "available",
    "enabled",
    "load_error",
    "set_enabled",
    "standardizes_samples",
    "try_batch_norm_eval",
    "try_batch_norm_module_train",
    "try_batch_norm_train",
    "try_bnp_fold",
    "try_channel_moments",
    "try_bnp_precondition_",
    "try_bnp_step_",
    "try_full_norm_module_train",
    "try_full_norm_train",
    "use",
]

#: Full Normalization estimators by their code in the C++ kernels.
ESTIMATOR_CODES = {"adaptive": 0, "batch": 1, "running": 2, "autograd": 3, "none": 4}

_DTYPES = frozenset((torch.float32, torch.float64, torch.float16, torch.bfloat16))
_PLAIN = (Tensor, torch.nn.Parameter)
_STRIDED = torch.strided
_C = torch._C
_enabled = _loader.env_enabled()
# Testing hook (tests/test_fused_triton.py): with TRITON_INTERPRET=1 in the environment, CPU
# tensors go to the Triton kernels run by Triton's interpreter instead of the C++ kernels.
_triton_on_cpu = False


def available() -> bool:
    """Whether the fused kernels are loaded (building them on the first call)."""
    return _loader.load() is not None


def load_error() -> str | None:
    """Why the kernels are unavailable, or ``None``."""
    return _loader.load_error()


def enabled() -> bool:
    """Whether the dispatch may use the fused kernels (``NORMLAB_FUSED`` and
    :func:`set_enabled`)."""
    return _enabled


def set_enabled(flag: bool) -> bool:
    """Switch the fused path on or off for this process; returns the previous setting.

    Raises:
        TypeError: ``flag`` is not a bool.
    """
    global _enabled
    if not isinstance(flag, bool):
        raise TypeError(f"set_enabled expected a bool, got {type(flag).__name__}")
    previous, _enabled = _enabled, flag
    return previous


@contextlib.contextmanager
def use(flag: bool) -> Iterator[None]:
    """Context manager: the fused path on (``True``) or off (``False``, the reference) inside."""
    previous = set_enabled(flag)
    try:
        yield
    finally:
        set_enabled(previous)


@contextlib.contextmanager
def _route_cpu_to_triton() -> Iterator[None]:
    # Testing hook: inside, CPU tensors run the Triton kernels in Triton's interpreter, when
    # TRITON_INTERPRET=1 is set (otherwise nothing changes).
    global _triton_on_cpu
    previous, _triton_on_cpu = _triton_on_cpu, True
    try:
        yield
    finally:
        _triton_on_cpu = previous


def _interpreting() -> bool:
    return _triton_on_cpu and os.environ.get("TRITON_INTERPRET") == "1"


def _ops(x: Tensor) -> ModuleType | None:
    # The kernels for x's device when the fused path may run at all in the current context:
    # the C++ module for CPU tensors, the Triton module for CUDA tensors.
    if not _enabled or torch.compiler.is_compiling():
        return None
    if x.is_cpu and not _interpreting():
        ops = _loader._module if _loader._tried else _loader.load()
    elif x.is_cuda or (x.is_cpu and _interpreting()):
        ops = _triton if _triton.available() else None
    else:
        return None
    if ops is None:
        return None
    if (
        _C._are_functorch_transforms_active()
        or _C._len_torch_dispatch_stack() > 0
        or _C._is_torch_function_mode_enabled()
        or _fwad._current_level >= 0
        or _C._get_tracing_state() is not None
    ):
        return None
    return ops


def _plain_input(x: Tensor) -> bool:
    return x.layout is _STRIDED and x.dtype in _DTYPES and x.dim() >= 2 and x.numel() > 0


def _same_device(p: Tensor, device: torch.device | None) -> bool:
    # device None: the CPU (the C++ kernels' case, kept to the cheapest test).
    return p.is_cpu if device is None else p.device == device


def _per_channel(p: object, c: int, device: torch.device | None = None) -> bool:
    # None, or a plain (C,) tensor of a floating dtype on the input's device.
    return p is None or (
        type(p) in _PLAIN
        and _same_device(p, device)
        and p.layout is _STRIDED
        and p.dtype in _DTYPES
        and p.dim() == 1
        and p.shape[0] == c
    )


def _constant(p: Tensor, c: int, device: torch.device | None = None) -> bool:
    # A per-channel statistic the map treats as constant: no gradient may be asked of it.
    return _per_channel(p, c, device) and p is not None and not p.requires_grad


def _stat_dtype(x: Tensor) -> torch.dtype:
    # The dtype of the statistics (and running buffers) of an input: float32 for half inputs.
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _gate(
    x: Tensor,
    params: tuple[Tensor | None, ...],
    stats: tuple[Tensor, ...] = (),
    buffers: tuple[Tensor, ...] = (),
) -> tuple[ModuleType, int] | None:
    # (kernels, C) when x and its per-channel tensors may go to the kernels: ``params`` are
    # weight/bias (None or (C,)), ``stats`` constant statistics, ``buffers`` running-statistics
    # buffers the kernels write (see _buffer).
    if type(x) is not Tensor:
        return None
    ops = _ops(x)
    if ops is None or not _plain_input(x):
        return None
    c = x.shape[1]
    device = None if ops is not _triton else x.device
    for p in params:
        if not _per_channel(p, c, device):
            return None
    for s in stats:
        if not _constant(s, c, device):
            return None
    if buffers:
        dtype = _stat_dtype(x)
        for b in buffers:
            if not _buffer(b, c, dtype, device):
                return None
    return ops, c


def try_batch_norm_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor] | None:
    """Fused :func:`normlab.functional.batch_norm_train`, or ``None`` (use the reference)."""
    gate = _gate(x, (weight, bias))
    return None if gate is None else gate[0].bn_train(x, weight, bias, float(eps))


def try_batch_norm_eval(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor | None:
    """Fused :func:`normlab.functional.batch_norm_eval`, or ``None`` (use the reference)."""
    gate = _gate(x, (weight, bias), (running_mean, running_var))
    if gate is None:
        return None
    return gate[0].norm_eval(x, running_mean, running_var, weight, bias, float(eps))


def _fn_code(
    gate: tuple[ModuleType, int] | None,
    outer_state: Tensor | None,
    outer_count: Tensor | None,
    estimator: str,
) -> int | None:
    # The estimator's code when a Full Normalization call that passed _gate may run fused.
    if gate is None or gate[0] is _triton:
        return None
    c = gate[1]
    if outer_state is not None and not (
        type(outer_state) is Tensor
        and outer_state.is_cpu
        and outer_state.dtype in _DTYPES
        and outer_state.shape == (2, c)
        and not outer_state.requires_grad
    ):
        return None
    if outer_count is not None and not _counter(outer_count):
        return None
    return ESTIMATOR_CODES.get(estimator)


def _counter(t: object, device: torch.device | None = None) -> bool:
    return type(t) is Tensor and _same_device(t, device) and t.dtype == torch.long and t.dim() == 0


def _buffer(t: object, c: int, dtype: torch.dtype, device: torch.device | None = None) -> bool:
    # A running-statistics buffer the kernels may write: (C,), contiguous, the statistics' dtype.
    return _constant(t, c, device) and t.dtype == dtype and t.is_contiguous()


def try_full_norm_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, step: Any
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """Fused ``FullNormTrainFn.apply(x, weight, bias, *step)``
    (:class:`normlab.functional.full_norm.FullNormTrainFn`, without a process group; ``step`` a
    :class:`~normlab.functional.full_norm.FullNormStep`, not imported here: full_norm imports
    this module), or ``None`` (use the reference). Returns ``(out, mean, var, rho)``."""
    if step.process_group is not None:
        return None
    gate = _gate(x, (weight, bias), (step.running_mean, step.running_var))
    code = _fn_code(gate, step.outer_state, step.outer_count, step.estimator)
    if code is None:
        return None
    return gate[0].fn_train(x, weight, bias, *step[:4], *_fn_scalars(step, code))


def _fn_scalars(step: Any, code: int) -> tuple[float, float, int, float, bool]:
    # The kernels' scalar arguments of a Full Normalization step (the last: compute rho).
    with_rho = step.estimator == "adaptive" and step.alpha < 1.0
    return float(step.alpha), float(step.eps), code, float(step.outer_momentum), with_rho


def try_batch_norm_module_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
    momentum: float | None,
    non_finite: Tensor | None = None,
) -> tuple[Tensor, Tensor, bool] | None:
    """A BatchNorm layer's training step, fused: :func:`try_batch_norm_train` and torch's
    running-statistics update (``momentum`` ``None``: the cumulative average) written into the
    buffers, which are left untouched when a statistic is not finite. Returns ``(y, var, ok)``
    (``ok`` false: nothing was written, the layer applies its non-finite policy), or ``None``
    (use the reference). On CUDA the buffers are written on the device, in the forward's
    launch, only if every statistic is finite; there ``non_finite`` (the layer's long scalar
    counter, or ``None``) is incremented on the device otherwise and ``ok`` is true, while
    without it ``ok`` is false and the layer's policy counts (or raises) from ``var``. The CPU
    kernels ignore ``non_finite``."""
    gate = _gate(x, (weight, bias), buffers=(running_mean, running_var))
    if gate is None:
        return None
    mom = -1.0 if momentum is None else float(momentum)
    buffers = (running_mean, running_var, num_batches_tracked)
    if gate[0] is not _triton:
        if not _counter(num_batches_tracked):
            return None
        return gate[0].bn_train_module(x, weight, bias, float(eps), *buffers, mom)
    device = x.device
    if not _counter(num_batches_tracked, device):
        return None
    if non_finite is not None and not _counter(non_finite, device):
        non_finite = None
    return _triton.bn_train_module(x, weight, bias, float(eps), buffers, mom, non_finite)


def try_full_norm_module_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    step: Any,
    num_batches_tracked: Tensor,
    sample_norm: bool = False,
) -> tuple[Tensor, Tensor, Tensor, bool] | None:
    """A FullNorm layer's training step, fused: :func:`try_full_norm_train`, then the updated
    estimates written into ``step.running_mean``/``running_var`` (the layer's buffers) and
    ``num_batches_tracked`` incremented, all skipped when an estimate is not finite. With
    ``sample_norm``, FN of each sample standardized over ``(C, *)`` first
    (:func:`normlab.functional.full_norm.sample_standardize`, with ``step.eps``; the caller
    checks that every sample holds more than one value), in the same kernels. Returns
    ``(out, mean, var, ok)``, or ``None`` (use the reference)."""
    if step.process_group is not None or not _counter(num_batches_tracked):
        return None
    gate = _gate(x, (weight, bias), buffers=(step.running_mean, step.running_var))
    code = _fn_code(gate, step.outer_state, step.outer_count, step.estimator)
    if code is None:
        return None
    scalars = _fn_scalars(step, code)
    return gate[0].fn_train_module(
        x, weight, bias, *step[:4], *scalars, num_batches_tracked, sample_norm
    )


def standardizes_samples(x: Tensor) -> bool:
    """Whether :func:`try_full_norm_module_train` may take ``sample_norm=True`` for ``x``: the
    C++ kernels standardize the samples themselves, the Triton ones do not (the caller then
    standardizes first). A ``True`` is no promise that the call will not return ``None``."""
    ops = _ops(x) if type(x) is Tensor else None
    return ops is not None and ops is not _triton


def try_channel_moments(x: Tensor) -> tuple[Tensor, Tensor] | None:
    """Fused per-channel mean and biased variance of ``x`` ``(N, C, *)`` (batch norm's batch
    statistics, in the statistics dtype), or ``None`` (use the reference). CPU only; not
    differentiable: the caller passes an input that needs no gradient."""
    gate = _gate(x, ())
    if gate is None or gate[0] is _triton:
        return None
    mean, var = gate[0].channel_statistics(x)
    return mean, var


_BNP_DTYPES = (torch.float32, torch.float64)


def _bnp_ops(t: Tensor) -> ModuleType | None:
    # The C++ module when BNP's CPU kernels may run for tensors like t (statistics of t's dtype).
    if type(t) is not Tensor or not t.is_cpu or t.dtype not in _BNP_DTYPES:
        return None
    ops = _ops(t)
    return None if ops is None or ops is _triton else ops


def try_bnp_fold(
    xs: list[Tensor | None],
    batch_means: list[Tensor | None],
    batch_vars: list[Tensor | None],
    mean: Tensor,
    var: Tensor,
    rho: float,
) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]] | None:
    """Fused :func:`normlab.functional.precondition.ema_update` of flat running statistics with
    one batch, or ``None`` (use the reference).

    ``mean``/``var`` (1-D) are the running moments of several layers, concatenated; segment ``i``
    is either the ``(rows, n_i)`` input ``xs[i]``, whose per-column moments
    (:func:`~normlab.functional.precondition.linear_input_moments`) the kernel computes, or
    (``xs[i]`` ``None``) the 1-D batch moments ``batch_means[i]``/``batch_vars[i]``; inputs have
    the statistics' dtype (float32/float64), or float16/bfloat16 with float32 statistics (summed
    in float32). Returns new ``(mean, var)`` tensors and their views per segment (1-D).
    """
    ops = _bnp_ops(mean)
    if ops is None or not all(type(x) is Tensor for x in xs if x is not None):
        return None
    out = ops.bnp_fold(xs, batch_means, batch_vars, mean, var, float(rho))
    if not out:
        return None
    k = len(xs)
    return out[0], out[1], out[2 : 2 + k], out[2 + k :]


def try_bnp_precondition_(
    grads_w: list[Tensor],
    grads_b: list[Tensor | None],
    means: list[Tensor],
    variances: list[Tensor],
    eps: float,
    floor: float,
) -> bool:
    """Fused BNP transform (:func:`~normlab.functional.precondition.precondition_linear_` /
    :func:`~normlab.functional.precondition.precondition_conv2d_` with ``groups=1`` and no weight
    normalization) of several layers' gradients in place; ``False`` (nothing written) when the
    call must go to the reference.

    ``grads_w[i]``: ``(C_out, K)`` or ``(C_out, C_in, kh, kw)``; ``means[i]``/``variances[i]``: the
    layer's statistics, ``K`` (or ``C_in * kh * kw``) entries, or ``C_in`` per channel. Every
    tensor must be a contiguous CPU tensor of the gradients' dtype (float32 or float64).
    """
    if not grads_w:
        return True
    ops = _bnp_ops(grads_w[0])
    if ops is None or not all(type(g) is Tensor for g in grads_w):
        return False
    return bool(ops.bnp_precondition(grads_w, grads_b, means, variances, float(eps), float(floor)))


def try_bnp_step_(
    xs: list[Tensor],
    grads_w: list[Tensor],
    grads_b: list[Tensor | None],
    mean: Tensor,
    var: Tensor,
    out_mean: Tensor,
    out_var: Tensor,
    rho: float,
    eps: float,
    floor: float,
) -> bool:
    """One BNP step of dense layers in one call, allocating nothing: the fold of
    :func:`try_bnp_fold` of the ``(rows, n_i)`` inputs ``xs`` into the flat statistics
    ``mean``/``var``, written into ``out_mean``/``out_var`` (contiguous, of the statistics' size
    and dtype, overlapping neither; a ``RuntimeError`` otherwise), then
    :func:`try_bnp_precondition_` of the layers' gradients (``grads_w[i]``: ``(C_out, n_i)``)
    with the new statistics.

    Returns ``True``, the gradients transformed in place; or ``False``, with nothing written
    (gradients, ``out_mean`` and ``out_var`` as they were), where either kernel would decline. The
    result equals the two calls' to the last bit.
    """
    ops = _bnp_ops(mean)
    if ops is None or not all(type(t) is Tensor for t in (*xs, *grads_w)):
        return False
    return bool(
        ops.bnp_step(
            xs, grads_w, grads_b, mean, var, out_mean, out_var, float(rho), float(eps), float(floor)
        )
    )
