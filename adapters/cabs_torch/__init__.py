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
- :class:`CABSTrainer`: the core's CABS step (:class:`cabs_core.loop.CABSLoop`)
  for a module, plain SGD or any ``torch.optim.Optimizer``, through
  :class:`TorchBackend`; :class:`CABSBatchSampler` feeds a ``DataLoader``.
- :class:`DataParallelCABSTrainer`: the same across the ranks of
  ``torch.distributed`` (``docs/distributed/torch.md``).

The errors are the core's (:mod:`cabs_core`). See ``docs/torch.md``.
"""

from .distributed import DataParallelCABSTrainer
from .groups import MicroBatchStats
from .layers import RULES
from .ops import register_rule
from .stats import (
    BatchNormTrainingError,
    FastPathFallbackWarning,
    PerExampleStats,
    UnsupportedModelError,
    check_batch_norm,
    per_example_stats,
    resolve_method,
    trainable_parameters,
    unsupported_reasons,
)
from .training import CABSBatchSampler, CABSTrainer, TorchBackend

__all__ = [
    "RULES",
    "BatchNormTrainingError",
    "CABSBatchSampler",
    "CABSTrainer",
    "DataParallelCABSTrainer",
    "FastPathFallbackWarning",
    "MicroBatchStats",
    "PerExampleStats",
    "TorchBackend",
    "UnsupportedModelError",
    "check_batch_norm",
    "per_example_stats",
    "register_rule",
    "resolve_method",
    "trainable_parameters",
    "unsupported_reasons",
]
