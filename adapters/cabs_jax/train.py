"""A drop-in CABS training step for JAX: padded buckets, the core controller and sampler.

Each step (docs/spec.md section 2): draw the decided number of examples with the core
sampler, pad them up to the smallest bucket >= that size (0/1 mask), run one
compiled step (statistics, SGD update with the batch's *mean* gradient,
reduction to four scalars), and let :class:`cabs_core.CABSController` decide
the next batch size from those four scalars: the only device-to-host copy.
A program is compiled once per bucket, not once per batch size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cabs_core import (
    BatchStats,
    CABSController,
    ControllerState,
    SamplerState,
    ScalarStats,
    StepInfo,
    bucket_for,
    next_batch,
    pad_indices,
    reduce_stats,
)
from cabs_core.exactness import VERIFY_EVERY, verify_due

from .dispatch import Method, batch_stats
from .flax_fast import FlaxLoss
from .stats import LossFn, PyTree, batch_size_of
from .verify import resolve

_CHECKPOINT_FORMAT = "cabs-jax-checkpoint/1"


def pad_batch(batch: PyTree, size: int) -> tuple[PyTree, np.ndarray]:
    """Pad a batch of m <= size examples to ``size`` with copies of example 0 and the 0/1 mask."""
    m = batch_size_of(batch)
    if m > size:
        raise ValueError(f"cannot pad a batch of {m} examples down to {size}")
    idx, mask = pad_indices(np.arange(m), size)
    return _gather(batch, idx), mask


def _gather(data: PyTree, idx: np.ndarray) -> PyTree:
    """Rows ``idx`` of every array: on the device for jax arrays, on the host for numpy ones."""
    def take(a: Any) -> Any:
        if isinstance(a, jax.Array):
            return jnp.take(a, jnp.asarray(idx), axis=0)
        return np.asarray(a)[idx]

    return jax.tree.map(take, data)


def take_batch(
    data: PyTree, sampler: SamplerState, batch_size: int, buckets: Sequence[int]
) -> tuple[PyTree, np.ndarray, SamplerState]:
    """The next ``batch_size`` examples of ``data`` in the core sampler's order, padded to a bucket.

    Returns (batch, mask, new sampler state); the batch's leading axis is
    ``bucket_for(batch_size, buckets)``.
    """
    n = batch_size_of(data)
    if n != sampler.num_examples:
        raise ValueError(f"data holds {n} examples but the sampler state expects {sampler.num_examples}")
    idx, sampler = next_batch(sampler, batch_size)
    padded, mask = pad_indices(idx, bucket_for(batch_size, buckets))
    return _gather(data, padded), mask, sampler


class BatchIterator:
    """Batches of ``data`` (numpy or jax arrays) in the core sampler's order, padded to buckets.

    The batch size may change at every call: ``batch, mask = it.next(batch_size)``.
    ``it.state`` is the sampler state to checkpoint; pass it back as ``state`` to resume.
    """

    def __init__(
        self, data: PyTree, buckets: Sequence[int], *, seed: int = 0, state: SamplerState | None = None
    ) -> None:
        self.data, self.buckets = data, tuple(buckets)
        self.state = SamplerState(batch_size_of(data), seed) if state is None else state

    def next(self, batch_size: int) -> tuple[PyTree, np.ndarray]:
        batch, mask, self.state = take_batch(self.data, self.state, batch_size, self.buckets)
        return batch, mask

    @property
    def epoch(self) -> float:
        return self.state.epoch


def apply_mean_gradient(
    params: PyTree, opt_state: PyTree, stats: BatchStats, lr: float, optimizer: optax.GradientTransformation | None
) -> tuple[PyTree, PyTree]:
    """theta <- theta - lr * grad_sum / count (the paper's update), or ``optimizer``
    applied to that mean gradient; traceable."""
    inv_m = 1 / jnp.maximum(stats.count, 1)
    mean_grad = jax.tree.unflatten(jax.tree.structure(params), [g * inv_m for g in stats.grad_sum])
    if optimizer is None:
        return jax.tree.map(lambda p, g: p - jnp.asarray(lr, p.dtype) * g.astype(p.dtype), params, mean_grad), opt_state
    updates, opt_state = optimizer.update(mean_grad, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


class TrainState(NamedTuple):
    """Everything a resumed run needs: parameters, optimizer, controller and sampler states."""

    params: PyTree
    opt_state: PyTree
    controller: ControllerState
    sampler: SamplerState


class CABSTrainer:
    """SGD with CABS batch sizes on ``data`` (a pytree of arrays, leading axis = examples).

    loss: ``loss(params, example) -> scalar`` or a :class:`cabs_jax.FlaxLoss`.
    controller: the core :class:`~cabs_core.CABSController` (its ``lr`` is the
    SGD learning rate). optimizer: None for plain SGD, theta <- theta - lr *
    g_bar (the paper's update), or any optax transformation applied to the
    mean gradient g_bar. buckets: padded sizes to compile for (default: the
    controller's buckets, else :func:`cabs_core.geometric_buckets`). ``traces`` counts
    compilations of the step. verify_every: with the fast path (a ``FlaxLoss``,
    method ``"auto"`` or ``"fast"``), the probe that establishes its per-example
    decomposition (:mod:`cabs_jax.verify`) runs on the first step of each input
    signature and again every ``verify_every`` steps (None or 0: first step only), on
    the host side, as its own compiled computation on the batch's first real examples.
    """

    def __init__(
        self,
        loss: LossFn,
        controller: CABSController,
        data: PyTree,
        *,
        optimizer: optax.GradientTransformation | None = None,
        method: Method = "auto",
        chunk_size: int | None = None,
        buckets: Sequence[int] | None = None,
        seed: int = 0,
        verify_every: int | None = VERIFY_EVERY,
    ) -> None:
        if not isinstance(controller, CABSController):
            raise ValueError(f"controller must be a cabs_core.CABSController, got {type(controller).__name__}")
        if method not in ("auto", "fast", "generic"):
            raise ValueError(f"method must be 'auto', 'fast' or 'generic', got {method!r}")
        verify_due(0, verify_every)  # validates it
        buckets = controller.padding_buckets(buckets)
        self.loss, self.controller, self.data = loss, controller, data
        self.num_examples = batch_size_of(data)
        self.optimizer, self.method, self.chunk_size = optimizer, method, chunk_size
        self.buckets, self.seed, self.verify_every = buckets, seed, verify_every
        self.traces = 0
        self._step = jax.jit(self._device_step, static_argnames=("path",))

    def init(self, params: PyTree) -> TrainState:
        """The state before the first step."""
        opt_state = () if self.optimizer is None else self.optimizer.init(params)
        return TrainState(params, opt_state, self.controller.init(), SamplerState(self.num_examples, self.seed))

    def _device_step(
        self, params: PyTree, opt_state: PyTree, batch: PyTree, mask: jax.Array, path: Method
    ) -> tuple[PyTree, PyTree, ScalarStats]:
        """Statistics, the update with the mean gradient, four scalars; traced once per bucket (and path)."""
        self.traces += 1
        stats = batch_stats(self.loss, params, batch, mask, method=path, chunk_size=self.chunk_size)
        params, opt_state = apply_mean_gradient(params, opt_state, stats, self.controller.lr, self.optimizer)
        return params, opt_state, reduce_stats(stats)

    def step(self, state: TrainState) -> tuple[TrainState, StepInfo]:
        """One CABS step with ``state.controller.batch_size`` examples.

        A step the controller skips for non-finite statistics (policy
        ``nonfinite="skip"``) leaves parameters and optimizer state unchanged.
        """
        batch, mask, sampler = take_batch(self.data, state.sampler, state.controller.batch_size, self.buckets)
        path: Method = self.method
        if path != "generic" and isinstance(self.loss, FlaxLoss):  # probe on the host, outside the compiled step
            due = verify_due(state.controller.step, self.verify_every)
            path = resolve(self.loss, state.params, batch, mask, self.method, reprobe=due)  # type: ignore[assignment]
        params, opt_state, scalars = self._step(state.params, state.opt_state, batch, mask, path=path)
        cstate, info = self.controller.update(state.controller, scalars)  # the one host copy
        if info.skipped and info.reason == "nonfinite":
            params, opt_state = state.params, state.opt_state
        return TrainState(params, opt_state, cstate, sampler), info


def save_checkpoint(path: str | os.PathLike, state: TrainState) -> None:
    """Write parameters, optimizer state, controller and sampler states to one ``.npz`` file."""
    leaves = jax.tree.leaves((state.params, state.opt_state))
    meta = {
        "format": _CHECKPOINT_FORMAT,
        "leaves": len(leaves),
        "controller": state.controller.to_dict(),
        "sampler": state.sampler.to_dict(),
    }
    arrays: dict[str, Any] = {f"leaf_{k}": np.asarray(x) for k, x in enumerate(leaves)}
    arrays["meta"] = np.asarray(json.dumps(meta))
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_checkpoint(path: str | os.PathLike, like: TrainState) -> TrainState:
    """Read a checkpoint; ``like`` (e.g. ``trainer.init(params)``) gives the pytree structure."""
    template, treedef = jax.tree.flatten((like.params, like.opt_state))
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["meta"]))
        if meta.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: not a cabs_jax checkpoint (format {meta.get('format')!r})")
        if meta["leaves"] != len(template):
            raise ValueError(f"{path}: checkpoint holds {meta['leaves']} arrays, the template {len(template)}")
        leaves = []
        for k, t in enumerate(template):
            a = f[f"leaf_{k}"]
            if a.shape != jnp.shape(t):
                raise ValueError(f"{path}: array {k} has shape {a.shape}, the template {jnp.shape(t)}")
            leaves.append(jnp.asarray(a, dtype=jnp.result_type(t)))
    params, opt_state = jax.tree.unflatten(treedef, leaves)
    return TrainState(
        params, opt_state, ControllerState.from_dict(meta["controller"]), SamplerState.from_dict(meta["sampler"])
    )
