"""cabs_core: Coupled Adaptive Batch Sizes (Balles, Romero, Hennig, UAI 2017),
framework-agnostic.

The core written against the Python Array API standard: the statistics an
adapter delivers (:mod:`.stats`), estimators of tr(Sigma) (:mod:`.variance`),
batch-size rules (:mod:`.rules`), the smoothed controller (:mod:`.controller`)
the batch sampler (:mod:`.sampler`), and what a fast path must establish
before it returns S (:mod:`.exactness`), and the one checkpoint envelope
(:mod:`.checkpoint`), and the one training step every adapter runs
(:mod:`.loop`), with what the data-parallel trainers share about their workers
(:mod:`.workers`). It imports no deep-learning framework.
"""

from . import checkpoint, loop
from .checkpoint import CheckpointMismatchError
from .controller import (
    CABSController,
    ConfigError,
    ControllerState,
    DesyncError,
    NonFiniteStatisticsError,
    StepInfo,
    check_digests,
)
from .exactness import (
    BatchNormTrainingError,
    FastPathFallbackWarning,
    UnsupportedModelError,
    accounting_scale,
    agree_on_path,
    check_close,
    probe_batch_size,
    relative_error,
    rtol_for,
    verify_due,
)
from .per_example import (
    bias_sq_norms,
    embedding_linear_cross_sq_norms,
    embedding_sq_norms,
    linear_cross_sq_norms,
    linear_sq_norms,
    scale_sq_norms,
    tied_embedding_sq_norms,
)
from .rules import (
    cabs_batch_size,
    discretise,
    gradient_noise_scale,
    inner_product_test_batch_size,
    norm_test_batch_size,
)
from .sampler import (
    SamplerState,
    bucket_for,
    epoch_permutation,
    geometric_buckets,
    next_batch,
    pad_indices,
    padded_shards,
    shard,
    shard_buckets,
)
from .stats import BatchStats, ScalarStats, batch_stats_from_per_example, combine, reduce_stats, to_host
from .variance import group_variance, inner_product_variance, two_pass_variance, within_batch_variance
from .workers import WorkerLostError

__version__ = "0.1.0"

__all__ = [
    "CheckpointMismatchError",
    "checkpoint",
    "loop",
    "BatchNormTrainingError",
    "FastPathFallbackWarning",
    "UnsupportedModelError",
    "accounting_scale",
    "agree_on_path",
    "check_close",
    "probe_batch_size",
    "relative_error",
    "rtol_for",
    "verify_due",
    "BatchStats",
    "CABSController",
    "ConfigError",
    "ControllerState",
    "DesyncError",
    "NonFiniteStatisticsError",
    "SamplerState",
    "ScalarStats",
    "StepInfo",
    "batch_stats_from_per_example",
    "bias_sq_norms",
    "bucket_for",
    "embedding_sq_norms",
    "embedding_linear_cross_sq_norms",
    "linear_cross_sq_norms",
    "linear_sq_norms",
    "cabs_batch_size",
    "check_digests",
    "combine",
    "discretise",
    "epoch_permutation",
    "geometric_buckets",
    "gradient_noise_scale",
    "group_variance",
    "inner_product_test_batch_size",
    "inner_product_variance",
    "next_batch",
    "norm_test_batch_size",
    "pad_indices",
    "padded_shards",
    "reduce_stats",
    "scale_sq_norms",
    "tied_embedding_sq_norms",
    "shard",
    "shard_buckets",
    "to_host",
    "two_pass_variance",
    "within_batch_variance",
    "WorkerLostError",
]
