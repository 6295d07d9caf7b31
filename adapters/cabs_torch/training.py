"""Training with CABS in PyTorch: :class:`CABSTrainer`, the core's trainer (:class:`cabs_core.trainer.Trainer`)
on :class:`TorchBackend`, torch's part of the step, and :class:`CABSBatchSampler` for a ``DataLoader``."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.data import Sampler

from cabs_core import BatchStats, CABSController, ScalarStats, StepInfo, reduce_stats
from cabs_core.exactness import VERIFY_EVERY
from cabs_core.loop import MicroBatch, check_arrays, check_learning_rate, join_arrays, one_rate, split_arrays
from cabs_core.trainer import BackendDefaults, DecisionSampler, Trainer

from .groups import MicroBatchStats
from .stats import Method, PerExampleStats
from .sums import LossFn


class CABSBatchSampler(DecisionSampler, Sampler[list[int]]):
    """A ``DataLoader`` ``batch_sampler`` (:class:`cabs_core.trainer.DecisionSampler`): the
    decided batches as index lists. Use ``num_workers=0`` (workers draw ahead of the decisions)."""

    def __iter__(self) -> Iterator[list[int]]:
        return (idx.tolist() for idx in super().__iter__())


class TorchBackend(BackendDefaults):
    """:class:`cabs_core.loop.Backend` for an eager ``nn.Module`` (updated in place); a
    batch is ``(inputs, targets, mask or None)``. With ``world_size > 1`` the sums and
    digests travel over the ``torch.distributed`` ``group``: ``grad_sum`` as one flat
    bucket per dtype, count, loss sum and S in one float64 all-reduce."""

    def __init__(self, stats_fn: PerExampleStats | MicroBatchStats, optimizer: torch.optim.Optimizer | None,
                 group: Any = None, world_size: int = 1, rank: int = 0) -> None:
        self.stats_fn, self.optimizer, self.group = stats_fn, optimizer, group
        self.processes, self.process_index, self.last_stats = world_size, rank, None

    def take(self, source: Any, rows: np.ndarray) -> Any:
        if len(rows) == self.num_examples(source) and (rows == np.arange(len(rows))).all():
            return source  # the whole batch in order: no copy
        idx = torch.from_numpy(rows)
        return tree_map(lambda t: t[idx.to(t.device)] if isinstance(t, Tensor) and t.dim() else t, source)

    def num_examples(self, source: Any) -> int:
        return next(t.shape[0] for t in tree_flatten(source[0])[0] if isinstance(t, Tensor) and t.dim())

    def statistics(self, model: nn.Module, batch: Any, micro: MicroBatch, *, verify: bool) -> BatchStats:
        inputs, targets, mask = batch
        if not micro.mask.all():
            keep = torch.from_numpy(micro.mask).to(self.stats_fn.params[0].device)
            mask = keep if mask is None else (mask != 0) & keep
        return self.stats_fn(inputs, targets, mask, verify=verify)

    def all_reduce(self, stats: BatchStats) -> BatchStats:
        if self.processes > 1:
            grads, by_dtype = list(stats.grad_sum), {}
            for k, g in enumerate(grads):
                by_dtype.setdefault(g.dtype, []).append(k)
            for ks in by_dtype.values():
                flat = torch.cat([grads[k].detach().reshape(-1) for k in ks])
                dist.all_reduce(flat, group=self.group)
                for k, piece in zip(ks, torch.split(flat, [grads[k].numel() for k in ks])):
                    grads[k] = piece.view_as(grads[k])
            scalars = torch.stack([stats.count, stats.loss_sum, stats.sq_norm_sum]).to(torch.float64)
            dist.all_reduce(scalars, group=self.group)
            count, loss_sum, sq = scalars.to(stats.count.dtype).unbind()
            stats = BatchStats(count, loss_sum, tuple(grads), sq)
        self.last_stats = stats
        return stats

    def scalars(self, model: nn.Module, stats: BatchStats) -> tuple[ScalarStats, float | None]:
        rate = None if self.optimizer is None else one_rate(g["lr"] for g in self.optimizer.param_groups)
        return reduce_stats(stats), rate

    @torch.no_grad()
    def apply(self, model: nn.Module, stats: BatchStats, lr: float) -> nn.Module:
        params, count = self.stats_fn.params, stats.count.clamp_min(1)
        for p, g in zip(params, stats.grad_sum):
            if self.optimizer is None:
                p.add_(g / count.to(g.dtype), alpha=-lr)
            else:
                p.grad = g / count.to(g.dtype)
        if self.optimizer is not None:
            self.optimizer.step()
            for p in params:
                p.grad = None
        return model

    def gather(self, words: np.ndarray) -> np.ndarray:
        if self.processes == 1:
            return super().gather(words)
        mine = torch.from_numpy(np.asarray(words, np.int32)).to(self.stats_fn.params[0].device)
        table = [torch.empty_like(mine) for _ in range(self.processes)]
        dist.all_gather(table, mine, group=self.group)
        return torch.stack(table).cpu().numpy()


class CABSTrainer(Trainer):
    """CABS training of ``model`` (docs/torch.md, "Training"): :meth:`step` runs the
    core's step (:class:`cabs_core.loop.CABSLoop`) through :class:`TorchBackend`:
    exact statistics, the controller's decision, and (unless they were non-finite)
    the update with the mean gradient, plain SGD at ``controller.lr`` or
    ``optimizer.step()`` (whose lr, after any scheduler, is the coupled rate).
    Checkpoints, properties and ``run``: :class:`cabs_core.trainer.Trainer`.

    data: ``(inputs, targets)`` to draw the decided batches from (seeded by
    ``seed``); else pass batches to :meth:`step` (e.g. a ``DataLoader`` with
    :meth:`batch_sampler`). max_micro_batch: at most this many examples per pass
    (the same decisions). micro_batches=k: :class:`MicroBatchStats`. method,
    chunk_size, compile, verify_every: :class:`PerExampleStats`'s. buckets:
    unused (eager).
    """

    _group, _processes, _rank, _check_every = None, 1, 0, 0

    def __init__(self, model: nn.Module, loss_fn: LossFn, controller: CABSController, *, data: Any = None,
                 optimizer: torch.optim.Optimizer | None = None, method: Method = "auto",
                 chunk_size: int | None = None, buckets: Sequence[int] | None = None, seed: int = 0,
                 max_micro_batch: int | None = None, micro_batches: int | None = None, compile: bool = False,
                 verify_every: int | None = VERIFY_EVERY) -> None:
        if micro_batches is not None and max_micro_batch is not None:
            raise ValueError("micro_batches (the group estimator) and max_micro_batch cannot be combined")
        self.stats_fn = PerExampleStats(model, loss_fn, method=method, chunk_size=chunk_size, compile=compile,
                                        verify_every=verify_every) if micro_batches is None else \
            MicroBatchStats(model, loss_fn, micro_batches, ddof=getattr(controller, "ddof", 1))
        self.model, self.optimizer, self.last_info = model, optimizer, None
        backend = TorchBackend(self.stats_fn, optimizer, self._group, self._processes, self._rank)
        device = next(model.parameters()).device
        self.data = None if data is None else (*tree_map(
            lambda a: torch.as_tensor(a, device=device) if isinstance(a, np.ndarray) else a, tuple(data)), None)
        self._start(backend, controller, None if data is None else backend.num_examples(self.data), seed,
                    buckets=buckets, max_micro_batch=max_micro_batch, check_every=self._check_every,
                    verify_every=verify_every)
        if optimizer is not None:
            check_learning_rate(controller, one_rate(g["lr"] for g in optimizer.param_groups))
            owned = {id(p) for p in model.parameters()}
            if any(id(p) not in owned for g in optimizer.param_groups for p in g["params"]):
                raise ValueError("the optimizer holds parameters that are not the model's")

    last_stats = property(lambda self: self.backend.last_stats, doc="The (all-reduced) statistics of the last step.")

    def batch_sampler(self, num_examples: int, *, seed: int | None = None, max_epochs: float | None = None,
                      max_batches: int | None = None) -> CABSBatchSampler:
        """A :class:`CABSBatchSampler` of this process's share of the decided batches
        (seed: the trainer's by default); its position is part of checkpoints and digests."""
        return self._feed(CABSBatchSampler(num_examples, lambda: self.batch_size, max_epochs=max_epochs,
                                           seed=self.seed if seed is None else seed, max_batches=max_batches,
                                           world_size=self._processes, rank=self._rank))

    def step(self, inputs: Any = None, targets: Any = None, mask: Tensor | None = None) -> StepInfo:
        """One CABS step on this process's share of the batch, or on the decided batch
        drawn from ``data``; returns the controller's :class:`cabs_core.StepInfo`."""
        self.last_info = self._step(None if inputs is None else (inputs, targets, mask))
        return self.last_info

    def _arrays(self) -> tuple[list[Any], dict[str, Any]]:
        """The model's parameters and buffers, then the optimizer's tensors (its state dict, each tensor
        replaced by its number, :func:`cabs_core.loop.split_arrays`, is an entry of the envelope)."""
        opt, extra = split_arrays(None if self.optimizer is None else self.optimizer.state_dict(), torch.is_tensor)
        arrays = [*self.model.state_dict().values(), *extra]
        return [t.detach().cpu().float() if t.dtype == torch.bfloat16 else t.detach().cpu() for t in arrays], \
            {"optimizer": opt}

    def _load_arrays(self, path: str | os.PathLike[str], arrays: list[np.ndarray], extra: dict[str, Any]) -> None:
        tensors, opt = list(self.model.state_dict().values()), extra.get("optimizer")
        if (opt is None) != (self.optimizer is None):
            raise ValueError(f"{os.fspath(path)}: the checkpoint holds {'no' if opt is None else 'an'} optimizer "
                             f"state, this trainer has {'no' if self.optimizer is None else 'an'} optimizer")
        check_arrays(path, arrays[: len(tensors)], tensors)
        with torch.no_grad():
            for t, a in zip(tensors, arrays):
                t.copy_(torch.from_numpy(a))
        if opt is not None:
            opt = join_arrays(opt, [torch.from_numpy(a) for a in arrays[len(tensors):]])
            self.optimizer.load_state_dict({**opt, "state": {int(i): e for i, e in opt["state"].items()}})
