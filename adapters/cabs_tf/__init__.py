"""cabs_tf: CABS (Balles, Romero, Hennig, UAI 2017) for TensorFlow 2 and Keras 3.

- :class:`StatsStep`: the per-step statistics of docs/spec.md section 4 (exact
  per-example squared gradient norms) for a Keras model or a list of
  variables, as one float64 vector ``[m, sum l_i, S, ||sum g_i||^2]``. The
  fast path returns S only where a probe has established its per-layer
  decomposition; otherwise ``auto`` falls back to the exact generic path
  (:class:`FastPathFallbackWarning`) and ``fast`` raises
  :class:`UnsupportedModelError` (alias :class:`UnsupportedLayerError`).
- :class:`CABSTrainer` / :func:`fit`: SGD with the CABS controller, bucketed
  shapes (one trace per bucket), checkpoint/resume.
- :class:`DecisionBatches`: batches whose size follows the decisions (also as
  a ``tf.data.Dataset``).
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

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
    PforFallbackWarning,
    StatsStep,
    TiedProjection,
    UnsupportedLayerError,
    UnsupportedModelError,
)
from .training import CABSTrainer, DecisionBatches, fit  # noqa: E402

__all__ = [
    "CABSTrainer",
    "DecisionBatches",
    "fit",
    "BatchNormTrainingError",
    "FastPathFallbackWarning",
    "PforFallbackWarning",
    "StatsStep",
    "TiedProjection",
    "UnsupportedLayerError",
    "UnsupportedModelError",
    "bias_sq_norms",
    "embedding_sq_norms",
    "linear_sq_norms",
    "scale_shift_sq_norms",
    "tied_embedding_sq_norms",
]

from .distributed import (  # noqa: E402
    DistributedCABSTrainer,
    gather_digests,
    load_checkpoint,
    logical_cpu_devices,
    save_checkpoint,
)

__all__ += [
    "DistributedCABSTrainer",
    "gather_digests",
    "load_checkpoint",
    "logical_cpu_devices",
    "save_checkpoint",
]
