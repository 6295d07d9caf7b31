"""The per-step statistics of docs/spec.md section 4, and their reduction to four scalars.

An adapter delivers a :class:`BatchStats` per step: sums over the examples of
the batch, which add up across micro-batches and data-parallel workers
(:func:`combine`). The CABS rule needs only four scalars of them
(:class:`ScalarStats`), reduced on the device where the statistics live
(:func:`reduce_stats`) and moved to the host in one transfer
(:func:`to_host`).

Everything here is written against the Array API standard
(``xp = array_namespace(x)``). TensorFlow tensors have no Array API
namespace: a TensorFlow adapter reduces on its device to the four scalars of
:class:`ScalarStats`, stacks them in that order into one tensor and hands the
core ``ScalarStats.from_vector(t.numpy())``: one device-to-host copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from array_api_compat import array_namespace, is_torch_array, to_device

Array = Any  # an Array API array (numpy, array-api-strict, torch, jax, ...)


class BatchStats(NamedTuple):
    """Sums over the (unmasked) examples i of one batch (docs/spec.md section 4).

    count:       m, the number of examples (0-d array)
    loss_sum:    sum_i l_i (0-d array)
    grad_sum:    sum_i g_i, one array per parameter (the ordinary gradient times m)
    sq_norm_sum: S = sum_i ||g_i||^2 over all parameters (0-d array)
    """

    count: Array
    loss_sum: Array
    grad_sum: tuple[Array, ...]
    sq_norm_sum: Array


class ScalarStats(NamedTuple):
    """The four scalars the rules need: m, sum_i l_i, S and ||sum_i g_i||^2."""

    count: Array
    loss_sum: Array
    sq_norm_sum: Array
    grad_sum_sq_norm: Array

    @classmethod
    def from_vector(cls, v: Sequence[Any]) -> ScalarStats:
        """From four values in field order, e.g. one host copy of a stacked tensor."""
        if len(v) != 4:
            raise ValueError(f"ScalarStats.from_vector needs 4 values, got {len(v)}")
        return cls(*(v[i] for i in range(4)))


def _sum_of_squares(x: Array) -> Array:
    """sum(x^2), accumulated in at least float32 (a float16 sum of 300 squares to inf)."""
    xp = array_namespace(x)
    if xp.isdtype(x.dtype, "real floating") and xp.finfo(x.dtype).bits < 32:
        x = xp.astype(x, xp.float32)
    return xp.sum(x * x)


def reduce_stats(stats: BatchStats) -> ScalarStats:
    """Reduce :class:`BatchStats` to :class:`ScalarStats` on their own device."""
    g2 = sum((_sum_of_squares(g) for g in stats.grad_sum[1:]), _sum_of_squares(stats.grad_sum[0]))
    return ScalarStats(stats.count, stats.loss_sum, stats.sq_norm_sum, g2)


def combine(a: BatchStats, b: BatchStats) -> BatchStats:
    """Statistics of the union of two disjoint batches (micro-batches, workers)."""
    if len(a.grad_sum) != len(b.grad_sum):
        raise ValueError(f"cannot combine statistics over {len(a.grad_sum)} and {len(b.grad_sum)} parameters")
    for k, (x, y) in enumerate(zip(a.grad_sum, b.grad_sum)):
        if tuple(x.shape) != tuple(y.shape):
            raise ValueError(
                f"cannot combine statistics: grad_sum[{k}] has shape {tuple(x.shape)} in one and "
                f"{tuple(y.shape)} in the other (different models or parameter orders?)"
            )
    for name in ("count", "loss_sum", "sq_norm_sum"):
        for side in (a, b):
            shape = tuple(getattr(getattr(side, name), "shape", ()))
            if shape not in ((), (1,)):
                raise ValueError(f"cannot combine statistics: {name} must be a scalar, got shape {shape}")
    return BatchStats(
        a.count + b.count,
        a.loss_sum + b.loss_sum,
        tuple(x + y for x, y in zip(a.grad_sum, b.grad_sum)),
        a.sq_norm_sum + b.sq_norm_sum,
    )


def batch_stats_from_per_example(losses: Array, grads: Sequence[Array], weights: Array | None = None) -> BatchStats:
    """:class:`BatchStats` from per-example losses ``(m,)`` and gradients.

    ``grads`` holds one array per parameter, each with a leading example axis
    of length m. ``weights`` is an optional 0/1 mask of shape ``(m,)``: masked
    examples (padding) change none of the sums. This materialises per-example
    gradients: it is the brute-force definition adapters are tested against.
    """
    xp = array_namespace(losses, *grads)
    if losses.ndim != 1:
        raise ValueError(f"losses must have shape (m,), got shape {tuple(losses.shape)}")
    m = losses.shape[0]
    for k, g in enumerate(grads):
        if g.ndim < 1 or g.shape[0] != m:
            raise ValueError(f"grads[{k}] must have a leading example axis of length {m}, got shape {tuple(g.shape)}")
    if not grads:
        raise ValueError("grads must hold at least one parameter's per-example gradients")
    w = xp.ones_like(losses) if weights is None else xp.astype(weights, losses.dtype)
    if w.shape != (m,):
        raise ValueError(f"weights must have shape ({m},), got shape {tuple(w.shape)}")
    grad_sum = []
    sq_norm_sum = xp.zeros((), dtype=losses.dtype)
    for g in grads:
        wg = xp.reshape(w, (m,) + (1,) * (g.ndim - 1)) * g
        grad_sum.append(xp.sum(wg, axis=0))
        sq_norm_sum = sq_norm_sum + xp.sum(wg * g)
    return BatchStats(xp.sum(w), xp.sum(w * losses), tuple(grad_sum), sq_norm_sum)


def to_host(stats: ScalarStats) -> tuple[float, float, float, float]:
    """The four scalars as Python floats (float64), in one device-to-host copy.

    Array API arrays are stacked on their device and copied once; other
    objects (NumPy scalars, Python numbers, TensorFlow eager tensors) go
    through ``numpy.asarray``.
    """
    host: Any
    try:
        xp = array_namespace(*stats)
    except TypeError:
        host = np.asarray([np.asarray(v, dtype=np.float64) for v in stats], dtype=np.float64)
    else:
        vals = [xp.asarray(v) for v in stats]
        dtype = next((v.dtype for v in vals if xp.isdtype(v.dtype, "real floating")), None)
        if dtype is not None and xp.finfo(dtype).bits < 32:  # bfloat16/float16: no DLPack export, few digits
            dtype = xp.float32
        stacked = xp.stack([xp.reshape(xp.astype(v, dtype) if dtype else v, ()) for v in vals])
        if is_torch_array(stacked):  # statistics are values: leave the autograd graph
            host = np.from_dlpack(to_device(stacked.detach(), "cpu"))
        else:
            host = np.asarray(stacked)
    return tuple(float(v) for v in host)  # type: ignore[return-value]
