"""Data-parallel CABS on ``tf.distribute`` (``MirroredStrategy``, ``MultiWorkerMirroredStrategy``).

The loop (:class:`cabs_core.loop.CABSLoop`) splits each micro-batch over the replicas
(this worker's ``shards``) and pads every shard to one shard bucket; each replica
computes its sums under ``strategy.run`` and all-reduces them there (the gradients and
m, sum l_i, S; ``||sum g_i||^2`` is recomputed from the reduced gradients), so every
worker feeds its controller the same numbers and applies the same update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from cabs_core import CABSController, ConfigError
from cabs_core.exactness import VERIFY_EVERY
from cabs_core.loop import CHECK_EVERY, MicroBatch

from .stats import Method, PerExampleStats
from .training import CABSTrainer, KerasBackend, _tf_variable


def logical_cpu_devices(n: int) -> list[str]:
    """Split the first physical CPU into ``n`` logical devices (tests and experiments with
    ``MirroredStrategy`` on one machine); must run before TensorFlow initialises its devices."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is None or len(current) != n:
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
        except RuntimeError as e:
            raise RuntimeError(
                f"cannot split the CPU into {n} logical devices: TensorFlow has already initialised its "
                f"devices ({e}). Call logical_cpu_devices before any TensorFlow op runs (e.g. in a fresh "
                f"process)."
            ) from e
    return [d.name for d in tf.config.list_logical_devices("CPU")]


class StrategyBackend(KerasBackend):
    """:class:`KerasBackend` over the replicas of a strategy: ``shards`` = this worker's
    replicas, ``processes`` = workers; the statistics are all-reduced inside ``strategy.run``."""

    def __init__(self, stats: PerExampleStats, optimizer: Any, strategy: tf.distribute.Strategy) -> None:
        outside = [getattr(v, "path", v.name) for v in stats.variables
                   if not strategy.extended.variable_created_in_scope(_tf_variable(v))]
        if outside:
            raise ValueError(
                f"variables {outside} were not created in strategy.scope() of {type(strategy).__name__}: "
                f"build the model inside `with strategy.scope():` so that every replica holds a mirrored copy")
        if optimizer is not None and getattr(optimizer, "_distribution_strategy", strategy) is not strategy:
            raise ConfigError("optimizer", "create the optimizer inside `with strategy.scope():` (Keras binds an "
                                           "optimizer to the strategy in force when it is constructed)")
        self.strategy = strategy
        with strategy.scope():
            super().__init__(stats, optimizer)
        ids = [int(i) for i in strategy.experimental_local_results(
            strategy.experimental_distribute_values_from_function(lambda ctx: ctx.replica_id_in_sync_group))]
        self.shards = len(ids)
        self.processes, self.process_index = strategy.num_replicas_in_sync // self.shards, min(ids) // self.shards
        self._gather_fn = tf.function(lambda local: strategy.run(
            lambda v: tf.distribute.get_replica_context().all_gather(v, axis=0), args=(local,)))

    def _statistics(self, x: Any, y: Any, mask: Any) -> Any:
        self.trace_count += 1  # Python side effect: runs once per trace

        def replica(x: Any, y: Any, mask: tf.Tensor) -> Any:
            grads, vec = self.stats(x, y, mask)
            ctx = tf.distribute.get_replica_context()
            return self._sums(ctx.all_reduce(tf.distribute.ReduceOp.SUM, list(grads)),
                              ctx.all_reduce(tf.distribute.ReduceOp.SUM, vec[:3]))

        return self.strategy.run(replica, args=(x, y, mask))

    def _place(self, x: Any, y: Any, mask: Any, micro: MicroBatch) -> tuple[Any, Any, Any]:
        base, size = self.process_index * self.shards, micro.size

        def put(a: np.ndarray) -> Any:
            return self.strategy.experimental_distribute_values_from_function(
                lambda ctx: a[(ctx.replica_id_in_sync_group - base) * size:][:size])

        return tf.nest.map_structure(put, (x, y, mask))

    def statistics(self, model: Any, batch: Any, micro: MicroBatch, *, verify: bool) -> Any:
        out = super().statistics(model, batch, micro, verify=verify)
        return tf.nest.map_structure(lambda t: self.strategy.experimental_local_results(t)[0], out)

    def gather_replicas(self, words_for: Callable[[int], np.ndarray]) -> np.ndarray:
        """Every replica's int32 words ``words_for(replica id)``, shape (replicas, k): one all-gather."""
        local = self.strategy.experimental_distribute_values_from_function(
            lambda ctx: np.asarray(words_for(ctx.replica_id_in_sync_group), np.int32)[None])
        return self.strategy.experimental_local_results(self._gather_fn(local))[0].numpy()

    def gather(self, words: np.ndarray) -> np.ndarray:
        return self.gather_replicas(lambda r: words)[:: self.shards]  # one row per worker


class DataParallelCABSTrainer(CABSTrainer):
    """:class:`CABSTrainer` over the replicas of ``strategy`` (default: the strategy in force).
    Build the model (and the optimizer) inside ``strategy.scope()``. Every ``check_every``
    steps (0: never) the workers compare one digest (:class:`cabs_core.DesyncError`)."""

    def __init__(self, model: keras.Layer | Sequence[tf.Variable], loss_fn: Callable[..., tf.Tensor],
                 controller: CABSController, data: tuple[Any, Any], *,
                 strategy: tf.distribute.Strategy | None = None, check_every: int = CHECK_EVERY,
                 optimizer: keras.optimizers.Optimizer | None = None, method: Method = "auto",
                 chunk_size: int | None = None, buckets: Sequence[int] | None = None, seed: int = 0,
                 max_micro_batch: int | None = None, verify_every: int | None = VERIFY_EVERY) -> None:
        self.strategy = strategy or tf.distribute.get_strategy()
        self._setup(model, loss_fn, controller, data, optimizer,
                    dict(method=method, chunk_size=chunk_size, verify_every=verify_every),
                    dict(seed=seed, buckets=buckets, max_micro_batch=max_micro_batch, verify_every=verify_every,
                         check_every=check_every), StrategyBackend, strategy=self.strategy)

    def check_sync(self) -> None:
        """Compare the workers' digests now (collective)."""
        self.loop.check_sync(self._run)

    def save(self, path: str, **extra: Any) -> None:
        """As :meth:`CABSTrainer.save`; ``replicas`` is informative (any count may resume it)."""
        super().save(path, replicas=int(self.strategy.num_replicas_in_sync), **extra)
