"""Full Normalization: ``fn`` (FullNorm layers) and one alias per gradient estimator
(``fn-batch``, ...; experiments use ``fn`` with ``estimator=...`` instead).

FN re-centres with its estimate of the mean, so the Linear/Conv feeding a slot has no bias. Its
training forward couples the samples of a batch through the estimate update
(``batch_dependent=True``), but the objective it minimizes and its inference do not depend on how
batches were built. See docs/algorithms/fn.md. Option ``sync=True`` shares the estimates over
the ranks of a distributed run (:mod:`normlab.methods.sync`). Unlike the bare layer, the method
sets ``alpha_reference=64`` (:data:`FN_ALPHA_REFERENCE`): ``alpha`` is the step at batch size 64
and smaller batches take smaller steps, so the estimates average over as many samples; and
``sample_norm=True`` (:data:`FN_SAMPLE_NORM`): each slot standardizes every sample over
``(C, *)`` before normalizing with the estimates, which removes a per-sample scale of the input
(``sample_norm=False`` is the FN of Lian & Liu 2019, which the ``fn-*`` experiments use).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from normlab.functional.full_norm import ESTIMATORS
from normlab.methods._layers import by_kind, keyword_defaults
from normlab.methods.base import Method
from normlab.methods.sync import sync_group
from normlab.nn import fullnorm as nfn
from normlab.nn.convert import NormKind

FN_OPTIONS = (
    "eps",
    "affine",
    "alpha",
    "alpha_decay",
    "alpha_reference",
    "debias",
    "estimator",
    "outer_momentum",
    "sample_norm",
)

#: The method's default ``alpha_reference``: ``alpha`` is the step at batch size 64 (the
#: experiments' reference batch), and other batch sizes average the estimates over as many samples
#: (at b=1 the layer's per-batch ``alpha = 0.1`` averages over ~10 samples; see
#: docs/algorithms/fn.md, "Batch size 1 under per-sample input scaling"). ``None``: per batch.
FN_ALPHA_REFERENCE = 64

#: The method's default ``sample_norm``: each slot standardizes every sample over ``(C, *)``
#: before FN normalizes it with the estimates (the bare layer's default is ``False``, the
#: paper's FN). Chosen by the method table's measurements: docs/algorithms/fn.md, "Per-sample
#: standardization before the estimates".
FN_SAMPLE_NORM = True

_full_norm = by_kind("fn", {k: getattr(nfn, f"FullNorm{k}", None) for k in ("1d", "2d", "3d")})


def _fn_layer(
    num_features: int, kind: NormKind, *, sync: bool = False, **options: Any
) -> nn.Module:
    # sync=True: the estimates are shared by the ranks of the default group (docs/distributed.md)
    return _full_norm(num_features, kind, process_group=sync_group(sync), **options)


FN = Method(
    "fn",
    "Full Normalization (MCSGD; the layer's default estimator)",
    _fn_layer,
    layer_options={
        **keyword_defaults(nfn.FullNorm2d.__init__, FN_OPTIONS),
        "alpha_reference": FN_ALPHA_REFERENCE,
        "sample_norm": FN_SAMPLE_NORM,
        "sync": False,
    },
)

FN_ALIASES = tuple(
    FN.alias(f"fn-{e}", f"Full Normalization, estimator {e!r}", estimator=e) for e in ESTIMATORS
)
