"""Per-example squared gradient norms of common layers, without per-example
gradients of the whole model.

Adapters capture a layer's input activations ``a`` and the gradient of the
summed loss with respect to the layer's output ``b`` (one backward pass); the
per-example gradient of a weight shared over T positions (tokens, pixels
after unfolding) is ``g_i = sum_t b_it a_it^T``, so

    ||g_i||^2 = sum_{t,s} (a_it . a_is) (b_it . b_is)         (Gram form, ~ T^2 (p + q))
              = ||sum_t b_it a_it^T||_F^2                      (materialised, ~ T p q)

:func:`linear_sq_norms` takes whichever is cheaper. With T = 1 the Gram form
is the rank-one formula ||a_i||^2 ||b_i||^2. Shapes: ``a`` (m, T, p), ``b``
(m, T, q). Written against the Array API so that torch and jax adapters share
it; results are exact up to floating-point rounding.
"""

from __future__ import annotations

from array_api_compat import array_namespace

from .stats import Array


def _check(a: Array, b: Array) -> None:
    if a.ndim != 3 or b.ndim != 3 or a.shape[:2] != b.shape[:2]:
        raise ValueError(
            f"expected inputs (m, T, p) and output gradients (m, T, q) with equal m and T, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def gram_is_cheaper(t: int, p: int, q: int) -> bool:
    """Whether the Gram form (T^2 (p + q) per example) beats materialising (T p q)."""
    return t * t * (p + q) < t * p * q


def linear_sq_norms(a: Array, b: Array) -> Array:
    """||sum_t b_it a_it^T||_F^2 for every example i: shape (m,)."""
    _check(a, b)
    xp = array_namespace(a, b)
    m, t, p = a.shape
    q = b.shape[2]
    if t == 1:
        return xp.sum(a[:, 0, :] * a[:, 0, :], axis=1) * xp.sum(b[:, 0, :] * b[:, 0, :], axis=1)
    if gram_is_cheaper(t, p, q):
        ga = xp.matmul(a, xp.permute_dims(a, (0, 2, 1)))  # (m, T, T)
        gb = xp.matmul(b, xp.permute_dims(b, (0, 2, 1)))
        return xp.sum(xp.reshape(ga * gb, (m, t * t)), axis=1)
    g = xp.matmul(xp.permute_dims(b, (0, 2, 1)), a)  # (m, q, p): per-example gradient of this layer
    return xp.sum(xp.reshape(g * g, (m, p * q)), axis=1)


def bias_sq_norms(b: Array) -> Array:
    """||sum_t b_it||^2 per example for a bias shared over the T positions: (m,)."""
    if b.ndim != 3:
        raise ValueError(f"expected output gradients (m, T, q), got {tuple(b.shape)}")
    xp = array_namespace(b)
    s = xp.sum(b, axis=1)
    return xp.sum(s * s, axis=1)


def embedding_sq_norms(tokens: Array, b: Array) -> Array:
    """Per-example squared norm of an embedding table's gradient: (m,).

    ``tokens`` (m, T) integer ids, ``b`` (m, T, q) gradients of the looked-up
    rows. Rows hit by equal ids add up: ||g_i||^2 = sum_{t,s} [id_it = id_is] (b_it . b_is).
    """
    if tokens.ndim != 2 or b.ndim != 3 or tokens.shape != b.shape[:2]:
        raise ValueError(
            f"expected tokens (m, T) and gradients (m, T, q), got {tuple(tokens.shape)} and {tuple(b.shape)}"
        )
    xp = array_namespace(tokens, b)
    m, t = tokens.shape
    same = xp.astype(tokens[:, :, None] == tokens[:, None, :], b.dtype)  # (m, T, T)
    gb = xp.matmul(b, xp.permute_dims(b, (0, 2, 1)))
    return xp.sum(xp.reshape(same * gb, (m, t * t)), axis=1)


def scale_sq_norms(xhat: Array, b: Array) -> Array:
    """||sum_t xhat_it * b_it||^2 per example: the gain gamma of a normalisation
    layer ``y = xhat * gamma + beta`` (elementwise over q), shapes (m, T, q);
    the shift beta is :func:`bias_sq_norms`."""
    if xhat.ndim != 3 or b.ndim != 3 or xhat.shape != b.shape:
        raise ValueError(
            f"expected normalised inputs and output gradients (m, T, q), got {tuple(xhat.shape)} and {tuple(b.shape)}"
        )
    xp = array_namespace(xhat, b)
    s = xp.sum(xhat * b, axis=1)
    return xp.sum(s * s, axis=1)


def tied_embedding_cross_terms(tokens: Array, b_lookup: Array, query: Array, b_attend: Array) -> Array:
    """<G_lookup,i, G_attend,i> per example: (m,), for an embedding table E (V, d)
    used both as a lookup ``E[tokens]`` and as an output projection ``query @ E^T``.

    ``tokens`` (m, T1) ids and ``b_lookup`` (m, T1, d) the gradients of the
    looked-up rows; ``query`` (m, T2, d) the projection's input and
    ``b_attend`` (m, T2, V) its output gradients. With G_lookup = onehot^T b_lookup
    and G_attend = b_attend^T query, the inner product is
    sum_{t,s} (b_lookup_it . query_is) * b_attend_is[tokens_it] (Gram form; the
    one-hot is never formed). The tied table's per-example squared norm is
    the lookup's term + the projection's term + 2 * this.
    """
    if (
        tokens.ndim != 2 or b_lookup.ndim != 3 or query.ndim != 3 or b_attend.ndim != 3
        or tokens.shape != b_lookup.shape[:2] or query.shape[:2] != b_attend.shape[:2]
        or tokens.shape[0] != query.shape[0] or b_lookup.shape[2] != query.shape[2]
    ):
        raise ValueError(
            f"expected tokens (m, T1), lookup gradients (m, T1, d), queries (m, T2, d) and projection gradients "
            f"(m, T2, V), got {tuple(tokens.shape)}, {tuple(b_lookup.shape)}, {tuple(query.shape)}, "
            f"{tuple(b_attend.shape)}"
        )
    xp = array_namespace(tokens, b_lookup, query, b_attend)
    m, t1 = tokens.shape
    t2 = b_attend.shape[1]
    dots = xp.matmul(b_lookup, xp.permute_dims(query, (0, 2, 1)))  # (m, T1, T2): b_lookup_it . query_is
    idx = xp.broadcast_to(xp.reshape(tokens, (m, 1, t1)), (m, t2, t1))
    # picked[i, t, s] = b_attend[i, s, tokens[i, t]] (take_along_axis: Array API 2024.12)
    picked = xp.permute_dims(xp.take_along_axis(b_attend, idx, axis=2), (0, 2, 1))
    return xp.sum(xp.reshape(dots * picked, (m, t1 * t2)), axis=1)
