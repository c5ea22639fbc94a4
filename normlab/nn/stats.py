r"""Inference statistics of batch-normalized models: exact population statistics, and folding.

:func:`recompute_statistics` replaces the running statistics of every BN layer with the exact
mean and variance of that layer's input over a data set (the "population statistics" of
Ioffe & Szegedy 2015, Sec. 3.1, computed exactly rather than approximated by a moving average;
cf. fvcore's precise BN and "Rethinking Batch in BatchNorm", Wu & Johnson 2021,
https://arxiv.org/abs/2105.07576). :func:`fold_batchnorm` folds eval-mode BN layers into the
``Linear``/``Conv`` that precedes them.

Conventions: a layer's input statistics are per channel (dimension 1) over every other dimension,
exactly what the layer normalizes; a BN layer's ``running_var`` holds the *unbiased* variance
:math:`\frac{1}{n-1}\sum (x-\mu)^2` over the :math:`n` values per channel, torch's convention
(eval-mode BN divides by :math:`\sqrt{\mathrm{running\_var}+\epsilon}`). The estimates of a Full
Normalization or Online Normalization layer track the data's own (biased) variance
:math:`\frac1n\sum (x-\mu)^2`, so :func:`recompute_statistics` gives them that: for FN, the
exact whole-data statistics its running estimates approximate.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm
from torch.nn.parameter import UninitializedBuffer

from normlab.nn.batchnorm import _BatchNorm as _NormlabBatchNorm
from normlab.nn.convert import model_neighbours, optional_module, replace_module
from normlab.nn.fullnorm import _FullNorm
from normlab.nn.online_norm import _OnlineNorm

__all__ = ["fold_batchnorm", "recompute_statistics"]

logger = logging.getLogger(__name__)

# Layers whose estimates track the data's own (biased) variance rather than BN's unbiased one.
_BIASED_TYPES = (_FullNorm, _OnlineNorm)
_BN_TYPES = (_NormlabBatchNorm, _TorchBatchNorm, *_BIASED_TYPES)
_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _is_tracking_bn(module: nn.Module) -> bool:
    # BN layers (normlab's or torch's) that keep running statistics; a Lazy BN that has not run
    # yet has no statistics of known size and is skipped.
    return (
        isinstance(module, _BN_TYPES)
        and module.track_running_stats
        and isinstance(module.running_mean, Tensor)
        and isinstance(module.running_var, Tensor)
        and not isinstance(module.running_mean, UninitializedBuffer)
    )


def _check_model(fn: str, model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn} expected an nn.Module, got {type(model).__name__}")


_DEVICE: list[torch.device | None] = [None]  # the device of the recompute in progress


def _batch_input(batch: Any) -> Tensor:
    # A batch is a tensor, or a tuple/list whose first element is the input (torch's update_bn).
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise TypeError(
            "recompute_statistics expected each batch to be a Tensor or a tuple/list whose first "
            f"element is the input Tensor, got {type(batch).__name__}"
        )
    device = _DEVICE[0]
    return batch if device is None or batch.device == device else batch.to(device)


def _model_device(model: nn.Module) -> torch.device | None:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return None


class _StopForward(Exception):
    """Raised by the recording hook once the layer of interest has seen its input."""


class _ChannelMoments:
    r"""Per-channel count, mean and :math:`M_2=\sum(x-\mu)^2` in float64, merged batch by batch.

    Chan et al.'s pairwise update: with :math:`\delta = \mu_b - \mu_a` and :math:`n = n_a+n_b`,
    :math:`\mu = \mu_a + \delta\, n_b/n` and :math:`M_2 = M_{2,a} + M_{2,b} + \delta^2 n_a n_b/n`.
    Each batch's own moments are two-pass (centred), so the result does not depend on how the
    data is cut into batches, beyond float64 rounding.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, x: Tensor) -> None:
        xd = x.detach().to(torch.float64)
        dims = (0, *range(2, xd.dim()))
        n_b = xd.numel() // xd.shape[1]
        if n_b == 0:
            return
        mean_b = xd.mean(dims)  # (N, C, *) -> (C,)
        centred = xd - mean_b.reshape((1, -1) + (1,) * (xd.dim() - 2))
        m2_b = (centred * centred).sum(dims)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta * delta * (self.count * n_b / n)
        self.count = n


def recompute_statistics(
    model: nn.Module,
    batches: Iterable[Tensor | Sequence[Any]],
    *,
    progress: Callable[[int, int], None] | None = None,
    device: torch.device | str | None = None,
) -> None:
    r"""Set every BN layer's running statistics to the exact population statistics of its input.

    For each BN layer (normlab's :class:`~normlab.nn.BatchNorm1d`/``2d`` and subclasses, and
    torch's ``BatchNorm1d/2d/3d``/``SyncBatchNorm``) that tracks running statistics,
    ``running_mean`` becomes :math:`\mu = \frac1n \sum x` and ``running_var`` the *unbiased*
    :math:`\frac{1}{n-1}\sum (x-\mu)^2` of that layer's input over all of ``batches``, with
    :math:`n` the number of values per channel (torch's convention for ``running_var``). Full
    Normalization and Online Normalization layers (:class:`~normlab.nn.FullNorm1d`/``2d``/``3d``,
    :class:`~normlab.nn.OnlineNorm1d`/``2d``) count as BN layers here, with the *biased*
    :math:`\frac1n\sum (x-\mu)^2` (the variance their estimates track; for a FullNorm with
    ``sample_norm``, of its :meth:`~normlab.nn.FullNorm1d.statistics_input`); their step counters,
    control and outer-factor state and options are left as they were. Measured effect on models
    trained with unshuffled batches: docs/algorithms/fn.md ("Exact statistics at inference").

    The statistics are exact and do not depend on how the data is cut into batches: layers are
    processed one at a time in the order the forward pass reaches them, with the whole model in
    eval mode, so layer :math:`l` sees its input as computed with layers before it already using
    their new population statistics (the statistics eval mode will use). Per-channel count, mean
    and centred second moment are accumulated in float64 and merged across batches with Chan's
    update. This costs one pass over the data per BN layer; each pass stops at its layer.

    ``momentum``, weights, ``num_batches_tracked`` and every module's train/eval mode are left as
    they were; the temporary hooks are removed. If anything raises part-way (a bad batch, say),
    the running statistics already written are restored too, so the model is left unchanged.

    Args:
        model: the model; called as ``model(inputs)`` under :func:`torch.no_grad`.
        batches: a re-iterable collection (a list, a ``DataLoader``) of input tensors, or of
            ``(inputs, targets, ...)`` tuples/lists whose first element is the input. It is
            iterated once per BN layer, plus once on its first batch to find the layer order.
        progress: optional ``progress(done, total)`` called after each layer is finished.
        device: where the batches are moved before each forward (default: the device of the
            model's first parameter or buffer), so a CPU loader feeds a model on a GPU.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ``batches`` is a one-shot iterator (a
            generator, ``iter(...)``), which cannot be replayed once per layer; or a batch is not
            a tensor or tuple/list of one.
        ValueError: ``batches`` is empty; a BN layer runs more than once per forward (its
            population statistics would be defined by its own output); a layer saw fewer than 2
            values per channel, or non-finite values; or a statistic does not fit the dtype of
            the layer's buffers (a variance above 65504 in a float16 ``running_var``).

    Note:
        BN layers with ``track_running_stats=False`` keep using batch statistics in eval mode,
        so the inputs of the layers after them, and hence their statistics, depend on the
        batching. A ``LazyBatchNorm*`` that has never run is skipped: run one forward first.

    Example::

        >>> import torch, normlab.nn.batchnorm as nbn
        >>> from normlab.nn.stats import recompute_statistics
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), nbn.BatchNorm1d(4))
        >>> data = [torch.randn(8, 3) for _ in range(4)]
        >>> recompute_statistics(model, data)
        >>> model[1].running_mean.shape
        torch.Size([4])
    """
    _check_model("recompute_statistics", model)
    if isinstance(batches, Iterator):
        raise TypeError(
            "recompute_statistics expected a re-iterable collection of batches (a list, a "
            "DataLoader), got a one-shot iterator of type "
            f"{type(batches).__name__}; it is iterated once per BN layer"
        )
    layers = [m for m in model.modules() if _is_tracking_bn(m)]
    if not layers:
        logger.info("recompute_statistics: no BN layer with running statistics; nothing to do")
        return

    modes = {m: m.training for m in model.modules()}
    saved = {m: (m.running_mean.clone(), m.running_var.clone()) for m in layers}  # type: ignore[union-attr]
    handles: list[torch.utils.hooks.RemovableHandle] = []
    finished = False
    _DEVICE[0] = torch.device(device) if device is not None else _model_device(model)
    try:
        model.eval()
        with torch.no_grad():
            order = _forward_order(model, layers, batches, handles)
            for done, layer in enumerate(order, start=1):
                mean, var, count = _layer_input_moments(model, layer, batches, handles)
                layer.running_mean.copy_(mean)  # type: ignore[union-attr]
                layer.running_var.copy_(var)  # type: ignore[union-attr]
                logger.info(
                    "recompute_statistics: layer %d/%d (%s, %d features): %d values per channel",
                    done,
                    len(order),
                    type(layer).__name__,
                    mean.numel(),
                    count,
                )
                if progress is not None:
                    progress(done, len(order))
        finished = True
    finally:
        _DEVICE[0] = None
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
        if not finished:
            with torch.no_grad():
                for layer, (mean, var) in saved.items():
                    layer.running_mean.copy_(mean)  # type: ignore[union-attr]
                    layer.running_var.copy_(var)  # type: ignore[union-attr]


def _forward_order(
    model: nn.Module,
    layers: list[nn.Module],
    batches: Iterable[Tensor | Sequence[Any]],
    handles: list[torch.utils.hooks.RemovableHandle],
) -> list[nn.Module]:
    # One forward on the first batch, recording the order in which the BN layers are called.
    calls: list[nn.Module] = []
    own = [m.register_forward_pre_hook(lambda m, _args: calls.append(m)) for m in layers]
    handles.extend(own)
    first = next(iter(batches), None)
    if first is None:
        raise ValueError("recompute_statistics expected at least one batch, got none")
    model(_batch_input(first))
    for handle in own:
        handle.remove()
    order: list[nn.Module] = []
    for layer in calls:
        if layer in order:
            raise ValueError(
                f"recompute_statistics expected each BN layer to run once per forward, but a "
                f"{type(layer).__name__}({layer.num_features}) ran more than once"  # type: ignore[attr-defined]
            )
        order.append(layer)
    unused = len(layers) - len(order)
    if unused:
        logger.warning(
            "recompute_statistics: %d BN layer(s) did not run in the forward pass; left as is",
            unused,
        )
    return order


def _layer_input_moments(
    model: nn.Module,
    layer: nn.Module,
    batches: Iterable[Tensor | Sequence[Any]],
    handles: list[torch.utils.hooks.RemovableHandle],
) -> tuple[Tensor, Tensor, int]:
    # One pass over the data, accumulating the moments of `layer`'s input; the forward is cut
    # short once the layer has seen its input (nothing after it is needed).
    acc = _ChannelMoments()

    def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        acc.update(layer.statistics_input(x) if isinstance(layer, _FullNorm) else x)
        raise _StopForward

    handle = layer.register_forward_pre_hook(record)
    handles.append(handle)
    try:
        for batch in batches:
            try:
                model(_batch_input(batch))
            except _StopForward:
                pass
    finally:
        handle.remove()
    name = f"{type(layer).__name__}({layer.num_features})"  # type: ignore[attr-defined]
    if acc.mean is None or acc.m2 is None or acc.count < 2:
        raise ValueError(
            f"recompute_statistics expected at least 2 values per channel for {name}, "
            f"got {acc.count}"
        )
    # Unbiased for BN (torch's running_var convention); biased for FN and Online Normalization
    # (see the module docstring).
    var = acc.m2 / (acc.count if isinstance(layer, _BIASED_TYPES) else acc.count - 1)
    if not (torch.isfinite(acc.mean).all() and torch.isfinite(var).all()):
        raise ValueError(
            f"recompute_statistics expected finite inputs to {name}, got NaN or Inf statistics"
        )
    dtype = layer.running_var.dtype  # type: ignore[union-attr]
    for what, value in (("mean", acc.mean), ("variance", var)):
        if not bool(torch.isfinite(value.to(dtype)).all()):
            largest = float(value.abs().max())
            raise ValueError(
                f"recompute_statistics expected statistics of {name}'s input that fit its "
                f"{dtype} buffers (largest finite {torch.finfo(dtype).max:g}), got a {what} of "
                f"{largest:.6g}; cast the layer to float32 (running statistics left unchanged)"
            )
    return acc.mean, var, acc.count


def fold_batchnorm(model: nn.Module) -> nn.Module:
    r"""An inference copy of ``model`` with eval-mode BN layers folded into the layer before.

    Adjacency rule: a BN layer is folded when its input is the output of an ``nn.Linear``/
    ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d`` (exact classes) that feeds nothing else, both are
    called once and registered once, the producer's output channels are the BN's features, and
    the BN is in eval mode with running statistics. Producers come from a :mod:`torch.fx` trace
    of the model, whatever the module nesting (a ResNet block's ``conv1 -> bn1``, a downsample
    ``nn.Sequential``); where the model cannot be traced (logged warning), from
    ``nn.Sequential`` order: the layer directly before the BN. Folded BN classes (exact, so a
    subclass with a fused activation is never folded away): torch's ``BatchNorm1d/2d/3d`` and
    ``SyncBatchNorm`` (an initialized ``LazyBatchNorm*`` is one of these), normlab's
    ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, ``BatchRenorm1d/2d/3d`` and ``FullNorm1d/2d/3d``
    (the same eval function). With :math:`s = \gamma/\sqrt{\sigma^2_{run}+\epsilon}` per output
    channel the layer becomes

    .. math::
        W' = s\,W,\qquad b' = s\,(b - \mu_{run}) + \beta

    (a bias is created when the layer had none) and the BN is replaced by ``nn.Identity`` (in the
    BN's train/eval mode); the folding is computed in float64 and cast back. ``Linear`` ->
    ``BatchNorm1d`` assumes 2-D ``(N, features)`` activations, the usual MLP layout. Other BN
    layers (in training mode, without running statistics, after something else, after a layer
    shared or whose output is also used elsewhere, of an unknown subclass) are kept, each logged
    at INFO with the reason.
    ``model`` itself is not modified (the copy is a deepcopy); the copy keeps the model's classes
    and attributes (it is not an ``fx.GraphModule``). Rules: see docs/surgery.md.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``model`` holds an uninitialized lazy module (it cannot be copied; run one
            forward first).

    Example::

        >>> import torch, normlab.nn.batchnorm as nbn
        >>> from normlab.nn.stats import fold_batchnorm
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), nbn.BatchNorm1d(4)).eval()
        >>> folded = fold_batchnorm(model)
        >>> type(folded[1]).__name__
        'Identity'
    """
    _check_model("fold_batchnorm", model)
    lazy = [
        name or type(m).__name__
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()
    ]
    if lazy:
        raise ValueError(
            f"fold_batchnorm expected initialized modules, got uninitialized lazy module(s) "
            f"{', '.join(lazy)}: run one forward pass first"
        )
    folded = copy.deepcopy(model)
    occurrences: dict[int, int] = {}
    for _name, module in folded.named_modules(remove_duplicate=False):
        occurrences[id(module)] = occurrences.get(id(module), 0) + 1
    bns = [(name, m) for name, m in folded.named_modules() if name and isinstance(m, _BN_TYPES)]
    if not bns:
        return folded
    graph = model_neighbours(folded, "fold_batchnorm")
    count = 0
    for name, bn in bns:
        prev_name, reason = _fold_target(folded, name, bn, graph, occurrences)
        if prev_name is None:
            logger.info("fold_batchnorm: kept %s: %s", name, reason)
            continue
        _fold_into(folded.get_submodule(prev_name), bn)  # type: ignore[arg-type]
        replace_module(folded, name, nn.Identity().train(bn.training))
        count += 1
    logger.debug("fold_batchnorm: folded %d of %d BN layers", count, len(bns))
    return folded


def _foldable_bn_classes() -> tuple[type, ...]:
    # Exact classes whose eval forward is the affine BN map with running statistics.
    found: list[type] = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm]
    for module_name, names in (
        ("normlab.nn.batchnorm", ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d")),
        ("normlab.nn.renorm", ("BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d")),
        ("normlab.nn.sync_batchnorm", ("SyncBatchNorm",)),
        ("normlab.nn.fullnorm", ("FullNorm1d", "FullNorm2d", "FullNorm3d")),
    ):
        module = optional_module(module_name)
        found.extend(c for c in (getattr(module, n, None) for n in names) if isinstance(c, type))
    return tuple(found)


def _fold_target(
    model: nn.Module,
    name: str,
    bn: nn.Module,
    graph: Any,
    occurrences: dict[int, int],
) -> tuple[str | None, str]:
    # (name of the layer to fold `bn` into, ""), or (None, why it is kept).
    if type(bn) not in _foldable_bn_classes():
        return None, (
            f"{type(bn).__name__} is not a plain batch norm class (a subclass may do more in "
            "its forward)"
        )
    if bn.training:
        return None, "in training mode (batch statistics)"
    if not _is_tracking_bn(bn):
        return None, "no running statistics"
    prev_name, reason = graph.producer(name)
    if prev_name is None:
        return None, reason
    prev = model.get_submodule(prev_name)
    if type(prev) not in _FOLDABLE:
        return None, f"preceded by {type(prev).__name__}, not a plain Linear/Conv"
    out = prev.out_features if isinstance(prev, nn.Linear) else prev.out_channels
    if out != bn.num_features:  # type: ignore[attr-defined]
        return None, f"{bn.num_features} features after a layer with {out} outputs"  # type: ignore[attr-defined]
    if occurrences.get(id(prev), 0) > 1:
        return None, f"the preceding {type(prev).__name__} is shared elsewhere in the model"
    if occurrences.get(id(bn), 0) > 1:
        return None, "the BN layer is shared elsewhere in the model"
    return prev_name, ""


@torch.no_grad()
def _fold_into(layer: nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d, bn: nn.Module) -> None:
    weight = layer.weight
    dtype = weight.dtype
    mean = bn.running_mean.to(torch.float64)  # type: ignore[union-attr]
    invstd = torch.rsqrt(bn.running_var.to(torch.float64) + bn.eps)  # type: ignore[union-attr,operator]
    gamma = bn.weight.to(torch.float64) if bn.weight is not None else torch.ones_like(mean)  # type: ignore[union-attr]
    beta = bn.bias.to(torch.float64) if bn.bias is not None else torch.zeros_like(mean)  # type: ignore[union-attr]
    scale = gamma * invstd  # (C_out,)
    bias = layer.bias.to(torch.float64) if layer.bias is not None else torch.zeros_like(mean)
    new_weight = weight.to(torch.float64) * scale.reshape((-1,) + (1,) * (weight.dim() - 1))
    new_bias = (bias - mean) * scale + beta
    layer.weight = nn.Parameter(new_weight.to(dtype), requires_grad=weight.requires_grad)
    layer.bias = nn.Parameter(new_bias.to(dtype), requires_grad=weight.requires_grad)
