r"""``BNPreconditioner``: Batch Normalization Preconditioning for the ``nn.Linear`` and
``nn.Conv2d`` layers of an unchanged model.

Lange, Helfrich & Ye, JMLR 23(72), 2022 (arXiv 2108.01110); ``ALGORITHMS.md`` §1. The maths is in
:mod:`normlab.functional.precondition`; this module only records the statistics (forward pre-hooks)
and applies the transform to ``.grad`` in place.

From the paper (its abstract): conditioning the parameter gradients with input statistics
instead of a BN layer, at any batch size including 1. Everything else here (the pooled-variance
EMA, ``rho``'s default, ``eps`` plus a variance ``floor``, per-channel conv statistics by default,
folding the current batch in before the step) is normlab's choice, because the paper's exact rules
are not confirmed; each is an option.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from normlab.functional import precondition as pc
from normlab.functional.batch_norm import Moments
from normlab.functional.precondition import RunningMoments

__all__ = ["BNPreconditioner", "LoadResult"]

logger = logging.getLogger(__name__)

_STATE_VERSION = 1
# ALGORITHMS.md §1.4 [D]: rho = 0.999 for batch size <= 4, 0.99 otherwise (used when rho=None).
_SMALL_BATCH = 4
_RHO_SMALL_BATCH = 0.999
_RHO_LARGE_BATCH = 0.99
# Recorded batches kept per layer before they are folded in without waiting for a step.
_MAX_PENDING = 8


class LoadResult(NamedTuple):
    """Layer names in the model but not in the loaded state, and the reverse."""

    missing_keys: list[str]
    unexpected_keys: list[str]


@dataclass(eq=False)  # compared by identity
class _Layer:
    # One hooked layer. `running` includes every recorded batch once `pending` is folded in
    # (BNPreconditioner._flush); `before_step` is `running` as it was just before the first
    # recorded forward of the current step (use_current_batch=False).
    name: str
    module: nn.Linear | nn.Conv2d
    handle: Any = None
    running: RunningMoments | None = None
    before_step: RunningMoments | None = None
    new_step: bool = True  # no forward recorded since the last precondition_()
    # Batch moments recorded but not yet folded into `running`, oldest first, each with whether
    # it was the first recorded forward of its step.
    pending: list[tuple[Moments, bool]] = field(default_factory=list)


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
    rho: float | None, eps: float, floor: float, conv_stats: str, use_current_batch: bool
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


def _stat_input(x: Tensor) -> Tensor:
    # Statistics of half-precision inputs are taken in float32 (as in functional.precondition).
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _linear_moments(x: Tensor) -> Moments:
    # linear_input_moments, fast: torch.var_mean over the leading dimension of an (M, n) matrix
    # is an order of magnitude slower on CPU than the two-pass per-channel kernel of batch norm
    # (torch.batch_norm_update_stats with no running buffers: the batch mean and biased variance,
    # per column). Falls back to the reference where that kernel is missing.
    rows = _stat_input(x).reshape(-1, x.shape[-1])  # (*, n) -> (M, n)
    if rows.device.type in ("cpu", "cuda"):
        try:
            mean, var = torch.batch_norm_update_stats(rows, None, None, 0.0)
        except (RuntimeError, NotImplementedError):  # e.g. a dtype without that kernel
            return pc.linear_input_moments(x)
        return Moments(mean, var, rows.shape[0])
    return pc.linear_input_moments(x)


def _conv_channel_moments(x: Tensor) -> Moments:
    # conv2d_channel_moments, fast: two passes (mean, then the mean of squared deviations) instead
    # of torch.var_mean over (N, H, W), which is an order of magnitude slower on CPU.
    xs = _stat_input(x if x.dim() == 4 else x.unsqueeze(0))  # (N, C, H, W)
    mean = xs.mean((0, 2, 3))
    dev = xs - mean.reshape(1, -1, 1, 1)
    var = dev.mul_(dev).mean((0, 2, 3))
    return Moments(mean, var, xs.numel() // xs.shape[1])


class _Flat(NamedTuple):
    # The running statistics of some layers stored contiguously: `running[i]` (the object held by
    # `layers[i].running`) views `mean`/`var` at `sizes[i]` entries.
    layers: tuple[_Layer, ...]
    running: tuple[RunningMoments, ...]
    mean: Tensor
    var: Tensor
    sizes: list[int]

    def holds(self, layers: tuple[_Layer, ...], stats: list[RunningMoments | None]) -> bool:
        return (
            len(layers) == len(self.layers)
            and all(a is b for a, b in zip(layers, self.layers, strict=True))
            and all(a is b for a, b in zip(stats, self.running, strict=True))
        )


def _flat(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    # Each torch call costs microseconds, which is the whole per-step cost of BNP on small
    # layers: skip the no-op ones.
    parts = [t if t.dim() == 1 else t.reshape(-1) for t in tensors]
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out if out.dtype == dtype else out.to(dtype)


def _ema_flat(
    mean: Tensor, var: Tensor, m_b: Tensor, v_b: Tensor, rho: float
) -> tuple[Tensor, Tensor]:
    r"""The pooled-variance EMA of :func:`~normlab.functional.precondition.ema_moments` on
    concatenated statistics (new tensors):

    .. math::
        \delta = m_B - \mu_{t-1}, \qquad \mu_t = \mu_{t-1} + (1-\rho)\,\delta, \qquad
        \sigma_t^2 = \rho\,\sigma_{t-1}^2 + (1-\rho)\,v_B + \rho(1-\rho)\,\delta^2 .

    Features whose batch moments are not finite keep their previous values.
    """
    w = 1.0 - rho
    delta = m_b - mean
    new_mean = torch.add(mean, delta, alpha=w)
    new_var = torch.mul(var, rho).add_(v_b, alpha=w).addcmul_(delta, delta, value=rho * w)
    if not math.isfinite(float(new_var.sum())):  # rare: keep the old values of bad features
        finite = torch.isfinite(m_b) & torch.isfinite(v_b)
        new_mean = torch.where(finite, new_mean, mean)
        new_var = torch.where(finite, new_var, var)
    return new_mean, new_var


def _precondition_in_place(
    grad_w: Tensor, grad_b: Tensor | None, mean_w: Tensor, s2_w: Tensor
) -> None:
    # The BNP transform of functional.precondition written into the gradients: the same
    # operations in the same order (so the same bits), without the out-of-place copies.
    # mean_w, s2_w broadcast against grad_w: (n,) for Linear, (C, 1|kh, 1|kw) for Conv2d.
    if grad_b is None:
        grad_w.div_(s2_w)
        return
    col = grad_b.unsqueeze(1) if grad_w.dim() == 2 else grad_b.view(-1, 1, 1, 1)
    outer = col * mean_w  # g_b mu^T
    grad_w.sub_(outer).div_(s2_w)
    if grad_w.dim() == 2:
        grad_b.sub_(torch.mul(grad_w, mean_w, out=outer).sum(1))  # g_b - G~_W mu
    else:
        grad_b.sub_((grad_w * mean_w).flatten(1).sum(1))


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

    Forward pre-hooks record the mean and variance of each hooked layer's *input* during training
    forwards; :meth:`precondition_` then replaces each layer's gradients, in place, by

    .. math::
        \tilde G_W = (G_W - g_b \mu^\top) D^{-2}, \qquad \tilde g_b = g_b - \tilde G_W \mu ,
        \qquad D^2 = \mathrm{diag}(\max(\sigma^2, \text{floor}) + \epsilon),

    (per channel or per patch entry for ``nn.Conv2d``, see
    :func:`normlab.functional.precondition.precondition_conv2d`). With statistics held fixed,
    ``precondition_()`` followed by an SGD step is exactly one SGD step on the input-normalized
    reparametrization :math:`z = V D^{-1}(h - \mu) + c` of every layer, mapped back to
    :math:`(W, b)`. The model itself is not changed: no layer is added, forward and eval outputs are
    the plain network's.

    Use it between ``backward()`` and ``optimizer.step()``, with any ``torch.optim`` optimizer
    (SGD with momentum is the faithful choice; Adam's per-coordinate scaling largely cancels the
    :math:`D^{-2}` factor, so report that as "BNP + Adam"); weight decay is best decoupled
    (``AdamW``-style), otherwise the L2 term is preconditioned too::

        precond = BNPreconditioner(model)
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            precond.precondition_()   # or once: precond.attach(optimizer)
            optimizer.step()
        with precond.paused():        # forwards that must not be recorded (eval mode is never)
            ...

    **Statistics.** For ``nn.Linear``, per input feature over every leading dimension; for
    ``nn.Conv2d``, per input channel over :math:`(N, H, W)` (``conv_stats="channel"``, BN's
    statistics) or per patch entry :math:`(c, u, v)` over the batch and all output positions
    (``conv_stats="patch"``, one ``unfold`` per forward, :math:`k_h k_w` times the input's memory,
    exact for any padding and padding mode). Each training forward of a layer (``module.training``
    and not :meth:`paused`) folds the batch's moments into a running estimate with the
    pooled-variance EMA of :func:`normlab.functional.precondition.ema_moments`, well defined at
    batch size 1. A layer called twice in a forward folds in both inputs. (The hooks only take the
    batch moments; folding them in waits until the statistics are next needed, by
    :meth:`precondition_`, :meth:`statistics` or :meth:`state_dict`, and is then done for all
    layers at once, with the same result: the per-step cost of BNP on small layers is the number
    of kernels launched.)

    **Statistics used for the step.** ``use_current_batch=True`` (BN-like): the running estimate
    after the current batch was folded in. ``False``: the running estimate as it was before the
    first recorded forward after the previous :meth:`precondition_` (only earlier steps' batches;
    the first step is then not preconditioned). Layers whose weight has no gradient, or that have
    no statistics for the step yet, are skipped.

    **Layers without bias.** Nothing absorbs the centring term, so only the :math:`D^{-2}` scaling
    applies (the centring is lost; a warning is logged at construction). Enable biases on BNP
    layers, initialized to zero. A bias that has no gradient is treated the same way.

    **Distributed.** Under DDP, gradients are already all-reduced when ``precondition_`` runs, so
    every rank applies the same transform if the statistics agree. The statistics are local: they
    are kept as ``(mean, var, num_batches)`` (:class:`~normlab.functional.precondition.
    RunningMoments`), a form that can be all-reduced (average the means, add the spread of the
    means to the averaged variances); normlab does not do this yet. Build the preconditioner on
    the unwrapped model, so that the layer names (the state-dict keys) do not carry the
    ``module.`` prefix of the wrapper.

    **Other forwards.** Diagnostics that run training-mode forwards (Hessian-vector products,
    ``torch.func`` transforms) should do so inside :meth:`paused`, or they change the statistics.

    Args:
        model: the network. Its modules are not modified apart from one forward pre-hook each.
        modules: the layers to precondition, as submodules of ``model`` or their names (from
            ``model.named_modules()``); default every ``nn.Linear`` and ``nn.Conv2d``, subclasses
            included (a subclass whose weight is used without calling its ``forward``, such as
            ``nn.MultiheadAttention.out_proj``, never gets statistics and is skipped). Layers must
            not share parameters.
        rho: weight of the *old* value in the EMA (Flax's convention; torch's ``momentum`` is
            ``1 - rho``), in :math:`(0, 1)`. ``None`` [D, default]: resolved at the first recorded
            forward from its batch size, 0.999 if it is at most 4, else 0.99 (``ALGORITHMS.md``
            §1.4); see :attr:`rho`.
        eps: :math:`\epsilon > 0` added to the floored variance. Default ``1e-5`` [D, BN's].
        floor: variance floor :math:`\ge 0`, limiting the gradient amplification of nearly
            constant inputs to :math:`1/(\text{floor}+\epsilon)`. Default ``1e-3`` [D].
        conv_stats: ``"channel"`` [D, default] or ``"patch"`` [D], as above.
        use_current_batch: as above. Default ``True`` [D].

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or a chosen module is not ``nn.Linear`` /
            ``nn.Conv2d``.
        ValueError: no such layer, an unknown module name, shared parameters, an option out of
            range. Nothing is hooked when the constructor raises.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        modules: Iterable[nn.Module | str] | None = None,
        rho: float | None = None,
        eps: float = 1e-5,
        floor: float = 1e-3,
        conv_stats: Literal["channel", "patch"] = "channel",
        use_current_batch: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"BNPreconditioner expected an nn.Module, got {type(model).__name__}")
        _check_options(rho, eps, floor, conv_stats, use_current_batch)
        layers = self._select(model, modules)  # raises before anything is hooked
        self._rho_option = None if rho is None else float(rho)
        self._rho_resolved: float | None = self._rho_option
        self.eps = float(eps)
        self.floor = float(floor)
        self.conv_stats: Literal["channel", "patch"] = conv_stats
        self.use_current_batch = use_current_batch
        self._pause_depth = 0
        self._removed = False
        self._attached: weakref.WeakKeyDictionary[torch.optim.Optimizer, _AttachHandle] = (
            weakref.WeakKeyDictionary()
        )
        self._layers = [_Layer(name, module) for name, module in layers]
        self._flat: dict[tuple[Any, ...], _Flat] = {}  # see _fold_group
        for layer in self._layers:
            if layer.module.bias is None:
                logger.warning(
                    "BNPreconditioner: layer %r has no bias, so BNP only rescales its weight "
                    "gradient and the centring by the input mean is lost; enable the bias",
                    layer.name,
                )
        for layer in self._layers:
            layer.handle = layer.module.register_forward_pre_hook(
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

    # ----------------------------------------------------------------------------- properties

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Names (as in ``model.named_modules()``) of the hooked layers, in model order."""
        return tuple(layer.name for layer in self._layers)

    @property
    def rho(self) -> float | None:
        """The EMA weight in use: the constructor's, or the one resolved from the first batch size
        when that was ``None`` (``None`` until a forward has been recorded)."""
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
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not module.training or not self.recording:
                return None
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, Tensor) and x.is_floating_point() and x.numel() > 0:
                self._record(layer, x)
            return None

        return hook

    def _record(self, layer: _Layer, x: Tensor) -> None:
        # No torch.no_grad() needed: everything here derives from the detached input.
        batch = self._batch_moments(layer.module, x.detach())
        if batch is None:  # an input the layer itself will reject: let it raise its own error
            return
        if self._rho_resolved is None:
            n = x.shape[0] if x.dim() >= (2 if isinstance(layer.module, nn.Linear) else 4) else 1
            self._rho_resolved = _RHO_SMALL_BATCH if n <= _SMALL_BATCH else _RHO_LARGE_BATCH
        # Folded into `running` by _flush, for all layers at once, before anything reads them.
        layer.pending.append((batch, layer.new_step))
        layer.new_step = False
        if len(layer.pending) > _MAX_PENDING:  # training-mode forwards without steps
            self._flush()

    def _flush(self) -> None:
        """Fold every recorded batch into the running statistics, oldest first per layer.

        Layers on the same device and dtype are folded together (:func:`_ema_flat` on their
        concatenated statistics): the per-step cost of BNP on small layers is the number of
        kernels launched, not their size.
        """
        rho = self._rho_resolved
        while any(layer.pending for layer in self._layers):
            groups: dict[tuple[Any, ...], list[tuple[_Layer, Moments]]] = {}
            for layer in self._layers:
                if not layer.pending:
                    continue
                assert rho is not None  # resolved by the first recorded forward
                batch, first = layer.pending.pop(0)
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
                self._fold_group(key, members, rho)  # type: ignore[arg-type]

    def _fold_group(
        self, key: tuple[Any, ...], members: list[tuple[_Layer, Moments]], rho: float
    ) -> None:
        layers = tuple(layer for layer, _ in members)
        running = [layer.running for layer in layers]
        flat = self._flat.get(key)
        if flat is not None and flat.holds(layers, running):
            mean, var, sizes = flat.mean, flat.var, flat.sizes  # no concatenation
        else:
            sizes = [r.mean.numel() for r in running]  # type: ignore[union-attr]
            mean = _flat([r.mean for r in running], key[1])  # type: ignore[union-attr]
            var = _flat([r.var for r in running], key[1])  # type: ignore[union-attr]
        m_b = _flat([b.mean for _, b in members], key[1])
        v_b = _flat([b.var for _, b in members], key[1])
        new_mean, new_var = _ema_flat(mean, var, m_b, v_b, rho)
        means = new_mean.split(sizes) if len(sizes) > 1 else (new_mean,)
        variances = new_var.split(sizes) if len(sizes) > 1 else (new_var,)
        new_running = []
        for layer, old, m, v in zip(layers, running, means, variances, strict=True):
            assert old is not None
            if old.mean.dim() != 1:
                m, v = m.view(old.mean.shape), v.view(old.mean.shape)
            stats = RunningMoments(m, v, old.num_batches + 1)
            layer.running = stats
            new_running.append(stats)
        self._flat[key] = _Flat(layers, tuple(new_running), new_mean, new_var, sizes)

    def _batch_moments(self, module: nn.Module, x: Tensor) -> Moments | None:
        if isinstance(module, nn.Linear):
            if x.dim() < 1 or x.shape[-1] != module.in_features:
                return None
            return _linear_moments(x)
        assert isinstance(module, nn.Conv2d)
        if x.dim() not in (3, 4) or x.shape[-3] != module.in_channels:
            return None
        if self.conv_stats == "channel":
            return _conv_channel_moments(x)
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

    @torch.no_grad()
    def precondition_(self) -> list[str]:
        r"""Replace each hooked layer's ``weight.grad`` and ``bias.grad`` by the BNP transform.

        In place (the ``.grad`` tensors keep their identity), with the arithmetic of
        :func:`~normlab.functional.precondition.precondition_linear` /
        :func:`~normlab.functional.precondition.precondition_conv2d`. Everything that can fail
        is checked before any gradient is written, so an error leaves every gradient as it was.
        Marks the end of a step for ``use_current_batch=False``.

        Returns:
            The names of the layers whose gradients were changed (the others had no weight
            gradient or no statistics yet).
        """
        self._check_alive("precondition_")
        self._flush()
        # First every transform's inputs (nothing is written), then the in-place updates.
        jobs: list[tuple[_Layer, Tensor, Tensor | None, RunningMoments]] = []
        for layer in self._layers:
            module = layer.module
            grad_w = module.weight.grad
            stats = self._step_stats(layer)
            if grad_w is not None and stats is not None:
                grad_b = None if module.bias is None else module.bias.grad
                jobs.append((layer, grad_w, grad_b, stats))
        # s^2 = max(var, floor) + eps (preconditioner_variance) is elementwise, so computing it
        # once on a whole flat group (see _fold_group) gives the same bits in two kernels.
        s2_of: dict[int, Tensor] = {}
        used = {id(stats) for *_, stats in jobs}
        for flat in self._flat.values():
            if all(id(r) in used for r in flat.running):
                s2 = flat.var.clamp_min(self.floor).add_(self.eps)
                parts = s2.split(flat.sizes) if len(flat.sizes) > 1 else (s2,)
                s2_of.update((id(r), part) for r, part in zip(flat.running, parts, strict=True))
        updates = []
        for layer, grad_w, grad_b, stats in jobs:
            module = layer.module
            mean, var, s2 = stats.mean, stats.var, s2_of.get(id(stats))
            if mean.dtype != grad_w.dtype or mean.device != grad_w.device:
                mean = mean.to(device=grad_w.device, dtype=grad_w.dtype)
                var = var.to(device=grad_w.device, dtype=grad_w.dtype)
                s2 = None
            if s2 is None:
                s2 = pc.preconditioner_variance(var, eps=self.eps, floor=self.floor)
            if isinstance(module, nn.Linear) or module.groups == 1:
                if mean.dim() == 1 and isinstance(module, nn.Conv2d):
                    mean, s2 = mean.view(-1, 1, 1), s2.view(-1, 1, 1)  # (C,) -> (C, 1, 1)
                updates.append((grad_w, grad_b, mean, s2, None))
            else:  # grouped convolutions: the functional rule, out of place, copied in below
                new = pc.precondition_conv2d(
                    grad_w, grad_b, mean, var, eps=self.eps, floor=self.floor, groups=module.groups
                )
                updates.append((grad_w, grad_b, mean, s2, new))
        for grad_w, grad_b, mean_w, s2_w, new in updates:
            if new is None:
                _precondition_in_place(grad_w, grad_b, mean_w, s2_w)
            else:
                grad_w.copy_(new[0])
                if grad_b is not None and new[1] is not None:
                    grad_b.copy_(new[1])
        done = [layer.name for layer, *_ in jobs]
        for layer in self._layers:
            layer.new_step = True
        return done

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
        """Detach every hook: the forward pre-hooks and all :meth:`attach` step pre-hooks.

        Idempotent. Afterwards nothing is recorded and ``precondition_``/``attach`` raise
        ``RuntimeError``; :meth:`statistics` and :meth:`state_dict` still work.
        """
        for layer in self._layers:
            if layer.handle is not None:
                layer.handle.remove()
                layer.handle = None
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
            TypeError / ValueError: malformed state, wrong tensor shapes, bad options, or (with
                ``strict``) layer names that do not match.
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
            if bool((tensors[1] < 0).any()):
                raise ValueError(f"layer {name!r}: {which} var has negative entries")
            return RunningMoments(tensors[0], tensors[1], count)

        return unpack("running"), unpack("before_step"), entry["new_step"]

    def __repr__(self) -> str:
        return (
            f"BNPreconditioner({len(self._layers)} layers, rho={self._rho_option}, "
            f"eps={self.eps}, floor={self.floor}, conv_stats={self.conv_stats!r}, "
            f"use_current_batch={self.use_current_batch})"
        )
