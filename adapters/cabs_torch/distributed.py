"""Data-parallel CABS on ``torch.distributed`` (gloo on CPU, NCCL on GPUs; docs/distributed/torch.md): one
process per rank, :class:`TorchBackend` all-reduces the sums and gathers the digests. DDP's gradient all-reduce
is not used (the statistics never call ``backward``); a ``DistributedDataParallel`` model is unwrapped."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cabs_core import CABSController, ConfigError
from cabs_core.loop import CHECK_EVERY

from .sums import LossFn
from .training import CABSTrainer


class DataParallelCABSTrainer(CABSTrainer):
    """:class:`CABSTrainer` across the ranks of ``process_group`` (default: the world).

    Each rank steps on its share of the global batch (from ``data``, or from
    :meth:`batch_sampler`); the statistics are all-reduced, so every rank makes
    the single-process decision and update. check_every: compare the ranks'
    digests (configuration, controller state, sampler position) every so many
    steps, at construction and after loading (0: never). broadcast_parameters:
    copy rank 0's parameters and buffers to every rank first. ``bs_min`` must be
    >= the world size; ``micro_batches`` is not available. Other keywords: as
    :class:`CABSTrainer`.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, controller: CABSController, *, process_group: Any = None,
                 check_every: int = CHECK_EVERY, broadcast_parameters: bool = True, **kwargs: Any) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group(...)"
                               " first (e.g. under torchrun: 'nccl' on GPUs, 'gloo' on CPUs)")
        if kwargs.get("micro_batches") is not None:
            raise ValueError("micro_batches (the group estimator) is not available data-parallel")
        self._group, self._check_every = process_group, check_every
        self._processes, self._rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        super().__init__(model, loss_fn, controller, **kwargs)
        if controller.bs_min < self._processes:
            raise ConfigError("bs_min", f"bs_min ({controller.bs_min}) must be >= the world size "
                                        f"({self._processes}), so that every rank's shard holds an example")
        if broadcast_parameters:
            src = 0 if process_group is None else dist.get_global_rank(process_group, 0)
            with torch.no_grad():
                for t in [*model.parameters(), *model.buffers()]:
                    dist.broadcast(t.data, src=src, group=process_group)
        self.check_sync()

    def _extra(self) -> dict[str, Any]:
        return {**super()._extra(), "world_size": self._processes}  # informative: any world size may resume
