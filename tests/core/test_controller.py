"""The controller against docs/spec.md sections 2, 3 and 5, on every backend."""

from __future__ import annotations

import dataclasses
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
    DesyncError,
    NonFiniteStatisticsError,
    check_digests,
)


def stats(xb, count, loss_sum, grad_sum, sq_norm_sum) -> BatchStats:
    f = np.float64
    return BatchStats(
        xb.asarray(f(count)),
        xb.asarray(f(loss_sum)),
        tuple(xb.asarray(np.asarray(g, dtype=f)) for g in grad_sum),
        xb.asarray(f(sq_norm_sum)),
    )


def test_reference_mode_by_hand(xb):
    """Two steps computed by hand from docs/spec.md section 2 (ddof 0, xi_avg 0, L_avg 1)."""
    ctl = CABSController(lr=0.1, mode="reference")
    s0 = ctl.init()
    assert (s0.xi_avg, s0.loss_avg, s0.batch_size) == (0.0, 1.0, 16)
    # m = 4, grad_sum = (2, 0) -> ||.||^2 = 4; S = 41: xi = (41 - 4/4) / 4 = 10; L_hat = 8/4 = 2
    s1, info = ctl.update(s0, stats(xb, 4, 8.0, [[2.0, 0.0]], 41.0))
    assert info.variance == pytest.approx(10.0) and info.loss == pytest.approx(2.0)
    assert s1.xi_avg == pytest.approx(0.5)  # 0.95 * 0 + 0.05 * 10
    assert s1.loss_avg == pytest.approx(1.05)  # 0.95 * 1 + 0.05 * 2
    assert info.raw == pytest.approx(0.1 * 0.5 / 1.05)
    assert info.batch_size == 16  # clipped up to bs_min
    # m = 10, grad_sum 0, S = 90000: xi = 9000, L_hat = 1
    s2, info = ctl.update(s1, stats(xb, 10, 10.0, [[0.0, 0.0]], 90000.0))
    xi_avg, l_avg = 0.95 * 0.5 + 0.05 * 9000, 0.95 * 1.05 + 0.05 * 1.0
    assert info.raw == pytest.approx(0.1 * xi_avg / l_avg)
    assert info.batch_size == round(0.1 * xi_avg / l_avg) == 43  # 45.0475 / 1.0475 = 43.005
    assert (s2.step, s2.updates, s2.batch_size) == (2, 2, 43)


def test_paper_mode_first_step_is_the_unsmoothed_ratio(xb):
    """Both averages start at 0: after one step the decision is lr * xi / L_hat."""
    ctl = CABSController(lr=0.1, mode="paper")
    # m = 5, grad_sum 0, S = 4000: xi = 4000 / 4 = 1000, L = 2
    _, info = ctl.update(ctl.init(), stats(xb, 5, 10.0, [[0.0]], 4000.0))
    assert info.raw == pytest.approx(0.1 * 1000 / 2.0, rel=1e-13)
    assert info.batch_size == 50


def transcription(lr, mu, steps, bs_min=16, bs_max=2048):
    """docs/spec.md section 2 written out literally, reference mode (the test's own oracle).

    Also returns the scale of each raw: the same ratio with xi replaced by the
    magnitude (S + m ||g_bar||^2) / m of the two terms whose difference xi is.
    Two correct float64 evaluations of xi differ by rounding relative to that
    magnitude, not to xi itself, which cancellation can make arbitrarily small."""
    xi_avg, size_avg, l_avg, out = 0.0, 0.0, 1.0, []
    for m, loss_sum, g, s in steps:
        g_bar = g / m
        xi = max((s - m * g_bar * g_bar) / m, 0.0)
        xi_avg = mu * xi_avg + (1 - mu) * xi
        size_avg = mu * size_avg + (1 - mu) * (s + m * g_bar * g_bar) / m
        l_avg = mu * l_avg + (1 - mu) * loss_sum / m
        raw = lr * xi_avg / l_avg if l_avg > 0 else math.inf
        out.append((raw, lr * size_avg / l_avg, min(max(round(min(raw, bs_max)), bs_min), bs_max)))
    return out


step_st = st.tuples(
    st.integers(1, 4096),
    st.floats(0.01, 1e4),  # loss_sum
    st.floats(0.0, 31.7),  # grad_sum (one entry; ||grad_sum||^2 up to ~1e3)
    st.floats(0.0, 1e7),  # S
)


@given(
    lr=st.floats(1e-3, 10.0),
    mu=st.sampled_from([0.0, 0.5, 0.9, 0.95, 0.99]),
    steps=st.lists(step_st, min_size=1, max_size=30),
)
def test_reference_mode_equals_transcription_of_spec(xb, lr, mu, steps):
    ctl = CABSController(lr=lr, mu=mu, mode="reference")
    state = ctl.init()
    expected = transcription(lr, mu, steps)
    for (m, loss_sum, g, s), (raw, scale, bs) in zip(steps, expected):
        state, info = ctl.update(state, stats(xb, m, loss_sum, [[g]], s))
        tol = 1e-9 * scale
        assert abs(info.raw - raw) <= tol
        if abs(raw - math.floor(raw) - 0.5) > tol + 1e-6 * max(raw, 1.0):  # away from a rounding boundary
            assert info.batch_size == bs


def _one_step(xb, lr=0.1, var=100.0, loss=1.0, mode="paper", **kw):
    """Decision after one step with given variance and mean loss (m = 11)."""
    ctl = CABSController(lr=lr, mode=mode, **kw)
    m = 11
    s = var * (m - ctl.ddof)  # grad_sum = 0, so xi = S / (m - ddof)
    return ctl.update(ctl.init(), stats(xb, m, loss * m, [[0.0]], s))[1]


@given(
    v1=st.floats(0.0, 1e6),
    v2=st.floats(0.0, 1e6),
    lr=st.floats(1e-3, 5.0),
    loss=st.floats(1e-3, 100.0),
    mode=st.sampled_from(["paper", "reference"]),
)
def test_decision_monotone_in_variance(xb, v1, v2, lr, loss, mode):
    lo, hi = sorted((v1, v2))
    a, b = _one_step(xb, lr, lo, loss, mode), _one_step(xb, lr, hi, loss, mode)
    assert a.batch_size <= b.batch_size
    assert 16 <= a.batch_size <= 2048 and 16 <= b.batch_size <= 2048


@given(lr1=st.floats(1e-3, 5.0), lr2=st.floats(1e-3, 5.0), var=st.floats(0.0, 1e6), loss=st.floats(1e-3, 100.0))
def test_decision_monotone_in_lr(xb, lr1, lr2, var, loss):
    lo, hi = sorted((lr1, lr2))
    assert _one_step(xb, lo, var, loss).batch_size <= _one_step(xb, hi, var, loss).batch_size


@given(
    l1=st.floats(1e-3, 100.0),
    l2=st.floats(1e-3, 100.0),
    var=st.floats(0.0, 1e6),
    mode=st.sampled_from(["paper", "reference"]),
)
def test_decision_antitone_in_loss(xb, l1, l2, var, mode):
    lo, hi = sorted((l1, l2))
    assert _one_step(xb, 0.1, var, lo, mode).batch_size >= _one_step(xb, 0.1, var, hi, mode).batch_size


@given(
    steps=st.lists(step_st, min_size=1, max_size=20),
    bounds=st.tuples(st.integers(1, 300), st.integers(0, 3000)),
    disc=st.sampled_from([None, "multiple", "buckets"]),
)
def test_decision_always_within_bounds(xb, steps, bounds, disc):
    bs_min, bs_max = bounds[0], bounds[0] + bounds[1]
    kw: dict = {}
    if disc == "multiple" and bs_max // 8 * 8 >= bs_min:
        kw["multiple_of"] = 8
    elif disc == "buckets":
        kw["buckets"] = sorted({bs_min, (bs_min + bs_max) // 2, bs_max})
    ctl = CABSController(lr=0.5, bs_min=bs_min, bs_max=bs_max, **kw)
    state = ctl.init()
    sizes = [state.batch_size]  # the first decision obeys the discretisation too
    for m, loss_sum, g, s in steps:
        state, info = ctl.update(state, stats(xb, m, loss_sum, [[g]], s))
        sizes += [info.batch_size, state.batch_size]
    for b in sizes:
        assert bs_min <= b <= bs_max
        if "multiple_of" in kw:
            assert b % 8 == 0
        if "buckets" in kw:
            assert b in kw["buckets"]


@pytest.mark.parametrize(
    "kw,first",
    [
        ({"bs_min": 3, "bs_max": 100, "multiple_of": 8}, 8),
        ({"bs_min": 5, "bs_max": 100, "buckets": [8, 50, 100]}, 8),
        ({"bs_min": 1, "bs_max": 8, "multiple_of": 8}, 8),
        ({"bs_min": 16, "bs_max": 2048}, 16),
    ],
)
def test_first_decision_is_discretised(xb, kw, first):
    ctl = CABSController(lr=0.5, **kw)
    state = ctl.init()
    assert state.batch_size == first
    # a skipped first step (count below 1 + ddof) keeps reporting it
    state, info = ctl.update(state, stats(xb, 1, 1.0, [[0.0]], 0.0))
    assert info.skipped and info.reason == "count" and info.batch_size == state.batch_size == first


@pytest.mark.parametrize(
    "kw",
    [
        {"bs_min": 3, "bs_max": 100, "multiple_of": 8, "bs_init": 3},
        {"bs_min": 5, "bs_max": 100, "buckets": [8, 50, 100], "bs_init": 20},
    ],
)
def test_bs_init_outside_the_discretisation_is_refused(kw):
    with pytest.raises(ConfigError, match="bs_init=") as e:
        CABSController(lr=0.5, **kw)
    assert e.value.argument == "bs_init"


@pytest.mark.parametrize(
    "mode,count,skipped",
    [("paper", 1, True), ("paper", 0, True), ("paper", 2, False), ("reference", 0, True), ("reference", 1, False)],
)
def test_too_few_examples_skip(xb, mode, count, skipped):
    ctl = CABSController(lr=0.1, mode=mode, bs_init=64)
    s0 = ctl.init()
    s1, info = ctl.update(s0, stats(xb, count, 2.0 * count, [[0.5 * count]], 1.0 * count))
    assert info.skipped is skipped
    if skipped:
        assert info.reason == "count" and info.raw is None and info.variance is None
        assert (s1.xi_avg, s1.loss_avg, s1.batch_size, s1.updates) == (s0.xi_avg, s0.loss_avg, 64, 0)
        assert (s1.step, s1.skipped) == (1, 1)


@pytest.mark.parametrize(
    "field,values",
    [
        ("loss_sum", (4, math.nan, [[1.0]], 9.0)),
        ("sq_norm_sum", (4, 1.0, [[1.0]], math.inf)),
        ("grad_sum", (4, 1.0, [[1.0, -math.inf]], 9.0)),
        ("count", (math.nan, 1.0, [[1.0]], 9.0)),
    ],
)
def test_nonfinite_raises_naming_the_value_and_skip_policy(xb, field, values):
    ctl = CABSController(lr=0.1)
    s0 = ctl.init()
    with pytest.raises(NonFiniteStatisticsError, match=f"non-finite {field}") as e:
        ctl.update(s0, stats(xb, *values))
    assert e.value.field == field and e.value.step == 1
    skip = CABSController(lr=0.1, nonfinite="skip")
    s1, info = skip.update(skip.init(), stats(xb, *values))
    assert info.skipped and info.reason == "nonfinite"
    assert (s1.nonfinite, s1.skipped, s1.updates) == (1, 1, 0)
    assert all(math.isfinite(v) for v in (s1.xi_avg, s1.loss_avg))


def test_negative_variance_is_clamped_and_counted(xb):
    ctl = CABSController(lr=0.1)
    # m = 4, ||grad_sum||^2 = 16, S slightly below 16/4 = 4: xi < 0
    s1, info = ctl.update(ctl.init(), stats(xb, 4, 4.0, [[4.0]], 4.0 - 1e-9))
    assert info.clamped and info.variance == 0.0 and s1.clamped == 1
    assert info.batch_size == 16 and s1.xi_avg == 0.0


@pytest.mark.parametrize("floor,eps", [(5.0, 0.0), (2.0, 0.0), (2.5, 0.1)])
def test_nonpositive_denominator_gives_bs_max(xb, floor, eps):
    # mean loss 2: L - floor + eps <= 0 in every case
    _, info = CABSController(lr=0.1, loss_floor=floor, eps=eps, bs_max=999).update(
        CABSController(lr=0.1, loss_floor=floor, eps=eps, bs_max=999).init(), stats(xb, 4, 8.0, [[0.0]], 3.0)
    )
    assert info.raw == math.inf and info.batch_size == 999


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        ({"bs_min": 0}, "bs_min"),
        ({"bs_min": 32, "bs_max": 16}, "bs_max"),
        ({"bs_min": 16.5}, "bs_min"),
        ({"bs_max": 100.0}, "bs_max"),
        ({"bs_min": True}, "bs_min"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -1.0}, "lr"),
        ({"lr": math.nan}, "lr"),
        ({"lr": "0.1"}, "lr"),
        ({"mu": 1.0}, "mu"),
        ({"mu": -0.01}, "mu"),
        ({"c": 0.0}, "c"),
        ({"eps": -1e-9}, "eps"),
        ({"loss_floor": math.inf}, "loss_floor"),
        ({"mode": "tf1"}, "mode"),
        ({"bs_init": 8}, "bs_init"),
        ({"multiple_of": 0}, "multiple_of"),
        ({"bs_max": 20, "multiple_of": 32}, "multiple_of"),
        ({"buckets": []}, "buckets"),
        ({"buckets": [64, 32]}, "buckets"),
        ({"buckets": [8, 32]}, "buckets"),
        ({"buckets": [32], "multiple_of": 8}, "buckets"),
        ({"nonfinite": "ignore"}, "nonfinite"),
    ],
)
def test_invalid_configuration_names_the_argument(kwargs, argument):
    kwargs = {"lr": 0.1, **kwargs}
    with pytest.raises(ConfigError, match=argument) as e:
        CABSController(**kwargs)
    assert e.value.argument == argument
    assert isinstance(e.value, ValueError)


def test_discretisation_by_hand(xb):
    # raw = lr * var / loss with loss 1: choose var so that raw = 100.3 -> 100
    assert _one_step(xb, 0.1, 1003.0, 1.0, multiple_of=32).batch_size == 128
    assert _one_step(xb, 0.1, 1003.0, 1.0, buckets=(16, 64, 96, 256)).batch_size == 256
    assert _one_step(xb, 0.1, 1e9, 1.0, bs_max=1000, multiple_of=48).batch_size == 960  # 1008 > bs_max
    assert _one_step(xb, 0.1, 1e9, 1.0, buckets=(16, 64)).batch_size == 64  # above every bucket


@given(steps=st.lists(step_st, min_size=2, max_size=25), cut=st.integers(1, 24))
def test_json_resume_makes_bit_identical_decisions(xb, steps, cut):
    cut = min(cut, len(steps) - 1)
    ctl = CABSController(lr=0.3, mode="paper", loss_floor=0.01)
    a = ctl.init()
    for m, ls, g, s in steps[:cut]:
        a, _ = ctl.update(a, stats(xb, m, ls, [[g]], s))
    b = ControllerState.from_json(json.loads(json.dumps(a.to_json())))
    assert b == a
    for m, ls, g, s in steps[cut:]:
        a, ia = ctl.update(a, stats(xb, m, ls, [[g]], s))
        b, ib = ctl.update(b, stats(xb, m, ls, [[g]], s))
        assert ia == ib and a == b


def test_update_leaves_the_old_state_alone(xb):
    ctl = CABSController(lr=0.1)
    s0 = ctl.init()
    snapshot = s0.to_dict()
    ctl.update(s0, stats(xb, 8, 8.0, [[1.0]], 100.0))
    assert s0.to_dict() == snapshot


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"format": "nope"}, "not a controller state"),
        ({"xi_avg": math.nan}, "not finite"),
        ({"batch_size": 3.5}, "must be int"),
    ],
)
def test_corrupt_state_is_refused(bad, match):
    d = {**CABSController(lr=0.1).init().to_dict(), **bad}
    with pytest.raises(ValueError, match=match):
        ControllerState.from_dict(d)
    d = CABSController(lr=0.1).init().to_dict()
    del d["updates"]
    with pytest.raises(ValueError, match="missing 'updates'"):
        ControllerState.from_dict(d)


def test_digest_tells_states_apart(xb):
    ctl = CABSController(lr=0.1)
    a, _ = ctl.update(ctl.init(), stats(xb, 8, 8.0, [[1.0]], 100.0))
    b = ControllerState.from_json(a.to_json())
    assert a.digest() == b.digest() and 0 <= a.digest() < 2**63
    nudged = dataclasses.replace(a, xi_avg=math.nextafter(a.xi_avg, math.inf))
    assert nudged.digest() != a.digest()
    assert dataclasses.replace(a, batch_size=a.batch_size + 1).digest() != a.digest()


def test_check_digests_names_the_step_and_the_odd_workers(xb):
    ctl = CABSController(lr=0.1)
    a, _ = ctl.update(ctl.init(), stats(xb, 8, 8.0, [[1.0]], 100.0))
    b, _ = ctl.update(ctl.init(), stats(xb, 8, 8.0, [[1.0]], 100.000001))  # another worker's statistics
    check_digests([a.digest()] * 3, step=1)  # agreement: no error
    with pytest.raises(DesyncError, match="diverged at step 42") as e:
        check_digests([a.digest(), a.digest(), b.digest()], step=42)
    assert e.value.step == 42 and e.value.names == ["worker 0", "worker 1", "worker 2"]
    assert f"worker 2: {b.digest():#018x}" in str(e.value)
    with pytest.raises(DesyncError, match="host-b"):
        check_digests([1, 2], step=3, names=["host-a", "host-b"])
    with pytest.raises(ValueError, match="at least one digest"):
        check_digests([], step=1)
    with pytest.raises(ValueError, match="2 digests but 1 names"):
        check_digests([1, 1], step=1, names=["a"])


def test_padding_buckets_prefer_the_controllers_own():
    assert CABSController(lr=0.1, bs_min=16, bs_max=128).padding_buckets() == (16, 32, 64, 128)
    own = CABSController(lr=0.1, bs_min=16, bs_max=128, buckets=(16, 100, 128))
    assert own.padding_buckets((8, 256)) == (16, 100, 128)  # decisions are buckets: nothing to pad
    assert CABSController(lr=0.1, bs_min=16, bs_max=128).padding_buckets([24, 128]) == (24, 128)
    with pytest.raises(ValueError, match="below bs_max = 128"):
        CABSController(lr=0.1, bs_min=16, bs_max=128).padding_buckets((16, 64))
    with pytest.raises(ValueError, match="strictly increasing"):
        CABSController(lr=0.1, bs_min=16, bs_max=128).padding_buckets((64, 32, 128))
