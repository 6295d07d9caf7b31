"""The shared exactness checks (cabs_core.exactness): tolerances, probe size, schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cabs_core import (
    BatchNormTrainingError,
    UnsupportedModelError,
    accounting_scale,
    check_close,
    probe_batch_size,
    relative_error,
    rtol_for,
    verify_due,
)


def test_check_close_passes_rounding_and_names_the_layer_on_a_mismatch():
    check_close("S", 1e-12, 1.0, rtol_for("float64"))
    with pytest.raises(UnsupportedModelError, match="at emb.weight.*2.5e-03|at emb.weight.*0.0025") as e:
        check_close("S", 2.5e-3, 1.0, rtol_for("float32"), layer="emb.weight")
    assert e.value.layer == "emb.weight" and "0.0025" in e.value.reason
    with pytest.raises(UnsupportedModelError):
        check_close("S", math.nan, 1.0, 1e-4)
    assert issubclass(BatchNormTrainingError, UnsupportedModelError)


def test_rtol_for_accepts_framework_dtype_names_and_refuses_unknown():
    assert rtol_for("torch.float32") == rtol_for("float32") == 2e-4
    with pytest.raises(ValueError, match="int32"):
        rtol_for("int32")


def test_relative_error_and_accounting_scale():
    assert relative_error(1.0, 1.0) == 0.0 and relative_error(1.0, 0.0) == math.inf
    assert relative_error(1.01, 1.0) == pytest.approx(0.01)
    # examples' gradients that cancel: the sum is 0, the scale is sqrt(m S)
    assert accounting_scale(0.0, 4, 9.0) == 6.0


@given(st.integers(1, 300), st.lists(st.integers(1, 300), max_size=8))
def test_probe_batch_size_avoids_every_dimension(m, avoid):
    k = probe_batch_size(m, avoid)
    if k is None:
        assert all(j in avoid for j in range(min(3, m), m + 1)) or m < 2
    else:
        assert 2 <= k <= m and k not in avoid
        assert all(j in avoid for j in range(min(3, m), k))


def test_verify_due_schedule():
    assert [s for s in range(25) if verify_due(s, 10)] == [0, 10, 20]
    assert [s for s in range(25) if verify_due(s, None)] == [0]
    assert [s for s in range(25) if verify_due(s, np.int64(10))] == [0, 10, 20]  # NumPy integers too
    with pytest.raises(ValueError, match="verify_every"):
        verify_due(3, -1)


def _gather_of(codes: list[int]):
    """A gather across processes whose other processes said ``codes`` (this process: the caller's word)."""
    def gather(words: np.ndarray) -> np.ndarray:
        return np.asarray([[int(words[0])], *([c] for c in codes)], np.int32)
    return gather


def test_processes_agree_on_one_path():
    from cabs_core import UnsupportedModelError, agree_on_path

    assert agree_on_path(lambda: "fast", _gather_of([0, 0])) == "fast"
    assert agree_on_path(lambda: "fast", _gather_of([0, 1])) == "generic"  # one process could not establish it
    assert agree_on_path(lambda: "generic", _gather_of([0])) == "generic"
    with pytest.raises(UnsupportedModelError, match=r"refused on process\(es\) \[2\] \(see that process"):
        agree_on_path(lambda: "fast", _gather_of([0, 2]))

    def refuse() -> str:
        raise UnsupportedModelError("tied weight", layer="Dense_0", reason="unseen use")

    with pytest.raises(UnsupportedModelError, match=r"process\(es\) \[0\]: tied weight") as e:
        agree_on_path(refuse, _gather_of([0]))
    assert e.value.layer == "Dense_0" and e.value.reason == "unseen use"
