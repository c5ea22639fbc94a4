"""The method registry: one name per normalization method, usable everywhere.

A method fills every normalization slot of a model (``norm_layer``), says whether the layer
before a slot keeps its bias, and may wrap the optimizer step (``training_hook``; BNP does).
``normlab.convert(model, name)`` swaps the slots of an existing model, e.g. one built with
``torch.nn.BatchNorm2d``, to another method and back.

Registered here: ``none``, ``bn`` (normlab reference BN), ``torch-bn``, ``gn``, ``ln``, ``brn``.
``fn`` and ``bnp`` register themselves from their own modules (imported by ``normlab``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d
from normlab.nn.convert import (
    NoNorm,
    NormKind,
    copy_norm_state,
    find_norm_slots,
    norm_slot_info,
    preceding_layer,
    replace_module,
)
from normlab.nn.renorm import BatchRenorm1d, BatchRenorm2d

__all__ = [
    "METHODS",
    "Method",
    "TrainingHook",
    "convert",
    "get_method",
    "list_methods",
    "register_method",
]

log = logging.getLogger(__name__)


class TrainingHook(Protocol):
    """What a method attaches to a training run (BNP's preconditioner is one)."""

    def before_step(self) -> None:
        """Called after ``loss.backward()`` and before ``optimizer.step()``."""

    def paused(self) -> contextlib.AbstractContextManager[Any]:
        """Context in which forwards (evaluation, diagnostics) are not recorded."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    def remove(self) -> None: ...


@dataclass(frozen=True)
class Method:
    """A normalization method.

    Attributes:
        name: registry name (``"bn"``, ``"gn"``, ...).
        description: one line for ``normlab list``.
        norm_layer: ``(num_features, kind) -> nn.Module`` filling one slot; ``kind`` is ``"1d"``
            for ``(N, C[, L])`` features and ``"2d"`` for ``(N, C, H, W)``.
        bias: whether the Linear/Conv feeding a slot keeps its bias (off before a normalization
            that re-centres, on otherwise).
        training_hook: ``(model, options) -> TrainingHook`` or ``None``.
        batch_dependent: True if the training forward couples the samples of a batch.
        variant_of: for a variant of another method (e.g. ``fn-batch``, FN with one fixed
            estimator), that method's name; ``compare`` runs only methods that are not variants.
    """

    name: str
    description: str
    norm_layer: Callable[[int, NormKind], nn.Module]
    bias: bool = False
    training_hook: Callable[[nn.Module, Mapping[str, Any]], TrainingHook] | None = None
    batch_dependent: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)
    variant_of: str | None = None


METHODS: dict[str, Method] = {}


def register_method(method: Method, *, overwrite: bool = False) -> Method:
    """Add ``method`` to the registry; a taken name raises ``ValueError`` unless ``overwrite``."""
    if method.name in METHODS and not overwrite:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def list_methods(*, variants: bool = True) -> list[str]:
    """Registered method names, in registration order (``variants=False``: main methods only)."""
    return [name for name, m in METHODS.items() if variants or m.variant_of is None]


def get_method(name: str | Method) -> Method:
    """The method registered as ``name`` (a :class:`Method` passes through)."""
    if isinstance(name, Method):
        return name
    if not isinstance(name, str):
        raise TypeError(f"method must be a name (str) or Method, got {type(name).__name__}")
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; valid methods: {', '.join(list_methods())}"
        ) from None


def group_count(num_channels: int, kind: NormKind = "2d", max_groups: int = 32) -> int:
    """GroupNorm's group count: the largest divisor of ``num_channels`` not above ``max_groups``;
    for ``"1d"`` features (one value per channel and sample) also keeping at least 16 channels
    per group, so each group's statistics are taken over 16 or more values (our choice)."""
    limit = min(max_groups, num_channels if kind == "2d" else max(1, num_channels // 16))
    return max(g for g in range(1, limit + 1) if num_channels % g == 0)


def _group_norm(num_features: int, kind: NormKind) -> nn.Module:
    layer = nn.GroupNorm(group_count(num_features, kind), num_features)
    layer.normlab_kind = kind  # lets convert() map it back to a 1d or 2d batch norm
    return layer


def _layer_norm(num_features: int, kind: NormKind) -> nn.Module:
    if kind == "1d":
        return nn.LayerNorm(num_features)
    layer = nn.GroupNorm(1, num_features)  # LayerNorm over (C, H, W)
    layer.normlab_kind = kind
    return layer


def _bn(kind_1d: type[nn.Module], kind_2d: type[nn.Module], **kwargs: Any):
    def make(num_features: int, kind: NormKind) -> nn.Module:
        return (kind_1d if kind == "1d" else kind_2d)(num_features, **kwargs)

    return make


# Batch Renorm's paper schedule (BN for 5k steps, full relaxation at 25k/40k steps, running
# statistics with momentum 0.01) never leaves the BN phase in CPU-scale runs of a few hundred
# steps. normlab's registered "brn" compresses it (our choice): BN for 100 steps, d_max = 5 at
# 500, r_max = 3 at 1000, and momentum 0.1 so the running statistics the corrections pull towards
# keep up within such short runs (with 0.01 they still lag after a few hundred steps).
BRN_CPU_SCHEDULE = {"warmup_steps": 100, "d_max_steps": 500, "r_max_steps": 1000}

register_method(
    Method(
        "none",
        "no normalization (biases on)",
        lambda c, k: NoNorm(c, k),
        True,
        batch_dependent=False,
    )
)
register_method(Method("bn", "normlab reference BatchNorm", _bn(BatchNorm1d, BatchNorm2d)))
register_method(Method("torch-bn", "torch.nn.BatchNorm1d/2d", _bn(nn.BatchNorm1d, nn.BatchNorm2d)))
register_method(
    Method(
        "gn",
        "GroupNorm (<= 32 groups; >= 16 channels per group for features)",
        _group_norm,
        batch_dependent=False,
    )
)
register_method(
    Method(
        "ln",
        "LayerNorm (GroupNorm with one group for conv features)",
        _layer_norm,
        batch_dependent=False,
    )
)
register_method(
    Method(
        "brn",
        "Batch Renormalization (compressed r_max/d_max ramp)",
        _bn(BatchRenorm1d, BatchRenorm2d, momentum=0.1, **BRN_CPU_SCHEDULE),
    )
)


@torch.no_grad()
def _ensure_bias(layer: nn.Module) -> None:
    if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and layer.bias is None:
        out = layer.weight.shape[0]
        layer.bias = nn.Parameter(
            torch.zeros(out, device=layer.weight.device, dtype=layer.weight.dtype)
        )


def convert(model: nn.Module, method: str | Method) -> nn.Module:
    """Fill every normalization slot of ``model`` with ``method``'s layer, in place.

    Slots are found by :func:`normlab.nn.convert.find_norm_slots` (torch/normlab batch norms,
    Batch Renorm, GroupNorm, LayerNorm, FullNorm, :class:`~normlab.nn.convert.NoNorm`), so a
    model built with ``torch.nn.BatchNorm2d`` converts, and converts back. Affine parameters and
    running statistics are carried over where both layers have them; new layers are on the old
    layer's device and dtype and in its train/eval mode. For methods whose ``bias`` is True
    (``none``, ``bnp``), a bias-free Linear/Conv directly before a slot in an ``nn.Sequential``
    gets a zero bias. Like :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`, the model is
    modified in place and returned; build the optimizer afterwards.

    Raises:
        ValueError: unknown method name (the message lists the valid ones).
    """
    m = get_method(method)
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expected an nn.Module, got {type(model).__name__}")
    slots = find_norm_slots(model)
    for name, old in slots:
        info = norm_slot_info(old)
        assert info is not None  # find_norm_slots only returns slots
        num_features, kind = info
        new = m.norm_layer(num_features, kind)
        ref = next(iter(old.parameters()), None)
        if ref is None:
            ref = next((b for b in old.buffers() if b.is_floating_point()), None)
        if ref is not None:
            new = new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        copy_norm_state(old, new)
        new.train(old.training)
        replace_module(model, name, new)
        if m.bias:
            prev = preceding_layer(model, name)
            if prev is not None:
                _ensure_bias(prev)
    log.debug("converted %d normalization slots to %s", len(slots), m.name)
    return model


from normlab.nn import fn_method  # noqa: E402, F401  (registers "fn")
