"""Data sets of the experiment: scikit-learn's digits (shipped, no download),
and MNIST, CIFAR-10 and SVHN read from files the user already has.

Every loader returns a :class:`Dataset`: images as float32 in [0, 1] with shape
(N, H, W, C) (channels last; a backend transposes if its layers want channels
first) and int64 labels 0..9. Nothing is ever downloaded.

Expected files under ``--data-dir`` (each also looked for in the subfolder
named in brackets):

- MNIST [``mnist/``, ``MNIST/raw/``]: ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``, each optionally gzipped (``.gz``).
- CIFAR-10 [``cifar-10-batches-py/``]: the python pickle batches
  ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``. Unpickling can
  execute code: these files must come from a source you trust. The loader
  refuses any pickled object other than plain numpy arrays, lists, dicts and
  strings, which limits but does not remove that risk.
- SVHN [``svhn/``]: ``train_32x32.mat`` and ``test_32x32.mat`` (the cropped
  digits, format 2); label 10 stands for the digit 0 and is mapped to 0.

A missing or malformed file raises :class:`DataError` naming the file and
what was wrong with it.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATASETS = ("digits", "mnist", "cifar10", "svhn")
DIGITS_SPLIT_SEED = 0  # the digits train/test split is fixed, whatever --seed says
DIGITS_TEST_FRACTION = 0.2


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file."""


@dataclass(frozen=True)
class Dataset:
    """An image classification data set in memory.

    x_train, x_test: float32 (N, H, W, C) in [0, 1]; y_train, y_test: int64 (N,) in 0..num_classes-1.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int = 10

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.ndim != 4 or x.dtype != np.float32:
                raise DataError(f"{self.name} {split} images must be float32 (N, H, W, C), got {x.dtype} {x.shape}")
            if y.shape != (x.shape[0],) or y.dtype != np.int64:
                raise DataError(f"{self.name} {split} labels must be int64 ({x.shape[0]},), got {y.dtype} {y.shape}")
            if len(y) == 0:
                raise DataError(f"{self.name} {split} split is empty")
            if y.min() < 0 or y.max() >= self.num_classes:
                raise DataError(f"{self.name} {split} labels must lie in 0..{self.num_classes - 1}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(f"{self.name}: train images {self.x_train.shape[1:]} and test images "
                            f"{self.x_test.shape[1:]} differ in shape")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C)."""
        h, w, c = self.x_train.shape[1:]
        return int(h), int(w), int(c)

    @property
    def num_inputs(self) -> int:
        """H * W * C: the input size of an MLP on the flattened images."""
        h, w, c = self.image_shape
        return h * w * c

    def describe(self) -> str:
        h, w, c = self.image_shape
        return f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} test images of {h}x{w}x{c}"


# ----------------------------------------------------------------------------- digits


def load_digits_dataset() -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1797 images, shipped with the package).

    Pixel values 0..16 are scaled to [0, 1]; a stratified split with a fixed seed
    keeps 20% (360 images) as the test set, 1437 for training.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).reshape(-1, 8, 8, 1)
    y = np.asarray(bunch.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=y
    )
    return Dataset("digits", np.ascontiguousarray(x_tr), y_tr, np.ascontiguousarray(x_te), y_te)


# ----------------------------------------------------------------------------- files


def _find(data_dir: Path, subdirs: Sequence[str], names: Sequence[str], what: str) -> Path:
    """The first existing ``dir/name`` over ``data_dir`` and its subfolders, else DataError."""
    dirs = [data_dir] + [data_dir / s for s in subdirs]
    for d in dirs:
        for n in names:
            if (d / n).is_file():
                return d / n
    raise DataError(
        f"{what}: none of {', '.join(names)} found in "
        + ", ".join(str(d) for d in dirs)
        + " (no download is attempted; put the files there or pass another --data-dir)"
    )


def _check_dir(data_dir: str | Path | None, dataset: str) -> Path:
    if data_dir is None:
        raise DataError(f"--data-dir is required for {dataset} (only digits ships with the package)")
    path = Path(data_dir)
    if not path.is_dir():
        raise DataError(f"--data-dir {path} is not a directory")
    return path


# ----------------------------------------------------------------------------- MNIST

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (gzipped or not) with ``ndim`` dimensions.

    Format: 2 zero bytes, type code 0x08 (unsigned byte), the number of
    dimensions, that many big-endian uint32 sizes, then the data.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    if len(raw) < 4:
        raise DataError(f"{path}: truncated, {len(raw)} bytes, not even the 4-byte magic number")
    magic = int.from_bytes(raw[:4], "big")
    expected = 0x0800 | ndim
    if magic != expected:
        raise DataError(
            f"{path}: wrong magic number 0x{magic:08x}, expected 0x{expected:08x} "
            f"(IDX file of unsigned bytes with {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes, need {header})")
    shape = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    size = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != size:
        state = "truncated" if len(raw) - header < size else "too long"
        raise DataError(f"{path}: {state}: header says shape {shape} = {size} bytes, file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_mnist(data_dir: str | Path | None) -> Dataset:
    """MNIST from the four IDX files (60000 train / 10000 test, 28x28)."""
    d = _check_dir(data_dir, "mnist")
    arrays: dict[str, np.ndarray] = {}
    paths: dict[str, Path] = {}
    for key, name in MNIST_FILES.items():
        paths[key] = _find(d, ("mnist", "MNIST/raw"), (name, name + ".gz"), f"MNIST {key.replace('_', ' ')}")
        arrays[key] = read_idx(paths[key], 3 if key.endswith("images") else 1)
    splits = []
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        ipath, lpath = paths[f"{split}_images"], paths[f"{split}_labels"]
        if images.shape[1:] != (28, 28):
            raise DataError(f"{ipath}: images must be 28x28, got {images.shape[1]}x{images.shape[2]}")
        if len(images) != len(labels):
            raise DataError(f"{ipath} has {len(images)} images but {lpath} has {len(labels)} labels")
        if len(labels) and labels.max() > 9:
            raise DataError(f"{lpath}: labels must lie in 0..9, found {int(labels.max())}")
        splits.append(((images.astype(np.float32) / 255.0)[..., None], labels.astype(np.int64)))
    (x_tr, y_tr), (x_te, y_te) = splits
    return Dataset("mnist", x_tr, y_tr, x_te, y_te)


# ----------------------------------------------------------------------------- CIFAR-10

CIFAR_TRAIN = tuple(f"data_batch_{k}" for k in range(1, 6))
CIFAR_TEST = "test_batch"


def _numpy_core(name: str) -> str:
    """numpy 2 moved numpy.core to numpy._core; pickles written by numpy 1 name the old one."""
    if name.startswith("numpy.core") and importlib.util.find_spec("numpy._core") is not None:
        return "numpy._core" + name[len("numpy.core") :]
    return name


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch holds: dicts, lists, strings and numpy arrays."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} (not part of a CIFAR-10 batch)")
        return getattr(importlib.import_module(_numpy_core(module)), name)


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: (n, 32, 32, 3) uint8 images and (n,) int64 labels.

    The file must be trusted (it is a pickle); see the module docstring.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a malformed file
        raise DataError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict with 'data' and 'labels', got {type(obj).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"{path}: the batch has no {'data' if 'data' not in batch else 'labels'!r} entry "
                        f"(keys: {sorted(map(str, batch))})")
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        raise DataError(f"{path}: 'data' must be uint8 of shape (n, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {data.shape[0]} images but labels of shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or (len(labels) and not 0 <= labels.min() <= labels.max() <= 9):
        raise DataError(f"{path}: labels must be integers in 0..9")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels.astype(np.int64)


def load_cifar10(data_dir: str | Path | None) -> Dataset:
    """CIFAR-10 from the python batches (50000 train / 10000 test, 32x32x3)."""
    d = _check_dir(data_dir, "cifar10")
    sub = ("cifar-10-batches-py",)
    train = [read_cifar_batch(_find(d, sub, (n,), "CIFAR-10 training batch")) for n in CIFAR_TRAIN]
    x_te, y_te = read_cifar_batch(_find(d, sub, (CIFAR_TEST,), "CIFAR-10 test batch"))
    x_tr = np.concatenate([x for x, _ in train])
    y_tr = np.concatenate([y for _, y in train])
    return Dataset("cifar10", x_tr.astype(np.float32) / 255.0, y_tr, x_te.astype(np.float32) / 255.0, y_te)


# ----------------------------------------------------------------------------- SVHN

SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def read_svhn_mat(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One SVHN cropped-digits .mat file: (n, 32, 32, 3) uint8 images, (n,) int64 labels with 10 -> 0."""
    from scipy.io import loadmat

    path = Path(path)
    try:
        mat = loadmat(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    except Exception as e:  # noqa: BLE001 - scipy raises several types on malformed files
        raise DataError(f"{path}: not a readable MATLAB file ({type(e).__name__}: {e})") from e
    for key in ("X", "y"):
        if key not in mat:
            raise DataError(f"{path}: no variable {key!r} (found {sorted(k for k in mat if not k.startswith('__'))})")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"])
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataError(f"{path}: 'X' must have shape (32, 32, 3, n), got {x.shape}")
    if x.dtype != np.uint8:  # the published files hold uint8 pixels; a cast would mangle floats in 0..1
        raise DataError(f"{path}: 'X' must hold uint8 pixels (0..255) as the SVHN files do, got {x.dtype}")
    y = y.reshape(-1)
    if y.shape != (x.shape[3],):
        raise DataError(f"{path}: 'X' holds {x.shape[3]} images but 'y' has {y.size} labels")
    if not (np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)))):
        raise DataError(f"{path}: 'y' must hold whole-number labels, got {y.dtype} values such as "
                        f"{y[np.flatnonzero(y != np.round(y))[:1]] if np.issubdtype(y.dtype, np.floating) else y[:1]}")
    if len(y) and not (1 <= y.min() and y.max() <= 10):
        raise DataError(f"{path}: labels must lie in 1..10 (10 = digit 0), found {y.min()}..{y.max()}")
    images = np.ascontiguousarray(x.transpose(3, 0, 1, 2)).astype(np.uint8)
    return images, (y.astype(np.int64) % 10)


def load_svhn(data_dir: str | Path | None) -> Dataset:
    """SVHN cropped digits (73257 train / 26032 test, 32x32x3)."""
    d = _check_dir(data_dir, "svhn")
    (x_tr, y_tr), (x_te, y_te) = (
        read_svhn_mat(_find(d, ("svhn",), (SVHN_FILES[s],), f"SVHN {s} file")) for s in ("train", "test")
    )
    return Dataset("svhn", x_tr.astype(np.float32) / 255.0, y_tr, x_te.astype(np.float32) / 255.0, y_te)


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """The data set ``name`` (one of :data:`DATASETS`)."""
    if name == "digits":
        return load_digits_dataset()
    if name == "mnist":
        return load_mnist(data_dir)
    if name == "cifar10":
        return load_cifar10(data_dir)
    if name == "svhn":
        return load_svhn(data_dir)
    raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
