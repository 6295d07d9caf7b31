"""Batch-size rules on the same statistics, and the discretisation of a raw size.

Each rule maps estimates to a *raw* (real-valued) batch size; :func:`discretise`
turns it into the integer the next step uses. The rules are elementwise and
work on Array API arrays (0-d or batched) as well as on NumPy float64 scalars.

Notation: ``variance`` = tr(Sigma) estimate xi; ``loss`` = L; ``grad_sq_norm``
= ||g_bar||^2 of the *mean* mini-batch gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from array_api_compat import array_namespace

from .stats import Array


def _safe_ratio(num: Array, den: Array) -> Array:
    """num / den where den > 0, +inf elsewhere (no division-by-zero warning)."""
    xp = array_namespace(num, den)
    ok = den > 0
    return xp.where(ok, num / xp.where(ok, den, xp.ones_like(den)), xp.asarray(math.inf, dtype=den.dtype))


def cabs_batch_size(
    lr: float, variance: Array, loss: Array, *, c: float = 1.0, loss_floor: float = 0.0, eps: float = 0.0
) -> Array:
    """CABS (Balles et al. 2017, eq. for m*): c * lr * xi / (L - L* + eps).

    +inf where the denominator is <= 0 (the decision is then bs_max).
    ``loss_floor`` L* and ``eps`` go beyond the paper, which assumes min L = 0.
    """
    return _safe_ratio(c * lr * variance, loss - loss_floor + eps)


def norm_test_batch_size(variance: Array, grad_sq_norm: Array, theta: float) -> Array:
    """Norm test (Byrd et al. 2012; De et al. 2017): the smallest m with
    xi / m <= theta^2 ||g_bar||^2, i.e. xi / (theta^2 ||g_bar||^2)."""
    return _safe_ratio(variance, theta**2 * grad_sq_norm)


def inner_product_test_batch_size(ip_variance: Array, grad_sq_norm: Array, theta: float) -> Array:
    """Inner-product test (Bollapragada et al. 2018): the smallest m with
    Var_i(g_i . g_bar) / m <= theta^2 ||g_bar||^4 (see
    :func:`cabs_core.variance.inner_product_variance`)."""
    return _safe_ratio(ip_variance, theta**2 * grad_sq_norm * grad_sq_norm)


def gradient_noise_scale(variance: Array, grad_sq_norm: Array, count: Array) -> Array:
    """B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018).

    |G|^2 is estimated without bias as ||g_bar||^2 - tr(Sigma) / m, since
    E||g_bar||^2 = |G|^2 + tr(Sigma) / m; +inf where that estimate is <= 0.
    """
    return _safe_ratio(variance, grad_sq_norm - variance / count)


def discretise(
    raw: float,
    bs_min: int,
    bs_max: int,
    multiple_of: int | None = None,
    buckets: Sequence[int] | None = None,
) -> int:
    """clip(round_half_even(raw), bs_min, bs_max), then optionally snapped up
    to a multiple of ``multiple_of`` (or down, to stay <= bs_max) or to the
    smallest of ``buckets`` >= the value (the largest bucket if none is)."""
    if math.isnan(raw):
        raise ValueError("raw batch size is NaN")
    b = round(min(max(raw, bs_min), bs_max))  # round() is round-half-to-even
    if multiple_of is not None:
        up = -(-b // multiple_of) * multiple_of
        b = up if up <= bs_max else bs_max // multiple_of * multiple_of
    elif buckets is not None:
        b = next((q for q in buckets if q >= b), buckets[-1])
    return int(b)
