"""Model surgery: find normalization slots in any model and swap what fills them.

A *normalization slot* is a module that normalizes a fixed number of channels: torch's and
normlab's batch norms, Batch Renorm, GroupNorm, LayerNorm over one dimension, normlab's
:class:`NoNorm` placeholder, and any layer type registered with :func:`register_norm_layer`
(FullNorm registers itself). :func:`normlab.convert` uses these helpers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

__all__ = [
    "NoNorm",
    "NormKind",
    "find_norm_slots",
    "norm_slot_info",
    "register_norm_layer",
    "replace_module",
]

NormKind = Literal["1d", "2d"]


class NoNorm(nn.Identity):
    """The empty normalization slot: returns its input unchanged.

    Unlike :class:`torch.nn.Identity` it remembers the slot's ``num_features`` and ``kind``
    (``"1d"`` for ``(N, C[, L])`` features, ``"2d"`` for ``(N, C, H, W)``), so a model converted
    to ``"none"`` can be converted back to a normalization method.
    """

    def __init__(self, num_features: int, kind: NormKind = "1d") -> None:
        super().__init__()
        if kind not in ("1d", "2d"):
            raise ValueError(f"kind must be '1d' or '2d', got {kind!r}")
        self.num_features = int(num_features)
        self.kind: NormKind = kind

    def extra_repr(self) -> str:
        return f"{self.num_features}, kind={self.kind!r}"


_INFO: list[tuple[type, Callable[[nn.Module], tuple[int, NormKind]]]] = []


def register_norm_layer(cls: type, info: Callable[[nn.Module], tuple[int, NormKind]]) -> None:
    """Declare ``cls`` a normalization slot; ``info(module)`` returns ``(num_features, kind)``."""
    _INFO.insert(0, (cls, info))


def _bn_info(m: nn.Module) -> tuple[int, NormKind]:
    name = type(m).__name__
    return m.num_features, ("2d" if name.endswith("2d") else "1d")  # type: ignore[return-value]


def _group_norm_info(m: nn.Module) -> tuple[int, NormKind]:
    return m.num_channels, getattr(m, "normlab_kind", "2d")  # type: ignore[return-value]


def _layer_norm_info(m: nn.Module) -> tuple[int, NormKind]:
    return m.normalized_shape[0], "1d"  # type: ignore[index,return-value]


register_norm_layer(nn.modules.batchnorm._BatchNorm, _bn_info)
register_norm_layer(nn.GroupNorm, _group_norm_info)
register_norm_layer(NoNorm, lambda m: (m.num_features, m.kind))  # type: ignore[attr-defined]


def norm_slot_info(module: nn.Module) -> tuple[int, NormKind] | None:
    """``(num_features, kind)`` if ``module`` is a normalization slot, else ``None``."""
    from normlab.nn.batchnorm import _BatchNorm

    if isinstance(module, _BatchNorm):
        return _bn_info(module)
    if isinstance(module, nn.LayerNorm):
        return _layer_norm_info(module) if len(module.normalized_shape) == 1 else None
    for cls, info in _INFO:
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
    """Carry the affine parameters and running statistics across a conversion, where both
    layers have them with the same shape."""
    for attr in ("weight", "bias", "running_mean", "running_var"):
        a, b = getattr(old, attr, None), getattr(new, attr, None)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape:
            b.copy_(a)
