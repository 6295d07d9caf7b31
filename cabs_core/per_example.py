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


# ----------------------------------------------------------------------------- tied parameters (issue 12)
# A parameter used by several layers (an embedding table that is also the
# output projection) has per-example gradient g_i = sum over its uses u of
# g_i^u, so ||g_i||^2 = sum_u ||g_i^u||^2 + 2 sum_{u<v} <g_i^u, g_i^v>; the
# cross terms below are the latter inner products, per example, in Gram form.


def linear_cross_sq_norms(a1: Array, b1: Array, a2: Array, b2: Array) -> Array:
    """<sum_t b1_it a1_it^T, sum_s b2_is a2_is^T>_F for every example i: shape (m,).

    Two uses of one weight W (q, p) as y = a W^T: inputs ``a1`` (m, T1, p),
    ``a2`` (m, T2, p), output gradients ``b1`` (m, T1, q), ``b2`` (m, T2, q).
    Gram form sum_{t,s} (a1_it . a2_is) (b1_it . b2_is), ~ T1 T2 (p + q).
    """
    _check(a1, b1)
    _check(a2, b2)
    if a1.shape[0] != a2.shape[0] or a1.shape[2] != a2.shape[2] or b1.shape[2] != b2.shape[2]:
        raise ValueError(f"uses of one weight need equal m, p and q, got {tuple(a1.shape)}, {tuple(b1.shape)} "
                         f"and {tuple(a2.shape)}, {tuple(b2.shape)}")
    xp = array_namespace(a1, b1, a2, b2)
    m, t1, t2 = a1.shape[0], a1.shape[1], a2.shape[1]
    ga = xp.matmul(a1, xp.permute_dims(a2, (0, 2, 1)))  # (m, T1, T2)
    gb = xp.matmul(b1, xp.permute_dims(b2, (0, 2, 1)))
    return xp.sum(xp.reshape(ga * gb, (m, t1 * t2)), axis=1)


def embedding_linear_cross_sq_norms(tokens: Array, e: Array, a: Array, b: Array) -> Array:
    """Per-example inner product of an embedding table's two uses: (m,).

    The lookup (``tokens`` (m, T1) integer ids, ``e`` (m, T1, d) gradients of the
    looked-up rows) has gradient sum_t onehot(id_it) e_it^T (V, d); the output
    projection y = a W^T with the same table W (V, d) (inputs ``a`` (m, T2, d),
    output gradients ``b`` (m, T2, V)) has sum_s b_is a_is^T. Their inner product is
    sum_{t,s} b_is[id_it] (e_it . a_is): the one-hot's Gram with b is a gather of
    b at the ids, never a one-hot.
    """
    if tokens.ndim != 2 or e.ndim != 3 or tokens.shape != e.shape[:2]:
        raise ValueError(f"expected tokens (m, T) and row gradients (m, T, d), got {tuple(tokens.shape)} "
                         f"and {tuple(e.shape)}")
    _check(a, b)
    if a.shape[0] != e.shape[0] or a.shape[2] != e.shape[2]:
        raise ValueError(f"the lookup's rows (m, T1, d) {tuple(e.shape)} and the projection's inputs "
                         f"(m, T2, d) {tuple(a.shape)} need equal m and d")
    xp = array_namespace(tokens, e, a, b)
    m, t1, t2 = e.shape[0], e.shape[1], a.shape[1]
    ids = xp.broadcast_to(xp.reshape(xp.astype(tokens, xp.int64), (m, t1, 1)), (m, t1, t2))
    gb = xp.take_along_axis(xp.permute_dims(b, (0, 2, 1)), ids, axis=1)  # (m, T1, T2): b_is[id_it]
    ga = xp.matmul(e, xp.permute_dims(a, (0, 2, 1)))  # (m, T1, T2)
    return xp.sum(xp.reshape(ga * gb, (m, t1 * t2)), axis=1)


def tied_embedding_sq_norms(tokens: Array, b_lookup: Array, h: Array, b_proj: Array) -> Array:
    """Per-example squared norm of the gradient of an embedding table E (V, q)
    that is both looked up and used as the output projection ``z = h E^T``: (m,).

    ``tokens`` (m, T) ids and ``b_lookup`` (m, T, q) the gradients of the
    looked-up rows; ``h`` (m, S, q) the projection's inputs and ``b_proj``
    (m, S, V) the gradients of its outputs: ||G1 + G2||^2 = ||G1||^2 + ||G2||^2
    + 2 <G1, G2>, the cross term from :func:`embedding_linear_cross_sq_norms`.
    """
    return (embedding_sq_norms(tokens, b_lookup) + linear_sq_norms(h, b_proj)
            + 2 * embedding_linear_cross_sq_norms(tokens, b_lookup, h, b_proj))
