"""Batch Normalization Preconditioning as a method: ``bnp``.

A model built for ``bnp`` has no normalization layer (every slot is a
:class:`~normlab.nn.convert.NoNorm`) and keeps the biases of the layers feeding the slots, which
absorb BNP's centring. The training hook is a :class:`~normlab.optim.BNPreconditioner` with the
method's options (``rho``, ``eps``, ``floor``, ``conv_stats``, ``use_current_batch``,
``modules``); see docs/algorithms/bnp.md.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from normlab.methods._layers import keyword_defaults
from normlab.methods.base import Method
from normlab.nn.convert import NoNorm, NormKind
from normlab.optim.preconditioner import BNPreconditioner

BNP_OPTIONS = ("rho", "eps", "floor", "conv_stats", "use_current_batch", "modules")


def _no_norm(num_features: int, kind: NormKind) -> nn.Module:
    return NoNorm(num_features, kind)


def bnp_training_hook(model: nn.Module, **options: Any) -> BNPreconditioner:
    """The ``bnp`` method's training hook: ``BNPreconditioner(model, **options)``."""
    return BNPreconditioner(model, **options)


BNP = Method(
    "bnp",
    "BN preconditioning: no BN layer, gradients conditioned by layer-input statistics",
    _no_norm,
    bias=True,
    make_hook=bnp_training_hook,
    batch_dependent=False,
    hook_options=keyword_defaults(BNPreconditioner.__init__, BNP_OPTIONS),
)
