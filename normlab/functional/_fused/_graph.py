"""The graph-recording backwards of the fused autograd nodes, supplied by the reference modules.

The fused nodes (the C++ nodes of ``csrc/module.cpp`` and the Triton nodes of
:mod:`~normlab.functional._fused._triton`) compute a first-order backward. When a graph of the
backward is recorded (``create_graph=True``) they call :func:`backward` ``(name)`` instead: a
function of the reference module that wrote the formulas, registered here by that module with
:func:`provide` when it is defined (:mod:`normlab.functional.batch_norm`:
``bn_train_backward`` and ``norm_eval_backward``; :mod:`normlab.functional.full_norm`:
``fn_train_backward``). Each returns ``(grad_x, grad_weight, grad_bias)`` computed in
differentiable operations (``None`` where there is nothing to return). This module imports
nothing of normlab, so the kernels never reach up into the modules that dispatch to them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["NAMES", "backward", "provide"]

#: The graph backwards the fused nodes call, by name.
NAMES = ("bn_train_backward", "norm_eval_backward", "fn_train_backward")

_backwards: dict[str, Callable[..., Any]] = {}


def provide(**functions: Callable[..., Any]) -> None:
    """Register graph backwards by name (one of :data:`NAMES`); a name given again replaces
    the earlier function (a reloaded module). ``ValueError`` on an unknown name, ``TypeError``
    on a value that is not callable; nothing is registered then."""
    unknown = sorted(set(functions) - set(NAMES))
    if unknown:
        raise ValueError(f"expected graph backward names among {NAMES}, got {unknown}")
    for name, fn in functions.items():
        if not callable(fn):
            raise TypeError(f"graph backward {name!r} must be callable, got {type(fn).__name__}")
    _backwards.update(functions)


def backward(name: str) -> Callable[..., Any]:
    """The graph backward registered under ``name``; ``RuntimeError`` when none is (the
    reference module that provides it was not imported, which importing
    :mod:`normlab.functional` always does)."""
    try:
        return _backwards[name]
    except KeyError:
        raise RuntimeError(
            f"no graph backward {name!r} is registered (provided: {sorted(_backwards)}); "
            "import normlab.functional, whose reference modules provide them"
        ) from None
