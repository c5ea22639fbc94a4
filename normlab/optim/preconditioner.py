r"""``BNPreconditioner``: Batch Normalization Preconditioning for the ``nn.Linear`` and
``nn.Conv2d`` layers of an unchanged model.

The statistics and the gradient transforms are those of :mod:`normlab.functional.precondition`;
this module records the statistics (forward hooks), folds them in, optionally all-reduces them
over a process group, and applies the transforms to ``.grad`` in place. What BNP is, how the class
hooks into training and which choices are normlab's own: docs/algorithms/bnp.md.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import operator
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from normlab.functional import _fused
from normlab.functional import precondition as pc
from normlab.functional.batch_norm import Moments
from normlab.functional.distributed import all_reduce_packed, group_size
from normlab.functional.precondition import RunningMoments

__all__ = ["BNPreconditioner", "LoadResult"]

logger = logging.getLogger(__name__)

_STATE_VERSION = 1
# rho=None resolves from the first recorded batch size: 0.999 up to 4 samples, else 0.99.
_SMALL_BATCH = 4
_RHO_SMALL_BATCH = 0.999
_RHO_LARGE_BATCH = 0.99
# Recorded batches kept per layer before they are folded in without waiting for a step.
_MAX_PENDING = 8


def _rho_for(batch_size: int) -> float:
    return _RHO_SMALL_BATCH if batch_size <= _SMALL_BATCH else _RHO_LARGE_BATCH


class LoadResult(NamedTuple):
    """Layer names in the model but not in the loaded state, and the reverse."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class _Stash(NamedTuple):
    # A dense layer's input kept until the next fold, and its version counter when recorded. It is
    # saved for backward anyway (the stash is only used in grad mode for a weight that requires
    # grad), and an in-place change since the forward is detected by the version. The input is
    # kept as the forward gave it, with its autograd history (detaching it costs about 1 % of a
    # small MLP's step; benchmarks/RESULTS.md), until the fold, the layer's next forward or
    # remove(), whichever comes first (_Layer.keep, _Layer.release): a forward that is never
    # differentiated holds its graph no longer than a `loss` variable kept until the next
    # iteration would. Every use of `x` outside the kernels detaches it first.
    x: Tensor
    version: int


def _released(
    pending: list[tuple[Moments | _Stash, bool]],
) -> list[tuple[Moments | _Stash, bool]]:
    # `pending` with every kept input detached from its autograd history.
    return [
        (_Stash(b.x.detach(), b.version) if type(b) is _Stash and b.x.requires_grad else b, first)
        for b, first in pending
    ]


def _copied(batch: Moments | _Stash, memo: dict[int, Any]) -> Moments | _Stash:
    # A deep copy of a pending batch (_Layer.__deepcopy__).
    if type(batch) is not _Stash:
        return copy.deepcopy(batch, memo)
    x = copy.deepcopy(batch.x.detach(), memo)
    changed = batch.x._version != batch.version  # (an in-place change stays one in the copy)
    return _Stash(x, x._version + 1 if changed else x._version)


@dataclass(eq=False)  # compared by identity
class _Layer:
    # One hooked layer. `running` includes every recorded batch once `pending` is folded in
    # (BNPreconditioner._flush); `before_step` is `running` as it was just before the first
    # recorded forward of the current step (use_current_batch=False).
    name: str
    module: nn.Linear | nn.Conv2d
    handle: Any = None  # the forward hook, which records the input once the layer has run
    running: RunningMoments | None = None
    before_step: RunningMoments | None = None
    new_step: bool = True  # no forward recorded since the last precondition_()
    # Batches recorded but not yet folded into `running`, oldest first, each with whether it was
    # the first recorded forward of its step: their moments, or a dense layer's input (_Stash)
    # whose moments _flush computes together with the other layers'.
    pending: list[tuple[Moments | _Stash, bool]] = field(default_factory=list)
    # The weight gradient the last precondition_() wrote and its version counter after the
    # write: while both still match, the gradients are already preconditioned.
    written: tuple[weakref.ref[Tensor], int] | None = None
    # Whether the weight_norm projection applies to this layer (when the option is on).
    weight_norm: bool = False

    def keep(self, batch: Moments | _Stash) -> None:
        # Record `batch` as pending; an earlier pending input of this layer lets go of its
        # autograd history now (see _Stash).
        if self.pending:
            self.release()
        self.pending.append((batch, self.new_step))
        self.new_step = False

    def release(self) -> None:
        # The pending inputs let go of their autograd history (their data stays until the fold).
        self.pending[:] = _released(self.pending)

    def __deepcopy__(self, memo: dict[int, Any]) -> _Layer:
        # torch deep-copies only tensors without autograd history, and a copy has a version
        # counter of its own: the copy keeps each input detached, with the version it has now
        # (or another one if the input was changed since its forward), so that both fold to the
        # same statistics or raise alike. This layer is unchanged.
        new = object.__new__(type(self))
        memo[id(self)] = new
        for name, value in vars(self).items():
            if name == "pending":
                value = [(_copied(batch, memo), first) for batch, first in value]
            else:
                value = copy.deepcopy(value, memo)
            setattr(new, name, value)
        return new

    def already_preconditioned(self, grad_w: Tensor) -> bool:
        if self.written is None:
            return False
        ref, version = self.written
        return ref() is grad_w and grad_w._version == version


class _AttachHandle:
    """Removes a preconditioning step pre-hook from an optimizer; also a context manager."""

    def __init__(self, owner: BNPreconditioner, optimizer: torch.optim.Optimizer, handle) -> None:
        self._owner = weakref.ref(owner)
        self._optimizer = weakref.ref(optimizer)
        self._handle = handle

    def remove(self) -> None:
        self._handle.remove()
        owner, optimizer = self._owner(), self._optimizer()
        if owner is not None and optimizer is not None and owner._attached.get(optimizer) is self:
            del owner._attached[optimizer]

    def __enter__(self) -> _AttachHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_options(
    rho: float | None,
    eps: float,
    floor: float,
    conv_stats: str,
    use_current_batch: bool,
    weight_norm: bool | str = False,
    debias: bool = False,
) -> None:
    if rho is not None and not (_is_real(rho) and 0.0 < rho < 1.0):
        raise ValueError(f"rho must be None or a float in (0, 1), got {rho!r}")
    if not (_is_real(eps) and eps > 0):
        raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
    if not (_is_real(floor) and floor >= 0):
        raise ValueError(f"floor must be a finite float >= 0, got {floor!r}")
    if conv_stats not in ("channel", "patch"):
        raise ValueError(f"conv_stats must be 'channel' or 'patch', got {conv_stats!r}")
    if not isinstance(use_current_batch, bool):
        raise TypeError(f"use_current_batch must be a bool, got {type(use_current_batch).__name__}")
    if not isinstance(debias, bool):
        raise TypeError(f"debias must be a bool, got {type(debias).__name__}")
    pc.weight_norm_mode(weight_norm)  # raises ValueError


class _Buffers(NamedTuple):
    # Flat statistics buffers and their per-layer views (1-D, `_Flat.sizes` entries each).
    mean: Tensor
    var: Tensor
    views: tuple[tuple[Tensor, Tensor], ...]


def _buffers(mean: Tensor, var: Tensor, sizes: list[int]) -> _Buffers:
    means = mean.split_with_sizes(sizes) if len(sizes) > 1 else (mean,)
    variances = var.split_with_sizes(sizes) if len(sizes) > 1 else (var,)
    return _Buffers(mean, var, tuple(zip(means, variances, strict=True)))


class _Flat:
    # The running statistics of some layers stored contiguously: `running[i]` (the object held by
    # `layers[i].running`) views `mean`/`var` at `sizes[i]` entries.
    #
    # The one-call step (BNPreconditioner._fused_step) writes the new statistics into buffers it
    # allocated and reuses them, three in turn, updating this object in place: `buffers` are
    # `mean`/`var` with their views, `previous` holds the layers' `before_step`, and `spare` is
    # held by no statistics object: the next step writes into it, so that nothing anyone holds
    # changes, even when the kernel raises midway. `count`: every layer's `num_batches`, where
    # that step set them (None: not known to be equal).
    __slots__ = (
        "layers",
        "running",
        "mean",
        "var",
        "sizes",
        "buffers",
        "previous",
        "spare",
        "count",
    )

    def __init__(
        self,
        layers: tuple[_Layer, ...],
        running: tuple[RunningMoments, ...],
        mean: Tensor,
        var: Tensor,
        sizes: list[int],
    ) -> None:
        self.layers = layers
        self.running = running
        self.mean = mean
        self.var = var
        self.sizes = sizes
        self.buffers: _Buffers | None = None
        self.previous: _Buffers | None = None
        self.spare: _Buffers | None = None
        self.count: int | None = None

    def holds(self, layers: tuple[_Layer, ...], stats: list[RunningMoments | None]) -> bool:
        return (
            len(layers) == len(self.layers) == len(stats)
            and all(map(operator.is_, layers, self.layers))
            and all(map(operator.is_, stats, self.running))
        )


def _flat(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    # Each torch call costs microseconds, which is the whole per-step cost of BNP on small
    # layers: skip the no-op ones.
    parts = [t if t.dim() == 1 else t.reshape(-1) for t in tensors]
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out if out.dtype == dtype else out.to(dtype)


_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _stashable(x: Tensor, weight: Tensor | None) -> bool:
    # Keep a dense layer's input for a batched fold only when autograd saves it for backward
    # anyway (grad mode, a weight parameter that requires grad), on a device with batch norm's
    # statistics kernel, and not inside a torch.func transform.
    return (
        torch.is_grad_enabled()
        and weight is not None
        and weight.requires_grad
        and (x.is_cpu or x.is_cuda)  # (x.device.type builds a device object: slower)
        and not _is_functorch_wrapped(x)
    )


def _stash_moments(
    batches: list[tuple[Any, Any, bool]],
) -> dict[tuple[Any, ...], tuple[Tensor, Tensor]]:
    """Replace, in place, every ``_Stash`` in ``batches`` (``(layer, batch, first)``) by the
    moments of its input; the inputs with the same number of rows, device and statistics dtype
    are concatenated along the feature dimension and reduced by one kernel, which computes every
    column on its own (the moments of each input are those of ``linear_input_moments``).

    Returns ``{layers: (mean, var)}``, the concatenated moments of each such group, keyed by the
    tuple of its layers in ``batches`` order.

    Raises:
        RuntimeError: an input was changed in place after its forward (before anything changes).
    """
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (layer, batch, _) in enumerate(batches):
        if type(batch) is not _Stash:
            continue
        x = batch.x
        if x._version != batch.version:
            raise RuntimeError(
                f"BNPreconditioner: the input of layer {layer.name!r} was modified in place "
                "after its forward, before its statistics were folded in; do not change a "
                "layer's input before the optimizer step"
            )
        dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        rows = x.numel() // x.shape[-1]
        groups.setdefault((rows, x.device, dtype), []).append(i)
    out: dict[tuple[Any, ...], tuple[Tensor, Tensor]] = {}
    for (rows, _, dtype), members in groups.items():
        xs = [batches[i][1].x.detach() for i in members]
        xs = [x if x.dim() == 2 else x.reshape(rows, x.shape[-1]) for x in xs]
        cat = xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)
        moments = pc.linear_input_moments(cat if cat.dtype == dtype else cat.to(dtype))
        sizes = [x.shape[-1] for x in xs]
        means = moments.mean.split_with_sizes(sizes) if len(xs) > 1 else (moments.mean,)
        variances = moments.var.split_with_sizes(sizes) if len(xs) > 1 else (moments.var,)
        for i, m, v in zip(members, means, variances, strict=True):
            layer, _, first = batches[i]
            batches[i] = (layer, Moments(m, v, rows), first)
        out[tuple(batches[i][0] for i in members)] = (moments.mean, moments.var)
    return out


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv_pads(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    # (left, right, top, bottom) of F.pad, as Conv2d pads; 'same' puts the odd pixel right/bottom.
    kh, kw = _pair(conv.kernel_size)
    dh, dw = _pair(conv.dilation)
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = _pair(conv.padding)  # type: ignore[arg-type]
    return (pw, pw, ph, ph)


class BNPreconditioner:
    r"""Batch Normalization Preconditioning (BNP) of a model's dense and conv layers.

    Forward hooks record the mean and variance of each hooked layer's *input* during training
    forwards; :meth:`precondition_` then replaces each layer's gradients, in place, by the BNP
    transform (:func:`~normlab.functional.precondition.precondition_linear_`, per input channel or
    per patch entry :func:`~normlab.functional.precondition.precondition_conv2d_` for
    ``nn.Conv2d``). With the statistics held fixed, ``precondition_()`` followed by an SGD step is
    one SGD step on the input-normalized reparametrization of every layer, mapped back to
    :math:`(W, b)` (docs/algorithms/bnp.md). The model is not changed: no layer is added, forward
    and eval outputs are the plain network's.

    Use it between ``backward()`` and ``optimizer.step()``, with any ``torch.optim`` optimizer::

        precond = BNPreconditioner(model)
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            precond.precondition_()   # or once: precond.attach(optimizer)
            optimizer.step()
        with precond.paused():        # forwards that must not be recorded (eval mode is never)
            ...

    **Statistics.** ``nn.Linear``: per input feature over every leading dimension.
    ``nn.Conv2d``: per input channel over :math:`(N, H, W)` (``conv_stats="channel"``) or per
    patch entry :math:`(c, u, v)` over the batch and all output positions (``"patch"``; one
    ``unfold`` per forward, exact for any padding and padding mode). Every training forward of a
    layer (``module.training`` and not :meth:`paused`) folds the batch's moments into a running
    estimate with :func:`~normlab.functional.precondition.ema_moments`; a layer called twice in a
    forward folds in both inputs. Only forwards that succeed count: a forward hook records the
    input once the layer has run, so an input the layer rejects (its own error) changes no
    statistic, count or ``rho``. Folding is deferred until the statistics are next needed
    (:meth:`precondition_`, :meth:`statistics`, :meth:`state_dict`), with the same result; until
    then a dense layer's input is kept (in grad mode, where autograd keeps it anyway), and a fold
    that finds it changed in place since its forward raises ``RuntimeError``. The kept input
    holds its autograd history until the fold, the layer's next forward or :meth:`remove`: a
    training forward that is never differentiated keeps its graph as long as a ``loss``
    variable held until the next iteration would.

    **Statistics used for the step.** ``use_current_batch=True``: the running estimate after the
    current batch was folded in. ``False``: the estimate as it was before the first recorded
    forward after the previous :meth:`precondition_` (the first step is then not preconditioned).
    Layers whose weight has no gradient, or that have no statistics for the step yet, are skipped.

    **Once per backward.** A layer whose weight gradient is still the tensor the previous
    :meth:`precondition_` wrote, unmodified, is skipped (logged at debug level): calling it twice,
    or :meth:`attach` plus a manual call, preconditions the gradients once. A backward, an
    in-place change or a new ``.grad`` tensor makes the gradients new again, so gradient
    accumulation (several backwards, then one step) is preconditioned once, at the step.

    **Layers without bias.** Nothing absorbs the centring term, so only the variance scaling
    applies (a warning is logged at construction). A bias without gradient is treated the same.

    **Distributed.** With ``process_group``, the batch moments of all layers are summed over the
    group in one packed all-reduce per recorded forward before they are folded in, so every rank
    holds the statistics of the concatenated batch, identical on all ranks, and ``rho=None``
    resolves from the global batch size. Folding is then collective: every rank must record the
    same number of training forwards and call :meth:`precondition_`, :meth:`statistics`,
    :meth:`state_dict` and :meth:`load_state_dict` at the same points (as under DDP, whose
    gradients are already averaged when ``precondition_`` runs). Build the preconditioner on the
    unwrapped model, so the layer names carry no ``module.`` prefix.

    **Other forwards.** Diagnostics that run training-mode forwards (Hessian-vector products,
    ``torch.func`` transforms) should do so inside :meth:`paused`, or they change the statistics.

    Args:
        model: the network. Its modules are not modified apart from one forward hook each.
        modules: the layers to precondition, as submodules of ``model`` or their names (from
            ``model.named_modules()``); default every ``nn.Linear`` and ``nn.Conv2d``, subclasses
            included (a subclass whose weight is used without calling its ``forward`` never gets
            statistics and is skipped). Layers must not share parameters.
        rho: weight of the *old* value in the EMA (torch's ``momentum`` is ``1 - rho``), in
            :math:`(0, 1)`. ``None`` (default): 0.999 if the first recorded batch has at most 4
            samples, else 0.99; see :attr:`rho`.
        debias: cap the EMA weight at :math:`n/(n+1)` for the :math:`(n+1)`-th batch
            (:func:`~normlab.functional.precondition.ema_rho`), so the statistics are the plain
            average of the batches seen until :math:`n` reaches :math:`\rho/(1-\rho)` instead of
            an EMA that starts out dominated by its first batch. Default ``True`` (measured in
            docs/algorithms/bnp.md).
        eps: :math:`\epsilon > 0` added to the floored variance. Default ``1e-5``.
        floor: variance floor :math:`\ge 0`; gradients are amplified at most
            :math:`1/(\text{floor}+\epsilon)` times. Default ``0.1`` (measured in
            docs/algorithms/bnp.md).
        conv_stats: ``"channel"`` (default) or ``"patch"``, as above.
        use_current_batch: as above. Default ``True``.
        weight_norm: ``False`` (default, ``"off"``); ``True`` (``"project"``): after the input
            transform, project each output unit's gradient (per output channel for
            convolutions) in the input-normalized coordinates orthogonally to
            :math:`v_i = D w_i`, the weight normalization part of batch normalization;
            ``"scaled"``: also divide it by :math:`\lVert v_i \rVert`. See
            :func:`~normlab.functional.precondition.precondition_linear_` and the measurements
            in docs/algorithms/bnp.md.
        weight_norm_modules: the hooked layers (modules or names) the ``weight_norm``
            projection applies to. ``None`` (default): every hooked layer except the model's
            last ``nn.Linear``/``nn.Conv2d`` in ``named_modules()`` order, taken to be the
            output layer (batch normalization normalizes hidden layers, not the logits).
        process_group: a ``torch.distributed`` process group to all-reduce the statistics over,
            or ``None`` (default): local statistics, no collective.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, a chosen module is not ``nn.Linear`` /
            ``nn.Conv2d``, or ``process_group`` is not a ``torch.distributed.ProcessGroup``.
        ValueError: no such layer, an unknown module name, shared parameters, an option out of
            range (``weight_norm`` not one of the values above), a ``weight_norm_modules`` entry
            that is not a hooked layer. Nothing is hooked when the constructor raises.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        modules: Iterable[nn.Module | str] | None = None,
        rho: float | None = None,
        debias: bool = True,
        eps: float = 1e-5,
        floor: float = 0.1,
        conv_stats: Literal["channel", "patch"] = "channel",
        use_current_batch: bool = True,
        weight_norm: bool | str = False,
        weight_norm_modules: Iterable[nn.Module | str] | None = None,
        process_group: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"BNPreconditioner expected an nn.Module, got {type(model).__name__}")
        _check_options(rho, eps, floor, conv_stats, use_current_batch, weight_norm, debias)
        if process_group is not None and not (
            torch.distributed.is_available()
            and isinstance(process_group, torch.distributed.ProcessGroup)
        ):
            raise TypeError(
                "process_group must be None or a torch.distributed.ProcessGroup, "
                f"got {type(process_group).__name__}"
            )
        layers = self._select(model, modules)  # raises before anything is hooked
        projected = self._select_weight_norm(model, layers, weight_norm_modules)
        self._rho_option = None if rho is None else float(rho)
        self._rho_resolved: float | None = self._rho_option
        self.debias = debias
        self.eps = float(eps)
        self.floor = float(floor)
        self.conv_stats: Literal["channel", "patch"] = conv_stats
        self.use_current_batch = use_current_batch
        self.weight_norm = weight_norm
        self._group = process_group
        # The local first batch size, kept until rho is resolved over the process group.
        self._first_batch_size: int | None = None
        self._pause_depth = 0
        self._removed = False
        self._attached: weakref.WeakKeyDictionary[torch.optim.Optimizer, _AttachHandle] = (
            weakref.WeakKeyDictionary()
        )
        self._layers = [
            _Layer(name, module, weight_norm=name in projected) for name, module in layers
        ]
        self._flat: dict[tuple[Any, ...], _Flat] = {}  # see _fold_group
        self._names = tuple(layer.name for layer in self._layers)
        for layer in self._layers:
            if layer.module.bias is None:
                logger.warning(
                    "BNPreconditioner: layer %r has no bias, so BNP only rescales its weight "
                    "gradient and the centring by the input mean is lost; enable the bias",
                    layer.name,
                )
        for layer in self._layers:
            layer.handle = layer.module.register_forward_hook(
                self._make_hook(layer), with_kwargs=True
            )

    @staticmethod
    def _select(
        model: nn.Module, modules: Iterable[nn.Module | str] | None
    ) -> list[tuple[str, nn.Linear | nn.Conv2d]]:
        named = dict(model.named_modules())
        if modules is None:
            chosen = [(n, m) for n, m in named.items() if isinstance(m, (nn.Linear, nn.Conv2d))]
            if not chosen:
                raise ValueError(
                    f"BNPreconditioner found no nn.Linear or nn.Conv2d layer in "
                    f"{type(model).__name__}"
                )
        else:
            if isinstance(modules, (str, nn.Module)):
                raise TypeError("modules must be an iterable of modules or names, not a single one")
            names_of = {id(m): n for n, m in named.items()}
            chosen = []
            for item in modules:
                if isinstance(item, str):
                    if item not in named:
                        raise ValueError(f"modules: {item!r} is not a submodule name of the model")
                    name, module = item, named[item]
                elif isinstance(item, nn.Module):
                    if id(item) not in names_of:
                        raise ValueError(
                            f"modules: a {type(item).__name__} that is not part of the model"
                        )
                    name, module = names_of[id(item)], item
                else:
                    raise TypeError(
                        f"modules must contain nn.Module or str, got {type(item).__name__}"
                    )
                if not isinstance(module, (nn.Linear, nn.Conv2d)):
                    raise TypeError(
                        f"modules: {name!r} is a {type(module).__name__}; BNP supports "
                        "nn.Linear and nn.Conv2d"
                    )
                if any(name == n for n, _ in chosen):
                    raise ValueError(f"modules: {name!r} given twice")
                chosen.append((name, module))
            if not chosen:
                raise ValueError("modules is empty: give at least one nn.Linear or nn.Conv2d")
        seen: dict[int, str] = {}
        for name, module in chosen:
            for p in (module.weight, module.bias):
                if p is None:
                    continue
                if id(p) in seen:
                    raise ValueError(
                        f"layers {seen[id(p)]!r} and {name!r} share a parameter, whose gradient "
                        "would be preconditioned twice; choose one of them with modules="
                    )
                seen[id(p)] = name
        return chosen

    @staticmethod
    def _select_weight_norm(
        model: nn.Module,
        layers: list[tuple[str, nn.Linear | nn.Conv2d]],
        chosen: Iterable[nn.Module | str] | None,
    ) -> set[str]:
        hooked = dict(layers)
        if chosen is None:
            dense_or_conv = [
                n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
            ]
            return {name for name in hooked if name != dense_or_conv[-1]}
        if isinstance(chosen, (str, nn.Module)):
            raise TypeError(
                "weight_norm_modules must be an iterable of modules or names, not a single one"
            )
        by_id = {id(m): n for n, m in layers}
        out = set()
        for item in chosen:
            if isinstance(item, str):
                name = item if item in hooked else None
            elif isinstance(item, nn.Module):
                name = by_id.get(id(item))
            else:
                raise TypeError(
                    f"weight_norm_modules must contain nn.Module or str, got {type(item).__name__}"
                )
            if name is None:
                what = repr(item) if isinstance(item, str) else f"a {type(item).__name__}"
                raise ValueError(
                    f"weight_norm_modules: {what} is not one of the hooked layers {sorted(hooked)}"
                )
            out.add(name)
        return out

    # ----------------------------------------------------------------------------- properties

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Names (as in ``model.named_modules()``) of the hooked layers, in model order."""
        return self._names

    @property
    def weight_norm_layers(self) -> tuple[str, ...]:
        """Names of the hooked layers the ``weight_norm`` projection applies to when it is on."""
        return tuple(layer.name for layer in self._layers if layer.weight_norm)

    @property
    def rho(self) -> float | None:
        """The EMA weight in use: the constructor's, or the one resolved from the first batch size
        when that was ``None`` (``None`` until a forward has been recorded; with a process group,
        until it is folded in, from the global batch size)."""
        return self._rho_resolved

    @property
    def recording(self) -> bool:
        """Whether training forwards are recorded now (not removed, not inside :meth:`paused`)."""
        return not self._removed and self._pause_depth == 0

    def statistics(self, *, for_step: bool = False) -> dict[str, RunningMoments]:
        """Running input statistics per layer name (copies); layers without any are left out.

        ``for_step=True`` gives the statistics the next :meth:`precondition_` would use.
        """
        self._flush()
        out = {}
        for layer in self._layers:
            stats = self._step_stats(layer) if for_step else layer.running
            if stats is not None:
                out[layer.name] = RunningMoments(
                    stats.mean.clone(), stats.var.clone(), stats.num_batches
                )
        return out

    # ------------------------------------------------------------------------------- recording

    def _make_hook(self, layer: _Layer):
        # A forward hook: it runs only once the layer has run, so an input the layer rejects
        # (wrong dtype, a padding larger than the input) records nothing. A dense layer's input
        # is kept (_Stash) and its moments computed at the next fold with the other layers' in
        # one kernel; a convolution's moments are computed here.
        dense = isinstance(layer.module, nn.Linear)

        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> None:
            if not module.training or self._removed or self._pause_depth:
                return None
            x = args[0] if args else kwargs.get("input")
            # Under a process group an empty shard is recorded too (it joins the all-reduce).
            if not (
                isinstance(x, Tensor)
                and x.is_floating_point()
                and (x.numel() > 0 or self._group is not None)
            ):
                return None
            if dense and x.numel() > 0 and _stashable(x, module._parameters.get("weight")):
                batch: Moments | _Stash | None = _Stash(x, x._version)  # (not detached: _Stash)
            else:
                # No torch.no_grad() needed: everything here derives from the detached input.
                batch = self._batch_moments(module, x.detach())
                if batch is None:
                    return None
            n = x.shape[0] if x.dim() >= (2 if dense else 4) else 1
            self._record(layer, batch, n)
            return None

        return hook

    def _record(self, layer: _Layer, batch: Moments | _Stash, n: int) -> None:
        # `batch`: the moments of an input the layer accepted; `n`: its batch size.
        if self._rho_resolved is None and self._first_batch_size is None:
            if self._group is None:
                self._rho_resolved = _rho_for(n)
            else:  # resolved from the global batch size at the first fold (_reduce)
                self._first_batch_size = n
        # Folded into `running` by _flush, for all layers at once, before anything reads them.
        layer.keep(batch)
        if len(layer.pending) > _MAX_PENDING:  # training-mode forwards without steps
            self._flush()

    def _flush(self) -> None:
        """Fold every recorded batch into the running statistics, oldest first per layer.

        One round per recorded forward: it takes the oldest pending batch of every layer, sums
        the batches over the process group if there is one (:meth:`_reduce`, one all-reduce),
        and folds them in, layers of one device and dtype together (:meth:`_fold_group`).
        """
        while True:
            batches: list[tuple[_Layer, Any, bool]] = [
                (layer, *layer.pending.pop(0)) for layer in self._layers if layer.pending
            ]
            if not batches:
                return
            try:
                if self._group is None and self._fused_fold(batches):
                    continue
                flat_batches = _stash_moments(batches)  # replaces the stashes by their moments
            except RuntimeError:  # put the round back: the statistics stay as they were
                for layer, batch, first in reversed(batches):
                    layer.pending.insert(0, (batch, first))
                raise
            if self._group is not None:
                flat_batches = {}
                try:
                    # depth: the most batches any layer had pending before this round
                    depth = 1 + max(len(layer.pending) for layer, _, _ in batches)
                    batches = self._reduce(batches, depth)
                except RuntimeError:  # put the round back: the statistics stay as they were
                    for layer, batch, first in reversed(batches):
                        layer.pending.insert(0, (batch, first))
                    raise
            rho = self._rho_resolved
            assert rho is not None  # resolved by the first recorded forward
            groups: dict[tuple[Any, ...], list[tuple[_Layer, Moments]]] = {}
            for layer, batch, first in batches:
                if first:
                    layer.before_step = layer.running
                running = layer.running
                if running is None:
                    layer.running = pc.ema_moments(None, batch, rho)
                    continue
                if running.mean.shape != batch.mean.shape:
                    raise ValueError(
                        f"layer {layer.name!r}: running statistics have shape "
                        f"{tuple(running.mean.shape)}, batch moments {tuple(batch.mean.shape)}"
                    )
                key = (running.mean.device, running.mean.dtype)
                groups.setdefault(key, []).append((layer, batch))
            for key, members in groups.items():
                self._fold_group(key, members, rho, flat_batches)  # type: ignore[arg-type]

    def _fused_fold(self, batches: list[tuple[_Layer, Any, bool]]) -> bool:
        """Fold one round in one fused kernel call: when every layer of the round has running
        statistics, all of one device and dtype, one history length (or no ``debias``), and
        inputs or moments of the statistics' dtype on the CPU. Returns ``False``, having
        changed nothing, otherwise. Whether it applies depends only on the statistics and the
        round, never on the flat buffers' history, so a run resumed from a state dict takes the
        same path as the run that saved it."""
        layers = tuple(layer for layer, _, _ in batches)
        running = [layer.running for layer in layers]
        if any(r is None for r in running):
            return False
        key = (running[0].mean.device, running[0].mean.dtype)
        flat = self._current_flat(key, layers, running)  # type: ignore[arg-type]
        if flat is None:
            return False
        counts = {r.num_batches for r in running}  # type: ignore[union-attr]
        if self.debias and len(counts) > 1:
            return False
        xs: list[Tensor | None] = []
        means: list[Tensor | None] = []
        variances: list[Tensor | None] = []
        for (_, batch, _), size in zip(batches, flat.sizes, strict=True):
            if type(batch) is _Stash:
                x = batch.x  # (the kernel reads it: detached only where a view is taken)
                if x._version != batch.version or x.shape[-1] != size:
                    return False  # the reference path raises
                xs.append(x if x.dim() == 2 else x.detach().reshape(-1, size))
                means.append(None)
                variances.append(None)
            else:
                if batch.mean.numel() != size:
                    return False
                xs.append(None)
                means.append(batch.mean.reshape(-1))
                variances.append(batch.var.reshape(-1))
        rho = pc.ema_rho(self._rho_resolved, next(iter(counts)), self.debias)  # type: ignore[arg-type]
        new = _fused.try_bnp_fold(xs, means, variances, flat.mean, flat.var, rho)
        if new is None:
            return False
        for layer, _, first in batches:
            if first:
                layer.before_step = layer.running
        self._install(key, flat, *new)
        return True

    def _reduce(
        self, batches: list[tuple[_Layer, Moments, bool]], depth: int
    ) -> list[tuple[_Layer, Moments, bool]]:
        """The batch moments of one round summed over the process group: one packed all-reduce.

        The packet (float64, on the first layer's device) holds this rank's ``depth`` and
        ``depth**2`` (to detect ranks that recorded different numbers of forwards), its first
        batch size while ``rho`` is unresolved, each layer's count, and each layer's sums
        ``count * mean`` and ``count * (var + mean**2)``; a layer with nothing recorded sends
        zeros. Returns the moments of the concatenated batches, for the layers any rank recorded.
        """
        device = self._layers[0].module.weight.device
        f64 = torch.float64
        local = {id(layer): (batch, first) for layer, batch, first in batches}
        counts = [0] * len(self._layers)
        sums: list[Tensor] = []
        squares: list[Tensor] = []
        for i, layer in enumerate(self._layers):
            entry = local.get(id(layer))
            if entry is None or entry[0].count == 0:
                size = math.prod(self._stat_shape(layer.module, self.conv_stats))
                sums.append(torch.zeros(size, dtype=f64, device=device))
                squares.append(torch.zeros(size, dtype=f64, device=device))
                continue
            batch = entry[0]
            counts[i] = batch.count
            mean = batch.mean.reshape(-1).to(device=device, dtype=f64)
            var = batch.var.reshape(-1).to(device=device, dtype=f64)
            sums.append(mean * batch.count)
            squares.append(torch.addcmul(var, mean, mean).mul_(batch.count))
        header = torch.tensor(
            [depth, depth * depth, self._first_batch_size or 0, *counts], dtype=f64, device=device
        )
        total, *parts = all_reduce_packed([header, *sums, *squares], self._group)
        world = group_size(self._group)
        stats = total.tolist()
        if stats[0] != world * depth or stats[1] != world * depth * depth:
            raise RuntimeError(
                "BNPreconditioner: the ranks of the process group recorded different numbers of "
                "training forwards before folding their statistics; every rank must run the same "
                "recorded forwards and call precondition_/statistics/state_dict at the same points"
            )
        if self._rho_resolved is None:
            self._rho_resolved = _rho_for(int(stats[2]))
            self._first_batch_size = None
        out = []
        n = len(self._layers)
        for i, layer in enumerate(self._layers):
            count = int(stats[3 + i])
            if count == 0:
                continue
            entry = local.get(id(layer))
            if entry is not None:
                batch, first = entry
                dtype = batch.mean.dtype
            else:  # recorded by other ranks only
                first, layer.new_step = layer.new_step, False
                weight = layer.module.weight
                half = weight.dtype in (torch.float16, torch.bfloat16)
                dtype = torch.float32 if half else weight.dtype
            shape = self._stat_shape(layer.module, self.conv_stats)
            mean = parts[i] / count
            var = (parts[n + i] / count).sub_(mean * mean).clamp_min_(0.0)
            stat_device = layer.module.weight.device
            batch = Moments(
                mean.to(device=stat_device, dtype=dtype).view(shape),
                var.to(device=stat_device, dtype=dtype).view(shape),
                count,
            )
            out.append((layer, batch, first))
        return out

    def _fold_group(
        self,
        key: tuple[Any, ...],
        members: list[tuple[_Layer, Moments]],
        rho: float,
        flat_batches: dict[tuple[_Layer, ...], tuple[Tensor, Tensor]] | None = None,
    ) -> None:
        # ema_update on the concatenated statistics of several layers: on small layers the cost of
        # BNP is the number of kernels launched, not their size. The new running statistics are
        # views of the flat result, which the next fold reuses without concatenating again.
        layers = tuple(layer for layer, _ in members)
        running = [layer.running for layer in layers]
        counts = {r.num_batches for r in running}  # type: ignore[union-attr]
        if self.debias and len(counts) > 1:  # one weight per fold: group equal histories
            parts: dict[int, list[tuple[_Layer, Moments]]] = {}
            for member, r in zip(members, running, strict=True):
                parts.setdefault(r.num_batches, []).append(member)  # type: ignore[union-attr]
            for part in parts.values():
                self._fold_group(key, part, rho)
            return
        step_rho = pc.ema_rho(rho, next(iter(counts)), self.debias)
        flat = self._current_flat(key, layers, running)  # type: ignore[arg-type]
        assert flat is not None  # the members were grouped by their statistics' key
        flat_b = flat_batches.get(layers) if flat_batches else None
        if flat_b is not None and flat_b[0].dtype == key[1]:
            m_b, v_b = flat_b  # the members' batch moments, already concatenated in this order
        else:
            m_b = _flat([b.mean for _, b in members], key[1])
            v_b = _flat([b.var for _, b in members], key[1])
        new_mean, new_var = pc.ema_update(flat.mean, flat.var, m_b, v_b, step_rho)
        sizes = flat.sizes
        means = new_mean.split_with_sizes(sizes) if len(sizes) > 1 else (new_mean,)
        variances = new_var.split_with_sizes(sizes) if len(sizes) > 1 else (new_var,)
        self._install(key, flat, new_mean, new_var, means, variances)

    def _current_flat(
        self, key: tuple[Any, ...], layers: tuple[_Layer, ...], running: list[RunningMoments]
    ) -> _Flat | None:
        # The layers' running statistics as one flat buffer (key: their device and dtype): the
        # one the last fold left when it holds exactly them, else a concatenation; None when
        # they are not all of that device and dtype.
        flat = self._flat.get(key)
        if flat is not None and flat.holds(layers, running):  # type: ignore[arg-type]
            return flat
        if any((r.mean.device, r.mean.dtype) != key for r in running):
            return None
        return _Flat(
            layers,
            tuple(running),
            _flat([r.mean for r in running], key[1]),
            _flat([r.var for r in running], key[1]),
            [r.mean.numel() for r in running],
        )

    def _install(
        self,
        key: tuple[Any, ...],
        old: _Flat,
        new_mean: Tensor,
        new_var: Tensor,
        means: Sequence[Tensor],
        variances: Sequence[Tensor],
    ) -> None:
        # The folded statistics of old's layers: each layer's running statistics become views
        # (means[i], variances[i], in its own shape) of the new flat buffer, kept for the next
        # fold.
        new_running = []
        for layer, stats, m, v in zip(old.layers, old.running, means, variances, strict=True):
            if stats.mean.dim() != 1:
                m, v = m.view(stats.mean.shape), v.view(stats.mean.shape)
            layer.running = RunningMoments(m, v, stats.num_batches + 1)
            new_running.append(layer.running)
        self._flat[key] = _Flat(old.layers, tuple(new_running), new_mean, new_var, old.sizes)

    def _batch_moments(self, module: nn.Module, x: Tensor) -> Moments | None:
        if isinstance(module, nn.Linear):
            if x.dim() < 1 or x.shape[-1] != module.in_features:
                return None
            return pc.linear_input_moments(x)
        assert isinstance(module, nn.Conv2d)
        if x.dim() not in (3, 4) or x.shape[-3] != module.in_channels:
            return None
        if self.conv_stats == "channel":
            return pc.conv2d_channel_moments(x)
        kh, kw = _pair(module.kernel_size)
        dh, dw = _pair(module.dilation)
        left, right, top, bottom = _conv_pads(module)
        if x.shape[-2] + top + bottom < dh * (kh - 1) + 1 or x.shape[-1] + left + right < (
            dw * (kw - 1) + 1
        ):
            return None
        if module.padding_mode == "zeros" and left == right and top == bottom:
            padding = (top, left)
        else:
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, (left, right, top, bottom), mode=mode)
            padding = (0, 0)
        return pc.conv2d_patch_moments(
            x, (kh, kw), stride=module.stride, padding=padding, dilation=module.dilation
        )

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Context in which no forward is recorded (nestable; restored even if the body raises)."""
        self._pause_depth += 1
        try:
            yield
        finally:
            self._pause_depth -= 1

    # -------------------------------------------------------------------------- preconditioning

    def _step_stats(self, layer: _Layer) -> RunningMoments | None:
        if self.use_current_batch:
            return layer.running
        return layer.running if layer.new_step else layer.before_step

    def _check_alive(self, what: str) -> None:
        if self._removed:
            raise RuntimeError(f"BNPreconditioner.{what}() called after remove()")

    def precondition_(self) -> list[str]:
        """Replace each hooked layer's ``weight.grad`` and ``bias.grad`` by the BNP transform.

        In place (the ``.grad`` tensors keep their identity), by
        :func:`~normlab.functional.precondition.precondition_linear_` /
        :func:`~normlab.functional.precondition.precondition_conv2d_` with this preconditioner's
        ``eps`` and ``floor``, and ``weight_norm`` for the layers in :attr:`weight_norm_layers`
        (on CPU, float32/float64, without the weight-norm projection and with ``groups=1``: one
        fused kernel call for all layers, within rounding of those functions; docs/performance.md).
        Marks the end of a step for ``use_current_batch=False``.

        Raises:
            RuntimeError: after :meth:`remove`, or a kept dense-layer input was changed in place
                since its forward (nothing is folded; see the class docstring).

        Layers whose gradients this method already preconditioned, unchanged since, are skipped
        (see "Once per backward" in the class docstring); a call that finds nothing else to do is
        a no-op (it does not mark the end of a step either) and logs that at debug level.

        Returns:
            The names of the layers whose gradients were changed (the others had no weight
            gradient, no statistics yet, or were already preconditioned).
        """
        self._check_alive("precondition_")
        names = self._fused_step()
        if names is not None:
            return names
        self._flush()
        current = self.use_current_batch
        mode = pc.weight_norm_mode(self.weight_norm)
        changed: list[_Layer] = []
        skipped: list[str] = []
        # CPU layers without the weight-norm projection go to the fused kernel, in one call:
        # their layers, weight and bias gradients, and statistics' means and variances.
        fused_layers: list[_Layer] = []
        grads_w: list[Tensor] = []
        grads_b: list[Tensor | None] = []
        means: list[Tensor] = []
        variances: list[Tensor] = []
        fused_stats: list[RunningMoments] = []
        rest: list[tuple[_Layer, Tensor, Tensor | None, RunningMoments]] = []
        for layer in self._layers:
            module = layer.module
            params = module._parameters  # (not the slower Module.__getattr__)
            grad_w = params["weight"].grad  # type: ignore[union-attr]
            stats = layer.running if current or layer.new_step else layer.before_step
            if grad_w is None or stats is None:
                continue
            if layer.written is not None and layer.already_preconditioned(grad_w):
                skipped.append(layer.name)
                continue
            bias = params.get("bias")
            grad_b = None if bias is None else bias.grad
            changed.append(layer)
            if (
                (mode == "off" or not layer.weight_norm)
                and grad_w.is_cpu
                and stats.var.dtype == grad_w.dtype
                and (type(module) is nn.Linear or getattr(module, "groups", 1) == 1)
            ):
                fused_layers.append(layer)
                grads_w.append(grad_w)
                grads_b.append(grad_b)
                means.append(stats.mean)
                variances.append(stats.var)
                fused_stats.append(stats)
            else:
                rest.append((layer, grad_w, grad_b, stats))
        if skipped:
            logger.debug(
                "BNPreconditioner.precondition_: gradients of %s are already preconditioned "
                "(no backward since the last call); left as they are",
                ", ".join(repr(name) for name in skipped),
            )
            if not changed:
                return []
        if rest:
            self._precondition_reference(rest, mode)
        if fused_layers:
            if not _fused.try_bnp_precondition_(
                grads_w, grads_b, means, variances, self.eps, self.floor
            ):
                declined = zip(fused_layers, grads_w, grads_b, fused_stats, strict=True)
                self._precondition_reference(list(declined), mode)
            for layer, grad_w in zip(fused_layers, grads_w, strict=True):
                layer.written = (weakref.ref(grad_w), grad_w._version)
        for layer in self._layers:
            layer.new_step = True
        return [layer.name for layer in changed]

    def _fused_step(self) -> list[str] | None:
        """:meth:`precondition_` of the common step in one fused kernel call (fold, then
        transform with the new statistics), or ``None``, having changed nothing, where the
        general path must run. The common step: no process group, ``use_current_batch``, no
        ``weight_norm`` projection, and every hooked layer has exactly one recorded forward since
        the last step (a dense input, unchanged since), a weight gradient not yet
        preconditioned, and running statistics in the flat buffer the last fold left. On small
        layers the calls are the cost of BNP, so this path checks only what the kernel does not.
        """
        if self._group is not None or not self.use_current_batch or len(self._flat) != 1:
            return None
        if (
            self.weight_norm is not False
            and pc.weight_norm_mode(self.weight_norm) != "off"
            and any(layer.weight_norm for layer in self._layers)
        ):
            return None
        ((key, flat),) = self._flat.items()
        layers = self._layers
        if len(flat.layers) != len(layers) or not all(map(operator.is_, flat.layers, layers)):
            return None
        xs: list[Tensor] = []
        grads_w: list[Tensor] = []
        grads_b: list[Tensor | None] = []
        for layer, running in zip(layers, flat.running, strict=True):
            pending = layer.pending
            if len(pending) != 1 or layer.running is not running:
                return None
            batch, first = pending[0]
            if type(batch) is not _Stash or not first or batch.x._version != batch.version:
                return None  # (the general path raises for a changed input)
            params = layer.module._parameters
            grad_w = params["weight"].grad  # type: ignore[union-attr]
            if grad_w is None or layer.already_preconditioned(grad_w):
                return None
            bias = params.get("bias")
            x = batch.x  # (the kernel reads it: detached only where a view is taken)
            xs.append(x if x.dim() == 2 else x.detach().reshape(-1, x.shape[-1]))
            grads_w.append(grad_w)
            grads_b.append(None if bias is None else bias.grad)
        counts = flat.count
        if counts is None:
            counts = flat.running[0].num_batches
            if self.debias and any(r.num_batches != counts for r in flat.running):
                return None
        rho = pc.ema_rho(self._rho_resolved, counts, self.debias)  # type: ignore[arg-type]
        spare = flat.spare
        if spare is None:
            spare = _buffers(torch.empty_like(flat.mean), torch.empty_like(flat.var), flat.sizes)
        if not _fused.try_bnp_step_(
            xs, grads_w, grads_b, flat.mean, flat.var, spare.mean, spare.var,
            rho, self.eps, self.floor,
        ):  # fmt: skip
            return None
        # _install's work for dense layers (1-D statistics), with the end of the step, in one loop.
        current = flat.buffers
        if current is None:
            current = _Buffers(flat.mean, flat.var, tuple((r.mean, r.var) for r in flat.running))
        running = []
        for layer, (m, v), grad_w in zip(layers, spare.views, grads_w, strict=True):
            layer.before_step = layer.running
            layer.running = stats = RunningMoments(m, v, counts + 1)
            running.append(stats)
            layer.pending.clear()
            layer.written = (weakref.ref(grad_w), grad_w._version)
            layer.new_step = True
        # The buffers of the old `before_step` are now held by no statistics object.
        flat.running, flat.mean, flat.var, flat.count = (
            tuple(running),
            spare.mean,
            spare.var,
            counts + 1,
        )
        flat.buffers, flat.previous, flat.spare = spare, current, flat.previous
        return list(self._names)

    @torch.no_grad()
    def _precondition_reference(
        self, jobs: list[tuple[_Layer, Tensor, Tensor | None, RunningMoments]], mode: str
    ) -> None:
        # The layers the fused kernel does not take (weight normalization, groups > 1, CUDA, a
        # dtype other than the statistics', or a call it declined), one by one. Statistics that
        # are views of a flat buffer (_fold_group) get their floored variance from one clamp and
        # one add over the whole buffer, the same bits as per layer, and the unchecked transform
        # (the shapes are the layers' own).
        weight_norm = self.weight_norm
        located = {id(r): (f, i) for f in self._flat.values() for i, r in enumerate(f.running)}
        s2_parts: dict[int, tuple[Tensor, ...]] = {}
        for layer, grad_w, grad_b, stats in jobs:
            module = layer.module
            on = mode != "off" and layer.weight_norm
            weight = module.weight if on else None
            where = located.get(id(stats))
            if (
                where is not None
                and stats.var.dtype == grad_w.dtype
                and stats.var.device == grad_w.device
            ):
                flat, i = where
                parts = s2_parts.get(id(flat))
                if parts is None:
                    s2 = flat.var.clamp_min(self.floor).add_(self.eps)
                    parts = s2.split_with_sizes(flat.sizes) if len(flat.sizes) > 1 else (s2,)
                    s2_parts[id(flat)] = parts
                s2 = parts[i] if stats.var.dim() == 1 else parts[i].view(stats.var.shape)
                groups = 1 if isinstance(module, nn.Linear) else module.groups
                pc._precondition_unchecked_(
                    grad_w, grad_b, stats.mean, s2, groups, weight, mode == "scaled"
                )
            else:
                dense = isinstance(module, nn.Linear)
                transform = pc.precondition_linear_ if dense else pc.precondition_conv2d_
                transform(
                    grad_w,
                    grad_b,
                    stats.mean,
                    stats.var,
                    eps=self.eps,
                    floor=self.floor,
                    weight_norm=weight_norm if on else False,
                    weight=weight,
                    **({} if dense else {"groups": module.groups}),
                )
            layer.written = (weakref.ref(grad_w), grad_w._version)

    def before_step(self) -> None:
        """:meth:`precondition_`, as the training hook of the ``bnp`` method
        (:class:`normlab.methods.TrainingHook`: called between ``backward()`` and
        ``optimizer.step()`` by :func:`normlab.train.train`)."""
        self.precondition_()

    def _step_pre_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.precondition_()
        return None

    def attach(self, optimizer: torch.optim.Optimizer) -> _AttachHandle:
        """Run :meth:`precondition_` before every ``optimizer.step()``.

        Uses the optimizer's public ``register_step_pre_hook``. Returns a handle whose ``remove()``
        detaches it (also usable as a context manager); :meth:`remove` detaches it too.

        Raises:
            TypeError: not a ``torch.optim.Optimizer``.
            ValueError: already attached to this optimizer (the gradients would be
                preconditioned twice).
        """
        self._check_alive("attach")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"attach expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if optimizer in self._attached:
            raise ValueError("this BNPreconditioner is already attached to that optimizer")
        handle = _AttachHandle(
            self, optimizer, optimizer.register_step_pre_hook(self._step_pre_hook)
        )
        self._attached[optimizer] = handle
        return handle

    def remove(self) -> None:
        """Detach every hook: the forward hooks and all :meth:`attach` step pre-hooks.

        Idempotent. Afterwards nothing is recorded and ``precondition_``/``attach`` raise
        ``RuntimeError``; :meth:`statistics` and :meth:`state_dict` still work.
        """
        for layer in self._layers:
            if layer.handle is not None:
                layer.handle.remove()
            layer.handle = None
            layer.release()
        for handle in list(self._attached.values()):
            handle.remove()
        self._attached.clear()
        self._removed = True

    # ------------------------------------------------------------------------------ state dict

    def _options(self) -> dict[str, Any]:
        return {
            "rho": self._rho_option,
            "eps": self.eps,
            "floor": self.floor,
            "conv_stats": self.conv_stats,
            "use_current_batch": self.use_current_batch,
            "weight_norm": self.weight_norm,
            "debias": self.debias,
        }

    def state_dict(self) -> dict[str, Any]:
        """Options, the resolved ``rho`` and per-layer statistics keyed by module name (copies).

        Per layer: ``running`` and ``before_step`` (each ``None`` or a dict with ``mean``, ``var``,
        ``num_batches``) and ``new_step``.
        """

        self._flush()

        def pack(stats: RunningMoments | None) -> dict[str, Any] | None:
            if stats is None:
                return None
            return {
                "mean": stats.mean.detach().clone(),
                "var": stats.var.detach().clone(),
                "num_batches": stats.num_batches,
            }

        return {
            "version": _STATE_VERSION,
            "options": self._options(),
            "rho_resolved": self._rho_resolved,
            "layers": {
                layer.name: {
                    "running": pack(layer.running),
                    "before_step": pack(layer.before_step),
                    "new_step": layer.new_step,
                }
                for layer in self._layers
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> LoadResult:
        """Load :meth:`state_dict` output: options (they replace the constructor's, as
        ``torch.optim`` does with hyper-parameters) and statistics, matched by layer name.

        Everything is validated before anything changes: on error the preconditioner is left as
        it was. With ``strict=False`` layers missing from the state keep their statistics (they
        are cleared if the loaded ``conv_stats`` changes their shape) and unknown names are
        ignored; both lists are returned.

        Raises:
            TypeError / ValueError: malformed state, wrong tensor shapes, NaN/Inf or negative
                statistics, bad options, or (with ``strict``) layer names that do not match.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"load_state_dict expected a dict, got {type(state_dict).__name__}")
        self._flush()  # recorded batches belong to the statistics being replaced
        for key in ("version", "options", "rho_resolved", "layers"):
            if key not in state_dict:
                raise ValueError(f"BNPreconditioner state_dict is missing {key!r}")
        if state_dict["version"] != _STATE_VERSION:
            raise ValueError(
                f"BNPreconditioner state_dict version {_STATE_VERSION} expected, "
                f"got {state_dict['version']!r}"
            )
        options = state_dict["options"]
        expected = set(self._options())
        if isinstance(options, dict):  # saved before these options existed: their old behaviour
            options = {"weight_norm": False, "debias": False, **options}
        if not isinstance(options, dict) or set(options) != expected:
            got = sorted(options) if isinstance(options, dict) else type(options).__name__
            raise ValueError(f"options must have the keys {sorted(expected)}, got {got}")
        _check_options(**options)
        rho_resolved = state_dict["rho_resolved"]
        if rho_resolved is not None and not (_is_real(rho_resolved) and 0 < rho_resolved < 1):
            raise ValueError(f"rho_resolved must be None or in (0, 1), got {rho_resolved!r}")
        if options["rho"] is not None and rho_resolved != options["rho"]:
            raise ValueError(f"rho_resolved={rho_resolved!r} differs from rho={options['rho']!r}")
        layers = state_dict["layers"]
        if not isinstance(layers, dict):
            raise TypeError(f"'layers' must be a dict, got {type(layers).__name__}")
        ours = {layer.name: layer for layer in self._layers}
        missing = [n for n in ours if n not in layers]
        unexpected = [n for n in layers if n not in ours]
        if strict and (missing or unexpected):
            raise ValueError(
                f"BNPreconditioner layer names do not match: missing {missing}, "
                f"unexpected {unexpected}"
            )
        staged = {}
        for name, entry in layers.items():
            if name in ours:
                shape = self._stat_shape(ours[name].module, options["conv_stats"])
                staged[name] = self._unpack_layer(name, entry, shape, ours[name].module)
        for name in missing:  # kept, unless the new conv_stats no longer fits their shape
            layer = ours[name]
            shape = self._stat_shape(layer.module, options["conv_stats"])
            if layer.running is not None and tuple(layer.running.mean.shape) != shape:
                staged[name] = (None, None, True)
        self._rho_option = options["rho"]
        self._rho_resolved = None if rho_resolved is None else float(rho_resolved)
        self.eps = float(options["eps"])
        self.floor = float(options["floor"])
        self.conv_stats = options["conv_stats"]
        self.use_current_batch = options["use_current_batch"]
        self.weight_norm = options["weight_norm"]
        self.debias = options["debias"]
        for name, (running, before_step, new_step) in staged.items():
            layer = ours[name]
            layer.running, layer.before_step, layer.new_step = running, before_step, new_step
        return LoadResult(missing, unexpected)

    @staticmethod
    def _stat_shape(module: nn.Module, conv_stats: str) -> tuple[int, ...]:
        if isinstance(module, nn.Linear):
            return (module.in_features,)
        assert isinstance(module, nn.Conv2d)
        if conv_stats == "channel":
            return (module.in_channels,)
        return (module.in_channels, *_pair(module.kernel_size))

    @staticmethod
    def _unpack_layer(
        name: str, entry: Any, shape: tuple[int, ...], module: nn.Module
    ) -> tuple[RunningMoments | None, RunningMoments | None, bool]:
        if not isinstance(entry, dict) or set(entry) != {"running", "before_step", "new_step"}:
            raise ValueError(
                f"layer {name!r}: expected a dict with keys 'running', 'before_step', 'new_step'"
            )
        if not isinstance(entry["new_step"], bool):
            raise TypeError(f"layer {name!r}: new_step must be a bool")

        def unpack(which: str) -> RunningMoments | None:
            stats = entry[which]
            if stats is None:
                return None
            if not isinstance(stats, dict) or set(stats) != {"mean", "var", "num_batches"}:
                raise ValueError(
                    f"layer {name!r}: {which} must be None or a dict with keys "
                    "'mean', 'var', 'num_batches'"
                )
            count = stats["num_batches"]
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"layer {name!r}: {which} num_batches must be an int >= 1")
            tensors = []
            for key in ("mean", "var"):
                t = stats[key]
                if not isinstance(t, Tensor) or not t.is_floating_point():
                    raise TypeError(f"layer {name!r}: {which} {key} must be a floating tensor")
                if tuple(t.shape) != shape:
                    raise ValueError(
                        f"layer {name!r}: {which} {key} of shape {shape} expected, "
                        f"got {tuple(t.shape)}"
                    )
                tensors.append(t.detach().to(device=module.weight.device).clone())
            for key, t in zip(("mean", "var"), tensors, strict=True):
                bad = int((~torch.isfinite(t)).sum())
                if bad:
                    raise ValueError(
                        f"layer {name!r}: {which} {key} must be finite, got {bad} NaN or Inf "
                        f"entries of {t.numel()}"
                    )
            if bool((tensors[1] < 0).any()):
                raise ValueError(f"layer {name!r}: {which} var has negative entries")
            return RunningMoments(tensors[0], tensors[1], count)

        return unpack("running"), unpack("before_step"), entry["new_step"]

    def __repr__(self) -> str:
        return (
            f"BNPreconditioner({len(self._layers)} layers, rho={self._rho_option}, "
            f"debias={self.debias}, eps={self.eps}, floor={self.floor}, "
            f"conv_stats={self.conv_stats!r}, use_current_batch={self.use_current_batch}, "
            f"weight_norm={self.weight_norm!r})"
        )
