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
    "SAMPLERS",
    "BatchSampler",
    "KLabelsSampler",
    "OnlineSampler",
    "ShuffledSampler",
    "UnshuffledSampler",
    "make_sampler",
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


#: Sampler kind -> class, in registration order.
SAMPLERS: Registry[type[BatchSampler]] = Registry("sampler kind")
for _cls in (ShuffledSampler, UnshuffledSampler, KLabelsSampler, OnlineSampler):
    SAMPLERS.register(_cls.kind, _cls)


def make_sampler(
    kind: str,
    labels: Tensor | np.ndarray,
    *,
    batch_size: int,
    seed: int = 0,
    k: int | None = None,
    drop_last: bool = False,
    shuffle_blocks: bool = True,
) -> BatchSampler:
    """Build a sampler of ``kind`` over a training set with these ``labels``.

    ``labels`` only provides the size for ``shuffled``/``online`` (so regression targets work
    there). ``batch_size`` must be 1 for ``online``; ``k`` is required by ``k-labels`` only.
    """
    SAMPLERS[kind]  # raises ValueError naming the valid kinds
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
