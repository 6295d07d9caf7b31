"""Data-parallel CABS on JAX's own sharding: ``jax.shard_map`` over a 1-D device mesh and ``lax.psum``.

One step (docs/spec.md sections 2 and 4; issue 8):

1. the core sampler draws the GLOBAL batch of ``state.controller.batch_size``
   indices; :func:`cabs_core.shard` splits it contiguously over the D devices
   of the mesh (the first ``b % D`` devices get one example more) and every
   shard is padded to one common per-device bucket (copies of a real example,
   mask 0);
2. one compiled program (``jax.jit`` of ``jax.shard_map``): each device
   computes :func:`cabs_jax.batch_stats` of its shard; the four sums
   (``count``, ``loss_sum``, ``grad_sum``, ``sq_norm_sum``) are ``psum``-ed
   over the mesh axis in one call; every device applies the same update with
   the global mean gradient ``grad_sum / count`` and reduces the sums to the
   four scalars of :class:`cabs_core.ScalarStats` (replicated);
3. one host copy of those four scalars (from a local replica); the core
   controller decides the next global batch size. Every process holds the same
   replicated scalars, so every process makes the same decision.

Multi-host (``jax.distributed.initialize()``): the mesh spans the devices of
all processes; each process gathers only the rows its own devices hold.
Processes compare :meth:`cabs_core.ControllerState.digest` every
``check_every`` steps (:func:`allgather_digests`, :func:`cabs_core.check_digests`) and
raise :class:`cabs_core.DesyncError` naming the step when they differ.
See ``docs/distributed/jax.md``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cabs_core import (
    CABSController,
    ControllerState,
    SamplerState,
    ScalarStats,
    StepInfo,
    check_digests,
    next_batch,
    padded_shards,
    reduce_stats,
    shard_buckets,
)

from .dispatch import Method, batch_stats
from .stats import LossFn, PyTree, batch_size_of
from .train import TrainState, apply_mean_gradient, load_checkpoint, save_checkpoint

DigestGather = Callable[[int], Sequence[int]]


def allgather_digests(digest: int) -> list[int]:
    """Every process's digest (a list indexed by ``jax.process_index()``); a collective: all
    processes must call it together. The 63-bit digest travels as three 21-bit int32 pieces,
    so it needs no 64-bit integers on the device."""
    if not 0 <= digest < 2**63:
        raise ValueError(f"a controller digest is a 63-bit non-negative integer, got {digest!r}")
    if jax.process_count() == 1:
        return [int(digest)]
    from jax.experimental import multihost_utils

    mask = (1 << 21) - 1
    pieces = np.asarray([(digest >> 42) & mask, (digest >> 21) & mask, digest & mask], np.int32)
    allp = np.asarray(multihost_utils.process_allgather(pieces)).reshape(-1, 3).astype(np.int64)
    return [int((a << 42) | (b << 21) | c) for a, b, c in allp]


def verify_sync(state: ControllerState, gather: DigestGather = allgather_digests) -> None:
    """Gather ``state.digest()`` from every process with ``gather`` and check that they agree
    (:func:`cabs_core.check_digests`, :class:`cabs_core.DesyncError` naming the step and processes)."""
    digests = list(gather(state.digest()))
    check_digests(digests, state.step, [f"process {k}" for k in range(len(digests))])


def data_mesh(devices: Sequence[Any] | None = None, axis_name: str = "data") -> Mesh:
    """A 1-D mesh over ``devices`` (default: ``jax.devices()``, all devices of all processes)."""
    devs = list(jax.devices() if devices is None else devices)
    if not devs:
        raise ValueError("data_mesh needs at least one device")
    return Mesh(np.asarray(devs, dtype=object), (axis_name,))


def _replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Every leaf replicated on all devices of ``mesh`` (works across processes)."""
    sharding = NamedSharding(mesh, P())

    def put(x: Any) -> jax.Array:
        x = _to_host(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def _to_host(x: Any) -> np.ndarray:
    """A replicated (or host) array as numpy, read from this process's first local replica."""
    if isinstance(x, jax.Array):
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


class DataParallelCABSTrainer:
    """SGD with CABS batch sizes, data-parallel over the devices of a 1-D ``mesh``.

    Same arguments and results as :class:`cabs_jax.CABSTrainer` (``loss``,
    ``controller``, ``data``, ``optimizer``, ``method``, ``chunk_size``, global
    ``buckets``, ``seed``), plus ``mesh`` (default :func:`data_mesh`: all devices),
    ``check_every`` (compare controller digests across processes every this many
    steps; 0: never; single-process runs have one controller and skip the check
    unless ``gather`` is given) and ``gather`` (how digests are collected,
    default :func:`allgather_digests`). ``data`` must be host (numpy) arrays
    present on every process; each process gathers the rows of its own devices.
    ``traces`` counts compilations (one per per-device bucket, :attr:`device_buckets`).
    """

    def __init__(
        self,
        loss: LossFn,
        controller: CABSController,
        data: PyTree,
        *,
        mesh: Mesh | None = None,
        optimizer: optax.GradientTransformation | None = None,
        method: Method = "auto",
        chunk_size: int | None = None,
        buckets: Sequence[int] | None = None,
        seed: int = 0,
        check_every: int = 100,
        gather: DigestGather | None = None,
    ) -> None:
        if not isinstance(controller, CABSController):
            raise ValueError(f"controller must be a cabs_core.CABSController, got {type(controller).__name__}")
        if method not in ("auto", "fast", "generic"):
            raise ValueError(f"method must be 'auto', 'fast' or 'generic', got {method!r}")
        mesh = data_mesh() if mesh is None else mesh
        if not isinstance(mesh, Mesh) or len(mesh.axis_names) != 1:
            raise ValueError(f"mesh must be a 1-D jax.sharding.Mesh (data parallelism), got {mesh!r}")
        if not isinstance(check_every, int) or isinstance(check_every, bool) or check_every < 0:
            raise ValueError(f"check_every must be an integer >= 0 (0: never check), got {check_every!r}")
        buckets = controller.padding_buckets(buckets)
        self.loss, self.controller, self.mesh = loss, controller, mesh
        self.axis_name = mesh.axis_names[0]
        self.world_size = int(mesh.devices.size)
        self.data = jax.tree.map(np.asarray, data)
        self.num_examples = batch_size_of(self.data)
        self.optimizer, self.method, self.chunk_size = optimizer, method, chunk_size
        self.buckets, self.seed = buckets, seed
        self.device_buckets = shard_buckets(buckets, self.world_size)
        self.check_every, self.gather = check_every, gather
        self.traces = 0
        self._batch_sharding = NamedSharding(mesh, P(self.axis_name))
        sharded = jax.shard_map(
            self._device_step,
            mesh=mesh,
            in_specs=(P(), P(), P(self.axis_name), P(self.axis_name)),
            out_specs=(P(), P(), P()),
            check_vma=False,
        )
        self._step = jax.jit(sharded)

    def init(self, params: PyTree) -> TrainState:
        """The state before the first step; parameters and optimizer state replicated on the mesh."""
        opt_state = () if self.optimizer is None else self.optimizer.init(params)
        return TrainState(
            _replicate(params, self.mesh),
            _replicate(opt_state, self.mesh),
            self.controller.init(),
            SamplerState(self.num_examples, self.seed),
        )

    def _device_step(
        self, params: PyTree, opt_state: PyTree, batch: PyTree, mask: jax.Array
    ) -> tuple[PyTree, PyTree, jax.Array]:
        """Per device: shard statistics, psum of the four sums, the update, four scalars."""
        self.traces += 1
        local = batch_stats(self.loss, params, batch, mask, method=self.method, chunk_size=self.chunk_size)
        stats = jax.lax.psum(local, self.axis_name)  # count, loss_sum, grad_sum, sq_norm_sum in one call
        params, opt_state = apply_mean_gradient(params, opt_state, stats, self.controller.lr, self.optimizer)
        scalars = reduce_stats(stats)
        dtype = stats.loss_sum.dtype
        return params, opt_state, jnp.stack([jnp.reshape(jnp.asarray(v).astype(dtype), ()) for v in scalars])

    def shard_batch(self, sampler: SamplerState, batch_size: int) -> tuple[PyTree, jax.Array, SamplerState, int]:
        """The next global batch, split over the mesh and padded: (batch, mask, sampler state, per-device size)."""
        if self.num_examples != sampler.num_examples:
            raise ValueError(
                f"data holds {self.num_examples} examples but the sampler state expects {sampler.num_examples}"
            )
        idx, sampler = next_batch(sampler, batch_size)
        gidx, gmask, size = padded_shards(idx, self.world_size, self.device_buckets)

        def put(a: np.ndarray, rows: np.ndarray) -> jax.Array:
            shape = (len(rows),) + a.shape[1:]
            return jax.make_array_from_callback(
                shape, self._batch_sharding, lambda index: a[rows[index[0]]][(slice(None),) + index[1:]]
            )

        batch = jax.tree.map(lambda a: put(a, gidx), self.data)
        mask = put(gmask, np.arange(len(gmask)))
        return batch, mask, sampler, size

    def step(self, state: TrainState) -> tuple[TrainState, StepInfo]:
        """One data-parallel CABS step with ``state.controller.batch_size`` examples in the global batch.

        A step the controller skips for non-finite statistics (``nonfinite="skip"``)
        leaves parameters and optimizer state unchanged. Every ``check_every`` steps
        the processes' controller digests are compared (:class:`cabs_core.DesyncError`).
        """
        batch, mask, sampler, _ = self.shard_batch(state.sampler, state.controller.batch_size)
        params, opt_state, vec = self._step(state.params, state.opt_state, batch, mask)
        scalars = ScalarStats.from_vector(_to_host(vec).tolist())  # the one device-to-host copy
        cstate, info = self.controller.update(state.controller, scalars)
        if info.skipped and info.reason == "nonfinite":
            params, opt_state = state.params, state.opt_state
        if self.check_every and cstate.step % self.check_every == 0 and (self.gather or jax.process_count() > 1):
            verify_sync(cstate, self.gather or allgather_digests)
        return TrainState(params, opt_state, cstate, sampler), info

    def save(self, path: str | os.PathLike, state: TrainState) -> None:
        """:func:`cabs_jax.save_checkpoint` of the replicated state, written by process 0 only.

        The file holds no device count: resume it on any number of devices."""
        if jax.process_index() == 0:
            host = jax.tree.map(_to_host, (state.params, state.opt_state))
            save_checkpoint(path, TrainState(*host, state.controller, state.sampler))

    def restore(self, path: str | os.PathLike, like: TrainState) -> TrainState:
        """:func:`cabs_jax.load_checkpoint`, then replicate parameters and optimizer state on this mesh."""
        host_like = TrainState(*jax.tree.map(_to_host, (like.params, like.opt_state)), like.controller, like.sampler)
        loaded = load_checkpoint(path, host_like)
        return TrainState(
            _replicate(loaded.params, self.mesh), _replicate(loaded.opt_state, self.mesh), loaded.controller,
            loaded.sampler,
        )


__all__ = [
    "DataParallelCABSTrainer",
    "allgather_digests",
    "data_mesh",
    "verify_sync",
]
