"""``convert``: fill every normalization slot of an existing model with a method's layer."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from normlab.methods.base import Method, get_method, resolve_method
from normlab.nn import batchnorm as nbn
from normlab.nn.convert import PRODUCERS, copy_norm_state, norm_slots, replace_module

__all__ = ["convert"]

log = logging.getLogger(__name__)

# Hyper-parameters a slot can carry to the new layer, read from the old layer's attributes
# (attribute name, option name), with torch's defaults: a non-default value that the target
# method cannot take is reported.
_CARRIED: tuple[tuple[str, str, Any], ...] = (
    ("eps", "eps", 1e-5),
    ("momentum", "momentum", 0.1),
    ("affine", "affine", True),
    ("elementwise_affine", "affine", True),
    ("track_running_stats", "track_running_stats", True),
    ("sample_norm", "sample_norm", False),
)


def _hyper_parameters(old: nn.Module) -> dict[str, tuple[Any, Any]]:
    found: dict[str, tuple[Any, Any]] = {}
    for attr, option, default in _CARRIED:
        if hasattr(old, attr) and option not in found:
            found[option] = (getattr(old, attr), default)
    # momentum=None means a cumulative average for batch norms only; layers without a momentum
    # (FullNorm, OnlineNorm) report None, which must not turn into one.
    if found.get("momentum", (0.0,))[0] is None and not isinstance(old, _CUMULATIVE_MOMENTUM):
        del found["momentum"]
    # Running statistics carried over are those of the slot's raw input, so a layer that keeps
    # them and does not standardize samples itself turns off FullNorm's sample_norm.
    if "sample_norm" not in found and getattr(old, "running_mean", None) is not None:
        found["sample_norm"] = (False, False)
    return found


_CUMULATIVE_MOMENTUM = (nn.modules.batchnorm._BatchNorm, nbn._BatchNorm)


def _reference_tensor(old: nn.Module, model: nn.Module) -> torch.Tensor | None:
    for source in (old, model):
        for t in (*source.parameters(), *source.buffers()):
            if t.is_floating_point():
                return t
    return None


@torch.no_grad()
def _ensure_bias(layer: nn.Module) -> int:
    # A zero bias on a Linear/Conv without one; 1 if one was added.
    if isinstance(layer, PRODUCERS) and layer.bias is None:
        out = layer.weight.shape[0]
        layer.bias = nn.Parameter(
            torch.zeros(out, device=layer.weight.device, dtype=layer.weight.dtype)
        )
        return 1
    return 0


def convert(
    model: nn.Module,
    method: str | Method,
    options: Mapping[str, Any] | None = None,
    *,
    example_input: Any = None,
) -> nn.Module:
    """Fill every normalization slot of ``model`` with ``method``'s layer, in place.

    Slots, their kinds and the layers feeding them are found by :func:`normlab.nn.norm_slots`
    (torch/normlab batch norms, ``SyncBatchNorm``, Batch Renorm, FullNorm, OnlineNorm, MABN,
    GroupNorm, LayerNorm, :class:`~normlab.nn.NoNorm`, and registered classes), so a model built
    with ``torch.nn.BatchNorm2d`` converts, and converts back. Like
    :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`, every new layer carries what the old
    one had and the new one supports: the hyper-parameters ``eps``, ``momentum``, ``affine``,
    ``track_running_stats`` and ``sample_norm`` (where the method takes them as options; a layer
    with running statistics and no ``sample_norm`` of its own carries ``sample_norm=False``, so
    ``fn`` keeps using the statistics of the raw input), affine parameters with
    their ``requires_grad``, running statistics and ``num_batches_tracked``, device, dtype and
    train/eval mode. A non-default hyper-parameter the method cannot take is reported with a
    ``UserWarning``. ``options`` (the method's options) override carried values.

    For methods whose ``bias`` is True (``none``, ``bnp``), the ``Linear``/``Conv`` feeding a
    slot gets a zero bias if it has none: the producer found in the :mod:`torch.fx` graph of the
    model (any nesting: a ResNet block's ``conv1 -> bn1``), or, where the model cannot be traced
    (logged warning), the layer directly before the slot in an ``nn.Sequential``. Build the
    optimizer afterwards. Rules: see docs/surgery.md.

    Every new layer is built before the first is swapped in, so a bad option, an unknown
    normalization subclass or an unresolvable slot kind leaves the model unchanged.

    Args:
        model: the model, converted in place and returned.
        method: a registered method name or a :class:`Method`.
        options: the method's options.
        example_input: optional input batch (tensor or tuple of positional arguments), run once
            in eval mode under ``torch.no_grad`` only if a slot's class accepts several input
            ranks (``SyncBatchNorm``) and its kind is needed from the input rank.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ``options`` is not a mapping.
        ValueError: unknown method (lists the valid ones) or option; an unregistered subclass of
            a normalization class (timm's ``BatchNormAct2d``; register it with
            :func:`normlab.nn.register_norm_layer`); an uninitialized ``LazyBatchNorm*``; a slot
            whose kind cannot be told; a method without a layer for a slot's kind.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expected an nn.Module, got {type(model).__name__}")
    given = get_method(method)
    m, _ = resolve_method(given, options)  # validates the options
    # An alias (fn-batch) fixes options of its main method: they count as given by the user.
    fixed = {k: v for k, v in given.defaults.items() if m.defaults.get(k) != v}
    user = {**fixed, **(options or {})}
    slots = norm_slots(model, example_input=example_input, producers=m.bias)
    plan: list[tuple[str, nn.Module]] = []
    for slot in slots:
        name, old = slot.name, slot.module
        carried: dict[str, Any] = {}
        for option, (value, default) in _hyper_parameters(old).items():
            if option in m.layer_options:
                carried[option] = value
            elif value != default and option not in user:
                warnings.warn(
                    f"convert: {name} ({type(old).__name__}) has {option}={value!r}, which "
                    f"method {m.name!r} does not take; its layer uses its own",
                    stacklevel=2,
                )
        new = m.norm_layer({**carried, **user})(slot.num_features, slot.kind)
        ref = _reference_tensor(old, model)
        if ref is not None:
            new = new.to(device=ref.device, dtype=ref.dtype)
        copy_norm_state(old, new)
        new.train(old.training)
        plan.append((name, new))
    biased = 0
    for (name, new), slot in zip(plan, slots, strict=True):
        replace_module(model, name, new)
        if m.bias and slot.producer is not None:
            biased += _ensure_bias(model.get_submodule(slot.producer))
    log.debug(
        "converted %d normalization slots to %s; %d producing layers got a zero bias",
        len(plan),
        m.name,
        biased,
    )
    return model
