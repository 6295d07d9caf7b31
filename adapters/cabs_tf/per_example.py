"""TensorFlow transcriptions of :mod:`cabs_core.per_example`.

TensorFlow tensors are not an Array API namespace, so the core's formulas are
repeated here line for line (and tested against the core's NumPy results).
``a`` (m, T, p) are a layer's inputs, ``b`` (m, T, q) the gradients of the
summed loss with respect to its output; the per-example weight gradient is
``g_i = sum_t b_it a_it^T`` and these functions return ||g_i||^2, shape (m,).
Shapes T, p, q must be static (they are, inside a bucketed ``tf.function``).
"""

from __future__ import annotations

import tensorflow as tf

from cabs_core.per_example import gram_is_cheaper


def _check(a: tf.Tensor, b: tf.Tensor) -> None:
    if a.shape.rank != 3 or b.shape.rank != 3 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"expected inputs (m, T, p) and output gradients (m, T, q) with equal T, "
            f"got {a.shape} and {b.shape}"
        )


def linear_sq_norms(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """||sum_t b_it a_it^T||_F^2 per example; see :func:`cabs_core.per_example.linear_sq_norms`.

    T = 1: rank-one formula ||a_i||^2 ||b_i||^2; otherwise the Gram form
    sum_{t,s} (a_it . a_is)(b_it . b_is) or the materialised per-example
    gradient, whichever is cheaper.
    """
    _check(a, b)
    t, p, q = a.shape[1], a.shape[2], b.shape[2]
    if t == 1:
        return tf.reduce_sum(a[:, 0] * a[:, 0], axis=1) * tf.reduce_sum(b[:, 0] * b[:, 0], axis=1)
    if gram_is_cheaper(t, p, q):
        ga = tf.matmul(a, a, transpose_b=True)  # (m, T, T)
        gb = tf.matmul(b, b, transpose_b=True)
        return tf.reduce_sum(ga * gb, axis=[1, 2])
    g = tf.matmul(b, a, transpose_a=True)  # (m, q, p): this layer's per-example gradient
    return tf.reduce_sum(g * g, axis=[1, 2])


def bias_sq_norms(b: tf.Tensor) -> tf.Tensor:
    """||sum_t b_it||^2 per example; see :func:`cabs_core.per_example.bias_sq_norms`."""
    if b.shape.rank != 3:
        raise ValueError(f"expected output gradients (m, T, q), got {b.shape}")
    s = tf.reduce_sum(b, axis=1)
    return tf.reduce_sum(s * s, axis=1)


def embedding_sq_norms(tokens: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """Squared norm of an embedding table's per-example gradient; see
    :func:`cabs_core.per_example.embedding_sq_norms`:
    sum_{t,s} [id_it = id_is] (b_it . b_is)."""
    if tokens.shape.rank != 2 or b.shape.rank != 3 or tokens.shape[1] != b.shape[1]:
        raise ValueError(f"expected tokens (m, T) and gradients (m, T, q), got {tokens.shape} and {b.shape}")
    same = tf.cast(tf.equal(tokens[:, :, None], tokens[:, None, :]), b.dtype)  # (m, T, T)
    gb = tf.matmul(b, b, transpose_b=True)
    return tf.reduce_sum(same * gb, axis=[1, 2])


def scale_shift_sq_norms(xhat: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """||sum_t xhat_it * b_it||^2 per example, the gain of a layer normalisation;
    see :func:`cabs_core.per_example.scale_sq_norms` (the shift is :func:`bias_sq_norms`)."""
    if xhat.shape.rank != 3 or b.shape.rank != 3:
        raise ValueError(f"expected normalised inputs and gradients (m, T, q), got {xhat.shape} and {b.shape}")
    s = tf.reduce_sum(xhat * b, axis=1)
    return tf.reduce_sum(s * s, axis=1)


def tied_embedding_sq_norms(tokens: tf.Tensor, b_lookup: tf.Tensor, h: tf.Tensor, b_proj: tf.Tensor) -> tf.Tensor:
    """Squared norm of the per-example gradient of an embedding table that is
    also the output projection ``z = h E^T``; see
    :func:`cabs_core.per_example.tied_embedding_sq_norms`: the two uses' own
    terms plus twice the cross term sum_{t,s} b_proj[s, id_t] (b_lookup_t . h_s)."""
    if tokens.shape.rank != 2 or b_lookup.shape.rank != 3 or h.shape.rank != 3 or b_proj.shape.rank != 3:
        raise ValueError(
            f"expected tokens (m, T), lookup gradients (m, T, q), projection inputs (m, S, q) and projection "
            f"output gradients (m, S, V), got {tokens.shape}, {b_lookup.shape}, {h.shape} and {b_proj.shape}"
        )
    p = tf.gather(b_proj, tokens, axis=2, batch_dims=1)  # (m, S, T): b_proj[i, s, id_it]
    q = tf.matmul(h, b_lookup, transpose_b=True)  # (m, S, T)
    cross = tf.reduce_sum(p * q, axis=[1, 2])
    return embedding_sq_norms(tokens, b_lookup) + linear_sq_norms(h, b_proj) + 2 * cross
