"""One registry type for every named thing normlab looks up: datasets, scenarios, models,
methods and experiments.

A :class:`Registry` maps names to objects in registration order. Registering a taken name raises
``ValueError`` unless ``overwrite=True``; looking up an unknown name raises ``ValueError`` that
lists the valid names and the nearest match. Nothing registers itself as a side effect of
importing another registry's module.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar, overload

__all__ = ["Registry", "nearest"]

T = TypeVar("T")


def nearest(name: str, valid: list[str]) -> str | None:
    """The entry of ``valid`` closest to ``name`` (``difflib`` ratio >= 0.5), or ``None``."""
    matches = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.5)
    return matches[0] if matches else None


class Registry(Generic[T]):
    """Names to objects, in registration order.

    Args:
        kind: what the registry holds, singular (``"method"``); used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    @overload
    def register(self, name: str, obj: T, *, overwrite: bool = False) -> T: ...

    @overload
    def register(
        self, name: str, obj: None = None, *, overwrite: bool = False
    ) -> Callable[[T], T]: ...

    def register(
        self, name: str, obj: T | None = None, *, overwrite: bool = False
    ) -> T | Callable[[T], T]:
        """Add ``obj`` under ``name`` and return it; without ``obj``, a decorator.

        Raises:
            TypeError: ``name`` is not a str.
            ValueError: ``name`` is empty, or taken and ``overwrite`` is False.
        """
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a str, got {type(name).__name__}")
        if not name:
            raise ValueError(f"{self.kind} name must be a non-empty str")
        if obj is None:
            return lambda o: self.register(name, o, overwrite=overwrite)
        if name in self._items and not overwrite:
            raise ValueError(
                f"{self.kind} {name!r} is already registered; pass overwrite=True to replace it"
            )
        self._items[name] = obj
        return obj

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return what it held (``ValueError`` if unknown)."""
        obj = self[name]
        del self._items[name]
        return obj

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            pass
        valid = self.names()
        hint = nearest(name, valid) if isinstance(name, str) else None
        raise ValueError(
            f"unknown {self.kind} {name!r}"
            + (f" (did you mean {hint!r}?)" if hint else "")
            + f"; valid {self.kind}s: {', '.join(valid)}"
        )

    get = __getitem__

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._items)

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())

    def values(self) -> list[T]:
        return list(self._items.values())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
