"""Estimators of tr(Sigma), the trace of the per-example gradient covariance.

Three ways to the same quantity, by what the caller has:

- :func:`within_batch_variance`: from the sums of docs/spec.md section 4 (no
  per-example gradients kept); the paper's estimator with ``ddof = 1``, the
  reference implementation's with ``ddof = 0``.
- :func:`two_pass_variance`: from per-example gradients, subtracting the mean
  first (numerically the safest; the definition the others are tested against).
- :func:`group_variance`: from k group mean gradients of sizes b_j
  (micro-batches or data-parallel replicas); needs no per-example gradients.

Results are 0-d arrays and may be slightly negative from floating-point
cancellation in :func:`within_batch_variance`; the controller clamps them.
"""

from __future__ import annotations

from collections.abc import Sequence

from array_api_compat import array_namespace

from .stats import Array, BatchStats, ScalarStats, reduce_stats


def within_batch_variance(stats: BatchStats | ScalarStats, ddof: int = 1) -> Array:
    """xi = (S - ||sum_i g_i||^2 / m) / (m - ddof)  (docs/spec.md section 2).

    Equals 1/(m - ddof) * sum_i ||g_i - g_bar||^2. Undefined (division by
    zero or a negative count) for m <= ddof: the caller checks m first.
    """
    s = reduce_stats(stats) if isinstance(stats, BatchStats) else stats
    return (s.sq_norm_sum - s.grad_sum_sq_norm / s.count) / (s.count - ddof)


def _weighted_sq_dev(arrays: Sequence[Array], weights: Array) -> Array:
    """sum_j w_j ||x_j - x_bar||^2 over all parameters, x_bar = sum_j w_j x_j / sum_j w_j."""
    if not arrays:
        raise ValueError("need at least one parameter array")
    xp = array_namespace(weights, *arrays)
    k = weights.shape[0]
    total = xp.sum(weights)
    out = xp.zeros((), dtype=arrays[0].dtype)
    for a in arrays:
        if a.ndim < 1 or a.shape[0] != k:
            raise ValueError(f"every array needs a leading axis of length {k}, got shape {tuple(a.shape)}")
        w = xp.reshape(xp.astype(weights, a.dtype), (k,) + (1,) * (a.ndim - 1))
        mean = xp.sum(w * a, axis=0) / total
        d = a - mean
        out = out + xp.sum(w * d * d)
    return out


def two_pass_variance(grads: Sequence[Array], ddof: int = 1, weights: Array | None = None) -> Array:
    """1/(m - ddof) * sum_i ||g_i - g_bar||^2 from per-example gradients.

    ``grads``: one array per parameter with a leading example axis of length
    m; ``weights``: optional 0/1 mask over the examples (m counts the ones).
    """
    xp = array_namespace(*grads)
    w = xp.ones(grads[0].shape[0], dtype=grads[0].dtype) if weights is None else weights
    m = xp.sum(xp.astype(w, grads[0].dtype))
    return _weighted_sq_dev(grads, w) / (m - ddof)


def group_variance(group_means: Sequence[Array], sizes: Array) -> Array:
    """sum_j b_j ||g_bar_j - g_bar||^2 / (k - 1) from k group means.

    ``group_means``: one array per parameter with a leading group axis of
    length k (group j's mean gradient); ``sizes``: b_j, shape ``(k,)``.
    With Cov[g_bar_j] = Sigma / b_j this is unbiased for tr(Sigma) for any
    group sizes; with all b_j = 1 it is the within-batch estimator, ddof = 1.
    """
    k = sizes.shape[0]
    if k < 2:
        raise ValueError(f"group_variance needs at least 2 groups, got {k}")
    return _weighted_sq_dev(group_means, sizes) / (k - 1)


def inner_product_variance(grads: Sequence[Array], weights: Array | None = None) -> Array:
    """1/(m - 1) * sum_i (g_i . g_bar - ||g_bar||^2)^2, the sample variance of
    the per-example projections on the mean gradient (Bollapragada et al. 2018)."""
    xp = array_namespace(*grads)
    m_ = grads[0].shape[0]
    w = xp.ones(m_, dtype=grads[0].dtype) if weights is None else xp.astype(weights, grads[0].dtype)
    m = xp.sum(w)
    proj = xp.zeros(m_, dtype=grads[0].dtype)
    means = []
    for g in grads:
        wb = xp.reshape(w, (m_,) + (1,) * (g.ndim - 1))
        means.append(xp.sum(wb * g, axis=0) / m)
    for g, mean in zip(grads, means):
        proj = proj + xp.sum(xp.reshape(g * mean, (m_, -1)), axis=1)
    mean_proj = xp.sum(w * proj) / m
    d = proj - mean_proj
    return xp.sum(w * d * d) / (m - 1)
