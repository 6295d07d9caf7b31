"""Choosing the statistics path: fast (Flax layers) or generic (vmap of grad)."""

from __future__ import annotations

from typing import Literal

import jax

from cabs_core import BatchStats

from .flax_fast import FlaxLoss, UnsupportedLayerError, fast_stats
from .stats import LossFn, PyTree, generic_stats

Method = Literal["auto", "fast", "generic"]


def batch_stats(
    loss: LossFn,
    params: PyTree,
    batch: PyTree,
    weights: jax.Array | None = None,
    *,
    method: Method = "auto",
    chunk_size: int | None = None,
) -> BatchStats:
    """Exact :class:`~cabs_core.BatchStats` (m, sum_i l_i, sum_i g_i, S = sum_i ||g_i||^2).

    ``method="fast"`` needs a :class:`FlaxLoss` whose parameters all belong to
    Dense/Conv/Embed/LayerNorm layers (else :class:`UnsupportedLayerError`);
    ``"generic"`` works for any ``loss(params, example)``; ``"auto"`` takes the
    fast path when it applies. ``chunk_size`` bounds the generic path's memory.
    Traceable: call it inside ``jax.jit``.
    """
    if method not in ("auto", "fast", "generic"):
        raise ValueError(f"method must be 'auto', 'fast' or 'generic', got {method!r}")
    if method == "fast" and not isinstance(loss, FlaxLoss):
        raise UnsupportedLayerError(
            f"method='fast' needs a cabs_jax.FlaxLoss (a linen module and a per-example output loss), "
            f"got {type(loss).__name__}; use method='generic' for other loss functions"
        )
    if method != "generic" and isinstance(loss, FlaxLoss):
        try:
            return fast_stats(loss, params, batch, weights)
        except UnsupportedLayerError:
            if method == "fast":
                raise
    return generic_stats(loss, params, batch, weights, chunk_size=chunk_size)
