"""Helpers shared by the method families: per-kind layer tables and constructor defaults."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from normlab.nn.convert import NormKind


def by_kind(name: str, classes: Mapping[str, type[nn.Module] | None]) -> Callable[..., nn.Module]:
    """A layer factory ``(num_features, kind, **options)`` choosing the class by slot kind."""

    def make(num_features: int, kind: NormKind, **options: Any) -> nn.Module:
        cls = classes.get(kind)
        if cls is None:
            have = ", ".join(k for k, c in classes.items() if c is not None)
            raise ValueError(f"method {name!r} has no layer for {kind!r} slots (it has: {have})")
        return cls(num_features, **options)

    return make


def keyword_defaults(fn: Callable[..., Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The default values of ``fn``'s parameters ``names`` (read, not copied)."""
    params = inspect.signature(fn).parameters
    return {n: params[n].default for n in names}
