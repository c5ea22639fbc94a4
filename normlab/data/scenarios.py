r"""Batch scenarios: a sampler kind and a data transform, chosen by name.

A :class:`Scenario` decides how batches are built (:meth:`Scenario.make_sampler`) and how the
data is transformed (:meth:`Scenario.apply`); the training loop never branches on it.

Presets (:data:`SCENARIOS`; override any field with :func:`get_scenario`):

=============== ============ ====== =========================================================
name            sampler      b      notes
=============== ============ ====== =========================================================
``shuffled``    shuffled     64     the i.i.d. baseline
``unshuffled``  unshuffled   64     single-label batches, block order reshuffled per epoch
``k-labels``    k-labels     64     at most ``k=3`` classes per batch
``online``      online       1      one sample per step
``small-batch`` shuffled     2      the smallest batch on which batch statistics exist
``scaled``      shuffled     16     each sample times a factor ~ U[0.1, 10], fixed per sample
``noniid``      noniid       64     each rank holds a disjoint subset of the labels (``k`` per
                                    rank; ``None``: all labels split evenly over the ranks)
=============== ============ ====== =========================================================

**Several ranks.** :meth:`Scenario.make_sampler` takes the process's ``rank`` and
``world_size``: ``batch_size`` is then the per-rank batch, a shuffled scenario splits each
epoch's permutation over the ranks, the single-label and ``k``-labels scenarios deal each rank
its own batches (:class:`~normlab.data.samplers.ShardedSampler`), and ``noniid`` gives each rank
the samples of its own labels (:class:`~normlab.data.samplers.NonIIDSampler`). With one process,
``noniid`` is rank 0 of one rank: every label with ``k=None``, the ``k`` smallest labels
otherwise. See docs/distributed.md.

``scaled`` follows Lian & Liu 2019's "MNIST with each input multiplied by a random scaling
factor" (at batch sizes 1 and 16; the paper's range is unknown, so ``[0.1, 10]`` is our choice;
``get_scenario("scaled", batch_size=1)`` gives the other setting).

**Random scaling.** With ``scale=(lo, hi)`` every sample :math:`x_i` becomes :math:`a_i x_i`,
where :math:`a_i` is drawn once per sample index and kept for the whole run (not redrawn per
epoch), from ``scale_dist``:

- ``"uniform"`` (default): :math:`a_i \sim U[lo, hi]`;
- ``"log-uniform"``: :math:`\log a_i \sim U[\log lo, \log hi]` (each decade equally likely).

Train and test sets get independent factors (streams ``[seed, 0]`` and ``[seed, 1]`` of
:func:`random_scale_factors`). Only inputs are scaled; regression targets are left alone.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from normlab.data.datasets import Dataset
from normlab.data.samplers import PARTITION_SAMPLERS, SAMPLERS, BatchSampler, make_sampler
from normlab.registry import Registry

__all__ = [
    "SCALE_DISTS",
    "SCENARIOS",
    "register_scenario",
    "Scenario",
    "get_scenario",
    "list_scenarios",
    "random_scale_factors",
    "scale_samples",
]

SCALE_DISTS = ("uniform", "log-uniform")

# Stream ids: the train and test factors must differ for the same seed.
_TRAIN_STREAM, _TEST_STREAM = 0, 1


def _check_scale(scale: Any, scale_dist: Any) -> None:
    if scale_dist not in SCALE_DISTS:
        raise ValueError(f"scale_dist must be one of {SCALE_DISTS}, got {scale_dist!r}")
    ok = (
        isinstance(scale, tuple)
        and len(scale) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scale)
    )
    if not ok:
        raise ValueError(f"scale must be a tuple (lo, hi) of two numbers, got {scale!r}")
    lo, hi = scale
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
        raise ValueError(f"scale=(lo, hi) must satisfy 0 < lo <= hi (finite), got {scale!r}")


def random_scale_factors(
    num_samples: int,
    scale: tuple[float, float],
    *,
    seed: int,
    stream: int = _TRAIN_STREAM,
    scale_dist: str = "uniform",
) -> Tensor:
    r"""One scaling factor per sample index, a pure function of ``(seed, stream, n, scale)``.

    ``uniform``: :math:`a_i \sim U[lo, hi]`; ``log-uniform``: :math:`a_i = e^{u_i}`,
    :math:`u_i \sim U[\log lo, \log hi]`. Drawn from ``numpy.random.default_rng([seed, stream])``,
    so factor :math:`i` does not depend on the epoch and is the same for every call.

    Returns:
        ``float32`` tensor of shape ``(num_samples,)`` with values in ``[lo, hi]``.
    """
    _check_scale(scale, scale_dist)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"num_samples must be an int >= 0, got {num_samples!r}")
    lo, hi = float(scale[0]), float(scale[1])
    rng = np.random.default_rng([seed, stream])
    if scale_dist == "uniform":
        factors = rng.uniform(lo, hi, size=num_samples)
    else:
        factors = np.exp(rng.uniform(math.log(lo), math.log(hi), size=num_samples))
    # float64 -> float32 rounding can step just outside [lo, hi]; clip back into it
    return torch.from_numpy(factors).to(torch.float32).clamp_(lo, hi)


def scale_samples(x: Tensor, factors: Tensor) -> Tensor:
    r""":math:`x_i \mapsto a_i x_i`: multiply sample ``i`` (all its features) by ``factors[i]``."""
    if factors.dim() != 1 or factors.shape[0] != x.shape[0]:
        raise ValueError(
            f"expected one factor per sample ({x.shape[0]},), got factors of shape "
            f"{tuple(factors.shape)}"
        )
    return x * factors.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))  # (N,) -> (N, 1, ...)


@dataclass(frozen=True)
class Scenario:
    """How batches are built and how the data is transformed.

    Attributes:
        name: preset name (kept when fields are overridden).
        sampler: sampler kind, a key of :data:`normlab.data.samplers.SAMPLERS`.
        batch_size: batch size (the maximum for ``k-labels`` and for a class's last
            ``unshuffled`` block); must be 1 for ``online``.
        k: classes per batch for ``k-labels``; labels per rank for ``noniid`` (``None``: all
            labels split evenly over the ranks); must be ``None`` for other kinds.
        scale: ``(lo, hi)`` of the per-sample scaling transform, or ``None`` for no transform.
        scale_dist: ``"uniform"`` or ``"log-uniform"`` (see the module docstring).
        drop_last: drop batches smaller than ``batch_size`` (not for ``online``).
        shuffle_blocks: for ``unshuffled``, reshuffle the block order each epoch.
        description: one line for tables and ``normlab list``.
    """

    name: str
    sampler: str
    batch_size: int
    k: int | None = None
    scale: tuple[float, float] | None = None
    scale_dist: str = "uniform"
    drop_last: bool = False
    shuffle_blocks: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS and self.sampler not in PARTITION_SAMPLERS:
            valid = ", ".join([*SAMPLERS, *PARTITION_SAMPLERS])
            raise ValueError(f"Scenario sampler must be one of {valid}, got {self.sampler!r}")
        b = self.batch_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"Scenario batch_size must be an int >= 1, got {b!r}")
        if self.sampler == "online" and b != 1:
            raise ValueError(f"Scenario with sampler 'online' needs batch_size 1, got {b}")
        if self.sampler == "k-labels":
            k = self.k
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"Scenario k (classes per batch) must be an int >= 1, got {k!r}")
        elif self.sampler in PARTITION_SAMPLERS:
            k = self.k
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
                raise ValueError(
                    f"Scenario k (labels per rank) must be None or an int >= 1, got {k!r}"
                )
        elif self.k is not None:
            raise ValueError(
                f"Scenario k applies to sampler 'k-labels' only (and to 'noniid', labels per "
                f"rank), got k={self.k!r} with sampler {self.sampler!r}"
            )
        if isinstance(self.scale, list):  # e.g. from JSON/TOML; stored as a tuple
            object.__setattr__(self, "scale", tuple(self.scale))
        if self.scale is not None:
            _check_scale(self.scale, self.scale_dist)
        elif self.scale_dist not in SCALE_DISTS:
            raise ValueError(f"scale_dist must be one of {SCALE_DISTS}, got {self.scale_dist!r}")
        for flag in ("drop_last", "shuffle_blocks"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"Scenario {flag} must be a bool, got {getattr(self, flag)!r}")

    @property
    def label(self) -> str:
        """Short description of the resolved parameters, e.g. ``"k-labels k=2 b=64"``."""
        parts = [self.name, f"b={self.batch_size}"]
        if self.k is not None:
            parts.insert(1, f"k={self.k}")
        if self.scale is not None:
            dist = "" if self.scale_dist == "uniform" else " log"
            parts.append(f"scale{dist}=[{self.scale[0]:g}, {self.scale[1]:g}]")
        return " ".join(parts)

    @property
    def takes_k(self) -> bool:
        """Whether ``k`` means something for this scenario's sampler (``k-labels``, ``noniid``)."""
        return self.sampler == "k-labels" or self.sampler in PARTITION_SAMPLERS

    def make_sampler(
        self, labels: Tensor, seed: int, *, rank: int = 0, world_size: int = 1
    ) -> BatchSampler:
        """The sampler for a training set with these ``labels`` (targets, for regression), for
        process ``rank`` of ``world_size`` (see the module docstring)."""
        return make_sampler(
            self.sampler,
            labels,
            batch_size=self.batch_size,
            seed=seed,
            k=self.k,
            drop_last=self.drop_last,
            shuffle_blocks=self.shuffle_blocks,
            rank=rank,
            world_size=world_size,
        )

    def apply(self, dataset: Dataset, seed: int) -> Dataset:
        """The dataset with this scenario's transform applied; ``dataset`` itself if none.

        The per-sample factors are stored in ``info["scale_factors_train"]`` /
        ``info["scale_factors_test"]``.
        """
        if self.scale is None:
            return dataset
        kw = {"scale_dist": self.scale_dist, "seed": seed}
        f_train = random_scale_factors(dataset.num_train, self.scale, stream=_TRAIN_STREAM, **kw)
        f_test = random_scale_factors(dataset.num_test, self.scale, stream=_TEST_STREAM, **kw)
        info = {
            **dataset.info,
            "scale": {"range": self.scale, "dist": self.scale_dist, "seed": seed},
            "scale_factors_train": f_train,
            "scale_factors_test": f_test,
        }
        return dataset.replace(
            x_train=scale_samples(dataset.x_train, f_train),
            x_test=scale_samples(dataset.x_test, f_test),
            info=info,
        )

    def replace(self, **overrides: Any) -> Scenario:
        """A new scenario with some fields changed; unknown fields raise :class:`ValueError`."""
        fields = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise ValueError(
                f"unknown Scenario field(s) {unknown}; valid fields: {', '.join(fields)}"
            )
        sampler = overrides.get("sampler", self.sampler)
        label_kinds = ("k-labels", *PARTITION_SAMPLERS)
        if sampler not in label_kinds and "k" not in overrides:
            overrides["k"] = None  # k is meaningless once the kind takes no k
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (``scale`` as a list); ``Scenario(**d)`` rebuilds it."""
        d = dataclasses.asdict(self)
        d["scale"] = None if self.scale is None else list(self.scale)
        return d


#: Scenario name -> preset :class:`Scenario`, in registration order.
SCENARIOS: Registry[Scenario] = Registry("scenario")

for _preset in (
    Scenario("shuffled", "shuffled", 64, description="random batches of 64 (i.i.d.)"),
    Scenario(
        "unshuffled",
        "unshuffled",
        64,
        description="sorted by label: single-label batches of 64",
    ),
    Scenario("k-labels", "k-labels", 64, k=3, description="at most 3 classes per batch of 64"),
    Scenario("online", "online", 1, description="one sample per step, random order"),
    Scenario("small-batch", "shuffled", 2, description="random batches of 2"),
    Scenario(
        "scaled",
        "shuffled",
        16,
        scale=(0.1, 10.0),
        description="random batches of 16, each sample times a fixed factor ~ U[0.1, 10]",
    ),
    Scenario(
        "noniid",
        "noniid",
        64,
        description="each rank holds a disjoint subset of the labels; random batches of 64",
    ),
):
    SCENARIOS.register(_preset.name, _preset)


def register_scenario(scenario: Scenario, *, overwrite: bool = False) -> Scenario:
    """Add a preset under ``scenario.name`` (a taken name raises unless ``overwrite``)."""
    if not isinstance(scenario, Scenario):
        raise TypeError(f"register_scenario expected a Scenario, got {type(scenario).__name__}")
    return SCENARIOS.register(scenario.name, scenario, overwrite=overwrite)


def list_scenarios() -> list[str]:
    """Preset scenario names, in definition order."""
    return SCENARIOS.names()


def get_scenario(name: str, **overrides: Any) -> Scenario:
    """The preset ``name``, with fields overridden (e.g. ``batch_size=16, k=2, scale=(lo, hi)``).

    Raises:
        ValueError: unknown name (lists the valid ones), unknown field, or invalid value.
    """
    preset = SCENARIOS[name]
    return preset.replace(**overrides) if overrides else preset
