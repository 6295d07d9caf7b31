"""CABS training for Keras 3 / TensorFlow: :class:`KerasBackend`, the framework's part of
:class:`cabs_core.loop.CABSLoop` (which draws, pads, micro-batches, decides and checkpoints):
statistics in one ``tf.function`` per bucket, each replica of the strategy in force summing
its shard and all-reducing inside ``strategy.run``, and the update in a separate
``tf.function`` run only when the loop accepts the step."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from cabs_core import CABSController, ScalarStats, StepInfo
from cabs_core.exactness import VERIFY_EVERY, agree_on_path
from cabs_core.loop import MicroBatch, check_arrays, check_learning_rate
from cabs_core.trainer import BackendDefaults, Trainer, history, num_rows, take_rows
from cabs_core.trainer import DecisionBatches as _Batches

from .stats import Method, PerExampleStats

SUM = tf.distribute.ReduceOp.SUM


def _tf_variable(v: Any) -> Any:
    """The ``tf.Variable`` behind a Keras 3 variable (a distributed one under a strategy)."""
    return v.value if isinstance(v, keras.Variable) else v


def _rate(optimizer: keras.optimizers.Optimizer) -> float:
    """The optimizer's learning rate now (its schedule at its iterations), also when mirrored."""
    return float(tf.convert_to_tensor(_tf_variable(optimizer.learning_rate)))


class DecisionBatches(_Batches):
    """:class:`cabs_core.trainer.DecisionBatches` of ``(x, y, mask)``, also as a ``tf.data.Dataset``."""

    def __init__(self, x: Any, y: Any, *, buckets: Sequence[int] | None = None, seed: int = 0,
                 mask_dtype: str = "float32") -> None:
        super().__init__((x, y), buckets=buckets, seed=seed, mask_dtype=mask_dtype)
        self.x, self.y = x, y

    def dataset(self, batch_size: Callable[[], int]) -> tf.data.Dataset:
        """An endless ``tf.data.Dataset`` of :meth:`next` ``(batch_size())`` (e.g. ``lambda:
        trainer.state.batch_size``), without prefetching: the step decides the next size."""
        def gen() -> Iterator[tuple[Any, Any, np.ndarray]]:
            while True:
                yield self.next(int(batch_size()))

        def spec(a: Any) -> tf.TensorSpec:
            return tf.TensorSpec((None, *np.shape(a)[1:]), np.asarray(a).dtype)

        sig = (*tf.nest.map_structure(spec, (self.x, self.y)), tf.TensorSpec((None,), self.mask_dtype))
        opts = tf.data.Options()
        opts.autotune.enabled, opts.experimental_optimization.inject_prefetch = False, False
        return tf.data.Dataset.from_generator(gen, output_signature=sig).with_options(opts)


class KerasBackend(BackendDefaults):
    """The :class:`cabs_core.loop.Backend` over the replicas of ``strategy`` (one for the default
    strategy): ``shards`` = this worker's replicas, ``processes`` = the workers. Statistics:
    ``(grad_sum per variable, float64 [m, sum l_i, S, ||sum g_i||^2])``, all-reduced."""

    pads = True

    def __init__(self, stats: PerExampleStats, optimizer: Any, strategy: tf.distribute.Strategy) -> None:
        self.stats, self.optimizer, self.strategy, self.trace_count = stats, optimizer, strategy, 0
        with strategy.scope():
            if optimizer is not None:
                optimizer.build(stats.variables)
        ids = strategy.experimental_local_results(
            strategy.experimental_distribute_values_from_function(lambda ctx: ctx.replica_id_in_sync_group))
        self.shards = len(ids)
        self.processes, self.process_index = strategy.num_replicas_in_sync // self.shards, min(ids) // self.shards
        self._stats_fn, self._update_fn = tf.function(self._statistics), tf.function(self._update)
        self.combine = tf.function(lambda a, b: self._sums([x + y for x, y in zip(a[0], b[0])], a[1][:3] + b[1][:3]))
        self._gather_fn = tf.function(lambda local: strategy.run(  # identity: placed on the device (MWMS does not)
            lambda v: tf.distribute.get_replica_context().all_gather(tf.identity(v), axis=0), args=(local,)))

    take, num_examples = staticmethod(take_rows), staticmethod(num_rows)

    @staticmethod
    def _sums(grads: list[tf.Tensor], first3: tf.Tensor) -> tuple[list[tf.Tensor], tf.Tensor]:
        g2 = tf.add_n([tf.reduce_sum(tf.cast(g, tf.float64) ** 2) for g in grads])  # not additive: recomputed
        return grads, tf.concat([first3, g2[None]], axis=0)

    def _statistics(self, x: Any, y: Any, mask: Any) -> Any:
        self.trace_count += 1  # Python side effect: runs once per trace

        def replica(x: Any, y: Any, mask: tf.Tensor) -> Any:
            grads, vec = self.stats(x, y, mask)
            ctx = tf.distribute.get_replica_context()
            return self._sums(ctx.all_reduce(SUM, list(grads)), ctx.all_reduce(SUM, vec[:3]))

        return self.strategy.run(replica, args=(x, y, mask))

    def statistics(self, model: Any, batch: Any, micro: MicroBatch, *, verify: bool) -> Any:
        (x, y), st = batch, self.stats
        mask = micro.mask.astype(tf.as_dtype(st.variables[0].dtype).name)
        sig = st.signature(x, y) if st.method == "fast" else None
        if sig is not None and (verify or sig not in st.verdicts):  # probe on the host
            had = st.verdicts.get(sig, "unseen")
            if self.processes == 1:
                st.verify(x, y, mask)
            elif agree_on_path(lambda: "fast" if st.verify(x, y, mask) else "generic", self.gather) == "generic" \
                    and st.verdicts.get(sig) is None:  # each worker probed its own rows: one path for all
                st.verdicts[sig] = "the fast path was not established on every worker"
            if had is None and st.verdicts.get(sig) is not None:
                self._stats_fn = tf.function(self._statistics)  # its traces took the fast path
        base, size = self.process_index * self.shards, micro.size

        def put(a: np.ndarray) -> Any:  # replica r's shard
            return self.strategy.experimental_distribute_values_from_function(
                lambda ctx: a[(ctx.replica_id_in_sync_group - base) * size:][:size])

        out = self._stats_fn(*tf.nest.map_structure(put, (x, y, mask)))
        return tf.nest.map_structure(lambda t: self.strategy.experimental_local_results(t)[0], out)

    def scalars(self, model: Any, stats: Any) -> tuple[ScalarStats, float | None]:
        return ScalarStats.from_vector(stats[1].numpy()), None if self.optimizer is None else _rate(self.optimizer)

    def _update(self, grads: list[tf.Tensor], count: tf.Tensor, lr: tf.Tensor) -> None:
        mean = [g / tf.cast(tf.maximum(count, 1.0), g.dtype) for g in grads]
        if self.optimizer is not None:
            self.optimizer.apply_gradients(zip(mean, self.stats.variables))
        else:
            for v, g in zip(self.stats.variables, mean):
                _tf_variable(v).assign_sub(tf.cast(lr, g.dtype) * g)

    def apply(self, model: Any, stats: Any, lr: float) -> Any:
        self._update_fn(stats[0], stats[1][0], tf.constant(lr, tf.float64))
        return model

    def gather_replicas(self, words_for: Callable[[int], np.ndarray]) -> np.ndarray:
        """Every replica's int32 words ``words_for(replica id)``, shape (replicas, k): one all-gather."""
        local = self.strategy.experimental_distribute_values_from_function(
            lambda ctx: np.asarray(words_for(ctx.replica_id_in_sync_group), np.int32)[None])
        return self.strategy.experimental_local_results(self._gather_fn(local))[0].numpy()

    def gather(self, words: np.ndarray) -> np.ndarray:
        return self.gather_replicas(lambda r: words)[:: self.shards]  # one row per worker


class CABSTrainer(Trainer):
    """CABS training of a Keras model (or a list of variables) on in-memory ``data = (x, y)``;
    steps, properties, ``run``, checkpoints: :class:`cabs_core.trainer.Trainer`.

    ``loss_fn``, ``method``, ``chunk_size``, ``verify_every``: as :class:`PerExampleStats`.
    ``optimizer``: None (SGD at ``controller.lr``) or a ``keras.optimizers.Optimizer`` fed the
    batch's mean gradient, whose rate (a schedule at its iterations) the controller couples
    to; it must equal ``controller.lr`` at construction. ``buckets``: padded sizes
    (:meth:`CABSController.padding_buckets`), one trace each; ``max_micro_batch``: at most
    this many examples per pass, the sums of the passes added.
    """

    strategy: tf.distribute.Strategy | None = None  # None: the strategy in force (one replica by default)
    check_every = 0  # one process: nothing to compare

    def __init__(self, model: keras.Layer | Sequence[tf.Variable], loss_fn: Callable[..., tf.Tensor],
                 controller: CABSController, data: tuple[Any, Any], *,
                 optimizer: keras.optimizers.Optimizer | None = None, method: Method = "auto",
                 chunk_size: int | None = None, buckets: Sequence[int] | None = None, seed: int = 0,
                 max_micro_batch: int | None = None, verify_every: int | None = VERIFY_EVERY) -> None:
        if not isinstance(data, tuple) or len(data) != 2:
            raise ValueError(f"data must be a tuple (x, y), got {type(data).__name__}")
        if optimizer is not None:
            check_learning_rate(controller, _rate(optimizer))
        self.model, self.data, self.strategy = model, data, self.strategy or tf.distribute.get_strategy()
        self.stats = PerExampleStats(model, loss_fn, method=method, chunk_size=chunk_size, verify_every=verify_every)
        backend = KerasBackend(self.stats, optimizer, self.strategy)
        self._start(backend, controller, backend.num_examples(data), seed, buckets=buckets,
                    max_micro_batch=max_micro_batch, verify_every=verify_every, check_every=self.check_every)

    trace_count = property(lambda self: self.backend.trace_count, doc="Traces of the statistics (one per bucket).")

    def step(self, batch: tuple[Any, ...] | None = None) -> StepInfo:
        """One CABS step on the decided number of examples (or on ``batch = (x, y[, mask])``,
        its rows with mask != 0); returns what the controller decided."""
        if batch is not None and len(batch) == 3:
            batch = take_rows(batch[:2], np.flatnonzero(np.asarray(batch[2]) != 0))
        return self._step(batch)

    def _variables(self) -> list[Any]:
        own = self.model.weights if isinstance(self.model, keras.Layer) else self.stats.variables
        return list(own) + list(self.backend.optimizer.variables if self.backend.optimizer else [])

    def _arrays(self) -> tuple[list[Any], dict[str, Any]]:
        """The weights (and buffers), then the optimizer's variables."""
        return [_tf_variable(v).numpy() for v in self._variables()], {}

    def _load_arrays(self, path: str | os.PathLike[str], arrays: list[np.ndarray], extra: dict[str, Any]) -> None:
        check_arrays(path, arrays, self._variables())
        for v, a in zip(self._variables(), arrays):
            _tf_variable(v).assign(a)


def fit(model: keras.Model, x: Any, y: Any, *, loss_fn: Callable[..., tf.Tensor], controller: CABSController,
        steps: int, verbose: bool = False, **kw: Any) -> dict[str, list[float]]:
    """``model.fit``-like: ``steps`` CABS steps (``kw``: :class:`CABSTrainer`'s options); returns
    ``{"loss", "batch_size", "epoch"}`` per step. ``loss_fn`` returns per-example losses."""
    return history(CABSTrainer(model, loss_fn, controller, (x, y), **kw), steps, verbose)
