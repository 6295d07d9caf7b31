"""Malformed data files are refused with a DataError naming the file and the problem,
never loaded and silently mangled (issue 14, item 9)."""

from __future__ import annotations

import numpy as np
import pytest

from cabs_experiments.data import DataError, load_svhn


def _write(d, x, y):
    from scipy.io import savemat

    for name in ("train_32x32.mat", "test_32x32.mat"):
        savemat(d / name, {"X": x, "y": y})


def test_svhn_float_images_are_refused(tmp_path):
    x = np.random.default_rng(0).random((32, 32, 3, 4))  # floats in 0..1: cast to uint8 they would all be 0
    _write(tmp_path, x, np.ones((4, 1), np.uint8))
    with pytest.raises(DataError, match="train_32x32.mat: 'X' must hold uint8 pixels.*float64"):
        load_svhn(tmp_path)


def test_svhn_fractional_labels_are_refused(tmp_path):
    x = np.zeros((32, 32, 3, 3), np.uint8)
    _write(tmp_path, x, np.array([[1.0], [1.5], [3.0]]))
    with pytest.raises(DataError, match=r"'y' must hold whole-number labels.*1\.5"):
        load_svhn(tmp_path)


def test_svhn_whole_number_float_labels_are_accepted(tmp_path):
    """MATLAB stores numbers as doubles by default: 1.0..10.0 are fine labels."""
    x = np.zeros((32, 32, 3, 3), np.uint8)
    _write(tmp_path, x, np.array([[10.0], [1.0], [3.0]]))
    assert load_svhn(tmp_path).y_train.tolist() == [0, 1, 3]
