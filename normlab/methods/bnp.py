"""Batch Normalization Preconditioning as a method: ``bnp``.

A model built for ``bnp`` has no normalization layer (every slot is a
:class:`~normlab.nn.convert.NoNorm`) and keeps the biases of the layers feeding the slots, which
absorb BNP's centring. The training hook is a :class:`~normlab.optim.BNPreconditioner` with the
method's options (``rho``, ``eps``, ``floor``, ``conv_stats``, ``use_current_batch``,
``weight_norm``, ``weight_norm_modules``, ``modules``, and ``sync``: share the statistics over
the ranks of a distributed run, by default whenever the run is distributed); see
docs/algorithms/bnp.md and docs/distributed.md.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from normlab.methods._layers import keyword_defaults
from normlab.methods.base import Method
from normlab.methods.sync import default_group, sync_group
from normlab.nn.convert import NoNorm, NormKind
from normlab.optim.preconditioner import BNPreconditioner

BNP_OPTIONS = (
    "rho",
    "debias",
    "eps",
    "floor",
    "conv_stats",
    "use_current_batch",
    "weight_norm",
    "weight_norm_modules",
    "modules",
)


def _no_norm(num_features: int, kind: NormKind) -> nn.Module:
    return NoNorm(num_features, kind)


def bnp_training_hook(
    model: nn.Module, *, sync: bool | None = None, **options: Any
) -> BNPreconditioner:
    """The ``bnp`` method's training hook: ``BNPreconditioner(model, **options)``; with
    ``sync=True`` or ``None`` (default) its statistics are all-reduced over the default process
    group when the run is distributed (:func:`normlab.methods.sync.default_group`; none in a
    single process).

    Raises:
        ValueError: ``sync=False`` while a process group of several ranks is initialised: each
            rank would precondition the averaged gradient with its own statistics and the
            replicas' parameters would drift apart.
    """
    group = sync_group(sync)
    if sync is False and default_group() is not None:
        raise ValueError(
            "bnp in a distributed run needs the option sync=True: with local statistics every "
            "rank preconditions the averaged gradient differently and the replicas drift apart"
        )
    return BNPreconditioner(model, process_group=group, **options)


BNP = Method(
    "bnp",
    "BN preconditioning: no BN layer, gradients conditioned by layer-input statistics",
    _no_norm,
    bias=True,
    make_hook=bnp_training_hook,
    batch_dependent=False,
    hook_options={**keyword_defaults(BNPreconditioner.__init__, BNP_OPTIONS), "sync": None},
)
