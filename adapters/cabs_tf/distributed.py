"""Data-parallel CABS on ``tf.distribute`` (``MirroredStrategy``, ``MultiWorkerMirroredStrategy``):
:class:`cabs_tf.training.KerasBackend` over the strategy's replicas, with the workers' agreement
checked every ``check_every`` steps (docs/distributed/tensorflow.md)."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from cabs_core import ConfigError
from cabs_core.loop import CHECK_EVERY
from cabs_core.workers import Cluster, WorkerLostError, lost_workers

from .training import CABSTrainer, _tf_variable


def logical_cpu_devices(n: int) -> list[str]:
    """Split the first physical CPU into ``n`` logical devices (tests and experiments with
    ``MirroredStrategy`` on one machine); must run before TensorFlow initialises its devices."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    if len(tf.config.get_logical_device_configuration(cpu) or []) != n:
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
        except RuntimeError as e:
            raise RuntimeError(f"cannot split the CPU into {n} logical devices: TensorFlow has already initialised "
                               f"its devices ({e}). Call logical_cpu_devices before any TensorFlow op runs (e.g. "
                               f"in a fresh process).") from e
    return [d.name for d in tf.config.list_logical_devices("CPU")]


class DataParallelCABSTrainer(CABSTrainer):
    """:class:`CABSTrainer` over the replicas of ``strategy`` (default: the strategy in force);
    the other arguments are :class:`CABSTrainer`'s. Build the model, and the optimizer, inside
    ``strategy.scope()``. Every ``check_every`` steps (0: never) the workers compare one digest
    of their run (:class:`cabs_core.DesyncError`). A collective that fails because a worker of a
    multi-worker run is gone raises :class:`cabs_core.workers.WorkerLostError` naming it."""

    # the collective failures a lost peer causes (refused connection, timeout, aborted collectives)
    lost_errors = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError,
                   tf.errors.AbortedError)

    def __init__(self, model: Any, loss_fn: Any, controller: Any, data: tuple[Any, Any], *,
                 strategy: tf.distribute.Strategy | None = None, check_every: int = CHECK_EVERY, **kw: Any) -> None:
        self.strategy, self.check_every = strategy or tf.distribute.get_strategy(), check_every
        variables = model.trainable_variables if isinstance(model, keras.Layer) else model
        outside = [v.path if hasattr(v, "path") else v.name for v in variables
                   if not self.strategy.extended.variable_created_in_scope(_tf_variable(v))]
        if outside:
            raise ValueError(f"variables {outside} were not created in strategy.scope() of "
                             f"{type(self.strategy).__name__}: build the model inside `with strategy.scope():` "
                             f"so that every replica holds a mirrored copy")
        opt = kw.get("optimizer")
        if opt is not None and getattr(opt, "_distribution_strategy", self.strategy) is not self.strategy:
            raise ConfigError("optimizer", "create the optimizer inside `with strategy.scope():` (Keras binds an "
                                           "optimizer to the strategy in force when it is constructed)")
        super().__init__(model, loss_fn, controller, data, **kw)

    def _cluster(self) -> Cluster | None:
        """(task type, index, the addresses of its job, timeout) of a multi-worker strategy, else None."""
        resolver = getattr(self.strategy, "cluster_resolver", None)
        if resolver is None or not resolver.task_type:
            return None
        job = resolver.cluster_spec().as_dict().get(resolver.task_type, [])
        job = [job[k] for k in sorted(job)] if isinstance(job, dict) else list(job)
        timeout = getattr(getattr(self.strategy.extended, "_communication_options", None), "timeout_seconds", None)
        return Cluster(resolver.task_type, int(resolver.task_id), job, timeout) if len(job) > 1 else None

    def _extra(self) -> dict[str, Any]:
        return {**super()._extra(), "replicas": int(self.strategy.num_replicas_in_sync)}  # informative: any count


__all__ = ["DataParallelCABSTrainer", "WorkerLostError", "logical_cpu_devices", "lost_workers"]
