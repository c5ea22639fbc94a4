r"""Seeded, resumable batch samplers: how the training set is cut into mini-batches.

A sampler yields ``LongTensor`` index batches into the training set. Every kind follows one
contract (:class:`BatchSampler`):

- The batches of epoch :math:`e` are a pure function of ``(seed, e, labels, parameters)``: the
  per-epoch random stream is ``numpy.random.default_rng([seed, e])``, independent of how many
  batches were drawn before, of other samplers and of torch's global RNG.
- Iterating yields the batches of the *current* epoch from the *current* position and advances the
  position as each batch is yielded. It does not move to the next epoch by itself: the training
  loop calls :meth:`BatchSampler.set_epoch` (which also resets the position to 0).
- :meth:`BatchSampler.state_dict` / :meth:`BatchSampler.load_state_dict` save and restore
  ``(epoch, position, seed)``; a sampler restored mid-epoch yields exactly the remaining batches.
- Unless ``drop_last=True``, each training sample appears in exactly one batch per epoch.
- No batch holds a single sample where that can be avoided (``batch_size >= 3``): a remainder of
  one sample takes a second one from a larger batch (see ``BatchSampler._avoid_singletons``), so
  that batch normalization does not fail on an artifact of the cutting. ``drop_last=True``
  instead drops every batch smaller than ``batch_size``.

Kinds (:data:`SAMPLERS`):

============== ===========================================================================
``shuffled``   a fresh random permutation each epoch, cut into batches of ``batch_size``
``online``     ``shuffled`` with batch size 1 (one pass = one epoch)
``unshuffled`` sorted by label and cut into single-label blocks of ``batch_size``; only the
               block order changes between epochs (``shuffle_blocks``)
``k-labels``   every batch holds samples of at most ``k`` classes
============== ===========================================================================

``unshuffled`` and ``k-labels`` need integer class labels and raise :class:`ValueError` for
regression targets.

**Several ranks** (distributed training, see docs/distributed.md). ``make_sampler(...,
rank=r, world_size=W)`` with ``W > 1`` gives rank ``r`` its share of each epoch:

- the kinds above are wrapped in a :class:`ShardedSampler`: the single-process plan (batches of
  ``batch_size``, so ``batch_size`` is the *per-rank* batch) is dealt round-robin, step ``t``
  of rank ``r`` being batch ``t W + r``. For ``shuffled`` this splits the epoch's permutation:
  the ranks' batches at one step are consecutive slices of it. When the number of batches is not
  a multiple of ``W``, the largest batches (the last one among equals) are halved until it is,
  so every rank runs the same number of steps, no rank gets an empty batch, each sample is still
  used once per epoch, and a half of a single-label (at most ``k``-label) batch keeps that
  property;
- :class:`NonIIDSampler` (kind ``noniid``, in :data:`PARTITION_SAMPLERS`) is defined by the
  rank: each rank draws only from its own disjoint subset of the labels.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from normlab.registry import Registry

__all__ = [
    "PARTITION_SAMPLERS",
    "SAMPLERS",
    "BatchSampler",
    "KLabelsSampler",
    "NonIIDSampler",
    "OnlineSampler",
    "ShardedSampler",
    "ShuffledSampler",
    "UnshuffledSampler",
    "make_sampler",
    "noniid_labels",
]

# One epoch's plan: ``order`` (a permutation, or a subset with drop_last) and the batch
# boundaries ``bounds``; batch i is ``order[bounds[i]:bounds[i + 1]]``.
_Plan = tuple[np.ndarray, np.ndarray]


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _class_labels(kind: str, labels: Tensor | np.ndarray) -> np.ndarray:
    """Labels as a 1-D int64 array; regression targets (floats) are rejected."""
    t = torch.as_tensor(labels)
    if t.dim() != 1:
        raise ValueError(f"sampler {kind!r} expected labels of shape (N,), got {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(
            f"sampler {kind!r} builds batches from class labels and needs integer labels, got "
            f"{t.dtype} (regression targets?); use 'shuffled' or 'online' for regression data"
        )
    if t.numel() == 0:
        raise ValueError(f"sampler {kind!r} got no labels (empty training set)")
    return t.detach().cpu().numpy().astype(np.int64, copy=False)


class BatchSampler:
    r"""Base class of normlab's samplers: epoch/position bookkeeping, iteration and resume.

    Subclasses implement :meth:`_plan_epoch`, which turns the epoch's random stream into an
    ordering and batch boundaries, and :meth:`_config`, the parameters that a loaded state dict
    must match.

    Args:
        num_samples: size of the training set.
        batch_size: (maximum) batch size.
        seed: non-negative int; with the epoch it seeds each epoch's stream.
        drop_last: drop batches smaller than ``batch_size``.
    """

    kind: ClassVar[str] = ""
    #: class labels the batches are built from (``None``: label-free kinds)
    _labels: np.ndarray | None = None
    #: most distinct labels a batch may hold (``None``: no limit)
    _max_labels: int | None = None

    def __init__(
        self, num_samples: int, batch_size: int, *, seed: int = 0, drop_last: bool = False
    ):
        self.num_samples = _check_int("num_samples", num_samples, 1)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        if not isinstance(drop_last, bool):
            raise TypeError(f"drop_last must be a bool, got {type(drop_last).__name__}")
        self.drop_last = drop_last
        self._seed = _check_int("seed", seed, 0)
        self._epoch = 0
        self._position = 0
        self._cache: tuple[int, int, _Plan] | None = None  # (seed, epoch, plan)

    # ---- to implement ---------------------------------------------------------------------
    def _plan_epoch(self, rng: np.random.Generator) -> _Plan:
        raise NotImplementedError

    def _config(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
        }

    # ---- shared machinery -----------------------------------------------------------------
    def _plan(self, seed: int, epoch: int) -> _Plan:
        if self._cache is not None and self._cache[:2] == (seed, epoch):
            return self._cache[2]
        order, bounds = self._plan_epoch(np.random.default_rng([seed, epoch]))
        if not self.drop_last and self.batch_size >= 3:
            order, bounds = self._avoid_singletons(order, bounds)
        if self.drop_last:
            full = np.flatnonzero(np.diff(bounds) == self.batch_size)
            order = np.concatenate([order[bounds[i] : bounds[i + 1]] for i in full] or [order[:0]])
            bounds = np.arange(len(full) + 1, dtype=np.int64) * self.batch_size
        if len(bounds) < 2:
            raise ValueError(
                f"sampler {self.kind!r} with drop_last=True and batch_size={self.batch_size} "
                f"yields no batch from {self.num_samples} samples"
            )
        self._cache = (seed, epoch, (order.astype(np.int64, copy=False), bounds))
        return self._cache[2]

    def _avoid_singletons(self, order: np.ndarray, bounds: np.ndarray) -> _Plan:
        """Give every one-sample batch a second sample taken from a batch of 3 or more.

        Batch normalization cannot train on one sample, so a remainder of 1 (``N mod b == 1``, a
        class of ``b + 1`` samples cut into single-label blocks, the tail of a ``k-labels``
        epoch) would make a BN run fail for an artifact of the cutting. The donor is the largest
        batch (ties: smallest sample index) whose move keeps the label limit: it must contain
        the singleton's label when at most one label is allowed. Sizes stay <= ``batch_size``
        and each sample still appears once. A singleton stays when no donor exists (e.g. a
        class with a single sample under ``unshuffled``).
        """
        sizes = np.diff(bounds)
        singles = np.flatnonzero(sizes == 1)
        if len(singles) == 0:
            return order, bounds
        batches = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        y = self._labels
        for i in singles:
            same_label_only = y is not None and self._max_labels == 1
            label = None if y is None else y[batches[i][0]]
            best, best_key = None, None
            for j, batch in enumerate(batches):
                if j == i or len(batch) < 3:
                    continue
                eligible = batch if not same_label_only else batch[y[batch] == label]
                if len(eligible) == 0:
                    continue
                key = (-len(batch), int(batch.min()))
                if best_key is None or key < best_key:
                    best, best_key = j, key
            if best is None:
                continue
            donor = batches[best]
            pool = donor if y is None else donor[y[donor] == label]
            moved = int((pool if len(pool) else donor).max())  # prefer the singleton's label
            batches[best] = donor[donor != moved]
            batches[i] = np.append(batches[i], moved)
        new_sizes = np.array([len(b) for b in batches], dtype=np.int64)
        return np.concatenate(batches), np.concatenate([[0], np.cumsum(new_sizes)])

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        """Number of batches of the current epoch already yielded."""
        return self._position

    @property
    def seed(self) -> int:
        return self._seed

    def set_epoch(self, epoch: int) -> None:
        """Select ``epoch`` and rewind to its first batch."""
        self._epoch = _check_int("epoch", epoch, 0)
        self._position = 0

    def batches(self, epoch: int | None = None) -> list[Tensor]:
        """All batches of ``epoch`` (default: the current one), without changing the state."""
        epoch = self._epoch if epoch is None else _check_int("epoch", epoch, 0)
        order, bounds = self._plan(self._seed, epoch)
        return [
            torch.from_numpy(order[a:b].copy())
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]

    def __len__(self) -> int:
        """Number of batches in the current epoch (constant across epochs except for
        ``k-labels``, whose last batches depend on the draw)."""
        return len(self._plan(self._seed, self._epoch)[1]) - 1

    def __iter__(self) -> Iterator[Tensor]:
        order, bounds = self._plan(self._seed, self._epoch)
        while self._position < len(bounds) - 1:
            i = self._position
            self._position += 1
            yield torch.from_numpy(order[bounds[i] : bounds[i + 1]].copy())

    def state_dict(self) -> dict[str, Any]:
        """``{"kind", "epoch", "position", "seed"}`` plus the parameters checked on load."""
        return {
            "kind": self.kind,
            "epoch": self._epoch,
            "position": self._position,
            "seed": self._seed,
            **self._config(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore ``epoch``, ``position`` and ``seed``; the kind and parameters must match.

        Raises:
            ValueError: wrong kind, mismatched parameters, missing keys or an out-of-range
                position. The sampler is left unchanged.
        """
        missing = [k for k in ("kind", "epoch", "position", "seed") if k not in state_dict]
        if missing:
            raise ValueError(f"sampler state_dict lacks keys {missing}")
        if state_dict["kind"] != self.kind:
            raise ValueError(
                f"sampler state_dict is for kind {state_dict['kind']!r}, this sampler is "
                f"{self.kind!r}"
            )
        mismatched = {
            k: (v, state_dict.get(k)) for k, v in self._config().items() if state_dict.get(k) != v
        }
        if mismatched:
            detail = ", ".join(
                f"{k}: expected {a!r}, got {b!r}" for k, (a, b) in mismatched.items()
            )
            raise ValueError(
                f"sampler state_dict does not match this {self.kind!r} sampler: {detail}"
            )
        seed = _check_int("seed", state_dict["seed"], 0)
        epoch = _check_int("epoch", state_dict["epoch"], 0)
        position = _check_int("position", state_dict["position"], 0)
        n_batches = len(self._plan(seed, epoch)[1]) - 1
        if position > n_batches:
            raise ValueError(
                f"sampler state_dict position {position} exceeds the {n_batches} batches of "
                f"epoch {epoch}"
            )
        self._seed, self._epoch, self._position = seed, epoch, position

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return (
            f"{type(self).__name__}({params}, seed={self._seed}, epoch={self._epoch}, "
            f"position={self._position})"
        )


class ShuffledSampler(BatchSampler):
    r"""A fresh uniform random permutation each epoch, cut into consecutive batches.

    With ``drop_last=False`` there are :math:`\lceil N/b \rceil` batches, the last one holding
    the remainder (a remainder of 1 with :math:`b \ge 3` gives sizes :math:`b - 1` and 2
    instead); with ``drop_last=True``, :math:`\lfloor N/b \rfloor` full batches.
    """

    kind = "shuffled"

    def __init__(
        self, num_samples: int, batch_size: int, *, seed: int = 0, drop_last: bool = False
    ):
        super().__init__(num_samples, batch_size, seed=seed, drop_last=drop_last)
        self._plan(self._seed, 0)  # fail now, not at the first len()/iter, if no batch results

    def _plan_epoch(self, rng: np.random.Generator) -> _Plan:
        n, b = self.num_samples, self.batch_size
        return rng.permutation(n), np.append(np.arange(0, n, b), n)


class OnlineSampler(ShuffledSampler):
    """Online learning: batches of one sample in a fresh random order each epoch."""

    kind = "online"

    def __init__(self, num_samples: int, *, seed: int = 0):
        super().__init__(num_samples, 1, seed=seed, drop_last=False)


class UnshuffledSampler(BatchSampler):
    """Single-label batches: samples sorted by label, cut into blocks that never mix labels.

    The samples of each class (in their dataset order) are cut into blocks of ``batch_size``; a
    class's last block holds the remainder and may be smaller (dropped if ``drop_last``; a
    remainder of 1 takes a sample from another block of its class, giving sizes ``b - 1`` and 2,
    so only a class with a single sample gives a one-sample batch). The
    blocks are fixed; with ``shuffle_blocks=True`` (default) their order is reshuffled each
    epoch, otherwise they come class by class, in label order, every epoch.
    """

    kind = "unshuffled"

    def __init__(
        self,
        labels: Tensor | np.ndarray,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle_blocks: bool = True,
        drop_last: bool = False,
    ):
        y = _class_labels(self.kind, labels)
        super().__init__(len(y), batch_size, seed=seed, drop_last=drop_last)
        if not isinstance(shuffle_blocks, bool):
            raise TypeError(f"shuffle_blocks must be a bool, got {type(shuffle_blocks).__name__}")
        self.shuffle_blocks = shuffle_blocks
        self._labels_crc = zlib.crc32(y.tobytes())
        self._labels, self._max_labels = y, 1
        self._sorted = np.argsort(y, kind="stable")  # label order, dataset order within a label
        starts = []
        class_starts = np.flatnonzero(np.r_[True, np.diff(y[self._sorted]) != 0])
        for a, b in zip(class_starts, np.append(class_starts[1:], len(y)), strict=True):
            starts.extend(range(a, b, self.batch_size))
        self._starts = np.asarray(starts, dtype=np.int64)
        self._ends = np.append(self._starts[1:], len(y))
        self._plan(self._seed, 0)

    def _config(self) -> dict[str, Any]:
        return {
            **super()._config(),
            "shuffle_blocks": self.shuffle_blocks,
            "labels_crc32": self._labels_crc,
        }

    def _plan_epoch(self, rng: np.random.Generator) -> _Plan:
        n_blocks = len(self._starts)
        block_order = rng.permutation(n_blocks) if self.shuffle_blocks else np.arange(n_blocks)
        order = np.concatenate([self._sorted[self._starts[i] : self._ends[i]] for i in block_order])
        sizes = (self._ends - self._starts)[block_order]
        return order, np.concatenate([[0], np.cumsum(sizes)])


class KLabelsSampler(BatchSampler):
    r"""Every batch draws from at most ``k`` classes; every sample once per epoch.

    Per epoch: the samples of each class are shuffled into a queue. Then, until all queues are
    empty, pick ``k`` of the classes with samples left (without replacement, with probability
    proportional to how many they have left, so classes run out at about the same time; all of
    them once ``k`` or fewer remain) and fill a batch of ``min(batch_size, left in those k)``
    samples from their queues, how many from each class being a multivariate hypergeometric
    draw (what drawing uniformly from their pooled samples would give). Batches are full except
    near the end of an epoch, where fewer samples remain in the chosen classes; so ``len()`` can
    vary slightly between epochs.
    """

    kind = "k-labels"

    def __init__(
        self,
        labels: Tensor | np.ndarray,
        batch_size: int,
        k: int,
        *,
        seed: int = 0,
        drop_last: bool = False,
    ):
        y = _class_labels(self.kind, labels)
        super().__init__(len(y), batch_size, seed=seed, drop_last=drop_last)
        self.k = _check_int("k", k, 1)
        self._labels_crc = zlib.crc32(y.tobytes())
        self._labels, self._max_labels = y, self.k
        self._members = [np.flatnonzero(y == c) for c in np.unique(y)]
        self._plan(self._seed, 0)

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "k": self.k, "labels_crc32": self._labels_crc}

    def _plan_epoch(self, rng: np.random.Generator) -> _Plan:
        queues = [rng.permutation(m) for m in self._members]
        left = np.array([len(q) for q in queues], dtype=np.int64)
        taken = np.zeros_like(left)
        parts: list[np.ndarray] = []
        sizes: list[int] = []
        while left.sum() > 0:
            avail = np.flatnonzero(left)
            if len(avail) <= self.k:
                chosen = avail
            else:
                chosen = rng.choice(
                    avail, size=self.k, replace=False, p=left[avail] / left[avail].sum()
                )
            size = int(min(self.batch_size, left[chosen].sum()))
            counts = rng.multivariate_hypergeometric(left[chosen], size)
            batch = np.concatenate(
                [queues[c][taken[c] : taken[c] + m] for c, m in zip(chosen, counts, strict=True)]
            )
            taken[chosen] += counts
            left[chosen] -= counts
            parts.append(rng.permutation(batch))
            sizes.append(size)
        return np.concatenate(parts), np.concatenate([[0], np.cumsum(sizes)])


def _check_rank(rank: Any, world_size: Any) -> tuple[int, int]:
    world_size = _check_int("world_size", world_size, 1)
    rank = _check_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return rank, world_size


class ShardedSampler(BatchSampler):
    r"""Rank ``rank``'s share of another sampler's epochs, for ``world_size`` ranks.

    Each epoch, the wrapped sampler's batches (its plan for ``(seed, epoch)``, the same on every
    rank) become *pieces*: while their number is not a multiple of ``world_size``, the largest
    piece (the last one among equals) is cut into two halves (sizes :math:`\lceil s/2 \rceil`,
    :math:`\lfloor s/2 \rfloor`). Then piece :math:`t W + r` is step :math:`t` of rank
    :math:`r`. So every rank has the same number of steps per epoch, the ranks' batches
    together hold each sample of the wrapped epoch exactly once, and every batch is a part of
    one of the wrapped sampler's batches (label structure kept). Halves keep at least two
    samples: once the largest piece has fewer than 4, the last ``2m`` pieces are merged
    pairwise instead (``m`` = pieces modulo ``world_size``; with ``batch_size < 4`` a few
    batches at the end of the epoch then hold up to ``2 batch_size`` samples, possibly from two
    of the wrapped batches).

    The state (epoch, position, seed) is this rank's; ranks advance together under DDP.

    Raises:
        ValueError: ``rank``/``world_size`` out of range, or an epoch with fewer samples than
            ranks (some rank would get no sample).
    """

    kind = "sharded"

    def __init__(self, base: BatchSampler, *, rank: int, world_size: int) -> None:
        if not isinstance(base, BatchSampler) or isinstance(base, ShardedSampler):
            raise TypeError(
                f"ShardedSampler wraps a normlab BatchSampler, got {type(base).__name__}"
            )
        super().__init__(
            base.num_samples, base.batch_size, seed=base.seed, drop_last=base.drop_last
        )
        self.base = base
        self.rank, self.world_size = _check_rank(rank, world_size)
        self._plan(self._seed, 0)

    def _config(self) -> dict[str, Any]:
        return {
            **self.base._config(),
            "base_kind": self.base.kind,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def _plan(self, seed: int, epoch: int) -> _Plan:
        if self._cache is not None and self._cache[:2] == (seed, epoch):
            return self._cache[2]
        order, bounds = self.base._plan(seed, epoch)
        w = self.world_size
        if len(order) < w:
            raise ValueError(
                f"epoch {epoch} of sampler {self.base.kind!r} has {len(order)} samples, fewer "
                f"than the {w} ranks"
            )
        pieces = [[int(a), int(b)] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        while len(pieces) % w:
            sizes = np.array([b - a for a, b in pieces])
            i = len(sizes) - 1 - int(np.argmax(sizes[::-1]))  # the last largest piece
            a, b = pieces[i]
            if b - a >= 4:  # both halves keep two samples or more
                mid = a + (b - a + 1) // 2
                pieces[i : i + 1] = [[a, mid], [mid, b]]
            else:  # small batches: merge the last 2m pieces pairwise instead
                m = len(pieces) % w
                tail = pieces[len(pieces) - 2 * m :]
                merged = [[tail[j][0], tail[j + 1][1]] for j in range(0, 2 * m, 2)]
                pieces[len(pieces) - 2 * m :] = merged
        mine = pieces[self.rank :: w]
        own = np.concatenate([order[a:b] for a, b in mine])
        sizes = np.array([b - a for a, b in mine], dtype=np.int64)
        plan = (own.astype(np.int64, copy=False), np.concatenate([[0], np.cumsum(sizes)]))
        self._cache = (seed, epoch, plan)
        return plan


def noniid_labels(classes: Any, rank: int, world_size: int, k: int | None = None) -> np.ndarray:
    """The labels rank ``rank`` holds under ``noniid``: with the distinct ``classes`` sorted,
    rank ``r`` holds ``sorted[r k : (r + 1) k]``; ``k=None`` splits all of them as evenly as
    possible (``numpy.array_split``, the first ranks one more).

    Raises:
        ValueError: ``k * world_size`` exceeds the number of classes, or fewer classes than
            ranks with ``k=None``.
    """
    rank, world_size = _check_rank(rank, world_size)
    classes = np.unique(np.asarray(classes))
    if k is None:
        if len(classes) < world_size:
            raise ValueError(
                f"noniid: {len(classes)} classes cannot give each of {world_size} ranks its own "
                "label"
            )
        return np.array_split(classes, world_size)[rank]
    k = _check_int("k", k, 1)
    if k * world_size > len(classes):
        raise ValueError(
            f"noniid: k={k} labels for each of {world_size} ranks needs {k * world_size} "
            f"disjoint classes, the data has {len(classes)}"
        )
    return classes[rank * k : (rank + 1) * k]


class NonIIDSampler(BatchSampler):
    r"""Non-i.i.d. workers: rank ``rank`` trains on the samples of its own labels only.

    The labels are split into disjoint subsets (:func:`noniid_labels`: ``k`` per rank, or all of
    them as evenly as possible with ``k=None``). Each epoch, the epoch's permutation of the whole
    training set (stream ``[seed, epoch]``, the same on every rank) is filtered to this rank's
    samples and cut into ``S`` batches of near-equal size (``numpy.array_split``), where ``S =
    ceil(n_max / batch_size)`` for the largest rank's ``n_max`` samples, the same on every rank,
    so ranks step together and each batch holds at most ``batch_size`` samples. Every sample
    of a held label is used once per epoch; samples of labels no rank holds (``k * W`` below the
    number of classes) are never used. With ``drop_last``, ``S = floor(n_min / batch_size)``
    full batches and the rest is dropped.

    One process (``world_size=1``) is rank 0 of one rank: all labels with ``k=None`` (shuffled
    batches of near-equal size), the ``k`` smallest labels otherwise.

    Raises:
        ValueError: regression targets; too few classes (:func:`noniid_labels`); a rank with
            fewer samples than ``S`` (it could not fill every step).
    """

    kind = "noniid"

    def __init__(
        self,
        labels: Tensor | np.ndarray,
        batch_size: int,
        k: int | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        drop_last: bool = False,
    ):
        y = _class_labels(self.kind, labels)
        super().__init__(len(y), batch_size, seed=seed, drop_last=drop_last)
        self.rank, self.world_size = _check_rank(rank, world_size)
        self.k = None if k is None else _check_int("k", k, 1)
        self._labels_crc = zlib.crc32(y.tobytes())
        self._labels, self._max_labels = y, None
        counts = []
        for r in range(self.world_size):
            held = noniid_labels(y, r, self.world_size, self.k)
            counts.append(int(np.isin(y, held).sum()))
        self.held_labels = noniid_labels(y, self.rank, self.world_size, self.k)
        self._mask = np.isin(y, self.held_labels)
        b = self.batch_size
        if drop_last:
            self._steps = min(counts) // b
        else:
            self._steps = -(-max(counts) // b)
            if min(counts) < self._steps:
                raise ValueError(
                    f"noniid: a rank holds {min(counts)} samples, fewer than the {self._steps} "
                    f"steps per epoch that its largest peer's {max(counts)} samples need at "
                    f"batch_size={b}; use a larger batch_size"
                )
        self._plan(self._seed, 0)

    def _config(self) -> dict[str, Any]:
        return {
            **super()._config(),
            "k": self.k,
            "rank": self.rank,
            "world_size": self.world_size,
            "labels_crc32": self._labels_crc,
        }

    def _plan_epoch(self, rng: np.random.Generator) -> _Plan:
        perm = rng.permutation(self.num_samples)
        own = perm[self._mask[perm]]
        if self.drop_last:
            own = own[: self._steps * self.batch_size]
        sizes = np.array([len(p) for p in np.array_split(own, self._steps)], dtype=np.int64)
        return own, np.concatenate([[0], np.cumsum(sizes)])

    def _avoid_singletons(self, order: np.ndarray, bounds: np.ndarray) -> _Plan:
        return order, bounds  # near-equal sizes: a singleton only where a rank has S samples


#: Sampler kind -> class, in registration order (kinds whose batches do not depend on a rank).
SAMPLERS: Registry[type[BatchSampler]] = Registry("sampler kind")
for _cls in (ShuffledSampler, UnshuffledSampler, KLabelsSampler, OnlineSampler):
    SAMPLERS.register(_cls.kind, _cls)

#: Kinds defined by a partition of the data over the ranks (``noniid``).
PARTITION_SAMPLERS: Registry[type[BatchSampler]] = Registry("partition sampler kind")
PARTITION_SAMPLERS.register(NonIIDSampler.kind, NonIIDSampler)


def make_sampler(
    kind: str,
    labels: Tensor | np.ndarray,
    *,
    batch_size: int,
    seed: int = 0,
    k: int | None = None,
    drop_last: bool = False,
    shuffle_blocks: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> BatchSampler:
    """Build a sampler of ``kind`` over a training set with these ``labels``.

    ``labels`` only provides the size for ``shuffled``/``online`` (so regression targets work
    there). ``batch_size`` must be 1 for ``online``; ``k`` is required by ``k-labels`` and
    optional for ``noniid`` (labels per rank). With ``world_size > 1`` the sampler yields rank
    ``rank``'s batches (:class:`ShardedSampler`, or :class:`NonIIDSampler` for ``noniid``);
    ``world_size=1`` returns the plain sampler.
    """
    rank, world_size = _check_rank(rank, world_size)
    if kind in PARTITION_SAMPLERS:
        return NonIIDSampler(
            labels, batch_size, k, rank=rank, world_size=world_size, seed=seed, drop_last=drop_last
        )
    SAMPLERS[kind]  # raises ValueError naming the valid kinds
    sampler = _make_local(kind, labels, batch_size, seed, k, drop_last, shuffle_blocks)
    if world_size == 1:
        return sampler
    return ShardedSampler(sampler, rank=rank, world_size=world_size)


def _make_local(
    kind: str,
    labels: Tensor | np.ndarray,
    batch_size: int,
    seed: int,
    k: int | None,
    drop_last: bool,
    shuffle_blocks: bool,
) -> BatchSampler:
    t = torch.as_tensor(labels)
    if t.dim() != 1:
        raise ValueError(f"sampler {kind!r} expected labels of shape (N,), got {tuple(t.shape)}")
    n = int(t.shape[0])
    if kind == "shuffled":
        return ShuffledSampler(n, batch_size, seed=seed, drop_last=drop_last)
    if kind == "online":
        if batch_size != 1:
            raise ValueError(f"sampler 'online' has batch_size 1, got batch_size={batch_size!r}")
        return OnlineSampler(n, seed=seed)
    if kind == "unshuffled":
        return UnshuffledSampler(
            labels, batch_size, seed=seed, shuffle_blocks=shuffle_blocks, drop_last=drop_last
        )
    if k is None:
        raise ValueError("sampler 'k-labels' needs k (the maximum number of classes per batch)")
    return KLabelsSampler(labels, batch_size, k, seed=seed, drop_last=drop_last)
