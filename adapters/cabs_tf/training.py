"""Training with CABS: batches whose size follows the decisions, the SGD step,
bucketed shapes and checkpoint/resume.

One step (Balles et al. 2017, Algorithm 1):

    indices <- sampler.next_batch(m_t)            (host, cabs_core sampler)
    pad to the bucket >= m_t, mask w = 1 for the m_t real examples
    grad_sum, v <- StatsStep(x, y, w)             (device, one tf.function per bucket)
    theta <- theta - lr * grad_sum / m_t          (the current batch's mean gradient)
    m_{t+1} <- controller.update(ScalarStats.from_vector(v.numpy()))   (one host copy)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from cabs_core import (
    CABSController,
    ControllerState,
    SamplerState,
    ScalarStats,
    StepInfo,
    bucket_for,
    next_batch,
    pad_indices,
    verify_due,
)
from cabs_core.exactness import VERIFY_EVERY

from .stats import Method, StatsStep

_TRAINER_FORMAT = "cabs-tf-trainer/1"


def _take(data: Any, idx: np.ndarray) -> Any:
    return tf.nest.map_structure(lambda a: np.take(a, idx, axis=0), data)


class DecisionBatches:
    """Batches ``(x, y, mask)`` of in-memory data drawn by the core's sampler.

    ``next(batch_size)`` returns the next ``batch_size`` examples of the
    sampler's stream, padded to the smallest of ``buckets`` >= batch_size
    (padding repeats the batch's first example with mask 0, so it is finite
    and changes none of the statistics). ``x``/``y`` are arrays or nests of
    arrays with a leading example axis.
    """

    def __init__(
        self, x: Any, y: Any, *, buckets: Sequence[int] | None = None, seed: int = 0, mask_dtype: str = "float32"
    ) -> None:
        sizes = {len(a) for a in tf.nest.flatten((x, y))}
        if len(sizes) != 1:
            raise ValueError(f"x and y must have the same number of examples, got sizes {sorted(sizes)}")
        self.x, self.y = x, y
        self.buckets = tuple(buckets) if buckets else None
        self.sampler = SamplerState(sizes.pop(), seed)
        self.mask_dtype = mask_dtype

    def next(self, batch_size: int) -> tuple[Any, Any, np.ndarray]:
        idx, self.sampler = next_batch(self.sampler, batch_size)
        idx, real = pad_indices(idx, bucket_for(batch_size, self.buckets) if self.buckets else batch_size)
        return _take(self.x, idx), _take(self.y, idx), real.astype(self.mask_dtype)

    def dataset(self, batch_size: Callable[[], int]) -> tf.data.Dataset:
        """An endless ``tf.data.Dataset`` of ``(x, y, mask)`` whose batch size is
        ``batch_size()`` at the moment each batch is drawn (pass e.g.
        ``lambda: trainer.state.batch_size``). No prefetching: the next size is
        decided by the step that consumes the current batch."""

        def spec(a: np.ndarray) -> tf.TensorSpec:
            return tf.TensorSpec((None, *a.shape[1:]), tf.as_dtype(a.dtype))

        def gen() -> Iterator[tuple[Any, Any, np.ndarray]]:
            while True:
                yield self.next(int(batch_size()))

        sig = (tf.nest.map_structure(spec, self.x), tf.nest.map_structure(spec, self.y),
               tf.TensorSpec((None,), tf.as_dtype(self.mask_dtype)))
        ds = tf.data.Dataset.from_generator(gen, output_signature=sig)
        opts = tf.data.Options()
        opts.autotune.enabled = False
        opts.experimental_optimization.inject_prefetch = False
        return ds.with_options(opts)


class CABSTrainer:
    """SGD with CABS batch sizes on in-memory data.

    ``target``, ``loss``, ``method``, ``chunk_size``: as :class:`StatsStep`.
    ``controller``: a :class:`cabs_core.CABSController` (its ``lr`` is the SGD
    learning rate). Shapes are padded to ``controller.padding_buckets(buckets)``
    (its own buckets, else ``buckets``, else a geometric grid): at most one trace per bucket.
    ``verify_every``: the fast path is probed on the real batch (outside the
    traced step) on the first step and then every ``verify_every`` steps
    (None/0: only on the first step of each input signature), see
    :meth:`StatsStep.verify`; a probe that fails switches to the generic path
    (one retrace per bucket) or, under ``method="fast"``, raises.
    """

    def __init__(
        self,
        target: keras.Layer | Sequence[tf.Variable],
        loss: Callable[..., tf.Tensor],
        controller: CABSController,
        x: Any,
        y: Any,
        *,
        method: Method = "auto",
        chunk_size: int = 32,
        seed: int = 0,
        buckets: Sequence[int] | None = None,
        verify_every: int | None = VERIFY_EVERY,
    ) -> None:
        self.stats = StatsStep(target, loss, method=method, chunk_size=chunk_size, verify_every=verify_every)
        self.verify_every = verify_every
        self._steps_taken = 0
        self.controller = controller
        self.state: ControllerState = controller.init()
        dtype = tf.as_dtype(self.stats.variables[0].dtype).name
        self.buckets = controller.padding_buckets(buckets)
        self.batches = DecisionBatches(x, y, buckets=self.buckets, seed=seed, mask_dtype=dtype)
        self.trace_count = 0
        self._step = tf.function(self._train_step)

    def _train_step(self, x: Any, y: Any, mask: tf.Tensor) -> tf.Tensor:
        self.trace_count += 1  # Python side effect: runs once per trace
        grads, vec = self.stats(x, y, mask)
        finite = tf.reduce_all(tf.math.is_finite(vec))  # no update from a non-finite step
        scale = tf.where(finite, self.controller.lr / tf.maximum(vec[0], 1.0), 0.0)  # lr * mean gradient
        for v, g in zip(self.stats.variables, grads):
            v.assign_sub(tf.cast(scale, v.dtype) * tf.where(finite, g, tf.zeros_like(g)))
        return vec

    def _maybe_verify(self, x: Any, y: Any, mask: Any) -> None:
        """Probe the fast path on this batch when due (host side, before the
        traced step); if a signature falls back, retrace the step."""
        stats = self.stats
        if stats.method != "fast":
            return
        due = verify_due(self._steps_taken, self.verify_every)
        self._steps_taken += 1
        sig = stats.signature(x, y)
        if sig in stats.verdicts and not due:
            return
        had = stats.verdicts.get(sig, "unseen")
        if not stats.verify(x, y, mask) and had is None and stats.verdicts.get(sig) is not None:
            self._step = tf.function(self._train_step)  # its traces took the fast path

    def apply(self, x: Any, y: Any, mask: Any) -> StepInfo:
        """One SGD step on a given (padded) batch, then the controller's decision."""
        self._maybe_verify(x, y, mask)
        vec = self._step(x, y, mask)
        self.state, info = self.controller.update(self.state, ScalarStats.from_vector(vec.numpy()))
        return info

    def step(self) -> StepInfo:
        """Draw a batch of the decided size, take the SGD step, decide the next size."""
        return self.apply(*self.batches.next(self.state.batch_size))

    def run(self, steps: int, callback: Callable[[int, StepInfo], None] | None = None) -> list[StepInfo]:
        infos = []
        for k in range(steps):
            infos.append(self.step())
            if callback is not None:
                callback(k, infos[-1])
        return infos

    @property
    def epoch(self) -> float:
        return self.batches.sampler.epoch

    def state_dict(self) -> dict:
        """Controller and sampler state (JSON-serialisable). Save the weights
        with the framework (``model.save_weights``, ``tf.train.Checkpoint``)."""
        return {"format": _TRAINER_FORMAT, "controller": self.state.to_dict(),
                "sampler": self.batches.sampler.to_dict()}

    def load_state_dict(self, d: dict) -> None:
        if d.get("format") != _TRAINER_FORMAT:
            raise ValueError(f"not a cabs_tf trainer state (format {d.get('format')!r})")
        sampler = SamplerState.from_dict(d["sampler"])
        if sampler.num_examples != self.batches.sampler.num_examples:
            raise ValueError(
                f"checkpoint is for {sampler.num_examples} examples, this data has "
                f"{self.batches.sampler.num_examples}"
            )
        self.state = ControllerState.from_dict(d["controller"])
        self.batches.sampler = sampler


def fit(
    model: keras.Model,
    x: Any,
    y: Any,
    *,
    loss: Callable[..., tf.Tensor],
    controller: CABSController,
    steps: int,
    method: Method = "auto",
    chunk_size: int = 32,
    seed: int = 0,
    verbose: bool = False,
    verify_every: int | None = VERIFY_EVERY,
) -> dict[str, list[float]]:
    """``model.fit``-like entry point: train ``model`` with CABS for ``steps``
    steps and return a history ``{"loss", "batch_size", "epoch"}`` per step.
    ``loss(y_true, y_pred)`` must return per-example losses (``reduction=None``)."""
    trainer = CABSTrainer(model, loss, controller, x, y, method=method, chunk_size=chunk_size, seed=seed,
                          verify_every=verify_every)
    history: dict[str, list[float]] = {"loss": [], "batch_size": [], "epoch": []}

    def log(k: int, info: StepInfo) -> None:
        history["loss"].append(float("nan") if info.loss is None else info.loss)
        history["batch_size"].append(info.batch_size)
        history["epoch"].append(trainer.epoch)
        if verbose:
            print(f"step {k + 1}: loss {info.loss} next batch {info.batch_size} epoch {trainer.epoch:.3f}")

    trainer.run(steps, log)
    return history
