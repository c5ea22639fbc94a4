"""Datasets, batch samplers and batch scenarios.

- :mod:`normlab.data.datasets`: :class:`Dataset`, :func:`load_dataset` and the :data:`DATASETS`
  registry (``digits``, ``mnist``, ``cifar10`` and seeded synthetic generators).
- :mod:`normlab.data.idx`: the IDX (MNIST) file reader.
- :mod:`normlab.data.samplers`: seeded, resumable :class:`BatchSampler` kinds.
- :mod:`normlab.data.scenarios`: :class:`Scenario` (sampler + transform) presets.
"""

from __future__ import annotations

from normlab.data.datasets import (
    DATASETS,
    Dataset,
    dataset_options,
    list_datasets,
    load_dataset,
    load_tiny,
    register_dataset,
)
from normlab.data.idx import read_idx
from normlab.data.samplers import (
    SAMPLERS,
    BatchSampler,
    KLabelsSampler,
    OnlineSampler,
    ShuffledSampler,
    UnshuffledSampler,
    make_sampler,
)
from normlab.data.scenarios import (
    SCENARIOS,
    Scenario,
    get_scenario,
    list_scenarios,
    random_scale_factors,
    register_scenario,
    scale_samples,
)

__all__ = [
    "DATASETS",
    "SAMPLERS",
    "SCENARIOS",
    "BatchSampler",
    "Dataset",
    "KLabelsSampler",
    "OnlineSampler",
    "Scenario",
    "ShuffledSampler",
    "UnshuffledSampler",
    "dataset_options",
    "get_scenario",
    "list_datasets",
    "list_scenarios",
    "load_dataset",
    "load_tiny",
    "make_sampler",
    "random_scale_factors",
    "read_idx",
    "register_dataset",
    "register_scenario",
    "scale_samples",
]
