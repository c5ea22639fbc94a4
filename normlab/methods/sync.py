"""Synchronized normalization for distributed training: the ``sync-bn`` method and the process
group that ``sync=True`` options fill in.

``sync-bn`` fills every slot with :class:`normlab.nn.SyncBatchNorm`: batch statistics over the
union of all ranks' batches when ``torch.distributed`` is initialised with more than one rank,
normlab's BatchNorm otherwise (one process: the same as ``bn``). ``fn`` and ``bnp`` take an
option ``sync``: with ``sync=True`` their layers / preconditioner get ``process_group=``
:func:`default_group` when the model is built, so their estimates and statistics are those of
the concatenated batch. ``fn`` defaults to ``False`` (local estimates, like BN under DDP);
``bnp`` defaults to ``None``, synchronized whenever the run is distributed, and refuses
``False`` there (the replicas would drift apart). See docs/distributed.md.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn

from normlab.methods._layers import keyword_defaults
from normlab.methods.base import Method
from normlab.nn.convert import NormKind
from normlab.nn.sync_batchnorm import SyncBatchNorm

__all__ = ["SYNC_BN", "default_group"]

SYNC_BN_OPTIONS = ("eps", "momentum", "affine", "track_running_stats")


def default_group() -> Any:
    """The default (world) process group when ``torch.distributed`` is initialised with more
    than one rank, else ``None`` (one process: nothing to synchronize)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def sync_group(sync: Any) -> Any:
    """The process group of a ``sync`` option: :func:`default_group` for ``True`` and for
    ``None`` (synchronized whenever the run is distributed), ``None`` for ``False``.

    Raises:
        TypeError: ``sync`` is not a bool or None.
    """
    if sync is not None and not isinstance(sync, bool):
        raise TypeError(f"option sync must be a bool or None, got {type(sync).__name__}: {sync!r}")
    return None if sync is False else default_group()


def _sync_batch_norm(num_features: int, kind: NormKind, **options: Any) -> nn.Module:
    layer = SyncBatchNorm(num_features, **options)
    layer.normlab_kind = kind  # SyncBatchNorm takes any input rank; convert() needs the kind
    return layer


SYNC_BN = Method(
    "sync-bn",
    "BatchNorm over all ranks' batches (normlab.nn.SyncBatchNorm; one process: bn)",
    _sync_batch_norm,
    min_batch_size=2,
    layer_options=keyword_defaults(SyncBatchNorm.__init__, SYNC_BN_OPTIONS),
)
