"""Data-parallel CABS on ``tf.distribute`` (``MirroredStrategy``, ``MultiWorkerMirroredStrategy``):
:class:`cabs_tf.training.KerasBackend` over the strategy's replicas, with the workers' agreement
checked every ``check_every`` steps (docs/distributed/tensorflow.md)."""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import Iterator
from typing import Any

import keras
import tensorflow as tf

from cabs_core import ConfigError, StepInfo
from cabs_core.loop import CHECK_EVERY

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


class WorkerLostError(RuntimeError):
    """A collective of a multi-worker run failed or timed out: a worker was lost (``lost``: the
    indices named, empty when none could be named). The others cannot continue: restart every
    worker from the last checkpoint."""

    def __init__(self, message: str, lost: list[int]) -> None:
        super().__init__(message)
        self.lost = lost


# the collective failures a lost peer causes (refused connection, timeout, aborted collectives)
_LOST = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError,
         tf.errors.AbortedError)


_SAYS_WHY = ("abort", "fail", "timed out", "unhealthy", "refused", "reset")  # the line of TF's error to quote


def _cluster(strategy: tf.distribute.Strategy) -> tuple[str, int, list[str]] | None:
    """(task type, this task's index, the addresses of its job) of a multi-worker strategy, else None."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return None
    job = resolver.cluster_spec().as_dict().get(resolver.task_type, [])
    job = [job[k] for k in sorted(job)] if isinstance(job, dict) else list(job)
    return (resolver.task_type, int(resolver.task_id), job) if len(job) > 1 else None


def _refuses(address: str, timeout_s: float = 1.0) -> bool:
    """Whether nothing listens at ``host:port`` any more (a dead worker; a hung one still accepts)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return False
    except OSError:
        return True


def lost_workers(message: str, task_type: str, me: int, addresses: list[str]) -> list[int]:
    """The peers a collective's error ``message`` names (``/job:T[/replica:0]/task:i`` or an address
    of the cluster), else those that no longer accept connections; never ``me``."""
    named = {int(i) for i in re.findall(rf"/job:{re.escape(task_type)}/(?:replica:\d+/)?task:(\d+)", message)}
    named |= {i for i, a in enumerate(addresses) if re.search(rf"(?<![\w.]){re.escape(a)}(?!\d)", message)}
    named.discard(me)
    if not named:
        named = {i for i, a in enumerate(addresses) if i != me and _refuses(a)}
    return sorted(named)


class DataParallelCABSTrainer(CABSTrainer):
    """:class:`CABSTrainer` over the replicas of ``strategy`` (default: the strategy in force);
    the other arguments are :class:`CABSTrainer`'s. Build the model, and the optimizer, inside
    ``strategy.scope()``. Every ``check_every`` steps (0: never) the workers compare one digest
    of their run (:class:`cabs_core.DesyncError`). A collective that fails because a worker of a
    multi-worker run is gone raises :class:`WorkerLostError` naming it."""

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

    @contextlib.contextmanager
    def _naming_lost_workers(self, what: str) -> Iterator[None]:
        """Re-raise a failed collective of a multi-worker run as :class:`WorkerLostError` naming the peer."""
        try:
            yield
        except _LOST as e:
            cluster = _cluster(self.strategy)
            if cluster is None:
                raise
            task_type, me, addresses = cluster
            lost = lost_workers(str(e), task_type, me, addresses)
            who = (", ".join(f"{task_type} {i} ({addresses[i]})" for i in lost)
                   or "a worker (none could be named: the error names none and every peer accepts connections)")
            timeout = getattr(getattr(self.strategy.extended, "_communication_options", None), "timeout_seconds",
                              None)
            bound = "no collective timeout" if timeout is None else f"collective timeout {timeout} s"
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            first = next((ln for ln in lines if any(w in ln.lower() for w in _SAYS_WHY)), lines[0] if lines else "")
            raise WorkerLostError(
                f"{task_type} {me}: lost {who} during {what} (a collective failed with {type(e).__name__}: "
                f"{first[:300]}; {bound}). The other workers cannot continue: restart every "
                f"worker from the last checkpoint (trainer.restore), with the same or another number of workers.",
                lost) from e

    def _step(self, batch: Any = None) -> StepInfo:
        with self._naming_lost_workers(f"step {self.state.step + 1}"):
            return super()._step(batch)

    def check_sync(self) -> None:
        with self._naming_lost_workers(f"the agreement check at step {self.state.step}"):
            super().check_sync()

    def _extra(self) -> dict[str, Any]:
        return {**super()._extra(), "replicas": int(self.strategy.num_replicas_in_sync)}  # informative: any count
