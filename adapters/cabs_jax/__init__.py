"""cabs_jax: Coupled Adaptive Batch Sizes (Balles, Romero, Hennig, UAI 2017) for JAX.

Exact per-step statistics of docs/spec.md section 4 under ``jax.jit`` (the generic
``vmap(grad)`` path for any ``loss(params, example)``, and a fast path for
Flax linen models of Dense/Conv/Embed/LayerNorm layers, Flax NNX modules of the same layers
through :class:`NNXLoss` (``cabs_jax.nnx_fast``) and Equinox modules through :class:`EquinoxLoss`
(``cabs_jax.eqx_fast``); any other loss on the
generic path), batches padded to a
few bucket sizes with a 0/1 mask so that each bucket compiles once, and a
trainer built on :class:`cabs_core.loop.CABSLoop` (:class:`CABSTrainer`, :class:`DataParallelCABSTrainer`).
See ``docs/jax.md``.
"""

from __future__ import annotations

from cabs_core import FastPathFallbackWarning, UnsupportedModelError
from cabs_core.exactness import VERIFY_EVERY

from .dispatch import Method, PerExampleStats, batch_stats
from .flax_fast import BatchNormTrainingError, FlaxLoss, fast_stats, is_supported
from .nnx import NNXLoss
from .stats import generic_stats, grad_tree
from .train import CABSTrainer, TrainState

__all__ = [
    "BatchNormTrainingError",
    "CABSTrainer",
    "FastPathFallbackWarning",
    "FlaxLoss",
    "Method",
    "NNXLoss",
    "PerExampleStats",
    "TrainState",
    "UnsupportedModelError",
    "VERIFY_EVERY",
    "batch_stats",
    "fast_stats",
    "generic_stats",
    "grad_tree",
    "is_supported",
]

from .distributed import DataParallelCABSTrainer, data_mesh  # noqa: E402  data parallelism (docs/distributed/jax.md)

__all__ += [
    "DataParallelCABSTrainer",
    "EquinoxLoss",
    "data_mesh",
]


def __getattr__(name: str) -> object:
    """``EquinoxLoss`` on first use: Equinox is imported only by those who use it."""
    if name == "EquinoxLoss":
        from .equinox import EquinoxLoss

        return EquinoxLoss
    raise AttributeError(f"module 'cabs_jax' has no attribute {name!r}")
