"""cabs_tf: CABS (Balles, Romero, Hennig, UAI 2017) for TensorFlow 2 and Keras 3.

- :class:`PerExampleStats`: the per-step statistics of docs/spec.md section 4 (exact
  per-example squared gradient norms) for a Keras model or a list of
  variables, as one float64 vector ``[m, sum l_i, S, ||sum g_i||^2]``. The
  fast path returns S only where a probe has established its per-layer
  decomposition; otherwise ``auto`` falls back to the exact generic path
  (:class:`FastPathFallbackWarning`) and ``fast`` raises
  :class:`UnsupportedModelError`.
- :class:`CABSTrainer` / :func:`fit`: CABS training through :class:`cabs_core.loop.CABSLoop`
  (plain SGD or a Keras optimizer, bucketed shapes with one trace per bucket,
  micro-batches, checkpoints); :class:`DataParallelCABSTrainer` over a ``tf.distribute`` strategy.
- :class:`DecisionBatches`: batches whose size follows the decisions (also as
  a ``tf.data.Dataset``).
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from .distributed import DataParallelCABSTrainer, WorkerLostError, logical_cpu_devices  # noqa: E402
from .per_example import (  # noqa: E402
    bias_sq_norms,
    embedding_sq_norms,
    linear_sq_norms,
    scale_shift_sq_norms,
    tied_embedding_sq_norms,
)
from .stats import (  # noqa: E402
    BatchNormTrainingError,
    FastPathFallbackWarning,
    PerExampleStats,
    PforFallbackWarning,
    TiedProjection,
    UnsupportedModelError,
)
from .training import CABSTrainer, DecisionBatches, fit  # noqa: E402

__all__ = [
    "CABSTrainer",
    "WorkerLostError",
    "DataParallelCABSTrainer",
    "DecisionBatches",
    "fit",
    "logical_cpu_devices",
    "BatchNormTrainingError",
    "FastPathFallbackWarning",
    "PerExampleStats",
    "PforFallbackWarning",
    "TiedProjection",
    "UnsupportedModelError",
    "bias_sq_norms",
    "embedding_sq_norms",
    "linear_sq_norms",
    "scale_shift_sq_norms",
    "tied_embedding_sq_norms",
]
