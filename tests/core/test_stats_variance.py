"""Statistics and variance estimators against brute-force loops, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cabs_core import (
    BatchStats,
    ScalarStats,
    batch_stats_from_per_example,
    combine,
    group_variance,
    inner_product_variance,
    reduce_stats,
    to_host,
    two_pass_variance,
    within_batch_variance,
)
from cabs_core.per_example import bias_sq_norms, embedding_sq_norms, linear_sq_norms, scale_sq_norms

SHAPES = [(3,), (2, 2)]  # two parameters: a vector and a matrix


def _problem(m: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    losses = rng.random(m) * 3
    grads = [rng.normal(size=(m, *s)) + 0.5 for s in SHAPES]
    return losses, grads


def _loop_stats(losses, grads, mask=None):
    """The definition, one example at a time, in float64."""
    m = len(losses)
    mask = np.ones(m) if mask is None else mask
    count = loss_sum = s = 0.0
    gsum = [np.zeros(g.shape[1:]) for g in grads]
    for i in range(m):
        if not mask[i]:
            continue
        count += 1
        loss_sum += losses[i]
        s += sum(float(np.sum(g[i] ** 2)) for g in grads)
        for acc, g in zip(gsum, grads):
            acc += g[i]
    return count, loss_sum, gsum, s


def _host(xb, stats: BatchStats):
    return (
        float(xb.to_numpy(stats.count)),
        float(xb.to_numpy(stats.loss_sum)),
        [xb.to_numpy(g) for g in stats.grad_sum],
        float(xb.to_numpy(stats.sq_norm_sum)),
    )


@pytest.mark.parametrize("masked", [False, True])
def test_batch_stats_match_loop(xb, masked):
    losses, grads = _problem(7, 0)
    mask = np.array([1, 0, 1, 1, 0, 1, 1], dtype=np.float64) if masked else None
    stats = batch_stats_from_per_example(
        xb.asarray(losses), [xb.asarray(g) for g in grads], None if mask is None else xb.asarray(mask)
    )
    count, loss_sum, gsum, s = _host(xb, stats)
    ec, el, eg, es = _loop_stats(losses, grads, mask)
    assert count == ec
    np.testing.assert_allclose([loss_sum, s], [el, es], rtol=1e-13)
    for a, b in zip(gsum, eg):
        np.testing.assert_allclose(a, b, rtol=1e-13)


def test_masked_equals_real_examples_only(xb):
    losses, grads = _problem(6, 1)
    mask = np.array([1, 1, 0, 1, 0, 0], dtype=np.float64)
    keep = mask.astype(bool)
    padded = batch_stats_from_per_example(xb.asarray(losses), [xb.asarray(g) for g in grads], xb.asarray(mask))
    real = batch_stats_from_per_example(xb.asarray(losses[keep]), [xb.asarray(g[keep]) for g in grads])
    a, b = _host(xb, padded), _host(xb, real)
    np.testing.assert_allclose([a[0], a[1], a[3]], [b[0], b[1], b[3]], rtol=1e-14)


@given(m=st.integers(2, 12), cut=st.integers(1, 11), seed=st.integers(0, 2**16))
def test_statistics_additive_under_split(xb, m, cut, seed):
    cut = min(cut, m - 1)
    losses, grads = _problem(m, seed)
    whole = batch_stats_from_per_example(xb.asarray(losses), [xb.asarray(g) for g in grads])
    parts = combine(
        batch_stats_from_per_example(xb.asarray(losses[:cut]), [xb.asarray(g[:cut]) for g in grads]),
        batch_stats_from_per_example(xb.asarray(losses[cut:]), [xb.asarray(g[cut:]) for g in grads]),
    )
    a, b = _host(xb, whole), _host(xb, parts)
    np.testing.assert_allclose([a[0], a[1], a[3]], [b[0], b[1], b[3]], rtol=1e-12)
    for x, y in zip(a[2], b[2]):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12)


@given(m=st.integers(2, 10), seed=st.integers(0, 2**16))
def test_variance_invariant_under_permutation(xb, m, seed):
    losses, grads = _problem(m, seed)
    perm = np.random.default_rng(seed + 1).permutation(m)
    v1 = within_batch_variance(batch_stats_from_per_example(xb.asarray(losses), [xb.asarray(g) for g in grads]))
    v2 = within_batch_variance(
        batch_stats_from_per_example(xb.asarray(losses[perm]), [xb.asarray(g[perm]) for g in grads])
    )
    np.testing.assert_allclose(xb.to_numpy(v1), xb.to_numpy(v2), rtol=1e-12)


@pytest.mark.parametrize("ddof", [0, 1])
def test_within_batch_equals_two_pass_and_loop(xb, ddof):
    losses, grads = _problem(9, 2)
    flat = np.concatenate([g.reshape(9, -1) for g in grads], axis=1)
    mean = flat.mean(axis=0)
    expected = sum(float(np.sum((flat[i] - mean) ** 2)) for i in range(9)) / (9 - ddof)
    stats = batch_stats_from_per_example(xb.asarray(losses), [xb.asarray(g) for g in grads])
    wb = float(xb.to_numpy(within_batch_variance(stats, ddof)))
    tp = float(xb.to_numpy(two_pass_variance([xb.asarray(g) for g in grads], ddof)))
    np.testing.assert_allclose([wb, tp], [expected, expected], rtol=1e-12)
    # the ScalarStats form gives the same number
    np.testing.assert_allclose(
        float(xb.to_numpy(within_batch_variance(reduce_stats(stats), ddof))), expected, rtol=1e-12
    )


def test_two_pass_respects_mask(xb):
    _, grads = _problem(8, 3)
    mask = np.array([1, 1, 1, 0, 1, 0, 1, 1], dtype=np.float64)
    keep = mask.astype(bool)
    a = two_pass_variance([xb.asarray(g) for g in grads], 1, xb.asarray(mask))
    b = two_pass_variance([xb.asarray(g[keep]) for g in grads], 1)
    np.testing.assert_allclose(xb.to_numpy(a), xb.to_numpy(b), rtol=1e-12)


def test_group_variance_with_unit_groups_is_within_batch(xb):
    _, grads = _problem(6, 4)
    g = group_variance([xb.asarray(a) for a in grads], xb.asarray(np.ones(6)))
    t = two_pass_variance([xb.asarray(a) for a in grads], 1)
    np.testing.assert_allclose(xb.to_numpy(g), xb.to_numpy(t), rtol=1e-12)


def test_group_variance_by_hand(xb):
    # two groups in 1-d: means 1 and 4, sizes 1 and 2; overall mean 3
    # sum_j b_j (m_j - 3)^2 / (k - 1) = 1*4 + 2*1 = 6
    v = group_variance([xb.asarray(np.array([[1.0], [4.0]]))], xb.asarray(np.array([1.0, 2.0])))
    assert float(xb.to_numpy(v)) == pytest.approx(6.0, rel=1e-15)


def test_group_variance_is_unbiased():
    """Averaged over many draws, the estimate from group means of unequal
    sizes approaches tr(Sigma) (numpy only: a Monte Carlo check, fixed seed)."""
    rng = np.random.default_rng(5)
    d, sizes = 4, np.array([3.0, 5.0, 8.0, 2.0])
    scales = np.array([0.5, 1.0, 2.0, 1.5])  # tr(Sigma) = sum of squares = 7.5
    estimates = []
    for _ in range(4000):
        means = np.stack([rng.normal(size=(int(b), d)).mean(axis=0) * scales + 1.0 for b in sizes])
        estimates.append(float(group_variance([means], sizes)))
    assert np.mean(estimates) == pytest.approx(7.5, rel=0.03)


def test_group_variance_needs_two_groups(xb):
    with pytest.raises(ValueError, match="at least 2 groups"):
        group_variance([xb.asarray(np.ones((1, 3)))], xb.asarray(np.ones(1)))


def test_inner_product_variance_matches_loop(xb):
    _, grads = _problem(7, 6)
    flat = np.concatenate([g.reshape(7, -1) for g in grads], axis=1)
    mean = flat.mean(axis=0)
    proj = flat @ mean
    expected = float(np.sum((proj - proj.mean()) ** 2) / 6)
    got = inner_product_variance([xb.asarray(g) for g in grads])
    np.testing.assert_allclose(float(xb.to_numpy(got)), expected, rtol=1e-12)


def test_shape_errors_name_the_problem(xb):
    with pytest.raises(ValueError, match=r"grads\[1\] must have a leading example axis of length 3"):
        batch_stats_from_per_example(xb.asarray(np.ones(3)), [xb.asarray(np.ones((3, 2))), xb.asarray(np.ones((2, 2)))])
    with pytest.raises(ValueError, match="losses must have shape"):
        batch_stats_from_per_example(xb.asarray(np.ones((3, 1))), [xb.asarray(np.ones((3, 2)))])


def test_to_host_one_copy_of_four_floats(xb):
    s = ScalarStats(
        xb.asarray(np.float64(4)), xb.asarray(np.float64(2.5)), xb.asarray(np.float64(9.0)), xb.asarray(np.float64(1.0))
    )
    assert to_host(s) == (4.0, 2.5, 9.0, 1.0)
    assert to_host(ScalarStats.from_vector(np.array([4.0, 2.5, 9.0, 1.0]))) == (4.0, 2.5, 9.0, 1.0)


@pytest.mark.parametrize("t,p,q", [(1, 4, 5), (6, 3, 4), (2, 9, 9)])  # rank-one, Gram, materialised
def test_linear_sq_norms_against_loop(xb, t, p, q):
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(4, t, p)), rng.normal(size=(4, t, q))
    expected = [float(np.sum(sum(np.outer(b[i, s], a[i, s]) for s in range(t)) ** 2)) for i in range(4)]
    np.testing.assert_allclose(xb.to_numpy(linear_sq_norms(xb.asarray(a), xb.asarray(b))), expected, rtol=1e-12)
    np.testing.assert_allclose(
        xb.to_numpy(bias_sq_norms(xb.asarray(b))), [float(np.sum(b[i].sum(0) ** 2)) for i in range(4)], rtol=1e-12
    )


def test_embedding_sq_norms_against_loop(xb):
    rng = np.random.default_rng(8)
    tokens, b = rng.integers(0, 4, size=(3, 5)), rng.normal(size=(3, 5, 2))
    expected = []
    for i in range(3):
        table = np.zeros((4, 2))
        for s in range(5):
            table[tokens[i, s]] += b[i, s]
        expected.append(float(np.sum(table**2)))
    got = embedding_sq_norms(xb.asarray(tokens), xb.asarray(b))
    np.testing.assert_allclose(xb.to_numpy(got), expected, rtol=1e-12)


def test_scale_sq_norms_against_loop(xb):
    rng = np.random.default_rng(9)
    xhat, b = rng.normal(size=(3, 4, 5)), rng.normal(size=(3, 4, 5))
    expected = [float(np.sum(sum(xhat[i, t] * b[i, t] for t in range(4)) ** 2)) for i in range(3)]
    np.testing.assert_allclose(xb.to_numpy(scale_sq_norms(xb.asarray(xhat), xb.asarray(b))), expected, rtol=1e-12)
