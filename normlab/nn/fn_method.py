r"""Full Normalization as a normlab method: ``fn`` and one ``fn-<estimator>`` per estimator.

Importing this module (``normlab.methods`` does, at its end) registers

* ``fn``: :class:`~normlab.nn.fullnorm.FullNorm1d` / :class:`~normlab.nn.fullnorm.FullNorm2d`
  with the layer's own defaults, so ``fn`` follows whatever default estimator and step size the
  layer documents;
* ``fn-adaptive``, ``fn-batch``, ``fn-running``, ``fn-autograd``, ``fn-none``: the same layers
  with the outer-factor estimator fixed (see :mod:`normlab.nn.fullnorm` for what each means).
  They exist so that experiments and ``normlab compare`` can put estimators side by side through
  the method name alone (a :class:`~normlab.train.TrainConfig` names its method by string);

and declares both layer types normalization slots for :func:`normlab.convert`
(``(num_features, "1d")`` / ``(num_features, "2d")``).

FN re-centres with its estimate of the mean, so the Linear/Conv feeding a slot has no bias
(``bias=False``, as for BatchNorm). FN has no training hook. Its training forward couples the
samples of a batch through the estimate update (``batch_dependent=True``), but the objective it
minimizes, and its inference, do not depend on how batches were built.

Converting from a BatchNorm carries ``weight``, ``bias``, ``running_mean`` and ``running_var``
over (:func:`normlab.nn.convert.copy_norm_state`); BatchNorm's ``running_var`` is the unbiased
estimate and FN's is the biased one, and the FN schedule restarts at step 0 (with ``debias``
its first training step replaces the copied estimates by the batch's statistics).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from normlab.functional.full_norm import ESTIMATORS
from normlab.methods import Method, register_method
from normlab.nn.convert import NormKind, register_norm_layer
from normlab.nn.fullnorm import FullNorm1d, FullNorm2d

__all__ = ["FN_METHOD_NAMES", "fn_method", "full_norm_layer"]


def full_norm_layer(**layer_options: Any) -> Callable[[int, NormKind], nn.Module]:
    """A ``norm_layer`` for :class:`~normlab.methods.Method`: ``(num_features, kind)`` ->
    ``FullNorm1d`` (``kind="1d"``) or ``FullNorm2d`` (``"2d"``) built with ``layer_options``
    (``eps``, ``alpha``, ``alpha_decay``, ``debias``, ``estimator``, ``outer_momentum``)."""

    def make(num_features: int, kind: NormKind) -> nn.Module:
        if kind not in ("1d", "2d"):
            raise ValueError(f"kind must be '1d' or '2d', got {kind!r}")
        cls = FullNorm1d if kind == "1d" else FullNorm2d
        return cls(num_features, **layer_options)

    return make


def fn_method(
    name: str, description: str, *, variant_of: str | None = None, **layer_options: Any
) -> Method:
    """An (unregistered) FN :class:`~normlab.methods.Method` whose layers get ``layer_options``.

    Example: ``register_method(fn_method("fn-slow", "FN, alpha 0.01", alpha=0.01))``.
    """
    # Fail here, not at the first model build, on a bad option.
    full_norm_layer(**layer_options)(1, "1d")
    return Method(
        name,
        description,
        full_norm_layer(**layer_options),
        bias=False,
        batch_dependent=True,
        options=dict(layer_options),
        variant_of=variant_of,
    )


def _fn_info_1d(m: nn.Module) -> tuple[int, NormKind]:
    return m.num_features, "1d"  # type: ignore[return-value]


def _fn_info_2d(m: nn.Module) -> tuple[int, NormKind]:
    return m.num_features, "2d"  # type: ignore[return-value]


register_norm_layer(FullNorm1d, _fn_info_1d)
register_norm_layer(FullNorm2d, _fn_info_2d)

register_method(
    fn_method("fn", "Full Normalization (MCSGD; the layer's default estimator)"), overwrite=True
)
for _estimator in ESTIMATORS:
    register_method(
        fn_method(
            f"fn-{_estimator}",
            f"Full Normalization, estimator {_estimator!r}",
            variant_of="fn",
            estimator=_estimator,
        ),
        overwrite=True,
    )

#: Every method name this module registers.
FN_METHOD_NAMES: tuple[str, ...] = ("fn", *(f"fn-{e}" for e in ESTIMATORS))
