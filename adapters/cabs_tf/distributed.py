"""Data-parallel CABS on ``tf.distribute`` (``MirroredStrategy``, ``MultiWorkerMirroredStrategy``).

Every statistic of docs/spec.md section 4 except ``||sum_i g_i||^2`` is a sum over
examples, so it adds up across replicas. One step with R replicas::

    indices <- next_batch(sampler, m_t)                  (global batch, same on every worker)
    rows_r  <- shard(indices, R, r)                      (cabs_core: contiguous, first m_t % R get one more)
    pad rows_r to the shard bucket >= ceil(m_t / R)      (mask 0 for padding: one trace per bucket)
    grad_sum_r, [m_r, L_r, S_r, .] <- StatsStep(shard)   (each replica, its own device)
    grad_sum <- all_reduce(SUM, grad_sum_r)              (one collective for the gradients)
    [m, L, S] <- all_reduce(SUM, [m_r, L_r, S_r])        (one collective for the scalars)
    ||grad_sum||^2 from the reduced grad_sum             (identical on every replica)
    theta <- theta - lr * grad_sum / m                   (every replica, same update)
    m_{t+1} <- controller.update(one host copy of the four scalars)

Since every worker feeds its controller the same all-reduced numbers, every
worker makes the same decision; :func:`gather_digests` and
:func:`check_digests` verify that periodically (:class:`DesyncError`).
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from cabs_core import (
    CABSController,
    ScalarStats,
    StepInfo,
    check_digests,
    next_batch,
    padded_shards,
    shard_buckets,
)
from cabs_core.exactness import VERIFY_EVERY

from .stats import Method
from .training import CABSTrainer, _take

_CHECKPOINT_FORMAT = "cabs-tf-checkpoint/1"


_GATHER_FNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _gather_fn(strategy: tf.distribute.Strategy) -> Callable[[Any], Any]:
    """One ``tf.function`` per strategy that all-gathers a per-replica value
    (traced once, not per call; holds the strategy weakly)."""
    fn = _GATHER_FNS.get(strategy)
    if fn is None:
        ref = weakref.ref(strategy)

        def gather(v: tf.Tensor) -> tf.Tensor:
            return tf.distribute.get_replica_context().all_gather(v, axis=0)

        fn = _GATHER_FNS[strategy] = tf.function(lambda local: ref().run(gather, args=(local,)))
    return fn


def gather_digests(strategy: tf.distribute.Strategy, digest_for: Callable[[int], int]) -> list[int]:
    """Every replica's digest, in replica order, through one ``all_gather``.

    ``digest_for(replica_id)`` is evaluated on the worker that hosts the
    replica (normally ``lambda r: trainer.state.digest()``: that worker's
    controller). A 63-bit digest travels as two exact float64 halves."""

    def halves(ctx: tf.distribute.experimental.ValueContext) -> np.ndarray:
        d = int(digest_for(ctx.replica_id_in_sync_group))
        if not 0 <= d < 2**64:
            raise ValueError(f"a digest must be an integer in [0, 2**64), got {d!r}")
        return np.array([[d >> 32, d & 0xFFFFFFFF]], np.float64)

    local = strategy.experimental_distribute_values_from_function(halves)
    out = strategy.experimental_local_results(_gather_fn(strategy)(local))[0].numpy()
    return [(int(hi) << 32) | int(lo) for hi, lo in out]


def logical_cpu_devices(n: int) -> list[str]:
    """Split the first physical CPU into ``n`` logical devices (for tests and
    experiments with ``MirroredStrategy`` on one machine); returns their names.
    Must run before TensorFlow initialises its devices."""
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


def _tf_variable(v: Any) -> Any:
    """The ``tf.Variable`` behind a Keras 3 variable (a distributed one under a strategy)."""
    return v.value if isinstance(v, keras.Variable) else v


class DistributedCABSTrainer(CABSTrainer):
    """:class:`cabs_tf.CABSTrainer` with data parallelism over a ``tf.distribute`` strategy.

    Build the model (create its variables) inside ``strategy.scope()``; the
    other arguments are those of :class:`CABSTrainer`. Each step draws the
    global batch of the decided size, splits it over the
    ``strategy.num_replicas_in_sync`` replicas with :func:`cabs_core.shard`,
    pads every shard to the same shard bucket (``ceil(bucket / R)`` for the
    global ``buckets``: at most one trace per bucket), all-reduces the sums,
    and applies the same SGD step on every replica. Every ``check_every``
    steps (``None``: never) the workers' controller digests are compared.
    """

    def __init__(
        self,
        target: keras.Layer | Sequence[tf.Variable],
        loss: Callable[..., tf.Tensor],
        controller: CABSController,
        x: Any,
        y: Any,
        *,
        strategy: tf.distribute.Strategy | None = None,
        method: Method = "auto",
        chunk_size: int = 32,
        seed: int = 0,
        buckets: Sequence[int] | None = None,
        check_every: int | None = 100,
        verify_every: int | None = VERIFY_EVERY,
    ) -> None:
        self.strategy = strategy or tf.distribute.get_strategy()
        if check_every is not None and (not isinstance(check_every, int) or check_every < 1):
            raise ValueError(f"check_every must be an integer >= 1 or None, got {check_every!r}")
        self.check_every = check_every
        super().__init__(target, loss, controller, x, y, method=method, chunk_size=chunk_size, seed=seed,
                         buckets=buckets, verify_every=verify_every)
        self.replicas = int(self.strategy.num_replicas_in_sync)
        outside = [v.path if hasattr(v, "path") else v.name for v in self.stats.variables
                   if not self.strategy.extended.variable_created_in_scope(_tf_variable(v))]
        if outside:
            raise ValueError(
                f"variables {outside} were not created in strategy.scope() of {type(self.strategy).__name__}: "
                f"build the model inside `with strategy.scope():` so that every replica holds a mirrored copy"
            )
        self.shard_buckets = shard_buckets(self.buckets, self.replicas)

    # -- one step ---------------------------------------------------------------
    def _replica_step(self, x: Any, y: Any, mask: tf.Tensor) -> tuple[list[tf.Tensor], tf.Tensor]:
        grads, vec = self.stats(x, y, mask)
        ctx = tf.distribute.get_replica_context()
        grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, list(grads))
        sums = ctx.all_reduce(tf.distribute.ReduceOp.SUM, vec[:3])  # m, sum l_i, S: additive
        g2 = tf.add_n([tf.reduce_sum(tf.cast(g, tf.float64) ** 2) for g in grads])  # not additive: recomputed
        vec = tf.concat([sums, g2[None]], axis=0)
        finite = tf.reduce_all(tf.math.is_finite(vec))  # no update from a non-finite step
        scale = tf.where(finite, self.controller.lr / tf.maximum(vec[0], 1.0), 0.0)
        updates = [tf.cast(scale, g.dtype) * tf.where(finite, g, tf.zeros_like(g)) for g in grads]
        return updates, vec

    def _train_step(self, x: Any, y: Any, mask: Any) -> Any:
        self.trace_count += 1  # Python side effect: runs once per trace
        updates, vec = self.strategy.run(self._replica_step, args=(x, y, mask))
        for v, u in zip(self.stats.variables, updates):
            self.strategy.extended.update(_tf_variable(v), lambda var, d: var.assign_sub(d), args=(u,), group=True)
        return vec

    def _distribute(self, xb: Any, yb: Any) -> tuple[Any, Any, Any]:
        """Split the real examples ``(xb, yb)`` of a global batch over the
        replicas and pad every shard to the common shard bucket."""
        m = len(tf.nest.flatten(xb)[0])
        idx, real, size = padded_shards(np.arange(m, dtype=np.int64), self.replicas, self.shard_buckets)
        rows = [idx[r * size : (r + 1) * size] for r in range(self.replicas)]
        masks = [real[r * size : (r + 1) * size].astype(self.batches.mask_dtype) for r in range(self.replicas)]

        def per_replica(data: Any) -> Any:
            return self.strategy.experimental_distribute_values_from_function(
                lambda ctx: _take(data, rows[ctx.replica_id_in_sync_group])
            )

        mask = self.strategy.experimental_distribute_values_from_function(
            lambda ctx: masks[ctx.replica_id_in_sync_group]
        )
        return per_replica(xb), per_replica(yb), mask

    def _run(self, xb: Any, yb: Any) -> StepInfo:
        self._maybe_verify(xb, yb, None)  # the probe runs on the host, on the global batch
        vec = self._step(*self._distribute(xb, yb))
        host = self.strategy.experimental_local_results(vec)[0].numpy()  # the one host copy
        self.state, info = self.controller.update(self.state, ScalarStats.from_vector(host))
        if self.check_every is not None and self.state.step % self.check_every == 0:
            self.check_sync()
        return info

    def step(self) -> StepInfo:
        """Draw the global batch of the decided size, split it over the
        replicas, take the SGD step, decide the next size."""
        idx, self.batches.sampler = next_batch(self.batches.sampler, self.state.batch_size)
        return self._run(_take(self.batches.x, idx), _take(self.batches.y, idx))

    def apply(self, x: Any, y: Any, mask: Any) -> StepInfo:
        """One step on a given global batch (e.g. from :class:`DecisionBatches`):
        its real examples (``mask`` 1) are split over the replicas."""
        real = np.flatnonzero(np.asarray(mask) != 0)
        if len(real) == 0:
            raise ValueError("the batch has no real examples (mask is all 0)")
        return self._run(_take(x, real), _take(y, real))

    def check_sync(self) -> None:
        """Compare the controller digests of all workers (one collective);
        :class:`DesyncError` naming the step when they differ."""
        try:
            local = max(1, len(self.strategy.extended.worker_devices))  # replicas per worker
        except RuntimeError:  # the default (no-op) strategy: one replica
            local = 1
        digests = gather_digests(self.strategy, lambda r: self.state.digest())
        check_digests(digests, self.state.step, [f"replica {r} (worker {r // local})" for r in range(len(digests))])

    def state_dict(self) -> dict:
        """As :meth:`CABSTrainer.state_dict` (loadable by either trainer), plus
        ``replicas``: informative only, a different number may resume it."""
        return {**super().state_dict(), "replicas": self.replicas}


def save_checkpoint(trainer: CABSTrainer, path: str | os.PathLike) -> None:
    """Write controller state, sampler position and weights to one ``.npz``
    file (written to a temporary name, then renamed). Works for
    :class:`CABSTrainer` and :class:`DistributedCABSTrainer`; in a
    multi-worker job let one worker (the chief) write it."""
    path = os.fspath(path)
    weights = {f"w{k}": np.asarray(_tf_variable(v).numpy()) for k, v in enumerate(trainer.stats.variables)}
    tmp = path + ".tmp.npz"
    state = json.dumps({"format": _CHECKPOINT_FORMAT, "trainer": trainer.state_dict()})
    np.savez(tmp, state=np.array(state), **weights)
    os.replace(tmp, path)


def load_checkpoint(trainer: CABSTrainer, path: str | os.PathLike) -> None:
    """Restore a :func:`save_checkpoint` file into ``trainer`` (any number of
    replicas): weights, controller state and sampler position."""
    with np.load(os.fspath(path)) as f:
        state = json.loads(str(f["state"]))
        if state.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: not a cabs_tf checkpoint (format {state.get('format')!r})")
        weights = [f[f"w{k}"] for k in range(sum(1 for n in f.files if n.startswith("w")))]
    variables = trainer.stats.variables
    if len(weights) != len(variables):
        raise ValueError(f"{path}: checkpoint holds {len(weights)} variables, the model has {len(variables)}")
    for v, w in zip(variables, weights):
        if tuple(v.shape) != w.shape:
            raise ValueError(f"{path}: variable {getattr(v, 'path', v.name)} has shape {tuple(v.shape)}, "
                             f"the checkpoint {w.shape}")
    trainer.load_state_dict(state["trainer"])
    for v, w in zip(variables, weights):
        _tf_variable(v).assign(w)
