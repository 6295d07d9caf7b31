"""Choosing the statistics path: fast (Flax layers) or generic (vmap of grad)."""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from cabs_core import BatchStats, UnsupportedModelError

from .flax_fast import FlaxLoss, fast_stats_unchecked
from .nnx import NNXLoss, trainable_state
from .nnx_fast import fast_stats_unchecked as nnx_fast_stats_unchecked
from .stats import LossFn, PyTree, batch_size_of, generic_stats, stat_dtype
from .verify import fast_impl, has_fast_path, resolve

Method = Literal["auto", "fast", "generic"]


def batch_stats(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    mask: jax.Array | None = None,
    *,
    method: Method = "auto",
    chunk_size: int | None = None,
) -> BatchStats:
    """Exact :class:`~cabs_core.BatchStats` (m, sum_i l_i, sum_i g_i, S = sum_i ||g_i||^2).

    ``method="fast"`` needs a :class:`FlaxLoss` (or :class:`NNXLoss`) whose parameters all belong to
    Dense/Conv/Embed/LayerNorm layers (or an :class:`EquinoxLoss`: :mod:`cabs_jax.eqx_fast`)
    and whose per-example decomposition the
    probe establishes for this input signature (:mod:`cabs_jax.verify`); else
    it raises :class:`~cabs_core.UnsupportedModelError` naming the layer and the
    reason. ``"generic"`` works for any ``loss_fn(params, example)``; ``"auto"``
    takes the fast path where it is established, else the generic path (one
    :class:`~cabs_core.FastPathFallbackWarning` per signature). ``chunk_size``
    bounds the generic path's memory. Traceable: call it inside ``jax.jit``.
    With an :class:`NNXLoss`, ``params`` is its trainable ``nnx.State`` (or the ``nnx.Module``
    itself, whose state of the loss's ``wrt`` filter is read); NNX models take the fast path on the
    layers of :mod:`cabs_jax.nnx_fast` (``nnx.Linear``/``LinearGeneral``/``Conv``/``Embed``/``LayerNorm``
    and modules whose parameters are all their own) under the same probe.
    """
    if method not in ("auto", "fast", "generic"):
        raise ValueError(f"method must be 'auto', 'fast' or 'generic', got {method!r}")
    params = trainable_state(loss_fn, params)
    if method == "fast" and not has_fast_path(loss_fn):
        raise UnsupportedModelError(
            f"method='fast' needs a cabs_jax.FlaxLoss, NNXLoss or EquinoxLoss (a module and a per-example output "
            f"loss), got {type(loss_fn).__name__}; use method='generic' for other loss functions",
            reason="not a FlaxLoss",
        )
    if batch_size_of(batch) == 0:  # spec section 5: an empty batch has count 0 (the controller skips the step)
        zero = jnp.zeros((), stat_dtype(params))
        return BatchStats(zero, zero, tuple(jnp.zeros_like(p) for p in jax.tree.leaves(params)), zero)
    eager = not any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves((params, batch, mask)))
    if method != "generic" and has_fast_path(loss_fn):
        if resolve(loss_fn, params, batch, mask, method) == "fast":
            if isinstance(loss_fn, NNXLoss):
                return (_nnx_fast_jit if eager else nnx_fast_stats_unchecked)(loss_fn, params, batch, mask)
            if not isinstance(loss_fn, FlaxLoss):  # e.g. an EquinoxLoss: its own fast path
                impl = fast_impl(loss_fn)
                return (impl.fast_stats_jit if eager else impl.fast_stats_unchecked)(loss_fn, params, batch, mask)
            return (_fast_jit if eager else fast_stats_unchecked)(loss_fn, params, batch, mask)
    if eager:  # one compiled program rather than one dispatch per operation
        return _generic_jit(loss_fn, params, batch, mask, chunk_size=chunk_size)
    return generic_stats(loss_fn, params, batch, mask, chunk_size=chunk_size)


_fast_jit = jax.jit(fast_stats_unchecked, static_argnums=0)
_nnx_fast_jit = jax.jit(nnx_fast_stats_unchecked, static_argnums=0)
_generic_jit = jax.jit(generic_stats, static_argnums=0, static_argnames="chunk_size")


class PerExampleStats:
    """``PerExampleStats(loss_fn)(params, batch, mask)``: :func:`cabs_jax.batch_stats` as an object."""

    def __init__(self, loss_fn: LossFn, *, method: Method = "auto", chunk_size: int | None = None) -> None:
        if method not in ("auto", "fast", "generic"):
            raise ValueError(f"method must be 'auto', 'fast' or 'generic', got {method!r}")
        self.loss_fn, self.method, self.chunk_size = loss_fn, method, chunk_size

    def __call__(self, params: PyTree, batch: PyTree, mask: jax.Array | None = None, *,
                 method: Method | None = None) -> BatchStats:
        """Exact statistics of the examples of ``batch`` with ``mask`` 1 (traceable)."""
        return batch_stats(self.loss_fn, params, batch, mask, method=method or self.method, chunk_size=self.chunk_size)

    def path(self, params: PyTree, batch: PyTree, mask: Any, *, reprobe: bool) -> Method:
        """The path this batch takes, established on the host before compiling (:mod:`cabs_jax.verify`)."""
        if self.method == "generic" or not has_fast_path(self.loss_fn):
            return self.method
        return resolve(self.loss_fn, params, batch, mask, self.method, reprobe=reprobe)  # type: ignore[return-value]
