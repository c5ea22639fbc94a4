"""Full Normalization: ``fn`` (FullNorm layers) and one alias per gradient estimator
(``fn-batch``, ...; experiments use ``fn`` with ``estimator=...`` instead).

FN re-centres with its estimate of the mean, so the Linear/Conv feeding a slot has no bias. Its
training forward couples the samples of a batch through the estimate update
(``batch_dependent=True``), but the objective it minimizes and its inference do not depend on how
batches were built. See docs/algorithms/fn.md.
"""

from __future__ import annotations

from normlab.functional.full_norm import ESTIMATORS
from normlab.methods._layers import by_kind, keyword_defaults
from normlab.methods.base import Method
from normlab.nn import fullnorm as nfn

FN_OPTIONS = ("eps", "affine", "alpha", "alpha_decay", "debias", "estimator", "outer_momentum")

FN = Method(
    "fn",
    "Full Normalization (MCSGD; the layer's default estimator)",
    by_kind("fn", {k: getattr(nfn, f"FullNorm{k}", None) for k in ("1d", "2d", "3d")}),
    layer_options=keyword_defaults(nfn.FullNorm2d.__init__, FN_OPTIONS),
)

FN_ALIASES = tuple(
    FN.alias(f"fn-{e}", f"Full Normalization, estimator {e!r}", estimator=e) for e in ESTIMATORS
)
