"""Batch-normalization methods: ``bn`` (normlab's reference BN), ``torch-bn`` and ``brn``
(Batch Renormalization)."""

from __future__ import annotations

from torch import nn

from normlab.methods._layers import by_kind, keyword_defaults
from normlab.methods.base import Method
from normlab.nn import batchnorm as nbn
from normlab.nn import renorm as nrn

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


def _classes(module: object, prefix: str) -> dict[str, type[nn.Module] | None]:
    return {k: getattr(module, f"{prefix}{k}", None) for k in ("1d", "2d", "3d")}


BN = Method(
    "bn",
    "normlab reference BatchNorm",
    by_kind("bn", _classes(nbn, "BatchNorm")),
    min_batch_size=2,
    layer_options=keyword_defaults(nbn.BatchNorm2d.__init__, BN_OPTIONS),
)
TORCH_BN = Method(
    "torch-bn",
    "torch.nn.BatchNorm1d/2d/3d",
    by_kind("torch-bn", _classes(nn, "BatchNorm")),
    min_batch_size=2,
    layer_options=keyword_defaults(nn.BatchNorm2d.__init__, BN_OPTIONS),
)
BRN = Method(
    "brn",
    "Batch Renormalization (compressed r_max/d_max ramp)",
    by_kind("brn", _classes(nrn, "BatchRenorm")),
    min_batch_size=2,
    layer_options={**keyword_defaults(nrn.BatchRenorm2d.__init__, BRN_OPTIONS), **BRN_CPU_SCHEDULE},
)
