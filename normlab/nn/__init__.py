"""Thin normalization modules over :mod:`normlab.functional`, and model surgery."""

from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from normlab.nn.convert import (
    NoNorm,
    NormSlot,
    find_norm_slots,
    norm_slot_info,
    norm_slots,
    register_norm_layer,
)
from normlab.nn.fullnorm import FullNorm1d, FullNorm2d, FullNorm3d
from normlab.nn.mabn import CenConv2d, MABN1d, MABN2d
from normlab.nn.online_norm import OnlineNorm1d, OnlineNorm2d
from normlab.nn.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from normlab.nn.stats import fold_batchnorm, recompute_statistics
from normlab.nn.sync_batchnorm import SyncBatchNorm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "CenConv2d",
    "FullNorm1d",
    "FullNorm2d",
    "FullNorm3d",
    "MABN1d",
    "MABN2d",
    "NoNorm",
    "NormSlot",
    "OnlineNorm1d",
    "OnlineNorm2d",
    "SyncBatchNorm",
    "find_norm_slots",
    "fold_batchnorm",
    "norm_slot_info",
    "norm_slots",
    "recompute_statistics",
    "register_norm_layer",
]
