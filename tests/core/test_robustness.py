"""Nothing silently wrong in the core: configuration values, malformed or extreme
statistics, low precision (issue 14's core items)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cabs_core import (
    BatchStats,
    CABSController,
    ConfigError,
    ControllerState,
    NonFiniteStatisticsError,
    ScalarStats,
    combine,
)


def test_numpy_scalars_in_the_configuration_become_python_numbers():
    ctl = CABSController(
        lr=np.float32(0.25), bs_min=np.int64(16), bs_max=np.int32(64), multiple_of=np.int64(8), mu=np.float64(0.9)
    )
    assert type(ctl.bs_min) is int and type(ctl.bs_max) is int and type(ctl.multiple_of) is int
    assert type(ctl.lr) is float and type(ctl.mu) is float
    state = ctl.init()
    assert type(state.batch_size) is int
    assert ControllerState.from_json(state.to_json()) == state
    assert state.digest() == CABSController(lr=0.25, bs_min=16, bs_max=64, multiple_of=8, mu=0.9).init().digest()
    assert json.loads(state.to_json())["batch_size"] == 16


def _bs(count, loss_sum, grads, s):
    grad_sum = tuple(np.asarray(g, np.float64) for g in grads)
    return BatchStats(np.float64(count), np.float64(loss_sum), grad_sum, np.float64(s))


def test_combine_refuses_mismatched_shapes_naming_the_field():
    a = _bs(2, 1.0, [[1.0, 2.0], [3.0]], 9.0)
    b = _bs(2, 1.0, [[1.0, 2.0, 0.0], [3.0]], 9.0)
    with pytest.raises(ValueError, match=r"grad_sum\[0\] has shape \(2,\) in one and \(3,\)"):
        combine(a, b)
    c = BatchStats(np.ones(2), np.float64(1.0), a.grad_sum, np.float64(9.0))
    with pytest.raises(ValueError, match="count must be a scalar"):
        combine(a, c)
    assert float(combine(a, a).sq_norm_sum) == 18.0


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_finite_statistics_whose_variance_overflows_follow_the_nonfinite_policy(policy):
    # finite inputs, but c * lr * xi and L - L* both overflow: raw would be inf / inf = NaN
    ctl = CABSController(lr=1e300, c=1e10, mu=0.0, loss_floor=-1.7e308, mode="reference", nonfinite=policy)
    state = ctl.init()
    s = ScalarStats(2.0, 1.7e308, 1.7e308, 0.0)
    if policy == "raise":
        with pytest.raises(NonFiniteStatisticsError, match="non-finite raw"):
            ctl.update(state, s)
    else:
        new, info = ctl.update(state, s)
        assert info.skipped and info.reason == "nonfinite" and new.nonfinite == 1
        assert (new.xi_avg, new.loss_avg, new.batch_size) == (state.xi_avg, state.loss_avg, state.batch_size)


def test_low_precision_grad_sum_is_squared_in_float32():
    """A float16 grad_sum of 300 squares to inf in float16 (max 65504)."""
    ctl = CABSController(lr=0.1)
    g = np.full((4,), 300.0, dtype=np.float16)
    bs = BatchStats(np.float16(16), np.float16(8.0), (g,), np.float32(4e5))
    _, info = ctl.update(ctl.init(), bs)
    assert not info.skipped and info.variance == pytest.approx((4e5 - 4 * 300.0**2 / 16) / 15)


any_float = st.floats(allow_nan=True, allow_infinity=True, width=64)
stat_value = st.one_of(any_float, st.floats(-1e6, 1e6), st.integers(-5, 5000).map(float))


@st.composite
def configs(draw):
    bs_min = draw(st.integers(1, 64))
    return CABSController(
        lr=draw(st.floats(1e-300, 1e300)),
        bs_min=bs_min,
        bs_max=bs_min + draw(st.integers(0, 5000)),
        mu=draw(st.floats(0.0, 0.999999)),
        c=draw(st.floats(1e-300, 1e300)),
        eps=draw(st.floats(0.0, 1e300)),
        loss_floor=draw(st.floats(-1e308, 1e308)),
        mode=draw(st.sampled_from(["paper", "reference"])),
        nonfinite=draw(st.sampled_from(["raise", "skip"])),
    )


@st.composite
def scalar_stats(draw):
    """Four values, each a Python float or a NumPy scalar of float64/32/16 (mixed namespaces)."""
    kinds = [float, np.float64, np.float32, np.float16]
    values = [(draw(st.sampled_from(kinds)), draw(stat_value)) for _ in range(4)]
    with np.errstate(over="ignore"):  # a huge float64 cast to float16 is inf: a case like any other
        return ScalarStats(*(kind(v) for kind, v in values))


@given(ctl=configs(), steps=st.lists(scalar_stats(), min_size=1, max_size=6))
def test_update_never_yields_a_nan_state_or_an_unrelated_error(ctl, steps):
    state = ctl.init()
    for s in steps:
        try:
            state, info = ctl.update(state, s)
        except NonFiniteStatisticsError as e:
            assert ctl.nonfinite == "raise" and e.field in {
                "count", "loss_sum", "sq_norm_sum", "grad_sum", "variance", "xi_avg", "loss_avg", "raw"
            }
            continue
        assert math.isfinite(state.xi_avg) and math.isfinite(state.loss_avg) and state.xi_avg >= 0
        assert ctl.bs_min <= state.batch_size <= ctl.bs_max and type(state.batch_size) is int
        assert info.batch_size == state.batch_size
        assert ControllerState.from_json(state.to_json()) == state


def test_config_errors_still_name_the_argument():
    with pytest.raises(ConfigError) as e:
        CABSController(lr=0.1, bs_min=np.int64(0))
    assert e.value.argument == "bs_min"
