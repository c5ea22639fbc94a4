"""Registers ``bnp``: Batch Normalization Preconditioning as a normalization *method*.

A model built for ``bnp`` has no normalization layer (every slot is a
:class:`~normlab.nn.convert.NoNorm`) and keeps the biases of the layers feeding the slots, which
absorb BNP's centring term. The training loop attaches a :class:`BNPreconditioner` as the
method's training hook: it records layer-input statistics during training forwards and rewrites
the gradients between ``backward()`` and ``optimizer.step()`` (``before_step``). Nothing in the
batch couples the samples of a forward, so the method is not batch dependent and trains at batch
size 1.

``TrainConfig.method_options`` are passed to :class:`BNPreconditioner` as keyword arguments
(``rho``, ``eps``, ``floor``, ``conv_stats``, ``use_current_batch``, ``modules``); for example
``TrainConfig(method="bnp", method_options={"floor": 1e-2})``.

The method's default variance floor is 0.1 (``BNP_DEFAULTS``), not the preconditioner's 1e-3:
inputs that are nearly constant (border pixels, dead units) otherwise get steps up to 1000x
larger. Measured with ``normlab compare``'s settings (digits, MLP 64-100-100-10, plain SGD; test
accuracy for shuffled b=64 lr 0.1 / single-label b=64 lr 0.1 / online b=1 lr 0.01): floor 1e-3
0.755 / 0.309 / 0.897; 1e-2 0.978 / 0.267 / 0.897; 0.1 0.967 / 0.802 / 0.897; 1.0 0.864 / 0.883 /
0.741. The BNP benchmark on MNIST-10k found the same (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from normlab.methods import Method, register_method
from normlab.nn.convert import NoNorm, NormKind
from normlab.optim.preconditioner import BNPreconditioner

__all__ = ["BNP_DEFAULTS", "BNP_OPTIONS", "bnp_training_hook"]

BNP_OPTIONS = ("rho", "eps", "floor", "conv_stats", "use_current_batch", "modules")
BNP_DEFAULTS: Mapping[str, Any] = {"floor": 0.1}


def bnp_training_hook(model: nn.Module, options: Mapping[str, Any]) -> BNPreconditioner:
    """The ``bnp`` method's training hook: ``BNPreconditioner(model, **options)``.

    Raises:
        ValueError: an option that is not a :class:`BNPreconditioner` keyword (the message lists
            the valid ones), or one the preconditioner rejects.
        TypeError: ``options`` is not a mapping.
    """
    if not isinstance(options, Mapping):
        raise TypeError(f"bnp options must be a mapping, got {type(options).__name__}")
    unknown = sorted(set(options) - set(BNP_OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown bnp option(s) {', '.join(unknown)}; valid: {', '.join(BNP_OPTIONS)}"
        )
    return BNPreconditioner(model, **{**BNP_DEFAULTS, **options})


def _no_norm(num_features: int, kind: NormKind) -> nn.Module:
    return NoNorm(num_features, kind)


BNP = register_method(
    Method(
        "bnp",
        "BN preconditioning: no BN layer, gradients conditioned by layer-input statistics",
        _no_norm,
        bias=True,
        training_hook=bnp_training_hook,
        batch_dependent=False,
    )
)
