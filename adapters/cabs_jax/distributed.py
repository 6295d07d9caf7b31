"""Data-parallel CABS on JAX's own sharding: one compiled ``jax.shard_map`` over a 1-D mesh with ``lax.psum``.

The loop (:mod:`cabs_core.loop`) shards each global batch over the mesh (shards = this process's
devices, processes = ``jax.process_count()``); the four sums arrive replicated on every device, so
``all_reduce`` is the identity and every process decides the same. See ``docs/distributed/jax.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cabs_core import BatchStats, CABSController, shard_buckets
from cabs_core.loop import CHECK_EVERY, MicroBatch
from cabs_core.workers import agreed_path, process_shards

from .dispatch import Method
from .stats import LossFn, PyTree
from .train import CABSTrainer, _Backend


def data_mesh(devices: Sequence[Any] | None = None, axis_name: str = "data") -> Mesh:
    """A 1-D mesh over ``devices`` (default: ``jax.devices()``, all devices of all processes)."""
    devs = list(jax.devices() if devices is None else devices)
    if not devs:
        raise ValueError("data_mesh needs at least one device")
    return Mesh(np.asarray(devs, dtype=object), (axis_name,))


def _replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Every leaf replicated on all devices of ``mesh`` (works across processes)."""
    def put(x: Any) -> jax.Array:
        x = np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)
        return jax.make_array_from_callback(x.shape, NamedSharding(mesh, P()), lambda index: x[index])

    return jax.tree.map(put, tree)


class _MeshBackend(_Backend):
    """The :class:`cabs_core.loop.Backend` over the mesh: host rows in, replicated sums out."""

    def __init__(self, trainer: DataParallelCABSTrainer) -> None:
        super().__init__(trainer)
        mesh, self.processes, self.process_index = trainer.mesh, jax.process_count(), jax.process_index()
        self.shards = process_shards([d.process_index for d in mesh.devices.flat], self.processes, self.process_index)
        self.axis = mesh.axis_names[0]
        self.sharding, self.agreed = NamedSharding(mesh, P(self.axis)), {}  # per-device size -> agreed path

    def _stats(self, params: PyTree, batch: PyTree, mask: jax.Array, path: Method) -> BatchStats:
        self.t.traces += 1

        def local(p: PyTree, b: PyTree, m: jax.Array) -> BatchStats:  # count, sums, S: one psum
            return jax.lax.psum(self.t.stats(p, b, m, method=path), self.axis)

        spec = P(self.axis)
        return jax.shard_map(local, mesh=self.t.mesh, in_specs=(P(), spec, spec), out_specs=P(),
                             check_vma=False)(params, batch, mask)

    def statistics(self, model: Any, batch: PyTree, micro: MicroBatch, *, verify: bool) -> BatchStats:
        local = jax.tree.map(lambda a: a.addressable_data(0), model[0])
        first = jax.tree.map(lambda a: a[: micro.size], batch)  # one device's shard: the compiled signature
        path = agreed_path(self.agreed, micro.size,  # every process probes its own shard: one verdict for all
                           lambda: self.t.stats.path(local, first, micro.mask[: micro.size], reprobe=verify),
                           self.gather, processes=self.processes, verify=verify)
        n = self.processes * self.shards * micro.size

        def glob(a: np.ndarray) -> jax.Array:
            return jax.make_array_from_process_local_data(self.sharding, a, (n,) + a.shape[1:])

        return self.stats_fn(model[0], jax.tree.map(glob, batch), glob(micro.mask), path=path)


class DataParallelCABSTrainer(CABSTrainer):
    """:class:`cabs_jax.CABSTrainer` data-parallel over the devices of a 1-D ``mesh``.

    Takes the arguments of :class:`CABSTrainer` (``buckets`` are global batch sizes), plus
    ``mesh`` (default :func:`data_mesh`: every device of every process) and ``check_every``
    (compare the processes' digests every so many steps; 0: never). ``data`` must be host
    arrays present on every process; each process reads the rows of its own devices.
    Parameters and optimizer state live replicated on the mesh; a checkpoint holds no
    device count (resume on any mesh, or with :class:`CABSTrainer`).
    """

    _backend = _MeshBackend

    def __init__(
        self, loss_fn: LossFn, controller: CABSController, data: PyTree, *, mesh: Mesh | None = None,
        check_every: int = CHECK_EVERY, **kwargs: Any,
    ) -> None:
        self.mesh = data_mesh() if mesh is None else mesh
        if not isinstance(self.mesh, Mesh) or len(self.mesh.axis_names) != 1:
            raise ValueError(f"mesh must be a 1-D jax.sharding.Mesh (data parallelism), got {mesh!r}")
        self._check_every = check_every
        super().__init__(loss_fn, controller, jax.tree.map(np.asarray, data), **kwargs)
        self.world_size = self.backend.shards * self.backend.processes
        self.device_buckets = shard_buckets(self.buckets, self.world_size)

    def _place(self, tree: PyTree) -> PyTree:
        return _replicate(tree, self.mesh)


__all__ = ["DataParallelCABSTrainer", "data_mesh"]
