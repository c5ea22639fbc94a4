"""Batch-normalization methods: ``bn`` (normlab's reference BN), ``torch-bn`` and ``brn``
(Batch Renormalization)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from normlab.methods._layers import by_kind, keyword_defaults
from normlab.methods.base import Method
from normlab.nn import batchnorm as nbn
from normlab.nn import renorm as nrn
from normlab.nn.convert import NormKind

BN_OPTIONS = ("eps", "momentum", "affine", "track_running_stats")

# Batch Renorm's paper schedule (BN for 5k steps, full relaxation at 25k/40k steps, running
# statistics with momentum 0.01) never leaves the BN phase in CPU-scale runs of a few hundred
# steps. The registered ``brn`` compresses it (our choice; see docs/algorithms/bn.md).
BRN_CPU_SCHEDULE = {"momentum": 0.1, "warmup_steps": 100, "d_max_steps": 500, "r_max_steps": 1000}
BRN_OPTIONS = (
    "eps",
    "momentum",
    "affine",
    "r_max",
    "d_max",
    "warmup_steps",
    "r_max_steps",
    "d_max_steps",
)


def _checked_torch_bn(make: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    # torch's BatchNorm checks neither eps nor momentum (a negative eps fails only at the first
    # forward): the checks of normlab's BatchNorm, with the same messages, plus bool flags.
    def checked(num_features: int, kind: NormKind, **options: Any) -> nn.Module:
        try:
            nbn.check_norm_args(num_features, options["eps"], options["momentum"])
        except ValueError as exc:
            raise ValueError(f"method 'torch-bn': {exc}") from None
        for flag in ("affine", "track_running_stats"):
            value = options[flag]
            if not isinstance(value, bool):
                raise TypeError(
                    f"method 'torch-bn': {flag} must be a bool, got {type(value).__name__} "
                    f"{value!r}"
                )
        return make(num_features, kind, **options)

    return checked


def _method(
    name: str,
    description: str,
    module: object,
    prefix: str,
    options: tuple[str, ...],
    check: Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]] | None = None,
    **fixed: Any,
) -> Method:
    # A batch-statistics method: the classes <prefix>1d/2d/3d of `module` by slot kind, their
    # constructor defaults for `options` (read from the 2d class), then the `fixed` values;
    # `check` wraps the factory with option checks the classes lack.
    classes = {k: getattr(module, f"{prefix}{k}", None) for k in ("1d", "2d", "3d")}
    defaults = keyword_defaults(classes["2d"].__init__, options)  # type: ignore[union-attr,misc]
    make = by_kind(name, classes)
    return Method(
        name,
        description,
        make if check is None else check(make),
        min_batch_size=2,
        layer_options={**defaults, **fixed},
    )


BN = _method("bn", "normlab reference BatchNorm", nbn, "BatchNorm", BN_OPTIONS)
TORCH_BN = _method(
    "torch-bn", "torch.nn.BatchNorm1d/2d/3d", nn, "BatchNorm", BN_OPTIONS, _checked_torch_bn
)
BRN = _method(
    "brn",
    "Batch Renormalization (compressed r_max/d_max ramp)",
    nrn,
    "BatchRenorm",
    BRN_OPTIONS,
    **BRN_CPU_SCHEDULE,
)
