"""Normalization slots and model surgery: find the modules that normalize a fixed number of
channels in any model, their kinds, and the ``Linear``/``Conv`` that feeds each of them.

A *normalization slot* is a module of a class in the slot table: torch's ``BatchNorm1d/2d/3d``,
``SyncBatchNorm`` and ``LazyBatchNorm1d/2d/3d``; normlab's batch norms, ``SyncBatchNorm``, Batch
Renorm, FullNorm, OnlineNorm and MABN layers (those that exist); ``GroupNorm``; ``LayerNorm`` over
one dimension; normlab's :class:`NoNorm` placeholder; and any class declared with
:func:`register_norm_layer`. Slot kinds come from this class table, never from class names:
``"1d"`` for ``(N, C[, L])`` features, ``"2d"`` for ``(N, C, H, W)``, ``"3d"`` for
``(N, C, D, H, W)``. A class that accepts several input ranks (``SyncBatchNorm``, a bare
``GroupNorm``) gets its kind from the input rank, else from its neighbours in the module graph
(:func:`norm_slots`). Built-in entries match their exact class only: an unregistered subclass of
a known normalization class (timm's ``BatchNormAct2d`` fuses an activation into a
``BatchNorm2d``) is refused with a ``ValueError``, so no forward is replaced or folded away
silently.

:func:`norm_slots` traces the model with :mod:`torch.fx` to find each slot's producer, whatever
the module nesting, and falls back to ``nn.Sequential`` neighbours (with a logged warning) where
tracing fails. :func:`normlab.convert` (in :mod:`normlab.methods`) swaps what fills the slots;
:func:`normlab.nn.fold_batchnorm` folds batch norms into their producers. Rules and design
notes: see docs/surgery.md.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal, NamedTuple

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from normlab.nn._base import NormBase

__all__ = [
    "NORM_KINDS",
    "NoNorm",
    "NormKind",
    "NormSlot",
    "find_norm_slots",
    "norm_slot_info",
    "norm_slots",
    "preceding_layer",
    "register_norm_layer",
    "replace_module",
]

log = logging.getLogger(__name__)

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


SlotInfo = Callable[[nn.Module], "tuple[int, NormKind | None] | None"]


@dataclass(frozen=True)
class _Entry:
    cls: type
    info: SlotInfo
    subclasses: bool  # user registrations cover subclasses; built-in entries the exact class
    fallback: NormKind | None = None  # kind when neither the input rank nor a neighbour tells


# User registrations first (latest first), then the built-in entries.
_TABLE: list[_Entry] = []
# Instances of these (or of a table class) whose exact class has no entry are refused.
_GUARDED: list[type] = [_TorchBatchNorm, NormBase]


def register_norm_layer(cls: type, info: SlotInfo) -> None:
    """Declare ``cls`` (and its subclasses) a normalization slot.

    ``info(module)`` returns ``(num_features, kind)``, or ``None`` where a module of the class is
    not a slot (then :func:`normlab.convert` and :func:`normlab.nn.fold_batchnorm` keep it as it
    is). ``kind`` may be ``None`` for a class that accepts several input ranks; the kind then
    comes from the input rank or the neighbours (:func:`norm_slots`). Later registrations take
    precedence over earlier ones and over the built-in table, so registering a subclass of a
    known normalization class (which is otherwise refused) declares what its forward is.

    Raises:
        TypeError: ``cls`` is not a class or ``info`` is not callable.
    """
    if not isinstance(cls, type):
        raise TypeError(f"cls must be a class, got {cls!r}")
    if not callable(info):
        raise TypeError(f"info must be callable, got {type(info).__name__}")
    _TABLE.insert(0, _Entry(cls, info, subclasses=True))


def _builtin(cls: type, info: SlotInfo, fallback: NormKind | None = None) -> None:
    _TABLE.append(_Entry(cls, info, subclasses=False, fallback=fallback))
    _GUARDED.append(cls)


def _fixed(kind: NormKind) -> SlotInfo:
    return lambda m: (m.num_features, kind)


def _any_rank(m: nn.Module) -> tuple[int, NormKind | None]:
    # A class that accepts several input ranks; `normlab_kind` (set by normlab's gn/ln layers,
    # or by hand) fixes the kind.
    return m.num_features, getattr(m, "normlab_kind", None)


def _group_norm_info(m: nn.Module) -> tuple[int, NormKind | None]:
    return m.num_channels, getattr(m, "normlab_kind", None)


def _layer_norm_info(m: nn.Module) -> tuple[int, NormKind] | None:
    if len(m.normalized_shape) != 1:
        return None
    return m.normalized_shape[0], "1d"


def _lazy_info(m: nn.Module) -> tuple[int, NormKind | None]:
    # An initialized lazy batch norm has become a BatchNorm1d/2d/3d (torch's cls_to_become), so
    # a module still of a Lazy class has not run: its num_features is unknown.
    raise ValueError(
        f"{type(m).__name__} has not run yet, so its num_features is unknown; run one forward "
        "pass first (it then becomes a BatchNorm of the same kind)"
    )


def optional_module(name: str) -> ModuleType | None:
    """``importlib.import_module(name)``, or ``None`` if that module does not exist (an error
    inside an existing module still raises)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        return None


def _register_defaults() -> None:
    _builtin(nn.GroupNorm, _group_norm_info, fallback="2d")
    _builtin(nn.LayerNorm, _layer_norm_info)
    _builtin(NoNorm, lambda m: (m.num_features, m.kind))
    _builtin(nn.SyncBatchNorm, _any_rank)
    for kind in NORM_KINDS:
        _builtin(getattr(nn, f"BatchNorm{kind}"), _fixed(kind))  # type: ignore[arg-type]
        _builtin(getattr(nn, f"LazyBatchNorm{kind}"), _lazy_info)
    families = {
        "normlab.nn.batchnorm": ("BatchNorm",),
        "normlab.nn.renorm": ("BatchRenorm",),
        "normlab.nn.fullnorm": ("FullNorm",),
        "normlab.nn.online_norm": ("OnlineNorm",),
        "normlab.nn.mabn": ("MABN",),
    }
    for module_name, prefixes in families.items():
        module = optional_module(module_name)
        for prefix in prefixes:
            for kind in NORM_KINDS:
                cls = getattr(module, f"{prefix}{kind}", None)
                if isinstance(cls, type):
                    _builtin(cls, _fixed(kind))  # type: ignore[arg-type]
    sync = optional_module("normlab.nn.sync_batchnorm")
    if sync is not None and isinstance(getattr(sync, "SyncBatchNorm", None), type):
        _builtin(sync.SyncBatchNorm, _any_rank)


_register_defaults()


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _entry(module: nn.Module) -> _Entry | None:
    # The table entry deciding `module`, None for a non-slot; ValueError for an unknown subclass
    # of a normalization class.
    t = type(module)
    for e in _TABLE:
        if t is e.cls or (e.subclasses and isinstance(module, e.cls)):
            return e
    if isinstance(module, tuple(_GUARDED)):
        known = set(_GUARDED)
        base = next(b for b in t.__mro__[1:] if b in known)
        raise ValueError(
            f"{_qualname(t)} is a subclass of {_qualname(base)} that normlab does not know: its "
            "forward may do more than normalize (a fused activation, say), which replacing or "
            "folding it would drop. Declare it with normlab.nn.register_norm_layer("
            f"{t.__name__}, info): info returns (num_features, kind) to make it a normalization "
            "slot, or None to keep it as it is"
        )
    return None


def _is_norm_like(module: nn.Module) -> bool:
    # Any module the slot table knows or guards, without raising: fx leaves.
    return isinstance(module, tuple(_GUARDED)) or any(isinstance(module, e.cls) for e in _TABLE)


def norm_slot_info(module: nn.Module) -> tuple[int, NormKind | None] | None:
    """``(num_features, kind)`` if ``module`` is a normalization slot, else ``None``.

    ``kind`` is what the class fixes; ``None`` for a class that accepts several input ranks and
    has no default (``SyncBatchNorm``; a bare ``GroupNorm`` defaults to ``"2d"``):
    :func:`norm_slots` then resolves it from the input rank or the neighbours.

    Raises:
        ValueError: ``module`` is an unregistered subclass of a known normalization class (the
            message names the class and says how to register it), or an uninitialized
            ``LazyBatchNorm*``.
    """
    e = _entry(module)
    if e is None:
        return None
    info = e.info(module)
    if info is None:
        return None
    num_features, kind = info
    return num_features, (kind if kind is not None else e.fallback)


def find_norm_slots(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every normalization slot, outermost first; a slot's own
    children are not searched.

    Raises:
        ValueError: as :func:`norm_slot_info`, the message prefixed with the module's name.
    """
    found: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            qual = f"{prefix}.{name}" if prefix else name
            try:
                info = norm_slot_info(child)
            except ValueError as e:
                raise ValueError(f"{qual}: {e}") from e
            if info is not None:
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
    """The module just before the slot in its parent, if the parent is an ``nn.Sequential``
    (the neighbour rule used where :mod:`torch.fx` cannot trace the model)."""
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


# --- neighbours: the torch.fx graph, or nn.Sequential order --------------------------------

# Layers whose output can take a bias (and be folded into, exact classes only; see stats.py).
PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Shape-preserving layers looked through when a neighbour is asked for the slot kind.
_POINTWISE = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)
_MAX_HOPS = 8


def _layer_kind(module: nn.Module) -> NormKind | None:
    # The slot kind a neighbouring layer implies, if any.
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.ConvTranspose1d)):
        return "1d"
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        return "2d"
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        return "3d"
    try:
        e = _entry(module)
        info = None if e is None else e.info(module)
    except ValueError:
        return None
    return None if info is None else info[1]


def _describe(node: fx.Node) -> str:
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f"the tensor method .{node.target}()"
    if node.op == "get_attr":
        return f"the attribute {node.target}"
    return str(node.target)


class _SlotTracer(fx.Tracer):
    # Normalization layers and Linear/Conv (their subclasses too) are leaves: never traced into.
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if _is_norm_like(m) or isinstance(m, PRODUCERS):
            return True
        return super().is_leaf_module(m, module_qualified_name)


class _GraphNeighbours:
    """Producers and kind-telling neighbours read from a torch.fx graph of the model."""

    traced = True

    def __init__(self, model: nn.Module, graph: fx.Graph) -> None:
        self.model = model
        self.calls: dict[str, list[fx.Node]] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                self.calls.setdefault(str(node.target), []).append(node)

    def _module(self, node: fx.Node) -> nn.Module:
        return self.model.get_submodule(str(node.target))

    def producer(self, name: str) -> tuple[str | None, str]:
        """``(producer name, "")``, or ``(None, why there is none)``."""
        calls = self.calls.get(name, [])
        if not calls:
            return None, "not called as a module in the traced forward"
        if len(calls) > 1:
            return None, f"called {len(calls)} times in the forward"
        node = calls[0]
        inputs = node.all_input_nodes
        if len(inputs) != 1 or not node.args or node.args[0] is not inputs[0]:
            return None, f"takes {len(inputs)} inputs from the graph"
        src = inputs[0]
        if src.op == "placeholder":
            return None, "preceded by nothing (it normalizes a model input)"
        if src.op != "call_module":
            return None, f"preceded by {_describe(src)}, not Linear/Conv"
        prev = self._module(src)
        if not isinstance(prev, PRODUCERS):
            return None, f"preceded by {type(prev).__name__}, not Linear/Conv"
        uses = len(self.calls[str(src.target)])
        if uses > 1:
            return None, (
                f"the preceding {type(prev).__name__} {src.target!r} is shared (called {uses} "
                "times)"
            )
        others = [u.name for u in src.users if u is not node]
        if others:
            return None, (
                f"the output of {type(prev).__name__} {src.target!r} is also used by "
                f"{', '.join(others)}"
            )
        return str(src.target), ""

    def kinds(self, name: str) -> set[NormKind]:
        """Slot kinds implied by the nearest layers before and after each call of ``name``,
        looking through shape-preserving layers."""
        found: set[NormKind] = set()

        def walk(node: Any, backwards: bool, hops: int) -> None:
            if not isinstance(node, fx.Node) or node.op != "call_module" or hops > _MAX_HOPS:
                return
            module = self._module(node)
            kind = _layer_kind(module)
            if kind is not None:
                found.add(kind)
            elif isinstance(module, _POINTWISE):
                for nxt in node.all_input_nodes if backwards else node.users:
                    walk(nxt, backwards, hops + 1)

        for node in self.calls.get(name, []):
            for src in node.all_input_nodes:
                walk(src, True, 0)
            for user in node.users:
                walk(user, False, 0)
        return found


class _SequentialNeighbours:
    """Producers and neighbours by ``nn.Sequential`` order (where tracing failed)."""

    traced = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def _siblings(self, name: str) -> tuple[str, list[str], int] | None:
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        if not isinstance(parent, nn.Sequential):
            return None
        names = list(parent._modules.keys())
        return parent_name, names, names.index(child)

    def producer(self, name: str) -> tuple[str | None, str]:
        where = self._siblings(name)
        if where is None:
            return None, "not in an nn.Sequential (and torch.fx could not trace the model)"
        parent_name, names, pos = where
        if pos == 0:
            return None, "preceded by nothing, not Linear/Conv in the same Sequential"
        prev_name = f"{parent_name}.{names[pos - 1]}" if parent_name else names[pos - 1]
        prev = self.model.get_submodule(prev_name)
        if not isinstance(prev, PRODUCERS):
            return (
                None,
                f"preceded by {type(prev).__name__}, not Linear/Conv in the same Sequential",
            )
        return prev_name, ""

    def kinds(self, name: str) -> set[NormKind]:
        where = self._siblings(name)
        if where is None:
            return set()
        parent_name, names, pos = where
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        found: set[NormKind] = set()
        for step in (-1, 1):
            i = pos + step
            while 0 <= i < len(names) and abs(i - pos) <= _MAX_HOPS:
                module = parent._modules[names[i]]
                kind = _layer_kind(module)  # type: ignore[arg-type]
                if kind is not None:
                    found.add(kind)
                    break
                if not isinstance(module, _POINTWISE):
                    break
                i += step
        return found


Neighbours = _GraphNeighbours | _SequentialNeighbours


def model_neighbours(model: nn.Module, caller: str) -> Neighbours:
    """The model's layer graph from :mod:`torch.fx` (normalization layers and Linear/Conv as
    leaves), or, where tracing fails, ``nn.Sequential`` order, with a logged warning naming
    ``caller`` and the tracing error."""
    try:
        graph = _SlotTracer().trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means: use the fallback
        first = (str(e).strip().splitlines() or [""])[0][:200]
        log.warning(
            "%s: torch.fx could not trace %s (%s: %s); falling back to nn.Sequential "
            "neighbours: only a Linear/Conv directly before a normalization layer in the same "
            "nn.Sequential counts as the layer that feeds it",
            caller,
            type(model).__name__,
            type(e).__name__,
            first,
        )
        return _SequentialNeighbours(model)
    return _GraphNeighbours(model, graph)


# --- slots with their kinds and producers ----------------------------------------------------


class NormSlot(NamedTuple):
    """A normalization slot resolved by :func:`norm_slots`.

    Attributes:
        name: qualified module name.
        module: the layer filling the slot.
        num_features: :math:`C`.
        kind: ``"1d"``, ``"2d"`` or ``"3d"``.
        producer: qualified name of the ``nn.Linear``/``nn.Conv1d/2d/3d`` (or subclass) whose
            output feeds this slot and nothing else, or ``None``.
    """

    name: str
    module: nn.Module
    num_features: int
    kind: NormKind
    producer: str | None


_RANK_KIND: dict[int, NormKind] = {2: "1d", 3: "1d", 4: "2d", 5: "3d"}


def _input_ranks(
    model: nn.Module, modules: dict[str, nn.Module], example_input: Any
) -> dict[str, set[int]]:
    # One eval forward under no_grad recording the input rank of `modules`; modes restored.
    ranks: dict[str, set[int]] = {name: set() for name in modules}
    handles = []
    for name, module in modules.items():

        def record(_m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            if args and isinstance(args[0], torch.Tensor):
                ranks[name].add(args[0].dim())

        handles.append(module.register_forward_pre_hook(record))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(example_input, tuple):
                model(*example_input)
            else:
                model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training
    return ranks


def norm_slots(
    model: nn.Module, *, example_input: Any = None, producers: bool = True
) -> list[NormSlot]:
    """Every normalization slot of ``model`` (as :func:`find_norm_slots`) with its kind and
    producer.

    Kind: the class's (:func:`norm_slot_info`); for a class that accepts several input ranks,
    the rank of its input in one eval forward of ``example_input`` (2 or 3: ``"1d"``, 4: ``"2d"``,
    5: ``"3d"``), else its nearest ``Linear``/``Conv``/fixed-kind normalization neighbours in the
    graph (``Linear``, ``Conv1d``: ``"1d"``; ``Conv2d``: ``"2d"``; ``Conv3d``: ``"3d"``; looking
    through activations and dropout), else the class default (``"2d"`` for a bare
    ``GroupNorm``).

    Producer (``producers=True``): from a :mod:`torch.fx` trace of ``model``, the single
    ``call_module`` node feeding the slot, if it is a ``Linear``/``Conv1d/2d/3d`` called once
    whose output feeds only this slot; where tracing fails (logged warning), the module just
    before the slot in its ``nn.Sequential``. Why a slot has no producer is logged at DEBUG.
    The model is traced only if producers or neighbours are needed.

    Args:
        model: the model; not modified (``example_input`` runs one forward in eval mode under
            ``torch.no_grad``; every module's train/eval mode is restored).
        example_input: optional input batch (a tensor, or a tuple of positional arguments).
        producers: whether to look for producers.

    Raises:
        ValueError: an unregistered subclass of a known normalization class, an uninitialized
            lazy batch norm (both from :func:`find_norm_slots`), a slot whose kind neither its
            class, its input rank nor its neighbours tell (or they disagree), or an input rank
            outside 2..5.
    """
    found = find_norm_slots(model)
    infos: dict[str, tuple[int, NormKind | None, NormKind | None]] = {}
    for name, module in found:
        e = _entry(module)
        assert e is not None
        info = e.info(module)
        assert info is not None
        infos[name] = (info[0], info[1], e.fallback)
    open_kinds = {name: m for name, m in found if infos[name][1] is None}
    ranks = (
        _input_ranks(model, open_kinds, example_input)
        if open_kinds and example_input is not None
        else {}
    )
    view: Neighbours | None = None

    def neighbours() -> Neighbours:
        nonlocal view
        if view is None:
            view = model_neighbours(model, "norm_slots")
        return view

    slots: list[NormSlot] = []
    for name, module in found:
        num_features, kind, fallback = infos[name]
        if kind is None:
            kind = _resolve_kind(name, module, ranks.get(name, set()), neighbours, fallback)
        producer = None
        if producers:
            producer, why = neighbours().producer(name)
            if producer is None:
                log.debug("norm_slots: %s has no producing Linear/Conv: %s", name, why)
        slots.append(NormSlot(name, module, num_features, kind, producer))
    return slots


def _resolve_kind(
    name: str,
    module: nn.Module,
    ranks: set[int],
    neighbours: Callable[[], Neighbours],
    fallback: NormKind | None,
) -> NormKind:
    cls = type(module).__name__
    if ranks:
        bad = sorted(r for r in ranks if r not in _RANK_KIND)
        kinds = {_RANK_KIND[r] for r in ranks if r in _RANK_KIND}
        if bad or len(kinds) > 1:
            raise ValueError(
                f"{name} ({cls}) expected inputs of one rank in 2..5 (one slot kind), got "
                f"input ranks {sorted(ranks)}"
            )
        return kinds.pop()
    view = neighbours()
    kinds = view.kinds(name)
    if len(kinds) == 1:
        return kinds.pop()
    if len(kinds) > 1:
        raise ValueError(
            f"{name} ({cls}): its neighbours imply different slot kinds {sorted(kinds)}; pass "
            "example_input, or set its normlab_kind attribute to '1d', '2d' or '3d'"
        )
    if fallback is not None:
        return fallback
    where = "in the traced graph" if view.traced else "in its nn.Sequential (no fx trace)"
    raise ValueError(
        f"{name} ({cls}) accepts inputs of several ranks and has no Linear/Conv neighbour "
        f"{where} telling its kind; pass example_input (one input batch), or set its "
        "normlab_kind attribute to '1d', '2d' or '3d'"
    )
