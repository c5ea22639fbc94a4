r"""Datasets as in-memory tensors with a train/test split: real data readers and seeded generators.

Every loader returns a :class:`Dataset`; :func:`load_dataset` looks loaders up by name in
:data:`DATASETS`. Nothing here downloads, and nothing refers to a fixed path: file-based datasets
(``mnist``, ``cifar10``) read only the directory passed as ``root``.

=========================== ============== ==============================================
name                        inputs         labels
=========================== ============== ==============================================
``digits``                  (N, 1, 8, 8)   10 classes; scikit-learn's bundled copy
``mnist``                   (N, 1, 28, 28) 10 classes; IDX files in ``root``
``cifar10``                 (N, 3, 32, 32) 10 classes; python-pickle batches in ``root``
``logistic-large-variance`` (N, dim)       2 classes; per-sample scale log-uniform
``ols-heterogeneous``       (N, dim)       float targets (regression)
``gaussian-halfspace``      (N, dim)       2 classes, ``y = 1[w* . x > 0]``
=========================== ============== ==============================================

Conventions: inputs are ``float32``; class labels are ``int64`` in ``[0, num_classes)``;
regression targets are ``float32`` of shape ``(N,)``. Image pixels are scaled to ``[0, 1]``.
Two-class synthetic labels are ``{0, 1}``; the signed label of the papers is ``2 y - 1``.
``seed`` controls every random choice of a loader (the train/test split of ``digits`` and of a
test-only ``mnist`` directory, and all synthetic draws), so the same ``(name, seed, options)``
always gives the same tensors.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from normlab.data.idx import read_idx
from normlab.registry import Registry

__all__ = [
    "DATASETS",
    "load_tiny",
    "Dataset",
    "list_datasets",
    "load_dataset",
    "register_dataset",
    "stratified_split",
]

logger = logging.getLogger(__name__)

TASKS = ("classification", "regression")


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    r"""A named dataset held in memory: train and test tensors plus what the labels mean.

    Attributes:
        name: registry name (``"digits"``, ``"mnist"``, ...).
        x_train: ``float32`` inputs, shape :math:`(N, *)`.
        y_train: ``int64`` class labels :math:`(N,)` for classification, ``float32`` targets
            :math:`(N,)` for regression.
        x_test: as ``x_train``, for the test split.
        y_test: as ``y_train``, for the test split.
        num_classes: number of classes; 0 for regression.
        task: ``"classification"`` or ``"regression"``.
        info: loader-specific metadata (split used, generating parameters such as ``w_star``,
            applied transforms). Read-only by convention.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    task: str
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"Dataset task must be one of {TASKS}, got {self.task!r}")
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if not isinstance(x, Tensor) or not isinstance(y, Tensor):
                raise TypeError(
                    f"Dataset x_{split}/y_{split} must be tensors, got "
                    f"{type(x).__name__}/{type(y).__name__}"
                )
            if x.dim() < 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"Dataset {split} split expected x of shape (N, ...) and y of shape (N,), got "
                    f"x {tuple(x.shape)} and y {tuple(y.shape)}"
                )
            if not x.is_floating_point():
                raise TypeError(f"Dataset x_{split} must be floating point, got {x.dtype}")
            if self.task == "classification":
                if y.dtype != torch.int64:
                    raise TypeError(f"classification y_{split} must be int64, got {y.dtype}")
                if self.num_classes < 1:
                    raise ValueError(
                        f"classification data needs num_classes >= 1, got {self.num_classes}"
                    )
                if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                    raise ValueError(
                        f"Dataset y_{split} labels must lie in [0, {self.num_classes}), got range "
                        f"[{int(y.min())}, {int(y.max())}]"
                    )
            else:
                if not y.is_floating_point():
                    raise TypeError(f"regression y_{split} must be floating point, got {y.dtype}")
                if self.num_classes != 0:
                    raise ValueError(f"regression data needs num_classes 0, got {self.num_classes}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"Dataset x_train and x_test must have the same sample shape, got "
                f"{tuple(self.x_train.shape[1:])} and {tuple(self.x_test.shape[1:])}"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. ``(1, 28, 28)``."""
        return tuple(self.x_train.shape[1:])

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.x_test.shape[0])

    def replace(self, **changes: Any) -> Dataset:
        """A copy with some fields replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def holdout(self, fraction: float, seed: int = 0) -> Dataset:
        """A validation view: a seeded random ``fraction`` of the *training* split becomes the
        evaluation split, the rest stays for training; the test split is not used.

        Raises:
            ValueError: ``fraction`` not in (0, 1), or a split that would be empty.
        """
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise ValueError(f"holdout fraction must be a float in (0, 1), got {fraction!r}")
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"holdout fraction must be in (0, 1), got {fraction!r}")
        n_val = int(round(self.num_train * fraction))
        if not 0 < n_val < self.num_train:
            raise ValueError(
                f"holdout {fraction} of {self.num_train} training samples leaves an empty split"
            )
        g = torch.Generator().manual_seed(10_007 + int(seed))
        perm = torch.randperm(self.num_train, generator=g)
        val, train = perm[:n_val].sort().values, perm[n_val:].sort().values
        return self.replace(
            x_train=self.x_train[train],
            y_train=self.y_train[train],
            x_test=self.x_train[val],
            y_test=self.y_train[val],
            info={**self.info, "holdout": {"fraction": fraction, "seed": seed}},
        )

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, task={self.task!r}, num_classes={self.num_classes}, "
            f"train={self.num_train}, test={self.num_test}, input_shape={self.input_shape})"
        )


# --------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------


def stratified_split(labels: np.ndarray, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    r"""Seeded stratified train/test split of ``range(len(labels))``.

    Class :math:`c` with :math:`n_c` samples gives :math:`\lfloor n_c \cdot n_{test}/N \rfloor`
    test samples, plus one for the classes with the largest remainders until exactly ``n_test``
    are taken (largest-remainder rounding). Which samples of a class go to test is a seeded random
    choice.

    Returns:
        ``(train_idx, test_idx)``, each sorted ascending, so both splits keep the original order.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    if not 0 < n_test < n:
        raise ValueError(f"n_test must be in (0, {n}) for {n} samples, got {n_test}")
    rng = np.random.default_rng([seed, 0x5D1])
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n_test / n
    quota = np.floor(exact).astype(np.int64)
    # ties in the remainder are broken by class order (stable sort), so the split is deterministic
    extra = np.argsort(-(exact - quota), kind="stable")[: n_test - int(quota.sum())]
    quota[extra] += 1
    test_parts = []
    for c, q in zip(classes, quota, strict=True):
        members = np.flatnonzero(labels == c)
        test_parts.append(rng.choice(members, size=int(q), replace=False))
    test_idx = np.sort(np.concatenate(test_parts))
    mask = np.ones(n, dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask), test_idx


def _n_test(n: int, test_fraction: float) -> int:
    if not isinstance(test_fraction, (int, float)) or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be a float in (0, 1), got {test_fraction!r}")
    n_test = round(n * test_fraction)
    if not 0 < n_test < n:
        raise ValueError(f"test_fraction={test_fraction} leaves an empty split of {n} samples")
    return n_test


def _require_root(name: str, root: str | os.PathLike[str] | None, expect: str) -> Path:
    if root is None:
        raise ValueError(
            f"dataset {name!r} reads files from a directory: pass root=<dir> ({expect})"
        )
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(
            f"dataset {name!r}: directory {str(path)!r} does not exist or is not a directory"
        )
    return path


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


def load_digits(
    *, root: str | os.PathLike[str] | None = None, seed: int = 0, test_fraction: float = 0.2
) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, no file or network access).

    Pixels (integers 0..16) are divided by 16, so inputs lie in ``[0, 1]``; shape
    ``(N, 1, 8, 8)``. The train/test split is :func:`stratified_split` with ``seed``
    (``test_fraction=0.2`` gives 1438/359). ``root`` is ignored.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    del root  # the data ships with scikit-learn
    bunch = _sk_load_digits()
    images = np.asarray(bunch.images, dtype=np.float64) / 16.0  # (1797, 8, 8), values 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = stratified_split(labels, _n_test(len(labels), test_fraction), seed)
    x = torch.from_numpy(images).to(torch.float32).unsqueeze(1)  # (N, 8, 8) -> (N, 1, 8, 8)
    y = torch.from_numpy(labels)
    return Dataset(
        name="digits",
        x_train=x[train_idx],
        y_train=y[train_idx],
        x_test=x[test_idx],
        y_test=y[test_idx],
        num_classes=10,
        task="classification",
        info={"split": f"stratified test_fraction={test_fraction} seed={seed}"},
    )


# --------------------------------------------------------------------------------------------
# MNIST (IDX files)
# --------------------------------------------------------------------------------------------

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_file(root: Path, stem: str) -> Path | None:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_mnist_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path, expected_type=0x08, expected_ndim=3)  # (N, H, W) uint8
    labels = read_idx(labels_path, expected_type=0x08, expected_ndim=1)  # (N,) uint8
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"MNIST count mismatch: images file {str(images_path)!r} holds {images.shape[0]} "
            f"images but labels file {str(labels_path)!r} holds {labels.shape[0]} labels"
        )
    if labels.size and labels.max() > 9:
        raise ValueError(
            f"MNIST labels file {str(labels_path)!r} holds label {int(labels.max())}; "
            "expected digits 0..9"
        )
    return images, labels.astype(np.int64)


def load_mnist(
    *, root: str | os.PathLike[str] | None = None, seed: int = 0, test_fraction: float = 0.2
) -> Dataset:
    """MNIST from the standard IDX files in ``root`` (each optionally gzip-compressed).

    Reads ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
    and ``t10k-labels-idx1-ubyte`` (or the same names + ``.gz``). If only the two ``t10k`` files
    are present, their 10k samples are split with :func:`stratified_split` (``seed``,
    ``test_fraction=0.2``: 8000 train / 2000 test). Pixels are divided by 255; shape
    ``(N, 1, 28, 28)``.

    Raises:
        ValueError: ``root`` not given, or a malformed file (see :func:`normlab.data.idx.read_idx`,
            plus image/label count mismatch and labels outside 0..9).
        FileNotFoundError: ``root`` missing, the test files missing, or only one of the two
            training files present.
    """
    names = ", ".join(f"{s}[.gz]" for pair in MNIST_FILES.values() for s in pair)
    path = _require_root("mnist", root, f"holding {names}")
    found = {split: [_find_file(path, s) for s in stems] for split, stems in MNIST_FILES.items()}
    missing_test = [s for s, f in zip(MNIST_FILES["test"], found["test"], strict=True) if f is None]
    if missing_test:
        raise FileNotFoundError(
            f"mnist: directory {str(path)!r} lacks {', '.join(m + '[.gz]' for m in missing_test)}"
        )
    test_images, test_labels = _read_mnist_pair(*found["test"])  # type: ignore[arg-type]
    n_train_files = sum(f is not None for f in found["train"])
    if n_train_files == 1:
        present = next(f for f in found["train"] if f is not None)
        absent = next(
            s for s, f in zip(MNIST_FILES["train"], found["train"], strict=True) if f is None
        )
        raise FileNotFoundError(
            f"mnist: directory {str(path)!r} has {present.name!r} but lacks {absent}[.gz]"
        )
    if n_train_files == 2:
        train_images, train_labels = _read_mnist_pair(*found["train"])  # type: ignore[arg-type]
        if train_images.shape[1:] != test_images.shape[1:]:
            raise ValueError(
                f"mnist: train images are {train_images.shape[1:]} but test images are "
                f"{test_images.shape[1:]} in {str(path)!r}"
            )
        split = "official 60k/10k"
    else:
        train_idx, test_idx = stratified_split(
            test_labels, _n_test(len(test_labels), test_fraction), seed
        )
        train_images, train_labels = test_images[train_idx], test_labels[train_idx]
        test_images, test_labels = test_images[test_idx], test_labels[test_idx]
        split = f"t10k only: stratified test_fraction={test_fraction} seed={seed}"
        logger.info("mnist: only the t10k files in %s; split them (%s)", path, split)

    def to_x(images: np.ndarray) -> Tensor:  # (N, H, W) uint8 -> (N, 1, H, W) float32 in [0, 1]
        return (torch.from_numpy(images).to(torch.float32) / 255.0).unsqueeze(1)

    return Dataset(
        name="mnist",
        x_train=to_x(train_images),
        y_train=torch.from_numpy(train_labels),
        x_test=to_x(test_images),
        y_test=torch.from_numpy(test_labels),
        num_classes=10,
        task="classification",
        info={"split": split, "root": str(path)},
    )


# --------------------------------------------------------------------------------------------
# CIFAR-10 (python pickle batches)
# --------------------------------------------------------------------------------------------

CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"

# The only globals a CIFAR batch (a dict of a NumPy array and a list of ints) needs, so a
# tampered file cannot run code: pickle.load would import and call anything it names.
_SAFE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS or (module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _RestrictedUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"CIFAR-10 file {str(path)!r} is not a valid pickle batch: {exc}") from exc
    if not isinstance(batch, dict):
        raise ValueError(
            f"CIFAR-10 file {str(path)!r} should hold a dict, got {type(batch).__name__}"
        )
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(
            f"CIFAR-10 file {str(path)!r} lacks the b'data' or b'labels' key "
            f"(keys: {sorted(map(repr, batch))})"
        )
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(
            f"CIFAR-10 file {str(path)!r}: b'data' should be uint8 of shape (N, 3072), got "
            f"{data.dtype} {data.shape}"
        )
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise ValueError(
            f"CIFAR-10 file {str(path)!r}: {data.shape[0]} images but labels of shape "
            f"{labels.shape}"
        )
    if labels.size and (
        not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() > 9
    ):
        raise ValueError(
            f"CIFAR-10 file {str(path)!r}: labels should be integers 0..9, got dtype "
            f"{labels.dtype} range [{labels.min()}, {labels.max()}]"
        )
    return data, labels.astype(np.int64)


def load_cifar10(*, root: str | os.PathLike[str] | None = None, seed: int = 0) -> Dataset:
    """CIFAR-10 from the python-pickle batches ``data_batch_1..5`` and ``test_batch``.

    ``root`` may be the ``cifar-10-batches-py`` directory itself or its parent. Each batch is a
    dict with ``b"data"`` (uint8, shape ``(N, 3072)``, channel-major 3x32x32) and ``b"labels"``.
    Pixels are divided by 255; shape ``(N, 3, 32, 32)``. The official split is used, so ``seed``
    is unused. The pickles are read with an allow-list of NumPy globals, so a tampered file
    cannot execute code.
    """
    del seed
    files = ", ".join((*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE))
    path = _require_root("cifar10", root, f"holding {files}")
    if (path / "cifar-10-batches-py").is_dir():
        path = path / "cifar-10-batches-py"
    missing = [n for n in (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE) if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"cifar10: directory {str(path)!r} lacks {', '.join(missing)}")
    train = [_read_cifar_batch(path / n) for n in CIFAR10_TRAIN_FILES]
    test_data, test_labels = _read_cifar_batch(path / CIFAR10_TEST_FILE)

    def to_x(data: np.ndarray) -> Tensor:  # (N, 3072) uint8 -> (N, 3, 32, 32) float32 in [0, 1]
        return torch.from_numpy(data).to(torch.float32).div_(255.0).reshape(-1, 3, 32, 32)

    return Dataset(
        name="cifar10",
        x_train=to_x(np.concatenate([d for d, _ in train])),
        y_train=torch.from_numpy(np.concatenate([lab for _, lab in train])),
        x_test=to_x(test_data),
        y_test=torch.from_numpy(test_labels),
        num_classes=10,
        task="classification",
        info={"split": "official", "root": str(path)},
    )


# --------------------------------------------------------------------------------------------
# Synthetic generators
# --------------------------------------------------------------------------------------------


def _check_sizes(n: int, n_test: int, dim: int) -> None:
    for key, value in (("n", n), ("n_test", n_test), ("dim", dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive int, got {value!r}")


def _check_range(lo_name: str, lo: float, hi_name: str, hi: float) -> None:
    if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and 0 < lo <= hi):
        raise ValueError(
            f"expected 0 < {lo_name} <= {hi_name}, got {lo_name}={lo!r}, {hi_name}={hi!r}"
        )


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, 0xDA7A]).generate_state(1)[0])
    )


def _split_xy(name: str, x: Tensor, y: Tensor, n: int, num_classes: int, info: dict) -> Dataset:
    task = "classification" if num_classes else "regression"
    return Dataset(name, x[:n], y[:n], x[n:], y[n:], num_classes, task, info)


def load_logistic_large_variance(
    *,
    root: str | os.PathLike[str] | None = None,
    seed: int = 0,
    n: int = 2000,
    n_test: int = 1000,
    dim: int = 20,
    scale_low: float = 1e-2,
    scale_high: float = 1e2,
    label_noise: float = 0.0,
) -> Dataset:
    r"""Two-class, linearly separable data whose per-sample scale spans orders of magnitude.

    With a teacher :math:`w^* \sim \mathcal N(0, I_d)/\sqrt d` (``info["w_star"]``):

    .. math::
        z_i \sim \mathcal N(0, I_d), \quad \log s_i \sim U[\log s_{lo}, \log s_{hi}], \quad
        x_i = s_i z_i, \quad y_i = \mathbb 1[w^{*\top} x_i > 0]

    (``scale_low``, ``scale_high`` are :math:`s_{lo}, s_{hi}`; ``info["scales"]`` holds the
    :math:`s_i`, train then test). A positive scale does not change the label, so the data is
    separable by :math:`w^*` (the labels are computed from the stored ``float32`` inputs); a
    fraction ``label_noise`` of labels is then flipped. This is the "large variance" logistic
    regression setting in which Lian & Liu 2019 (Fig. 3) report BN failing to converge.
    """
    del root
    _check_sizes(n, n_test, dim)
    _check_range("scale_low", scale_low, "scale_high", scale_high)
    if not isinstance(label_noise, (int, float)) or not 0.0 <= label_noise <= 0.5:
        raise ValueError(f"label_noise must be a float in [0, 0.5], got {label_noise!r}")
    g = _generator(seed)
    total = n + n_test
    w_star = torch.randn(dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    z = torch.randn(total, dim, generator=g, dtype=torch.float64)
    log_s = torch.empty(total, dtype=torch.float64).uniform_(
        math.log(scale_low), math.log(scale_high), generator=g
    )
    scales = log_s.exp()
    x = (z * scales[:, None]).to(torch.float32)
    y = (x.double() @ w_star > 0).long()
    flip = torch.rand(total, generator=g, dtype=torch.float64) < label_noise
    y = torch.where(flip, 1 - y, y)
    info = {"w_star": w_star, "scales": scales, "flipped": flip}
    return _split_xy("logistic-large-variance", x, y, n, 2, info)


def load_ols_heterogeneous(
    *,
    root: str | os.PathLike[str] | None = None,
    seed: int = 0,
    n: int = 2000,
    n_test: int = 1000,
    dim: int = 20,
    scale_low: float = 0.1,
    scale_high: float = 10.0,
    noise: float = 0.1,
) -> Dataset:
    r"""Least-squares regression whose feature scales are spread exponentially.

    Feature :math:`j` has scale :math:`s_j = s_{lo}\,(s_{hi}/s_{lo})^{j/(d-1)}` (geometric
    spacing, ``info["feature_scales"]``), so the Hessian :math:`E[x x^\top] = \mathrm{diag}(s^2)`
    has condition number :math:`(s_{hi}/s_{lo})^2`:

    .. math::
        x_{ij} = s_j z_{ij}, \quad z_{ij} \sim \mathcal N(0, 1), \quad
        y_i = x_i^\top w^* + \sigma \epsilon_i, \quad w^*_j = g_j / s_j,\ g_j \sim \mathcal N(0, 1)

    With :math:`w^*_j = g_j/s_j` (``info["w_star"]``) every feature contributes equally to
    :math:`y`, so the small-scale directions, which gradient descent fits slowest, matter as
    much as the large ones. ``noise`` is :math:`\sigma`. Targets are ``float32`` of shape ``(N,)``;
    ``num_classes`` is 0.
    """
    del root
    _check_sizes(n, n_test, dim)
    _check_range("scale_low", scale_low, "scale_high", scale_high)
    if not isinstance(noise, (int, float)) or noise < 0:
        raise ValueError(f"noise must be a float >= 0, got {noise!r}")
    g = _generator(seed)
    total = n + n_test
    feature_scales = torch.logspace(
        math.log10(scale_low), math.log10(scale_high), dim, dtype=torch.float64
    )
    w_star = torch.randn(dim, generator=g, dtype=torch.float64) / feature_scales
    x = (torch.randn(total, dim, generator=g, dtype=torch.float64) * feature_scales).to(
        torch.float32
    )
    eps = torch.randn(total, generator=g, dtype=torch.float64)
    y = (x.double() @ w_star + noise * eps).to(torch.float32)
    info = {"w_star": w_star, "feature_scales": feature_scales, "noise": noise}
    return _split_xy("ols-heterogeneous", x, y, n, 0, info)


def load_gaussian_halfspace(
    *,
    root: str | os.PathLike[str] | None = None,
    seed: int = 0,
    n: int = 2000,
    n_test: int = 1000,
    dim: int = 50,
    cond: float = 100.0,
) -> Dataset:
    r"""Gaussian inputs labelled by a halfspace (Kohler et al. 2019, length-direction decoupling).

    .. math::
        \Sigma = Q\,\mathrm{diag}(\lambda)\,Q^\top, \quad
        \lambda_j = \kappa^{-j/(d-1)}, \quad x_i \sim \mathcal N(0, \Sigma), \quad
        y_i = \mathbb 1[w^{*\top} x_i > 0]

    with :math:`Q` a seeded random orthogonal matrix, :math:`\kappa` = ``cond`` (so
    :math:`\kappa(\Sigma)` = ``cond``) and a teacher :math:`w^* \sim \mathcal N(0, I)/\sqrt d`.
    ``info`` holds ``w_star`` and ``covariance`` (:math:`\Sigma`, float64). Labels are computed
    from the stored ``float32`` inputs, so ``y == (x.double() @ w_star > 0)`` holds exactly.
    """
    del root
    _check_sizes(n, n_test, dim)
    if not isinstance(cond, (int, float)) or cond < 1:
        raise ValueError(f"cond must be a float >= 1, got {cond!r}")
    g = _generator(seed)
    total = n + n_test
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # sign fix: Haar-distributed orthogonal matrix
    eigvals = cond ** (-torch.arange(dim, dtype=torch.float64) / max(dim - 1, 1))
    covariance = (q * eigvals) @ q.T
    w_star = torch.randn(dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    z = torch.randn(total, dim, generator=g, dtype=torch.float64)
    x = ((z * eigvals.sqrt()) @ q.T).to(torch.float32)  # rows ~ N(0, Q diag(lambda) Q^T)
    y = (x.double() @ w_star > 0).long()
    info = {"w_star": w_star, "covariance": covariance, "eigenvalues": eigvals}
    return _split_xy("gaussian-halfspace", x, y, n, 2, info)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def load_tiny(*, root: str | None = None, seed: int = 0, n: int = 3, repeat: int = 1) -> Dataset:
    """``n`` training samples of ``n`` different classes; the test set is the same ``n`` samples.

    Taken from ``digits`` (or from MNIST-10k when ``root`` is given): for each of the classes
    0..n-1 one training sample chosen with ``seed``. The training split holds every sample
    ``repeat`` times (so that random batches of 2 exist for batch norm); labels are 0..n-1.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= 10:
        raise ValueError(f"n must be an int in [2, 10], got {n!r}")
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be an int >= 1, got {repeat!r}")
    base = load_dataset("mnist" if root is not None else "digits", root=root, seed=seed)
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(n):
        idx = torch.nonzero(base.y_train == c).flatten()
        picks.append(int(idx[torch.randint(len(idx), (1,), generator=g)]))
    x, y = base.x_train[picks], torch.arange(n)
    return Dataset(
        name=f"tiny-{n}" if repeat == 1 else f"tiny-{n}x{repeat}",
        x_train=x.repeat(repeat, *([1] * (x.dim() - 1))),
        y_train=y.repeat(repeat),
        x_test=x.clone(),
        y_test=y.clone(),
        num_classes=n,
        task="classification",
        info={"source": base.name, "source_indices": picks, "repeat": repeat},
    )


def _load_tiny_3x2(*, root: str | None = None, seed: int = 0) -> Dataset:
    """3 samples of 3 classes, each twice in training; test = the same 3."""
    return load_tiny(root=root, seed=seed, n=3, repeat=2)


def _load_tiny_3(*, root: str | None = None, seed: int = 0) -> Dataset:
    """3 samples of 3 classes; test = the same 3."""
    return load_tiny(root=root, seed=seed, n=3, repeat=1)


#: Dataset name -> loader ``(*, root, seed, **options) -> Dataset``, in registration order.
DATASETS: Registry[Callable[..., Dataset]] = Registry("dataset")


def register_dataset(
    name: str, loader: Callable[..., Dataset], *, overwrite: bool = False
) -> Callable[..., Dataset]:
    """Add a loader under ``name``; it must accept keyword arguments ``root`` and ``seed``."""
    if not callable(loader):
        raise TypeError(f"dataset loader must be callable, got {type(loader).__name__}")
    params = inspect.signature(loader).parameters
    if not {"root", "seed"} <= params.keys():
        raise ValueError(f"loader for {name!r} must accept root= and seed=, got {list(params)}")
    return DATASETS.register(name, loader, overwrite=overwrite)


for _name, _loader in (
    ("digits", load_digits),
    ("mnist", load_mnist),
    ("cifar10", load_cifar10),
    ("logistic-large-variance", load_logistic_large_variance),
    ("ols-heterogeneous", load_ols_heterogeneous),
    ("gaussian-halfspace", load_gaussian_halfspace),
    ("tiny-3", _load_tiny_3),
    ("tiny-3x2", _load_tiny_3x2),
):
    register_dataset(_name, _loader)


def list_datasets() -> list[str]:
    """Registered dataset names, in registration order."""
    return DATASETS.names()


def dataset_options(name: str) -> dict[str, Any]:
    """The options of dataset ``name`` (besides ``root`` and ``seed``) with their defaults."""
    loader = DATASETS[name]
    return {
        k: p.default
        for k, p in inspect.signature(loader).parameters.items()
        if k not in ("root", "seed") and p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def load_dataset(
    name: str, *, root: str | os.PathLike[str] | None = None, seed: int = 0, **options: Any
) -> Dataset:
    """Load dataset ``name`` from :data:`DATASETS`.

    Args:
        name: a registered name (see :func:`list_datasets`).
        root: directory with the files of a file-based dataset (``mnist``, ``cifar10``);
            ignored by the others.
        seed: seeds every random choice of the loader (splits, synthetic draws).
        **options: loader-specific options (e.g. ``n``, ``dim`` for synthetic data,
            ``test_fraction`` for ``digits``/``mnist``); see :func:`dataset_options`.

    Raises:
        ValueError: unknown name (the message lists the valid ones), unknown option (lists the
            accepted ones), bad option value, or malformed data files.
        FileNotFoundError: a missing directory or file.
    """
    loader = DATASETS[name]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    accepted = dataset_options(name)
    unknown = sorted(set(options) - accepted.keys())
    if unknown:
        raise ValueError(
            f"dataset {name!r} got unknown option(s) {unknown}; accepted: "
            f"{', '.join(f'{k}={v!r}' for k, v in accepted.items()) or 'none'}"
        )
    dataset = loader(root=root, seed=seed, **options)
    logger.debug("loaded %r", dataset)
    return dataset
