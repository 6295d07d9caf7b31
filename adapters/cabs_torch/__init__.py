"""cabs_torch: the PyTorch adapter of CABS (Balles, Romero, Hennig, UAI 2017).

- :class:`PerExampleStats` / :func:`per_example_stats`: the exact statistics of
  docs/spec.md section 4 (count, sum of losses, gradient sum, S = sum_i ||g_i||^2) for
  an ``nn.Module`` and a per-example loss; a fast hook-based path for common
  layers, which returns S only for an input signature it has verified (probe,
  accounting check; otherwise ``auto`` falls back with a
  :class:`FastPathFallbackWarning` and ``fast`` raises
  :class:`UnsupportedModelError`), and a generic ``torch.func`` path for any model.
- :class:`MicroBatchStats`: the group estimator over micro-batches (BatchNorm
  in training mode).
- :class:`CABSSGD`: an SGD step with lr times the batch's mean gradient that
  updates the core's controller and returns the next batch size.
- :class:`CABSBatchSampler`: a ``batch_sampler`` for ``DataLoader`` driven by
  the core's sampler.
- :class:`DistributedCABSSGD`: data-parallel CABSSGD on ``torch.distributed``
  (all-reduced statistics, desync detection; ``docs/distributed/torch.md``).

See ``docs/torch.md``.
"""

from .distributed import DistributedCABSSGD, all_reduce_stats, check_in_sync, config_digest
from .groups import MicroBatchStats
from .layers import RULES
from .stats import (
    BatchNormTrainingError,
    FastPathFallbackWarning,
    PerExampleStats,
    UnsupportedLayerError,
    UnsupportedModelError,
    check_batch_norm,
    per_example_stats,
    resolve_method,
    trainable_parameters,
    unsupported_reasons,
)
from .training import CABSSGD, CABSBatchSampler

__all__ = [
    "RULES",
    "BatchNormTrainingError",
    "CABSBatchSampler",
    "CABSSGD",
    "FastPathFallbackWarning",
    "DistributedCABSSGD",
    "MicroBatchStats",
    "PerExampleStats",
    "UnsupportedLayerError",
    "UnsupportedModelError",
    "all_reduce_stats",
    "check_batch_norm",
    "check_in_sync",
    "config_digest",
    "per_example_stats",
    "resolve_method",
    "trainable_parameters",
    "unsupported_reasons",
]
