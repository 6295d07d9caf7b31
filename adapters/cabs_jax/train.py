"""CABS training in JAX: :class:`CABSTrainer` runs the core's step (:class:`cabs_core.loop.CABSLoop`) on the
model ``(params, opt_state)`` through a small backend: the statistics of a padded batch (compiled once per
bucket) and the update (compiled apart, applied only to the steps the controller accepted)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cabs_core import BatchStats, CABSController, ConfigError, ControllerState, SamplerState, ScalarStats, StepInfo
from cabs_core.exactness import VERIFY_EVERY
from cabs_core.loop import CHECK_EVERY, CABSLoop, MicroBatch, RunState, check_arrays, check_learning_rate
from cabs_core.stats import reduce_stats
from cabs_core.trainer import BackendDefaults

from .dispatch import Method, PerExampleStats
from .nnx import optax_of, trainable_state
from .stats import LossFn, PyTree, batch_size_of


class TrainState(NamedTuple):
    """Everything a resumed run needs: parameters, optimizer state and the loop's
    :class:`cabs_core.loop.RunState`, as its two parts (controller, sampler)."""

    params: PyTree
    opt_state: PyTree
    controller: ControllerState
    sampler: SamplerState


def _next_lr(params: PyTree, opt_state: PyTree, optimizer: optax.GradientTransformation) -> jax.Array:
    """The learning rate the next ``optimizer.update`` uses: the ``hyperparams`` an update would
    record (schedules evaluated at the current count); the update itself is dead code under jit."""
    return optimizer.update(jax.tree.map(jnp.zeros_like, params), opt_state, params)[1].hyperparams["learning_rate"]


@partial(jax.jit, static_argnames="optimizer")
def _host_vector(stats: BatchStats, params: PyTree, opt_state: PyTree,
                 optimizer: optax.GradientTransformation | None) -> jax.Array:
    """The four scalars of :class:`ScalarStats` and, with an optimizer, the rate of the next
    update, stacked on the device: the step's one host copy."""
    values = list(reduce_stats(stats)) + ([] if optimizer is None else [_next_lr(params, opt_state, optimizer)])
    dtype = jnp.promote_types(stats.loss_sum.dtype, jnp.float32)
    return jnp.stack([jnp.reshape(jnp.asarray(v).astype(dtype), ()) for v in values])


@partial(jax.jit, static_argnames="optimizer")
def _update(params: PyTree, opt_state: PyTree, stats: BatchStats, lr: jax.Array,
            optimizer: optax.GradientTransformation | None) -> tuple[PyTree, PyTree]:
    """theta <- theta - lr g_bar, or ``optimizer`` fed g_bar = grad_sum / count."""
    inv_m = 1 / jnp.maximum(stats.count, 1)  # count in >= float32: g_bar back in each parameter's dtype
    g = jax.tree.unflatten(jax.tree.structure(params), [g * inv_m for g in stats.grad_sum])
    g = jax.tree.map(lambda gi, p: gi.astype(p.dtype), g, params)
    if optimizer is None:
        return jax.tree.map(lambda p, gi: p - (lr * gi).astype(p.dtype), params, g), opt_state
    updates, opt_state = optimizer.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


class _Backend(BackendDefaults):
    """The single-device :class:`cabs_core.loop.Backend`: padded batches, one program per bucket."""

    pads = True

    def __init__(self, trainer: CABSTrainer) -> None:
        self.t = trainer
        self.stats_fn = jax.jit(self._stats, static_argnames="path")

    def _stats(self, params: PyTree, batch: PyTree, mask: jax.Array, path: Method) -> BatchStats:
        self.t.traces += 1
        return self.t.stats(params, batch, mask, method=path)

    def take(self, source: PyTree, rows: np.ndarray) -> PyTree:
        def one(a: Any) -> Any:
            return jnp.take(a, jnp.asarray(rows), axis=0) if isinstance(a, jax.Array) else np.asarray(a)[rows]
        return jax.tree.map(one, source)

    def num_examples(self, source: PyTree) -> int:
        return batch_size_of(source)

    def statistics(self, model: Any, batch: PyTree, micro: MicroBatch, *, verify: bool) -> BatchStats:
        path = self.t.stats.path(model[0], batch, micro.mask, reprobe=verify)
        return self.stats_fn(model[0], batch, micro.mask, path=path)

    def scalars(self, model: Any, stats: BatchStats) -> tuple[ScalarStats, float | None]:
        host = np.asarray(_host_vector(stats, *model, self.t.optimizer).addressable_data(0), np.float64)  # one copy
        return ScalarStats(*(float(v) for v in host[:4])), None if self.t.optimizer is None else float(host[4])

    def apply(self, model: Any, stats: BatchStats, lr: float) -> Any:
        return _update(*model, stats, jnp.asarray(lr, stats.loss_sum.dtype), self.t.optimizer)

    def gather(self, words: np.ndarray) -> np.ndarray:
        if self.processes == 1:
            return super().gather(words)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(np.asarray(words))).reshape(self.processes, -1)


class CABSTrainer:
    """SGD (or an optax optimizer) with CABS batch sizes on ``data`` (a pytree, leading axis = examples).

    loss_fn: ``loss_fn(params, example) -> scalar``, a :class:`cabs_jax.FlaxLoss` or :class:`cabs_jax.NNXLoss`; method,
    chunk_size: as :class:`PerExampleStats`. optimizer: None for theta <- theta - lr g_bar at
    ``controller.lr``, or an optax transformation fed g_bar built with
    ``optax.inject_hyperparams(...)(learning_rate=...)`` (or a fresh ``nnx.Optimizer`` of one), whose rate
    (after its schedule) is the one the controller couples to; it must start at ``controller.lr``.
    buckets, seed, max_micro_batch, verify_every: as :class:`cabs_core.loop.CABSLoop`. ``traces`` counts
    compilations of the statistics.
    """

    _backend, _check_every = _Backend, CHECK_EVERY  # the data-parallel trainer sets its own

    def __init__(
        self, loss_fn: LossFn, controller: CABSController, data: PyTree, *,
        optimizer: optax.GradientTransformation | None = None, method: Method = "auto", chunk_size: int | None = None,
        buckets: Sequence[int] | None = None, seed: int = 0, max_micro_batch: int | None = None,
        verify_every: int | None = VERIFY_EVERY,
    ) -> None:
        self.stats = PerExampleStats(loss_fn, method=method, chunk_size=chunk_size)
        optimizer = optax_of(optimizer)  # a fresh nnx.Optimizer: its optax transformation
        self.controller, self.data, self.optimizer, self.traces = controller, data, optimizer, 0
        self.backend = self._backend(self)
        self.loop = CABSLoop(self.backend, controller, num_examples=batch_size_of(data), seed=seed, buckets=buckets,
                             max_micro_batch=max_micro_batch, verify_every=verify_every, check_every=self._check_every)
        self.buckets = self.loop.buckets
        try:  # the rate is checked now on a stand-in parameter, else (a structured optimizer) in init
            probe = None if optimizer is None else optimizer.init(jnp.zeros(1))
        except Exception:
            probe = None
        if probe is not None:
            self._check_lr(jnp.zeros(1), probe)

    def _place(self, tree: PyTree) -> PyTree:
        """Where parameters and optimizer state live (the data-parallel trainer replicates them)."""
        return tree

    def _check_lr(self, params: PyTree, opt_state: PyTree) -> None:
        if getattr(opt_state, "hyperparams", {}).get("learning_rate") is None:
            raise ConfigError("optimizer", "the optimizer's learning rate must be readable: build it as "
                              "optax.inject_hyperparams(optax.sgd)(learning_rate=...) (or adam, ...)")
        check_learning_rate(self.controller, float(_next_lr(params, opt_state, self.optimizer)))  # once, eagerly

    def init(self, params: PyTree) -> TrainState:
        """The state before the first step (with a :class:`cabs_jax.NNXLoss`, ``params`` may be the ``nnx.Module``)."""
        params = trainable_state(self.stats.loss_fn, params)
        opt_state = () if self.optimizer is None else self.optimizer.init(params)
        if self.optimizer is not None:
            self._check_lr(params, opt_state)
        run = self.loop.init()
        return TrainState(self._place(params), self._place(opt_state), run.controller, run.sampler)  # type: ignore

    def step(self, state: TrainState) -> tuple[TrainState, StepInfo]:
        """One CABS step with ``state.controller.batch_size`` examples (:meth:`CABSLoop.step`)."""
        run, (params, opt_state), info = self.loop.step(
            RunState(state.controller, state.sampler), (state.params, state.opt_state), self.data)
        return TrainState(params, opt_state, run.controller, run.sampler), info  # type: ignore[arg-type]

    def save(self, path: str | os.PathLike[str], state: TrainState) -> None:
        """One atomic ``.npz`` (:meth:`CABSLoop.save`): the envelope, then the leaves of (params, opt_state),
        written by process 0 only."""
        if jax.process_index() != 0:
            return
        leaves = [np.asarray(a.addressable_data(0) if isinstance(a, jax.Array) else a)
                  for a in jax.tree.leaves((state.params, state.opt_state))]
        self.loop.save(path, RunState(state.controller, state.sampler), leaves)

    def restore(self, path: str | os.PathLike[str], like: TrainState, *, allow: Sequence[str] = ()) -> TrainState:
        """The state saved in ``path``; ``like`` (e.g. ``trainer.init(params)``) gives structure and dtypes.
        A changed configuration raises :class:`cabs_core.CheckpointMismatchError` unless its keys are in ``allow``."""
        run, arrays, _ = self.loop.load(path, allow=allow)
        template, treedef = jax.tree.flatten((like.params, like.opt_state))
        check_arrays(path, arrays, template)
        leaves = [jnp.asarray(a, jnp.result_type(t)) for a, t in zip(arrays, template)]
        params, opt_state = self._place(jax.tree.unflatten(treedef, leaves))
        return TrainState(params, opt_state, run.controller, run.sampler)  # type: ignore[arg-type]
