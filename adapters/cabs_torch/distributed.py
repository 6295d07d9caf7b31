"""Data-parallel CABS on ``torch.distributed`` (gloo on CPU, NCCL on GPUs): the
core's step (:class:`cabs_core.loop.CABSLoop`) with one process per rank. Each
rank computes the exact sums of its shard; they are all-reduced (``grad_sum`` as
one flat bucket per dtype, count, loss sum and S in one float64 all-reduce), so
every rank decides and steps as one process would on the global batch; every
``check_every`` steps the ranks compare the core's digest. DDP's gradient
all-reduce is not used (the statistics never call ``backward``); a
``DistributedDataParallel`` model is unwrapped. See docs/distributed/torch.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cabs_core import BatchStats, CABSController, ConfigError
from cabs_core.loop import CHECK_EVERY

from .stats import LossFn
from .training import CABSTrainer, TorchBackend


class DataParallelBackend(TorchBackend):
    """:class:`TorchBackend` whose sums and digests travel over ``group``."""

    def __init__(self, stats_fn: Any, optimizer: Any, group: Any, world_size: int, rank: int) -> None:
        super().__init__(stats_fn, optimizer)
        self.group, self.processes, self.process_index = group, world_size, rank

    def all_reduce(self, stats: BatchStats) -> BatchStats:
        grads, out = stats.grad_sum, list(stats.grad_sum)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for k, g in enumerate(grads):
            by_dtype.setdefault(g.dtype, []).append(k)
        for ks in by_dtype.values():
            flat = torch.cat([grads[k].detach().reshape(-1) for k in ks])
            dist.all_reduce(flat, group=self.group)
            for k, piece in zip(ks, torch.split(flat, [grads[k].numel() for k in ks])):
                out[k] = piece.view_as(grads[k])
        scalars = torch.stack([stats.count, stats.loss_sum, stats.sq_norm_sum]).to(torch.float64)
        dist.all_reduce(scalars, group=self.group)
        count, loss_sum, sq = scalars.to(stats.count.dtype).unbind()
        return super().all_reduce(BatchStats(count, loss_sum, tuple(out), sq))

    def gather(self, words: np.ndarray) -> np.ndarray:
        mine = torch.from_numpy(np.asarray(words, np.int32)).to(self.stats_fn.params[0].device)
        table = [torch.empty_like(mine) for _ in range(self.processes)]
        dist.all_gather(table, mine, group=self.group)
        return torch.stack(table).cpu().numpy()


class DataParallelCABSTrainer(CABSTrainer):
    """:class:`CABSTrainer` across the ranks of ``process_group`` (default: the world).

    Each rank steps on its share of the global batch (drawn from ``data``, or
    from :meth:`batch_sampler`); the statistics are all-reduced, so every rank
    makes the single-process decision and update. check_every: compare the
    ranks' digests (configuration, controller state, sampler position) every so
    many steps, at construction and after loading (0: never).
    broadcast_parameters: copy rank 0's parameters and buffers to every rank
    first. ``bs_min`` must be >= the world size; ``micro_batches`` is not available.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, controller: CABSController, *, process_group: Any = None,
                 check_every: int = CHECK_EVERY, broadcast_parameters: bool = True, **kwargs: Any) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group(...)"
                               " first (e.g. under torchrun: 'nccl' on GPUs, 'gloo' on CPUs)")
        if kwargs.get("micro_batches") is not None:
            raise ValueError("micro_batches (the group estimator) is not available data-parallel")
        self.group, self._check_every = process_group, check_every
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

    def _backend(self) -> TorchBackend:
        return DataParallelBackend(self.stats_fn, self.optimizer, self.group, self._processes, self._rank)

    def check_sync(self) -> None:
        """Raise :class:`cabs_core.DesyncError` on every rank unless all agree (collective; not if check_every=0)."""
        if self._check_every:
            if self.sampler is not None:
                self.run = self.run._replace(sampler=self.sampler.state)
            self.loop.check_sync(self.run)

    def _extra(self) -> dict[str, Any]:
        return {**super()._extra(), "world_size": self._processes}

    def load_state_dict(self, d: dict[str, Any], *, allow: Any = ()) -> None:
        """As :meth:`CABSTrainer.load_state_dict` (any world size), then check agreement (collective)."""
        super().load_state_dict(d, allow=allow)
        self.check_sync()

    def restore(self, path: Any, *, allow: Any = ()) -> None:
        """As :meth:`CABSTrainer.restore` (any world size), then check agreement (collective)."""
        super().restore(path, allow=allow)
        self.check_sync()
