"""CABS training for Keras 3 / TensorFlow: a thin :class:`cabs_core.loop.Backend` of
:class:`cabs_core.loop.CABSLoop`, which does the step (sampler, padding to buckets,
micro-batches, non-finite policy, controller update, checkpoints). The backend
computes the statistics (one ``tf.function`` per bucket) and applies the update
(a separate ``tf.function``, run only when the loop accepts the step).
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from cabs_core import CABSController, ControllerState, SamplerState, ScalarStats, StepInfo, next_batch
from cabs_core.exactness import VERIFY_EVERY
from cabs_core.loop import CABSLoop, MicroBatch, check_arrays, check_learning_rate, plan_batch

from .stats import Method, PerExampleStats


def _take(data: Any, rows: np.ndarray) -> Any:
    return tf.nest.map_structure(lambda a: np.take(np.asarray(a), rows, axis=0), data)


def _tf_variable(v: Any) -> Any:
    """The ``tf.Variable`` behind a Keras 3 variable (a distributed one under a strategy)."""
    return v.value if isinstance(v, keras.Variable) else v


def _rate(optimizer: keras.optimizers.Optimizer) -> float:
    """The optimizer's learning rate now (its schedule at its iterations), also under a strategy."""
    return float(tf.convert_to_tensor(_tf_variable(optimizer.learning_rate)))


class DecisionBatches:
    """Batches ``(x, y, mask)`` of in-memory data whose size follows the decisions: the
    sampler's next ``batch_size`` examples, padded to the smallest of ``buckets`` that holds
    them (:func:`cabs_core.loop.plan_batch`; padding repeats a real example with mask 0)."""

    def __init__(self, x: Any, y: Any, *, buckets: Sequence[int] | None = None, seed: int = 0,
                 mask_dtype: str = "float32") -> None:
        sizes = {len(a) for a in tf.nest.flatten((x, y))}
        if len(sizes) != 1:
            raise ValueError(f"x and y must have the same number of examples, got sizes {sorted(sizes)}")
        self.x, self.y, self.buckets, self.mask_dtype = x, y, buckets, mask_dtype
        self.sampler = SamplerState(sizes.pop(), seed)

    def next(self, batch_size: int) -> tuple[Any, Any, np.ndarray]:
        idx, self.sampler = next_batch(self.sampler, batch_size)
        (mb,) = plan_batch(idx, buckets=self.buckets)
        return _take(self.x, mb.rows), _take(self.y, mb.rows), mb.mask.astype(self.mask_dtype)

    def dataset(self, batch_size: Callable[[], int]) -> tf.data.Dataset:
        """An endless ``tf.data.Dataset`` of ``(x, y, mask)``, each batch of size ``batch_size()``
        when drawn (e.g. ``lambda: trainer.state.batch_size``); no prefetching."""
        def spec(a: Any) -> tf.TensorSpec:
            return tf.TensorSpec((None, *np.shape(a)[1:]), tf.as_dtype(np.asarray(a).dtype))

        def gen() -> Iterator[tuple[Any, Any, np.ndarray]]:
            while True:
                yield self.next(int(batch_size()))

        sig = (tf.nest.map_structure(spec, self.x), tf.nest.map_structure(spec, self.y),
               tf.TensorSpec((None,), tf.as_dtype(self.mask_dtype)))
        opts = tf.data.Options()
        opts.autotune.enabled, opts.experimental_optimization.inject_prefetch = False, False
        return tf.data.Dataset.from_generator(gen, output_signature=sig).with_options(opts)


def _sq_norm(grads: Sequence[tf.Tensor]) -> tf.Tensor:
    return tf.add_n([tf.reduce_sum(tf.cast(g, tf.float64) ** 2) for g in grads])


class KerasBackend:
    """The :class:`cabs_core.loop.Backend` of one device. Statistics: ``(grad_sum per
    variable, float64 [m, sum l_i, S, ||sum g_i||^2])``, a one-copy host read."""

    pads, shards, processes, process_index = True, 1, 1, 0

    def __init__(self, stats: PerExampleStats, optimizer: keras.optimizers.Optimizer | None) -> None:
        self.stats, self.optimizer, self.trace_count = stats, optimizer, 0
        if optimizer is not None:
            optimizer.build(stats.variables)
        self._stats_fn = tf.function(self._statistics)
        self._update_fn = tf.function(self._update)
        self._combine_fn = tf.function(lambda a, b: self._sums([x + y for x, y in zip(a[0], b[0])],
                                                               a[1][:3] + b[1][:3]))

    def take(self, source: Any, rows: np.ndarray) -> Any:
        return _take(source, rows)

    def num_examples(self, source: Any) -> int:
        return len(tf.nest.flatten(source)[0])

    def _sums(self, grads: list[tf.Tensor], first3: tf.Tensor) -> tuple[list[tf.Tensor], tf.Tensor]:
        return grads, tf.concat([first3, _sq_norm(grads)[None]], axis=0)  # ||sum g||^2 is not additive

    def _statistics(self, x: Any, y: Any, mask: tf.Tensor) -> Any:
        self.trace_count += 1  # Python side effect: runs once per trace
        return self.stats(x, y, mask)

    def _inputs(self, batch: Any, micro: MicroBatch) -> tuple[Any, Any, Any]:
        return (*batch, micro.mask.astype(tf.as_dtype(self.stats.variables[0].dtype).name))

    def statistics(self, model: Any, batch: Any, micro: MicroBatch, *, verify: bool) -> Any:
        x, y, mask = self._inputs(batch, micro)
        st = self.stats
        if st.method == "fast" and (verify or st.signature(x, y) not in st.verdicts):
            sig = st.signature(x, y)
            had = st.verdicts.get(sig, "unseen")
            if not st.verify(x, y, mask) and had is None and st.verdicts.get(sig) is not None:
                self._stats_fn = tf.function(self._statistics)  # its traces took the fast path
        return self._stats_fn(*self._place(x, y, mask, micro))

    def _place(self, x: Any, y: Any, mask: Any, micro: MicroBatch) -> tuple[Any, Any, Any]:
        return x, y, mask

    def combine(self, a: Any, b: Any) -> Any:
        return self._combine_fn(a, b)

    def all_reduce(self, stats: Any) -> Any:
        return stats

    def scalars(self, stats: Any) -> ScalarStats:
        return ScalarStats.from_vector(stats[1].numpy())

    def learning_rate(self, model: Any) -> float | None:
        return None if self.optimizer is None else _rate(self.optimizer)

    def _update(self, grads: list[tf.Tensor], count: tf.Tensor, lr: tf.Tensor) -> None:
        n = tf.maximum(count, 1.0)
        mean = [g / tf.cast(n, g.dtype) for g in grads]
        if self.optimizer is not None:
            self.optimizer.apply_gradients(zip(mean, self.stats.variables))
            return
        for v, g in zip(self.stats.variables, mean):
            _tf_variable(v).assign_sub(tf.cast(lr, g.dtype) * g)

    def apply(self, model: Any, stats: Any, lr: float) -> Any:
        self._update_fn(stats[0], stats[1][0], tf.constant(lr, tf.float64))
        return model

    def gather(self, words: np.ndarray) -> np.ndarray:
        return np.asarray(words)[None]


class CABSTrainer:
    """CABS training of a Keras model (or a list of variables) on in-memory ``data = (x, y)``.

    ``loss_fn``, ``method``, ``chunk_size``, ``verify_every``: as :class:`PerExampleStats`.
    ``optimizer``: None (SGD at ``controller.lr``) or a ``keras.optimizers.Optimizer`` fed
    the batch's mean gradient; its learning rate (a schedule evaluated at its iterations)
    is the rate the controller couples to, equal to ``controller.lr`` at construction.
    ``buckets``: padded sizes (:meth:`CABSController.padding_buckets`), one trace each;
    ``max_micro_batch``: larger batches are split and their sums added.
    """

    def __init__(self, model: keras.Layer | Sequence[tf.Variable], loss_fn: Callable[..., tf.Tensor],
                 controller: CABSController, data: tuple[Any, Any], *,
                 optimizer: keras.optimizers.Optimizer | None = None, method: Method = "auto",
                 chunk_size: int | None = None, buckets: Sequence[int] | None = None, seed: int = 0,
                 max_micro_batch: int | None = None, verify_every: int | None = VERIFY_EVERY) -> None:
        self._setup(model, loss_fn, controller, data, optimizer, dict(
            method=method, chunk_size=chunk_size, verify_every=verify_every),
            dict(seed=seed, buckets=buckets, max_micro_batch=max_micro_batch, verify_every=verify_every))

    def _setup(self, model: Any, loss_fn: Callable[..., tf.Tensor], controller: CABSController,
               data: tuple[Any, Any], optimizer: Any, stats_kw: dict, loop_kw: dict,
               backend: type[KerasBackend] = KerasBackend, **backend_kw: Any) -> None:
        if not isinstance(data, tuple) or len(data) != 2:
            raise ValueError(f"data must be a tuple (x, y), got {type(data).__name__}")
        if optimizer is not None:
            check_learning_rate(controller, _rate(optimizer))
        self.model, self.data = model, data
        self.stats = PerExampleStats(model, loss_fn, **stats_kw)
        self.backend = backend(self.stats, optimizer, **backend_kw)
        self.loop = CABSLoop(self.backend, controller, num_examples=self.backend.num_examples(data), **loop_kw)
        self._run = self.loop.init()

    @property
    def state(self) -> ControllerState:
        """The controller's state (``state.batch_size``: the next step's size)."""
        return self._run.controller

    @state.setter
    def state(self, value: ControllerState) -> None:
        self._run = self._run._replace(controller=value)

    @property
    def sampler(self) -> SamplerState:
        return self._run.sampler

    @property
    def batch_size(self) -> int:
        return self.state.batch_size

    @property
    def examples_seen(self) -> int:
        return self.sampler.examples_seen

    @property
    def epoch(self) -> float:
        return self.sampler.epoch

    @property
    def buckets(self) -> tuple[int, ...] | None:
        return self.loop.buckets

    @property
    def trace_count(self) -> int:
        """Traces of the statistics function (at most one per bucket)."""
        return self.backend.trace_count

    def step(self, batch: tuple[Any, ...] | None = None) -> StepInfo:
        """One CABS step on the decided number of examples (or on ``batch = (x, y[, mask])``,
        its rows with mask != 0); returns what the controller decided."""
        if batch is not None and len(batch) == 3:
            batch = _take(batch[:2], np.flatnonzero(np.asarray(batch[2]) != 0))
        self._run, _, info = self.loop.step(self._run, self.model, self.data, batch=batch)
        return info

    def run(self, steps: int, callback: Callable[[int, StepInfo], None] | None = None) -> list[StepInfo]:
        infos = []
        for k in range(steps):
            infos.append(self.step())
            if callback is not None:
                callback(k, infos[-1])
        return infos

    def _arrays(self) -> list[Any]:
        own = self.model.weights if isinstance(self.model, keras.Layer) else self.stats.variables
        return list(own) + (list(self.backend.optimizer.variables) if self.backend.optimizer else [])

    def save(self, path: str, **extra: Any) -> None:
        """Controller, sampler, weights and optimizer state to one ``.npz`` (atomic)."""
        self.loop.save(path, self._run, [_tf_variable(v).numpy() for v in self._arrays()], **extra)

    def restore(self, path: str, *, allow: Sequence[str] = ()) -> None:
        """Resume from :meth:`save`; a changed configuration (lr, bs_max, seed, ...) raises
        :class:`cabs_core.CheckpointMismatchError` unless named in ``allow``."""
        try:
            run, arrays, _ = self.loop.load(path, allow=allow)
        except zipfile.BadZipFile as e:  # a torn file: CABSLoop.load lets this one through
            raise ValueError(f"{path}: not a CABS checkpoint file ({e})") from e
        like = self._arrays()
        check_arrays(path, arrays, like)
        for v, a in zip(like, arrays):
            _tf_variable(v).assign(a)
        self._run = run


def fit(model: keras.Model, x: Any, y: Any, *, loss_fn: Callable[..., tf.Tensor], controller: CABSController,
        steps: int, verbose: bool = False, **kw: Any) -> dict[str, list[float]]:
    """``model.fit``-like: ``steps`` CABS steps (``kw``: :class:`CABSTrainer`'s options);
    returns ``{"loss", "batch_size", "epoch"}`` per step. ``loss_fn`` returns per-example losses."""
    trainer = CABSTrainer(model, loss_fn, controller, (x, y), **kw)
    history: dict[str, list[float]] = {"loss": [], "batch_size": [], "epoch": []}

    def log(k: int, info: StepInfo) -> None:
        for key, v in (("loss", float("nan") if info.loss is None else info.loss),
                       ("batch_size", info.batch_size), ("epoch", trainer.epoch)):
            history[key].append(v)
        if verbose:
            print(f"step {k + 1}: loss {info.loss} next batch {info.batch_size} epoch {trainer.epoch:.3f}")

    trainer.run(steps, log)
    return history


__all__ = ["CABSTrainer", "DecisionBatches", "KerasBackend", "fit"]
