"""Normalization slots: find the modules that normalize a fixed number of channels in any model.

A *normalization slot* is a module of a known normalization class: torch's and normlab's batch
norms, Batch Renorm, FullNorm, GroupNorm, LayerNorm over one dimension, normlab's :class:`NoNorm`
placeholder, and any class declared with :func:`register_norm_layer`. Slot kinds come from this
class table, never from class names: ``"1d"`` for ``(N, C[, L])`` features, ``"2d"`` for
``(N, C, H, W)``, ``"3d"`` for ``(N, C, D, H, W)``. :func:`normlab.convert` (in
:mod:`normlab.methods`) swaps what fills the slots.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

__all__ = [
    "NORM_KINDS",
    "NoNorm",
    "NormKind",
    "find_norm_slots",
    "norm_slot_info",
    "preceding_layer",
    "register_norm_layer",
    "replace_module",
]

NormKind = Literal["1d", "2d", "3d"]
NORM_KINDS: tuple[str, ...] = ("1d", "2d", "3d")


def check_kind(kind: object) -> NormKind:
    """``kind`` if it is one of :data:`NORM_KINDS`, else ``ValueError``."""
    if kind not in NORM_KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, NORM_KINDS))}, got {kind!r}")
    return kind  # type: ignore[return-value]


class NoNorm(nn.Identity):
    """The empty normalization slot: returns its input unchanged.

    Unlike :class:`torch.nn.Identity` it remembers the slot's ``num_features`` and ``kind``, so a
    model converted to ``"none"`` can be converted back to a normalization method.
    """

    def __init__(self, num_features: int, kind: NormKind = "1d") -> None:
        super().__init__()
        self.num_features = int(num_features)
        self.kind: NormKind = check_kind(kind)

    def extra_repr(self) -> str:
        return f"{self.num_features}, kind={self.kind!r}"


SlotInfo = Callable[[nn.Module], "tuple[int, NormKind] | None"]

# Most specific first: the first class in the table that a module is an instance of decides.
_TABLE: list[tuple[type, SlotInfo]] = []


def register_norm_layer(cls: type, info: SlotInfo) -> None:
    """Declare ``cls`` (and its subclasses) a normalization slot.

    ``info(module)`` returns ``(num_features, kind)``, or ``None`` where a module of the class is
    not a slot. Later registrations take precedence over earlier ones.
    """
    if not isinstance(cls, type):
        raise TypeError(f"cls must be a class, got {cls!r}")
    if not callable(info):
        raise TypeError(f"info must be callable, got {type(info).__name__}")
    _TABLE.insert(0, (cls, info))


def _fixed(kind: NormKind) -> SlotInfo:
    return lambda m: (m.num_features, kind)


def _group_norm_info(m: nn.Module) -> tuple[int, NormKind]:
    # normlab's gn/ln layers remember the kind they were built for; a bare GroupNorm is a 2d slot.
    return m.num_channels, getattr(m, "normlab_kind", "2d")


def _layer_norm_info(m: nn.Module) -> tuple[int, NormKind] | None:
    if len(m.normalized_shape) != 1:
        return None
    return m.normalized_shape[0], "1d"


def _register_defaults() -> None:
    from normlab.nn import batchnorm as nbn
    from normlab.nn import fullnorm as nfn
    from normlab.nn import renorm as nrn

    register_norm_layer(nn.GroupNorm, _group_norm_info)
    register_norm_layer(nn.LayerNorm, _layer_norm_info)
    register_norm_layer(NoNorm, lambda m: (m.num_features, m.kind))
    table: list[tuple[object, NormKind]] = [
        (nn.BatchNorm1d, "1d"),
        (nn.BatchNorm2d, "2d"),
        (nn.BatchNorm3d, "3d"),
    ]
    for module, suffix in ((nbn, "BatchNorm"), (nrn, "BatchRenorm"), (nfn, "FullNorm")):
        for kind in NORM_KINDS:
            cls = getattr(module, f"{suffix}{kind}", None)
            if cls is not None:
                table.append((cls, kind))  # type: ignore[arg-type]
    for cls, kind in table:
        register_norm_layer(cls, _fixed(kind))  # type: ignore[arg-type]


_register_defaults()


def norm_slot_info(module: nn.Module) -> tuple[int, NormKind] | None:
    """``(num_features, kind)`` if ``module`` is a normalization slot, else ``None``."""
    for cls, info in _TABLE:
        if isinstance(module, cls):
            return info(module)
    return None


def find_norm_slots(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every normalization slot, outermost first; a slot's own
    children are not searched."""
    found: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            qual = f"{prefix}.{name}" if prefix else name
            if norm_slot_info(child) is not None:
                found.append((qual, child))
            else:
                visit(qual, child)

    visit("", model)
    return found


def replace_module(model: nn.Module, qualified_name: str, new: nn.Module) -> None:
    """Set the submodule at ``qualified_name`` (dotted path) to ``new``."""
    parent_name, _, child = qualified_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def preceding_layer(model: nn.Module, qualified_name: str) -> nn.Module | None:
    """The module just before the slot in its parent, if the parent is an ``nn.Sequential``."""
    parent_name, _, child = qualified_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential):
        return None
    names = list(parent._modules.keys())
    pos = names.index(child)
    return parent._modules[names[pos - 1]] if pos > 0 else None


@torch.no_grad()
def copy_norm_state(old: nn.Module, new: nn.Module) -> None:
    """Carry affine parameters (values and ``requires_grad``) and running statistics across a
    conversion, where both layers have them with the same shape."""
    for attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        a, b = getattr(old, attr, None), getattr(new, attr, None)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape:
            b.copy_(a)
            if isinstance(b, nn.Parameter):
                b.requires_grad_(a.requires_grad)
