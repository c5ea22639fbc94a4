"""The :class:`Method` type: one complete description of a normalization method.

A method fills every normalization slot of a model (its layer factory, per slot kind ``"1d"``,
``"2d"``, ``"3d"``), says whether the Linear/Conv feeding a slot keeps its bias, may attach a
training hook (BNP's preconditioner), takes **one options mapping** that reaches both the layers
and the hook, and carries its experiment defaults (learning rate, learning-rate grid, optimizer)
so that experiments can tune every method fairly without knowing its name.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn

from normlab.nn.convert import NormKind, check_kind
from normlab.registry import Registry

__all__ = [
    "METHODS",
    "Method",
    "TrainingHook",
    "get_method",
    "list_methods",
    "register_method",
    "resolve_method",
]


class TrainingHook(Protocol):
    """What a method attaches to a training run (BNP's preconditioner is one)."""

    def before_step(self) -> None:
        """Called after ``loss.backward()`` and before ``optimizer.step()``."""

    def paused(self) -> contextlib.AbstractContextManager[Any]:
        """Context in which forwards (evaluation, diagnostics) are not recorded."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> Any: ...

    def remove(self) -> None: ...


LayerFactory = Callable[..., nn.Module]
HookFactory = Callable[..., TrainingHook]


@dataclass(frozen=True)
class Method:
    """A normalization method.

    Attributes:
        name: registry name (``"bn"``, ``"fn"``, ...).
        description: one line for ``normlab list``.
        make_layer: ``(num_features, kind, **layer_options) -> nn.Module`` filling one slot.
        bias: whether the Linear/Conv feeding a slot keeps its bias (off before a normalization
            that re-centres, on otherwise).
        make_hook: ``(model, **hook_options) -> TrainingHook``, or ``None``.
        batch_dependent: True if the training forward couples the samples of a batch.
        min_batch_size: the smallest training batch the method can normalize (2 for batch
            norms, which need two values per channel; 1 for everything else).
        layer_options: the options the layer factory takes, with their defaults.
        hook_options: the options the training hook takes, with their defaults.
        lr: default learning rate (plain SGD, batch size 64).
        lr_grid: learning rates an experiment searches for this method (its own grid).
        optimizer: default optimizer name (``"sgd"``, ``"momentum"``, ``"adam"``).
        alias_of: for an alias (``fn-batch`` is ``fn`` with ``estimator="batch"``), the method it
            fixes options of; experiments use the main method with options, not aliases.
    """

    name: str
    description: str
    make_layer: LayerFactory
    bias: bool = False
    make_hook: HookFactory | None = None
    batch_dependent: bool = True
    min_batch_size: int = 1
    layer_options: Mapping[str, Any] = field(default_factory=dict)
    hook_options: Mapping[str, Any] = field(default_factory=dict)
    lr: float = 0.1
    lr_grid: tuple[float, ...] = (0.03, 0.1, 0.3)
    optimizer: str = "sgd"
    alias_of: str | None = None

    def __post_init__(self) -> None:
        both = set(self.layer_options) & set(self.hook_options)
        if both:
            raise ValueError(
                f"method {self.name!r}: options {sorted(both)} are both layer and hook"
            )

    @property
    def defaults(self) -> dict[str, Any]:
        """Every option with its default value."""
        return {**self.layer_options, **self.hook_options}

    def resolve_options(self, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The defaults updated with ``options``.

        Raises:
            TypeError: ``options`` is not a mapping.
            ValueError: an option the method does not take (the message lists the valid ones).
        """
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise TypeError(
                f"method options must be a mapping, got {type(options).__name__}: {options!r}"
            )
        valid = self.defaults
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"method {self.name!r} got unknown option(s) {', '.join(map(str, unknown))}; "
                f"valid: {', '.join(valid) or 'none'}"
            )
        return {**valid, **options}

    def norm_layer(self, options: Mapping[str, Any] | None = None) -> Callable[..., nn.Module]:
        """``(num_features, kind) -> nn.Module``: this method's layer built with ``options``
        (only the layer's share of them). Bad options raise here, not at the first slot."""
        resolved = self.resolve_options(options)
        layer_opts = {k: resolved[k] for k in self.layer_options}

        def make(num_features: int, kind: NormKind = "1d") -> nn.Module:
            return self.make_layer(num_features, check_kind(kind), **layer_opts)

        make(1, "1d")  # validate the options now
        return make

    def training_hook(
        self, model: nn.Module, options: Mapping[str, Any] | None = None
    ) -> TrainingHook | None:
        """The hook attached to ``model`` with ``options`` (its share), or ``None``."""
        resolved = self.resolve_options(options)
        if self.make_hook is None:
            return None
        return self.make_hook(model, **{k: resolved[k] for k in self.hook_options})

    def alias(self, name: str, description: str, **options: Any) -> Method:
        """A method named ``name`` equal to this one with ``options`` as its defaults."""
        resolved = self.resolve_options(options)
        return dataclasses.replace(
            self,
            name=name,
            description=description,
            layer_options={k: resolved[k] for k in self.layer_options},
            hook_options={k: resolved[k] for k in self.hook_options},
            alias_of=self.name,
        )


METHODS: Registry[Method] = Registry("method")


def register_method(method: Method, *, overwrite: bool = False) -> Method:
    """Add ``method`` to :data:`METHODS`; a taken name raises ``ValueError`` unless
    ``overwrite``."""
    if not isinstance(method, Method):
        raise TypeError(f"register_method expected a Method, got {type(method).__name__}")
    return METHODS.register(method.name, method, overwrite=overwrite)


def list_methods(*, aliases: bool = True, variants: bool | None = None) -> list[str]:
    """Registered method names in registration order; ``aliases=False``: main methods only
    (``variants`` is the former name of ``aliases``)."""
    if variants is not None:
        aliases = variants
    return [name for name, m in METHODS.items() if aliases or m.alias_of is None]


def get_method(name: str | Method) -> Method:
    """The method registered as ``name`` (a :class:`Method` passes through).

    Raises:
        TypeError: ``name`` is neither a str nor a Method.
        ValueError: unknown name (lists the valid ones and the nearest match).
    """
    if isinstance(name, Method):
        return name
    if not isinstance(name, str):
        raise TypeError(f"method must be a name (str) or Method, got {type(name).__name__}")
    return METHODS[name]


def resolve_method(
    name: str | Method, options: Mapping[str, Any] | None = None
) -> tuple[Method, dict[str, Any]]:
    """``(method, resolved options)``; an alias resolves to its main method with the alias's
    options, so ``("fn-batch", {})`` and ``("fn", {"estimator": "batch"})`` are the same."""
    method = get_method(name)
    resolved = method.resolve_options(options)
    if method.alias_of is not None:
        method = get_method(method.alias_of)
        resolved = method.resolve_options(resolved)
    return method, resolved
