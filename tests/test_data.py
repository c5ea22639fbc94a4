"""Datasets: digits, MNIST (IDX), CIFAR-10 (pickle batches), synthetic generators, error paths."""

from __future__ import annotations

import collections
import dataclasses
import gzip
import math
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import normlab.data as nd
from normlab.data.datasets import (
    DATASETS,
    Dataset,
    dataset_options,
    list_datasets,
    load_dataset,
    stratified_split,
)
from normlab.data.idx import read_idx

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08, magic: int | None = None):
    """Write an IDX file by hand (the oracle for the reader); ``.gz`` names are compressed."""
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if magic is None:
        magic = (type_code << 8) | array.ndim
    raw = struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in array.shape)
    raw += np.ascontiguousarray(array, dtype=dtype[type_code]).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return raw


def rows_with_labels(x: torch.Tensor, y: torch.Tensor, scale: float) -> collections.Counter:
    """Multiset of (pixel bytes, label): compares datasets up to sample order."""
    pixels = np.rint(x.reshape(len(x), -1).numpy() * scale).astype(np.uint8)
    return collections.Counter(zip(map(bytes, pixels), y.tolist(), strict=True))


# ---- registry -----------------------------------------------------------------------------


def test_registry_and_unknown_names():
    expected = {
        "digits",
        "mnist",
        "cifar10",
        "logistic-large-variance",
        "ols-heterogeneous",
        "gaussian-halfspace",
    }
    assert expected <= set(list_datasets()) and set(DATASETS) == set(list_datasets())
    with pytest.raises(
        ValueError,
        match=r"unknown dataset 'mnst' \(did you mean 'mnist'\?\); valid datasets: digits",
    ):
        load_dataset("mnst")
    with pytest.raises(TypeError):
        DATASETS["x"] = None  # type: ignore[index]
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['dims'\]; accepted: n=2000"):
        load_dataset("gaussian-halfspace", dims=3)
    assert dataset_options("digits") == {"test_fraction": 0.2}
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        load_dataset("digits", seed=-1)


def test_public_names_importable():
    for name in ("Dataset", "load_dataset", "DATASETS", "Scenario", "get_scenario", "SCENARIOS"):
        assert hasattr(nd, name)
    assert issubclass(nd.ShuffledSampler, nd.BatchSampler)


def test_package_has_no_fixed_paths_or_downloads():
    src = Path(nd.__file__).parent
    for path in src.glob("*.py"):
        text = path.read_text()
        assert "/work" not in text and "shared/data" not in text, path
        assert not re.search(r"\b(urllib|requests|http|download)\b", text, re.I), path


def test_dataset_validation():
    x, y = torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"y of shape \(N,\), got x \(4, 3\) and y \(3,\)"):
        Dataset("d", x, y[:3], x, y, 2, "classification")
    with pytest.raises(TypeError, match="int64"):
        Dataset("d", x, y.float(), x, y, 2, "classification")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\), got range \[0, 5\]"):
        Dataset("d", x, y + torch.tensor([0, 0, 0, 5]), x, y, 2, "classification")
    with pytest.raises(ValueError, match="task must be one of"):
        Dataset("d", x, y, x, y, 2, "ranking")
    with pytest.raises(ValueError, match="regression data needs num_classes 0"):
        Dataset("d", x, y.float(), x, y.float(), 2, "regression")
    ds = Dataset("d", x, y, x, y, 2, "classification")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.name = "e"  # type: ignore[misc]
    assert "train=4" in repr(ds) and ds.input_shape == (3,)


# ---- digits -------------------------------------------------------------------------------


def test_digits_shapes_range_and_content():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits")
    bunch = load_digits()
    n = len(bunch.target)
    assert (ds.num_train, ds.num_test) == (n - round(0.2 * n), round(0.2 * n))
    assert ds.x_train.shape[1:] == (1, 8, 8) and ds.x_train.dtype == torch.float32
    assert ds.y_train.dtype == torch.int64 and (ds.num_classes, ds.task) == (10, "classification")
    for x in (ds.x_train, ds.x_test):
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    # train + test are exactly sklearn's images / 16 with their labels
    ours = rows_with_labels(
        torch.cat([ds.x_train, ds.x_test]), torch.cat([ds.y_train, ds.y_test]), 16
    )
    ref = collections.Counter(
        zip(
            map(bytes, bunch.images.reshape(n, -1).astype(np.uint8)),
            bunch.target.tolist(),
            strict=True,
        )
    )
    assert ours == ref
    # stratified: each class's test share is its proportional quota, rounded
    counts = np.bincount(bunch.target)
    test_counts = np.bincount(ds.y_test.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - counts * ds.num_test / n) < 1)


def test_digits_split_is_seeded():
    a, b, c = load_dataset("digits"), load_dataset("digits"), load_dataset("digits", seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_test, c.y_test)
    half = load_dataset("digits", test_fraction=0.5)
    assert abs(half.num_test - half.num_train) <= 1
    with pytest.raises(ValueError, match="test_fraction must be a float in"):
        load_dataset("digits", test_fraction=1.5)


def test_stratified_split_exact_quota():
    labels = np.array([0] * 7 + [1] * 5 + [2] * 3)
    train, test = stratified_split(labels, 6, seed=0)
    assert len(test) == 6 and len(np.intersect1d(train, test)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(15))
    # quotas 2.8, 2.0, 1.2 -> 2, 2, 1 plus one for the largest remainder (class 0)
    assert np.bincount(labels[test]).tolist() == [3, 2, 1]
    with pytest.raises(ValueError, match="n_test must be in"):
        stratified_split(labels, 15, seed=0)


# ---- MNIST: the real t10k files -----------------------------------------------------------


def _decode_idx_numpy(path: Path, header: int) -> np.ndarray:
    return np.frombuffer(gzip.decompress(path.read_bytes()), dtype=np.uint8, offset=header)


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason=f"{MNIST_DIR} not present")
def test_mnist_t10k_only_is_split_8k_2k():
    ds = load_dataset("mnist", root=MNIST_DIR)
    assert ds.x_train.shape == (8000, 1, 28, 28) and ds.x_test.shape == (2000, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert float(ds.x_train.min()) == 0.0 and float(ds.x_train.max()) == 1.0
    labels = _decode_idx_numpy(MNIST_DIR / "t10k-labels-idx1-ubyte.gz", 8)
    pixels = _decode_idx_numpy(MNIST_DIR / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 784)
    assert len(labels) == 10_000
    counts = np.bincount(labels, minlength=10)
    train_counts = np.bincount(ds.y_train.numpy(), minlength=10)
    test_counts = np.bincount(ds.y_test.numpy(), minlength=10)
    assert np.array_equal(train_counts + test_counts, counts)
    assert np.all(np.abs(test_counts - counts * 0.2) < 1)  # stratified 20%
    # the split partitions the 10k (image, label) pairs; pixels are bytes / 255
    ours = rows_with_labels(
        torch.cat([ds.x_train, ds.x_test]), torch.cat([ds.y_train, ds.y_test]), 255
    )
    assert ours == collections.Counter(zip(map(bytes, pixels), labels.tolist(), strict=True))
    again = load_dataset("mnist", root=MNIST_DIR)
    assert torch.equal(again.y_train, ds.y_train) and torch.equal(again.x_test, ds.x_test)


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason=f"{MNIST_DIR} not present")
def test_mnist_uncompressed_files_read_the_same(tmp_path):
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(gzip.decompress((MNIST_DIR / f"{name}.gz").read_bytes()))
    raw = read_idx(tmp_path / "t10k-labels-idx1-ubyte")
    gz = read_idx(MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    assert raw.dtype == np.uint8 and np.array_equal(raw, gz)
    images = read_idx(tmp_path / "t10k-images-idx3-ubyte")
    assert images.shape == (10_000, 28, 28)


# ---- MNIST: crafted IDX files -------------------------------------------------------------


def _fake_mnist(root: Path, n_train: int = 12, n_test: int = 5, gz: bool = False, seed: int = 0):
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(root / f"{split}-images-idx3-ubyte{suffix}", images)
        write_idx(root / f"{split}-labels-idx1-ubyte{suffix}", labels)
        arrays[split] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_official_split_from_crafted_files(tmp_path, gz):
    arrays = _fake_mnist(tmp_path, gz=gz)
    ds = load_dataset("mnist", root=str(tmp_path))
    for split, key in (("train", "train"), ("test", "t10k")):
        images, labels = arrays[key]
        x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        torch.testing.assert_close(x, torch.from_numpy(images[:, None] / 255.0).float())
        assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))
    assert ds.info["split"].startswith("official")


def test_read_idx_other_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    cases = [
        (0x09, rng.integers(-128, 128, size=(3, 4)).astype(np.int8)),
        (0x0B, rng.integers(-30000, 30000, size=(2, 3, 4)).astype(np.int16)),
        (0x0C, rng.integers(-(2**31), 2**31 - 1, size=7).astype(np.int32)),
        (0x0D, rng.standard_normal((5, 2)).astype(np.float32)),
        (0x0E, rng.standard_normal(6)),
    ]
    for code, array in cases:
        path = tmp_path / f"a{code}.idx"
        write_idx(path, array, type_code=code)
        out = read_idx(path)
        assert out.dtype == array.dtype.newbyteorder("=") and np.array_equal(out, array)


def _expect(exc, pattern, fn, *args, **kw):
    with pytest.raises(exc, match=pattern):
        fn(*args, **kw)


def test_idx_errors_name_file_and_problem(tmp_path):
    labels = np.arange(5, dtype=np.uint8)
    raw = write_idx(tmp_path / "ok", labels)

    (tmp_path / "garbage").write_bytes(b"\x12\x34\x56\x78" + raw[4:])
    _expect(
        ValueError, r"'.*garbage' has wrong magic number 0x12345678", read_idx, tmp_path / "garbage"
    )
    (tmp_path / "badtype").write_bytes(b"\x00\x00\x07\x01" + raw[4:])
    _expect(
        ValueError, "badtype' has wrong magic number 0x00000701", read_idx, tmp_path / "badtype"
    )
    _expect(
        ValueError,
        "ok' has wrong magic number 0x00000801: expected 0x00000803",
        read_idx,
        tmp_path / "ok",
        expected_ndim=3,
    )
    (tmp_path / "tiny").write_bytes(b"\x00\x00")
    _expect(ValueError, "tiny' is truncated: 2 bytes", read_idx, tmp_path / "tiny")
    (tmp_path / "short_header").write_bytes(raw[:6])
    _expect(
        ValueError,
        "short_header' is truncated: header declares 1",
        read_idx,
        tmp_path / "short_header",
    )
    (tmp_path / "short_data").write_bytes(raw[:-2])
    _expect(
        ValueError,
        r"short_data' is truncated: header declares shape \(5,\) \(5 data bytes\) but only 3",
        read_idx,
        tmp_path / "short_data",
    )
    (tmp_path / "long").write_bytes(raw + b"\x00")
    _expect(ValueError, "long' has 1 unexpected trailing bytes", read_idx, tmp_path / "long")
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    _expect(ValueError, r"bad.gz': corrupt gzip stream", read_idx, tmp_path / "bad.gz")
    (tmp_path / "cut.gz").write_bytes(gzip.compress(raw)[:-6])
    _expect(ValueError, r"cut.gz': corrupt gzip stream", read_idx, tmp_path / "cut.gz")
    _expect(FileNotFoundError, "nothing' does not exist", read_idx, tmp_path / "nothing")


def test_mnist_errors(tmp_path):
    _expect(ValueError, "pass root=<dir>", load_dataset, "mnist")
    _expect(FileNotFoundError, "does not exist", load_dataset, "mnist", root=tmp_path / "missing")
    _expect(
        FileNotFoundError,
        r"lacks t10k-images-idx3-ubyte\[.gz\], t10k-labels-idx1-ubyte\[.gz\]",
        load_dataset,
        "mnist",
        root=tmp_path,
    )

    def fresh(name: str) -> Path:
        root = tmp_path / name
        root.mkdir()
        _fake_mnist(root)
        return root

    root = fresh("mismatch")  # mislabeled: 5 images, 4 labels
    write_idx(root / "t10k-labels-idx1-ubyte", np.zeros(4, dtype=np.uint8))
    _expect(
        ValueError,
        r"count mismatch: images file '.*t10k-images-idx3-ubyte' holds 5 images but labels "
        r"file '.*t10k-labels-idx1-ubyte' holds 4 labels",
        load_dataset,
        "mnist",
        root=root,
    )
    root = fresh("swapped")  # labels where the images belong: wrong magic
    write_idx(root / "train-images-idx3-ubyte", np.zeros(12, dtype=np.uint8))
    _expect(
        ValueError,
        "train-images-idx3-ubyte' has wrong magic number 0x00000801",
        load_dataset,
        "mnist",
        root=root,
    )
    root = fresh("truncated")
    path = root / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    _expect(ValueError, "train-images-idx3-ubyte' is truncated", load_dataset, "mnist", root=root)
    root = fresh("label10")
    write_idx(root / "t10k-labels-idx1-ubyte", np.array([0, 1, 10, 2, 3], dtype=np.uint8))
    _expect(ValueError, "t10k-labels-idx1-ubyte' holds label 10", load_dataset, "mnist", root=root)
    root = fresh("half_train")
    (root / "train-labels-idx1-ubyte").unlink()
    _expect(
        FileNotFoundError,
        "has 'train-images-idx3-ubyte' but lacks train-labels-idx1-ubyte",
        load_dataset,
        "mnist",
        root=root,
    )


# ---- CIFAR-10 -----------------------------------------------------------------------------


def _write_cifar(root: Path, n_per_batch: int = 3, protocol: int = 2, seed: int = 0):
    """Writes the six batches in the layout of cifar-10-batches-py; returns (data, labels)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n_per_batch).tolist()
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n_per_batch)],
        }
        (root / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        out[name] = (data, labels)
    return out


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_fixture(tmp_path, protocol):
    arrays = _write_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol)
    ds = load_dataset("cifar10", root=tmp_path)  # parent of cifar-10-batches-py
    same = load_dataset("cifar10", root=tmp_path / "cifar-10-batches-py")
    assert torch.equal(ds.x_train, same.x_train)
    assert ds.x_train.shape == (15, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    assert ds.num_classes == 10 and ds.y_train.dtype == torch.int64
    train = [arrays[f"data_batch_{i}"] for i in range(1, 6)]
    data = np.concatenate([d for d, _ in train])
    # channel-major rows: pixel (c, h, w) is column c*1024 + h*32 + w
    i, c, h, w = 7, 2, 5, 30
    assert float(ds.x_train[i, c, h, w]) == pytest.approx(data[i, c * 1024 + h * 32 + w] / 255.0)
    torch.testing.assert_close(ds.x_train.reshape(15, -1), torch.from_numpy(data / 255.0).float())
    assert ds.y_train.tolist() == sum((lab for _, lab in train), [])
    assert ds.y_test.tolist() == arrays["test_batch"][1]


def test_cifar10_errors(tmp_path):
    _expect(FileNotFoundError, "does not exist", load_dataset, "cifar10", root=tmp_path / "none")
    root = tmp_path / "c"
    _write_cifar(root)
    (root / "test_batch").unlink()
    _expect(FileNotFoundError, "lacks test_batch", load_dataset, "cifar10", root=root)

    def broken(content: bytes) -> None:
        _write_cifar(root)
        (root / "data_batch_3").write_bytes(content)

    good = (root / "data_batch_1").read_bytes()
    broken(good[: len(good) // 2])  # truncated pickle
    _expect(
        ValueError, "data_batch_3' is not a valid pickle batch", load_dataset, "cifar10", root=root
    )
    broken(b"\x00garbage")
    _expect(
        ValueError, "data_batch_3' is not a valid pickle batch", load_dataset, "cifar10", root=root
    )
    broken(pickle.dumps(collections.OrderedDict))  # a global outside the allow-list
    _expect(
        ValueError,
        "refusing to load global collections.OrderedDict",
        load_dataset,
        "cifar10",
        root=root,
    )
    broken(pickle.dumps([1, 2]))
    _expect(ValueError, "should hold a dict, got list", load_dataset, "cifar10", root=root)
    broken(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}))
    _expect(ValueError, r"2 images but labels of shape \(1,\)", load_dataset, "cifar10", root=root)
    broken(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]}))
    _expect(
        ValueError,
        r"uint8 of shape \(N, 3072\), got uint8 \(2, 100\)",
        load_dataset,
        "cifar10",
        root=root,
    )
    broken(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [12]}))
    _expect(ValueError, "labels should be integers 0..9", load_dataset, "cifar10", root=root)
    broken(pickle.dumps({b"images": np.zeros((1, 3072), np.uint8)}))
    _expect(ValueError, "lacks the b'data' or b'labels' key", load_dataset, "cifar10", root=root)


# ---- synthetic generators -----------------------------------------------------------------

SYNTHETIC = ["logistic-large-variance", "ols-heterogeneous", "gaussian-halfspace"]


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_seeded(name):
    a, b = (
        load_dataset(name, seed=3, n=200, n_test=50),
        load_dataset(name, seed=3, n=200, n_test=50),
    )
    c = load_dataset(name, seed=4, n=200, n_test=50)
    for split in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, split), getattr(b, split))
    assert not torch.equal(a.x_train, c.x_train)
    assert (a.num_train, a.num_test) == (200, 50) and a.x_train.dtype == torch.float32
    assert not torch.equal(a.x_train[:50], a.x_test)  # test samples are fresh draws


def test_logistic_large_variance_properties():
    ds = load_dataset("logistic-large-variance", n=4000, n_test=1000, dim=10)
    x = torch.cat([ds.x_train, ds.x_test]).double()
    y = torch.cat([ds.y_train, ds.y_test])
    w, s = ds.info["w_star"], ds.info["scales"]
    assert (ds.num_classes, ds.task, x.shape[1]) == (2, "classification", 10)
    assert torch.equal(y, (x @ w > 0).long())  # separable by w*
    assert 0.4 < float(y.double().mean()) < 0.6
    # scales are log-uniform on [1e-2, 1e2]: four decades, uniform in log10
    assert float(s.min()) >= 1e-2 and float(s.max()) <= 1e2
    log_s = s.log10()
    assert float(log_s.max() - log_s.min()) > 3.9
    assert abs(float(log_s.mean())) < 0.1 and abs(float(log_s.std()) - 4 / math.sqrt(12)) < 0.05
    # x_i = s_i z_i with z_i ~ N(0, I): ||x_i||^2 / s_i^2 ~ chi^2_10 (mean 10, var 20)
    chi2 = (x.pow(2).sum(1) / s.pow(2)).mean()
    assert abs(float(chi2) - 10) < 5 * math.sqrt(20 / 5000)
    norms = x.norm(dim=1)
    assert float(norms.max() / norms.min()) > 1e3  # sample norms span orders of magnitude

    noisy = load_dataset("logistic-large-variance", n=4000, n_test=1000, dim=10, label_noise=0.2)
    y_noisy = torch.cat([noisy.y_train, noisy.y_test])
    flipped = noisy.info["flipped"]
    assert torch.equal(y_noisy != (x @ w > 0).long(), flipped)
    assert abs(float(flipped.double().mean()) - 0.2) < 0.02


def test_ols_heterogeneous_properties():
    ds = load_dataset("ols-heterogeneous", n=20_000, n_test=100, dim=8, noise=0.1)
    x, y = ds.x_train.double(), ds.y_train.double()
    w, scales = ds.info["w_star"], ds.info["feature_scales"]
    assert (ds.num_classes, ds.task, ds.y_train.dtype) == (0, "regression", torch.float32)
    np.testing.assert_allclose(scales.numpy(), np.geomspace(0.1, 10.0, 8), rtol=1e-12)
    # feature j has standard deviation s_j (scales spread over two decades)
    np.testing.assert_allclose(x.std(0).numpy(), scales.numpy(), rtol=0.05)
    # y = x w* + noise: residual std is the noise level; least squares recovers w*
    resid = y - x @ w
    assert abs(float(resid.std()) - 0.1) < 0.005 and abs(float(resid.mean())) < 0.005
    w_hat = torch.linalg.lstsq(x, y[:, None]).solution[:, 0]
    assert float((w_hat - w).abs().max() * scales.min()) < 0.01
    # every feature contributes equally: Var(x_j w*_j) = g_j^2 with g ~ N(0, 1)
    g = w * scales
    np.testing.assert_allclose((x * w).std(0).numpy(), g.abs().numpy(), rtol=0.05)


def test_gaussian_halfspace_properties():
    ds = load_dataset("gaussian-halfspace", n=20_000, n_test=1000, dim=10, cond=100.0)
    x, y = ds.x_train.double(), ds.y_train
    w, cov = ds.info["w_star"], ds.info["covariance"]
    assert torch.equal(y, (x @ w > 0).long())  # labels are the halfspace of w*
    assert torch.equal(ds.y_test, (ds.x_test.double() @ w > 0).long())
    eig = torch.linalg.eigvalsh(cov)
    np.testing.assert_allclose(eig.numpy(), np.geomspace(0.01, 1.0, 10), rtol=1e-10)
    emp = x.T @ x / len(x)
    assert float((emp - cov).norm() / cov.norm()) < 0.05
    assert 0.4 < float(y.double().mean()) < 0.6
    assert ds.x_train.shape == (20_000, 10) and ds.num_classes == 2


def test_synthetic_bad_options():
    _expect(ValueError, "n must be a positive int, got 0", load_dataset, "gaussian-halfspace", n=0)
    _expect(ValueError, "cond must be a float >= 1", load_dataset, "gaussian-halfspace", cond=0.5)
    _expect(
        ValueError,
        "expected 0 < scale_low <= scale_high, got scale_low=10, scale_high=1",
        load_dataset,
        "logistic-large-variance",
        scale_low=10,
        scale_high=1,
    )
    _expect(ValueError, "noise must be a float >= 0", load_dataset, "ols-heterogeneous", noise=-1.0)
    _expect(ValueError, "label_noise", load_dataset, "logistic-large-variance", label_noise=0.9)
