"""Thin normalization modules over :mod:`normlab.functional`, and model surgery."""

from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d
from normlab.nn.convert import NoNorm, find_norm_slots, norm_slot_info, register_norm_layer
from normlab.nn.fullnorm import FullNorm1d, FullNorm2d
from normlab.nn.renorm import BatchRenorm1d, BatchRenorm2d
from normlab.nn.stats import fold_batchnorm, recompute_statistics

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "FullNorm1d",
    "FullNorm2d",
    "NoNorm",
    "find_norm_slots",
    "fold_batchnorm",
    "norm_slot_info",
    "recompute_statistics",
    "register_norm_layer",
]
