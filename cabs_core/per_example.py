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


def tied_embedding_sq_norms(tokens: Array, b_lookup: Array, h: Array, b_proj: Array) -> Array:
    """Per-example squared norm of the gradient of an embedding table E (V, q)
    that is both looked up and used as the output projection ``z = h E^T``: (m,).

    ``tokens`` (m, T) ids and ``b_lookup`` (m, T, q) the gradients of the
    looked-up rows; ``h`` (m, S, q) the projection's inputs and ``b_proj``
    (m, S, V) the gradients of its outputs. The per-example gradient is the sum
    of the two uses' terms, G1 = sum_t e_{id_t} b_lookup_t^T and
    G2 = sum_s b_proj_s h_s^T, so ||G1 + G2||^2 = ||G1||^2 + ||G2||^2 + 2 <G1, G2>
    with the cross term in Gram form sum_{t,s} b_proj[s, id_t] (b_lookup_t . h_s)
    (the one-hot of the ids is never built).
    """
    if (tokens.ndim != 2 or b_lookup.ndim != 3 or h.ndim != 3 or b_proj.ndim != 3
            or tokens.shape != b_lookup.shape[:2] or h.shape[:2] != b_proj.shape[:2]
            or h.shape[2] != b_lookup.shape[2] or h.shape[0] != tokens.shape[0]):
        raise ValueError(
            f"expected tokens (m, T), lookup gradients (m, T, q), projection inputs (m, S, q) and projection "
            f"output gradients (m, S, V), got {tuple(tokens.shape)}, {tuple(b_lookup.shape)}, "
            f"{tuple(h.shape)} and {tuple(b_proj.shape)}"
        )
    xp = array_namespace(tokens, b_lookup, h, b_proj)
    m, t = tokens.shape
    s, v = b_proj.shape[1], b_proj.shape[2]
    # P[i, s, t] = b_proj[i, s, id_it], gathered from the flattened array
    base = xp.reshape(xp.arange(m, dtype=tokens.dtype), (m, 1, 1)) * (s * v) + xp.reshape(
        xp.arange(s, dtype=tokens.dtype), (1, s, 1)) * v
    idx = xp.reshape(base + xp.reshape(tokens, (m, 1, t)), (m * s * t,))
    p = xp.reshape(xp.take(xp.reshape(b_proj, (m * s * v,)), idx), (m, s, t))
    q = xp.matmul(h, xp.permute_dims(b_lookup, (0, 2, 1)))  # (m, S, T): h_s . b_lookup_t
    cross = xp.sum(xp.reshape(p * q, (m, s * t)), axis=1)
    return embedding_sq_norms(tokens, b_lookup) + linear_sq_norms(h, b_proj) + 2 * cross
