"""Batch sources: what the training loop reads batches from.

A source serves training batches by sample index (the scenario's sampler picks the indices from
the labels) and evaluation batches in order, on one device. Two kinds:

- :class:`TensorSource`: a normlab :class:`~normlab.data.Dataset` held in memory (moved to the
  device once);
- :class:`StreamSource`: a pair of ``torch.utils.data.Dataset`` objects (train, test) read
  sample by sample; only the training labels are read up front (from a ``targets`` or ``labels``
  attribute or a ``TensorDataset``'s second tensor, else by reading every sample once).

:func:`as_source` builds either from what a user passes and applies the scenario's per-sample
scaling (the same factors as :meth:`~normlab.data.Scenario.apply`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset, default_collate
from torch.utils.data import Dataset as TorchDataset

from normlab.data.datasets import Dataset
from normlab.data.scenarios import _TEST_STREAM, _TRAIN_STREAM, Scenario, random_scale_factors

__all__ = ["BatchSource", "StreamSource", "TensorSource", "as_source"]


class BatchSource:
    """Interface of a batch source (see the module docstring)."""

    task: str
    num_classes: int
    input_shape: tuple[int, ...]
    labels: Tensor  # training labels (targets for regression), on the CPU
    num_train: int

    def train_batch(self, idx: Any) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def batches(self, split: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        raise NotImplementedError


class TensorSource(BatchSource):
    """A normlab :class:`Dataset` in memory, on ``device``."""

    def __init__(self, data: Dataset, device: torch.device) -> None:
        self.data = data
        self.task, self.num_classes = data.task, data.num_classes
        self.input_shape = tuple(data.x_train.shape[1:])
        self.labels = data.y_train
        self.num_train = data.num_train
        self.device = device
        on_cpu = device.type == "cpu"
        self._x = {
            s: getattr(data, f"x_{s}") if on_cpu else getattr(data, f"x_{s}").to(device)
            for s in ("train", "test")
        }
        self._y = {
            s: getattr(data, f"y_{s}") if on_cpu else getattr(data, f"y_{s}").to(device)
            for s in ("train", "test")
        }

    def train_batch(self, idx: Any) -> tuple[Tensor, Tensor]:
        if self.device.type != "cpu":
            idx = torch.as_tensor(idx, device=self.device)
        return self._x["train"][idx], self._y["train"][idx]

    def batches(self, split: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        x, y = self._x[split], self._y[split]
        for start in range(0, len(x), batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]


def _torch_dataset(obj: Any, what: str) -> TorchDataset:
    if isinstance(obj, DataLoader):
        obj = obj.dataset
    if not (hasattr(obj, "__getitem__") and hasattr(obj, "__len__")):
        raise TypeError(
            f"{what} must be a torch.utils.data.Dataset (with __getitem__ and __len__) or a "
            f"DataLoader, got {type(obj).__name__}"
        )
    return obj


def _read_labels(ds: TorchDataset) -> Tensor:
    n = len(ds)
    if isinstance(ds, TensorDataset) and len(ds.tensors) >= 2:
        return ds.tensors[1].detach().cpu()
    for attr in ("targets", "labels"):
        value = getattr(ds, attr, None)
        if value is not None and len(value) == n:
            return torch.as_tensor(np.asarray(value))
    return torch.as_tensor([_label(ds[i]) for i in range(n)])


def _label(sample: Any) -> Any:
    if not isinstance(sample, (tuple, list)) or len(sample) < 2:
        raise TypeError(
            f"dataset samples must be (input, label) pairs, got {type(sample).__name__}"
        )
    y = sample[1]
    return y.item() if isinstance(y, Tensor) else y


class StreamSource(BatchSource):
    """Train/test ``torch.utils.data.Dataset`` objects read sample by sample."""

    def __init__(
        self,
        train: Any,
        test: Any,
        device: torch.device,
        scale: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        self.train, self.test = (
            _torch_dataset(train, "train data"),
            _torch_dataset(test, "test data"),
        )
        if len(self.train) == 0 or len(self.test) == 0:
            raise ValueError(
                f"train and test data must not be empty, got {len(self.train)} and "
                f"{len(self.test)} samples"
            )
        self.device = device
        self.labels = _read_labels(self.train)
        self.num_train = len(self.train)
        floating = self.labels.is_floating_point()
        self.task = "regression" if floating else "classification"
        classes = getattr(self.train, "classes", None)
        self.num_classes = (
            0 if floating else (len(classes) if classes is not None else int(self.labels.max()) + 1)
        )
        first = self.train[0]
        _label(first)
        self.input_shape = tuple(torch.as_tensor(first[0]).shape)
        self._scale = scale

    def _collate(self, ds: TorchDataset, idx: Sequence[int], factors: Tensor | None):
        x, y = default_collate([tuple(ds[int(i)][:2]) for i in idx])
        x = torch.as_tensor(x)
        if not x.is_floating_point():
            x = x.float()
        if factors is not None:
            x = x * factors[torch.as_tensor(idx)].view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return x.to(self.device), torch.as_tensor(y).to(self.device)

    def train_batch(self, idx: Any) -> tuple[Tensor, Tensor]:
        return self._collate(
            self.train,
            list(np.asarray(idx).reshape(-1)),
            None if self._scale is None else self._scale[0],
        )

    def batches(self, split: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        ds = self.train if split == "train" else self.test
        factors = None if self._scale is None else self._scale[0 if split == "train" else 1]
        for start in range(0, len(ds), batch_size):
            yield self._collate(ds, range(start, min(start + batch_size, len(ds))), factors)


def as_source(data: Any, scenario: Scenario, seed: int, device: torch.device) -> BatchSource:
    """A batch source for ``data`` (a normlab :class:`Dataset`, or a ``(train, test)`` pair of
    torch Datasets/DataLoaders) under ``scenario``'s transform, on ``device``.

    Raises:
        TypeError: ``data`` is none of these.
    """
    if isinstance(data, Dataset):
        return TensorSource(scenario.apply(data, seed), device)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        train, test = _torch_dataset(data[0], "train data"), _torch_dataset(data[1], "test data")
        scale = None
        if scenario.scale is not None:
            kw = {"scale_dist": scenario.scale_dist, "seed": seed}
            scale = (
                random_scale_factors(len(train), scenario.scale, stream=_TRAIN_STREAM, **kw),
                random_scale_factors(len(test), scenario.scale, stream=_TEST_STREAM, **kw),
            )
        return StreamSource(train, test, device, scale)
    raise TypeError(
        "data must be a normlab.data.Dataset or a (train, test) pair of torch Datasets or "
        f"DataLoaders, got {type(data).__name__}"
    )
