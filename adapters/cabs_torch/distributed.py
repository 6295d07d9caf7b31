"""Data-parallel CABS on ``torch.distributed`` (gloo on CPU, NCCL on GPUs).

Every statistic of docs/spec.md section 4 is a sum over examples, so the statistics of
a global batch are the sums of its shards' statistics. One step on each rank:

1. the rank's shard of the global batch (:func:`cabs_core.shard`, via
   :meth:`DistributedCABSSGD.batch_sampler`) goes through the exact
   per-example path (:class:`PerExampleStats`);
2. ``grad_sum`` is summed over the ranks with one ``all_reduce`` on a flat
   bucket (one per parameter dtype), and ``count``, ``loss_sum`` and
   ``sq_norm_sum`` with ONE more ``all_reduce`` of three float64 numbers
   (:func:`all_reduce_stats`);
3. every rank feeds the same global sums to the controller, so it makes the
   same decision, and takes the same SGD step with the global mean gradient
   ``grad_sum / count``.

Every ``check_every`` steps the ranks compare :meth:`ControllerState.digest`
(and a digest of the controller's configuration and the sampler's position)
with one ``all_gather`` and raise :class:`cabs_core.DesyncError` on every rank if they
differ (:func:`check_in_sync`).

DDP's own gradient all-reduce is not used: it runs inside ``loss.backward()``,
and the exact per-example path takes its gradients with
``torch.autograd.grad`` (hooks compute S on the way), which never fires DDP's
hooks. A ``DistributedDataParallel`` model is accepted and unwrapped. See
``docs/distributed/torch.md``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cabs_core import BatchStats, CABSController, DesyncError
from cabs_core.exactness import VERIFY_EVERY

from .stats import LossFn, Method
from .training import CABSSGD, CABSBatchSampler


def _group_info(group: Any) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group(...) first "
            "(e.g. under torchrun: init_process_group('nccl') on GPUs, 'gloo' on CPUs)"
        )
    return dist.get_world_size(group), dist.get_rank(group)


def all_reduce_stats(stats: BatchStats, group: Any = None) -> BatchStats:
    """The sums of ``stats`` over the ranks of ``group`` (the global batch's statistics).

    ``grad_sum`` travels as one flat bucket per dtype (one ``all_reduce`` for
    the usual single-dtype model); ``count``, ``loss_sum`` and ``sq_norm_sum``
    travel together in one ``all_reduce`` of a float64 vector. Every rank
    receives the same numbers. Collective: every rank of ``group`` must call it.
    """
    grads = stats.grad_sum
    out: list[Tensor | None] = [None] * len(grads)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for k, g in enumerate(grads):
        by_dtype.setdefault(g.dtype, []).append(k)
    for ks in by_dtype.values():
        flat = torch.cat([grads[k].detach().reshape(-1) for k in ks])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for k, piece in zip(ks, torch.split(flat, [grads[k].numel() for k in ks])):
            out[k] = piece.view_as(grads[k])
    scalars = torch.stack([stats.count, stats.loss_sum, stats.sq_norm_sum]).to(torch.float64)
    dist.all_reduce(scalars, op=dist.ReduceOp.SUM, group=group)
    count, loss_sum, sq = scalars.to(stats.count.dtype).unbind()
    return BatchStats(count, loss_sum, tuple(out), sq)  # type: ignore[arg-type]


def config_digest(controller: CABSController) -> int:
    """A 63-bit fingerprint of a controller's configuration (ranks must agree on it)."""
    text = json.dumps(asdict(controller), sort_keys=True, default=list)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def check_in_sync(values: dict[str, int], step: int, group: Any = None, device: torch.device | None = None) -> None:
    """Raise :class:`cabs_core.DesyncError` on every rank unless all ranks pass the same
    ``values`` (named integers in [-2**63, 2**63)). One ``all_gather``; collective."""
    world_size, rank = _group_info(group)
    names = list(values)
    mine = torch.tensor([int(values[n]) for n in names], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu().tolist()
    bad = [n for j, n in enumerate(names) if len({row[j] for row in table}) > 1]
    if bad:
        detail = "; ".join(f"{n}: " + ", ".join(f"rank {r}={row[names.index(n)]}" for r, row in enumerate(table))
                           for n in bad)
        raise DesyncError(
            f"data-parallel CABS ranks disagree after step {step} (this is rank {rank} of {world_size}): "
            f"{detail}. Every rank must run the same controller configuration on the same all-reduced "
            f"statistics; a rank that changed its state, skipped a step or loaded another checkpoint "
            f"diverges. Restart all ranks from one checkpoint.",
            step,
        )


class DistributedCABSSGD(CABSSGD):
    """:class:`CABSSGD` across the ranks of a ``torch.distributed`` process group.

    Each rank calls :meth:`step` with its shard of the global batch (from
    :meth:`batch_sampler`); the statistics are all-reduced, so every rank
    makes the decision a single process would make on the global batch and
    takes the same step ``theta <- theta - lr * grad_sum / count`` with the
    global sums.

    process_group: the group (default: the world). check_every: compare the
        ranks' controller digests every so many steps (0: never; also after
        :meth:`load_state_dict`). broadcast_parameters: copy rank 0's parameters
        and buffers to every rank at construction (as DDP does). verify_every: as
        in :class:`CABSSGD` (each rank verifies its own fast path; a rank that
        falls back to the generic path still contributes exact sums).
    The controller's ``bs_min`` must be >= the world size, so that every shard
    holds an example; ``multiple_of=world_size`` makes the shards even.
    ``micro_batches`` (BatchNorm in training mode) is not available here.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        controller: CABSController,
        *,
        process_group: Any = None,
        check_every: int = 10,
        broadcast_parameters: bool = True,
        method: Method = "auto",
        chunk_size: int | None = None,
        weight_decay: float = 0.0,
        verify_every: int | None = VERIFY_EVERY,
    ) -> None:
        world_size, rank = _group_info(process_group)
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        super().__init__(model, loss_fn, controller, method=method, chunk_size=chunk_size, weight_decay=weight_decay,
                         verify_every=verify_every)
        if not isinstance(check_every, int) or isinstance(check_every, bool) or check_every < 0:
            raise ValueError(f"check_every must be an integer >= 0, got {check_every!r}")
        if controller.bs_min < world_size:
            raise ValueError(
                f"bs_min ({controller.bs_min}) must be >= the world size ({world_size}), so that every rank's "
                f"shard holds at least one example"
            )
        self.group, self.world_size, self.rank, self.check_every = process_group, world_size, rank, check_every
        self._config_digest = config_digest(controller)
        if broadcast_parameters:
            self.broadcast_parameters()
        self.check_sync()

    @property
    def device(self) -> torch.device:
        return self.stats_fn.params[0].device

    @torch.no_grad()
    def broadcast_parameters(self, src: int = 0) -> None:
        """Copy rank ``src``'s parameters and buffers to every rank (collective)."""
        src_global = dist.get_global_rank(self.group, src) if self.group is not None else src
        for t in [*self.model.parameters(), *self.model.buffers()]:
            dist.broadcast(t.data, src=src_global, group=self.group)

    def batch_sampler(self, num_examples: int, *, seed: int = 0, max_epochs: float | None = None,
                      max_batches: int | None = None, world_size: int | None = None,
                      rank: int | None = None) -> CABSBatchSampler:
        """This rank's :class:`CABSBatchSampler`: the global batch of the decided
        size from the core's sampler, then this rank's shard (:func:`cabs_core.shard`)."""
        return super().batch_sampler(
            num_examples, seed=seed, max_epochs=max_epochs, max_batches=max_batches,
            world_size=self.world_size if world_size is None else world_size,
            rank=self.rank if rank is None else rank,
        )

    def step(self, inputs: Any, targets: Any = None, weights: Tensor | None = None) -> int:
        """One step on this rank's shard with the global statistics; returns
        the next global batch size (the same on every rank). Collective."""
        stats = all_reduce_stats(self.stats_fn(inputs, targets, weights), self.group)
        state, info = self.controller.update(self.state, stats)
        self.state, self.last_info, self.last_stats = state, info, stats
        if info.reason != "nonfinite":
            self.apply(stats)
        if self.check_every and state.step % self.check_every == 0:
            self.check_sync()
        return info.batch_size

    def sync_values(self) -> dict[str, int]:
        """What the ranks compare: the controller state's digest, the
        configuration's digest and the sampler's position (-1 without one)."""
        return {
            "controller state digest": self.state.digest(),
            "controller config digest": self._config_digest,
            "sampler examples_seen": -1 if self.sampler is None else int(self.sampler.state.examples_seen),
        }

    def check_sync(self) -> None:
        """Raise :class:`cabs_core.DesyncError` on every rank if the ranks disagree (collective)."""
        check_in_sync(self.sync_values(), self.state.step, self.group, self.device)

    def state_dict(self) -> dict[str, Any]:
        """As :meth:`CABSSGD.state_dict` (the same on every rank; save it on
        rank 0) plus the world size, for information: the state is global, so
        any world size can load it."""
        return {**super().state_dict(), "world_size": self.world_size}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Load a :class:`CABSSGD` or :class:`DistributedCABSSGD` state (any world
        size) on every rank, then check that the ranks agree (collective)."""
        super().load_state_dict(d)
        self.check_sync()
