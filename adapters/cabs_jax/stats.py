"""Exact per-step statistics (docs/spec.md section 4) for any ``loss(params, example)``.

The generic path: ``jax.vmap(jax.value_and_grad(loss))`` over a chunk of
examples gives the per-example gradients g_i; each chunk is reduced at once to
its sums (m, sum_i l_i, sum_i g_i, S = sum_i ||g_i||^2) and chunks are folded
with ``lax.scan``, so at most ``chunk_size`` per-example gradients exist at any
time. Everything is traceable: call it inside ``jax.jit``.

``grad_sum`` is a tuple of arrays in the order of ``jax.tree.leaves(params)``
(rebuild the pytree with :func:`grad_tree`).

Precision (docs/jax.md, "Mixed precision"): ``count``, ``loss_sum`` and ``S``
are accumulated in :func:`stat_dtype` (at least float32, float64 for float64
parameters), whatever the parameters' dtype: a bfloat16 count stopped at 256. Squared
norms of per-example gradients are formed in at least float32
(:func:`compute_dtype`); each ``grad_sum`` leaf is accumulated in at least
float32 and returned in its parameter's dtype (it feeds the update).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from cabs_core import BatchStats

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]  # loss(params, example) -> scalar


def batch_size_of(batch: PyTree) -> int:
    """m, the common length of the leading axis of every leaf of ``batch``."""
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError("batch has no arrays")
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else -1 for x in leaves}
    if len(sizes) != 1 or -1 in sizes:
        shapes = [tuple(jnp.shape(x)) for x in leaves]
        raise ValueError(f"every array of a batch needs the same leading example axis, got shapes {shapes}")
    return int(sizes.pop())


def check_weights(weights: jax.Array | None, m: int, dtype: Any) -> jax.Array:
    """The 0/1 example mask as an array of ``dtype`` and shape (m,) (all ones if None)."""
    if weights is None:
        return jnp.ones((m,), dtype)
    w = jnp.asarray(weights)
    if w.shape != (m,):
        raise ValueError(f"weights must have shape ({m},) (one 0/1 entry per example), got {tuple(w.shape)}")
    return w.astype(dtype)


def float_dtype(params: PyTree) -> Any:
    """The floating dtype of the parameters (the statistics' dtype)."""
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError("params has no arrays")
    dts = [jnp.result_type(x) for x in leaves]
    if not all(jnp.issubdtype(d, jnp.floating) for d in dts):
        raise ValueError(f"all parameters must be floating point arrays, got dtypes {sorted({str(d) for d in dts})}")
    return jnp.result_type(*dts)


def stat_dtype(params: PyTree) -> Any:
    """The dtype of ``count``, ``loss_sum`` and ``S``: the parameters' floating dtype
    promoted to at least float32 (float32 for bfloat16/float16 and float32
    parameters, float64 for float64 ones). Not float64 for float32 parameters under
    ``jax_enable_x64``: the trainer's mean gradient ``grad_sum / count`` would then
    turn float32 optimizer states into float64 ones."""
    return compute_dtype(float_dtype(params))


def compute_dtype(dtype: Any) -> Any:
    """``dtype`` promoted to at least float32: where squares of (per-example)
    gradients and activations are formed and summed."""
    return jnp.promote_types(dtype, jnp.float32)


def grad_tree(stats: BatchStats, params: PyTree) -> PyTree:
    """``stats.grad_sum`` as a pytree shaped like ``params``."""
    return jax.tree.unflatten(jax.tree.structure(params), list(stats.grad_sum))


def _pad_leading(x: jax.Array, n: int) -> jax.Array:
    """Pad the leading axis to length n with copies of example 0 (finite values)."""
    extra = n - x.shape[0]
    if extra == 0:
        return x
    return jnp.concatenate([x, jnp.broadcast_to(x[:1], (extra,) + x.shape[1:])], axis=0)


def generic_stats(
    loss: LossFn,
    params: PyTree,
    batch: PyTree,
    weights: jax.Array | None = None,
    *,
    chunk_size: int | None = None,
) -> BatchStats:
    """Exact :class:`~cabs_core.BatchStats` of ``loss(params, example)`` over ``batch``.

    ``batch``: pytree of arrays with a leading example axis m; ``weights``:
    0/1 mask of shape (m,) (padding carries 0 and changes none of the sums).
    ``chunk_size``: per-example gradients are formed for at most this many
    examples at a time (None: all m at once).
    """
    m = batch_size_of(batch)
    dtype = stat_dtype(params)
    w = check_weights(weights, m, dtype)
    leaves = jax.tree.leaves(params)
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    if chunk_size is None or chunk_size >= m:
        chunk_size = m
    n_chunks = -(-m // chunk_size)
    padded = n_chunks * chunk_size
    chunks = jax.tree.map(
        lambda x: _pad_leading(jnp.asarray(x), padded).reshape((n_chunks, chunk_size) + jnp.shape(x)[1:]), batch
    )
    w_chunks = jnp.concatenate([w, jnp.zeros((padded - m,), dtype)]).reshape(n_chunks, chunk_size)
    per_example = jax.vmap(jax.value_and_grad(loss), in_axes=(None, 0))

    def fold(carry: tuple, chunk: tuple) -> tuple:
        loss_sum, grad_sum, sq_sum = carry
        examples, wc = chunk
        losses, grads = per_example(params, examples)
        keep = wc != 0
        loss_sum = loss_sum + jnp.sum(jnp.where(keep, wc * losses.astype(dtype), 0))
        new_grad_sum, sq = [], jnp.zeros((chunk_size,), dtype)
        for acc, g in zip(grad_sum, jax.tree.leaves(grads)):
            g = jnp.where(keep.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0).astype(acc.dtype)  # >= float32
            new_grad_sum.append(acc + jnp.tensordot(wc.astype(acc.dtype), g, axes=1))
            sq = sq + jnp.sum(g.reshape(chunk_size, -1) ** 2, axis=1).astype(dtype)
        return (loss_sum, tuple(new_grad_sum), sq_sum + jnp.sum(wc * sq)), None

    zero = jnp.zeros((), dtype)
    init = (zero, tuple(jnp.zeros(jnp.shape(p), compute_dtype(jnp.result_type(p))) for p in leaves), zero)
    (loss_sum, grad_sum, sq_sum), _ = jax.lax.scan(fold, init, (chunks, w_chunks))
    grad_sum = tuple(g.astype(jnp.result_type(p)) for g, p in zip(grad_sum, leaves))  # the parameters' dtypes
    return BatchStats(jnp.sum(w), loss_sum, grad_sum, sq_sum)
