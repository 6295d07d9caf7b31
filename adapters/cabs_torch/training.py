"""Training with CABS in PyTorch: :class:`CABSTrainer` runs the core's step
(:class:`cabs_core.loop.CABSLoop`) through :class:`TorchBackend`, which supplies
only what torch must do: exact statistics (:class:`PerExampleStats`), the update
(plain SGD or any ``torch.optim.Optimizer`` fed the mean gradient) and the
model's arrays for checkpoints. :class:`CABSBatchSampler` feeds a ``DataLoader``
batches of the decided sizes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.data import Sampler

from cabs_core import BatchStats, CABSController, ControllerState, SamplerState, StepInfo, combine, reduce_stats
from cabs_core.exactness import VERIFY_EVERY
from cabs_core.loop import CABSLoop, MicroBatch, check_arrays, check_learning_rate
from cabs_core.sampler import next_batch, shard

from .groups import MicroBatchStats
from .stats import Method, PerExampleStats
from .sums import LossFn


class CABSBatchSampler(Sampler[list[int]]):
    """A ``DataLoader`` ``batch_sampler``: ``batch_size()`` indices per batch from the
    core's sampler (:func:`cabs_core.next_batch`), this rank's :func:`cabs_core.shard`;
    stops after ``max_epochs`` epochs or ``max_batches`` batches if given. Use
    ``num_workers=0`` (workers draw ahead of the decisions)."""

    def __init__(self, num_examples: int, batch_size: Callable[[], int], *, seed: int = 0,
                 max_epochs: float | None = None, max_batches: int | None = None, world_size: int = 1,
                 rank: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size) = [0, {world_size}), got {rank}")
        self.state, self.batch_size, self.batches = SamplerState(num_examples, seed), batch_size, 0
        self.max_epochs, self.max_batches, self.world_size, self.rank = max_epochs, max_batches, world_size, rank

    def next_indices(self) -> np.ndarray:
        """The next batch of this rank's example indices (int64), advancing the state."""
        idx, self.state = next_batch(self.state, int(self.batch_size()))
        self.batches += 1
        return shard(idx, self.world_size, self.rank)

    def __iter__(self) -> Iterator[list[int]]:
        while (self.max_epochs is None or self.state.epoch < self.max_epochs) and (
                self.max_batches is None or self.batches < self.max_batches):
            yield self.next_indices().tolist()

    def __len__(self) -> int:
        if self.max_batches is None:
            raise TypeError("a CABSBatchSampler without max_batches has no length (batch sizes are decided online)")
        return max(0, self.max_batches - self.batches)

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.state.to_dict(), "batches": self.batches}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        state = SamplerState.from_dict(d["sampler"])
        if state.num_examples != self.state.num_examples:
            raise ValueError(f"checkpoint is for {state.num_examples} examples, this sampler has "
                             f"{self.state.num_examples}")
        self.state, self.batches = state, int(d["batches"])


def _one_lr(optimizer: torch.optim.Optimizer) -> float:
    rates = {float(g["lr"]) for g in optimizer.param_groups}
    if len(rates) != 1:
        raise ValueError(f"every parameter group of the optimizer must have the same lr (CABS couples the batch "
                         f"size to one rate), got {sorted(rates)}")
    return rates.pop()


class TorchBackend:
    """:class:`cabs_core.loop.Backend` for an eager ``nn.Module`` (updated in place); a
    batch is ``(inputs, targets, mask or None)``. With ``world_size > 1`` the sums and
    digests travel over the ``torch.distributed`` ``group``: ``grad_sum`` as one flat
    bucket per dtype, count, loss sum and S in one float64 all-reduce."""

    shards, pads = 1, False

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

    def combine(self, a: BatchStats, b: BatchStats) -> BatchStats:
        return combine(a, b)

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

    def scalars(self, stats: BatchStats) -> Any:
        return reduce_stats(stats)

    def learning_rate(self, model: nn.Module) -> float | None:
        return None if self.optimizer is None else _one_lr(self.optimizer)

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
            return np.asarray(words)[None]
        mine = torch.from_numpy(np.asarray(words, np.int32)).to(self.stats_fn.params[0].device)
        table = [torch.empty_like(mine) for _ in range(self.processes)]
        dist.all_gather(table, mine, group=self.group)
        return torch.stack(table).cpu().numpy()


class CABSTrainer:
    """CABS training of ``model`` (docs/torch.md, "Training"): :meth:`step` runs the
    core's step (:class:`cabs_core.loop.CABSLoop`) through :class:`TorchBackend`:
    exact statistics, the controller's decision, and (unless they were non-finite)
    the update with the mean gradient, plain SGD at ``controller.lr`` or
    ``optimizer.step()`` (whose lr, after any scheduler, is the coupled rate).

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
        self.model, self.optimizer, self.seed, self.sampler, self.last_info = model, optimizer, seed, None, None
        self.backend = TorchBackend(self.stats_fn, optimizer, self._group, self._processes, self._rank)
        device = next(model.parameters()).device
        self.data = None if data is None else (*tree_map(
            lambda a: torch.as_tensor(a, device=device) if isinstance(a, np.ndarray) else a, tuple(data)), None)
        self.buckets, self.max_micro_batch, self.verify_every = buckets, max_micro_batch, verify_every
        self._make_loop(controller, None if data is None else self.backend.num_examples(self.data), seed)
        if optimizer is not None:
            check_learning_rate(controller, _one_lr(optimizer))
            owned = {id(p) for p in model.parameters()}
            if any(id(p) not in owned for g in optimizer.param_groups for p in g["params"]):
                raise ValueError("the optimizer holds parameters that are not the model's")

    def _make_loop(self, controller: CABSController, num_examples: int | None, seed: int) -> None:
        self.loop = CABSLoop(self.backend, controller, num_examples=num_examples, seed=seed, buckets=self.buckets,
                             max_micro_batch=self.max_micro_batch, check_every=self._check_every,
                             verify_every=self.verify_every)
        self.controller, self.run = controller, self.loop.init()

    @property
    def state(self) -> ControllerState:
        """The controller's state."""
        return self.run.controller

    @property
    def batch_size(self) -> int:
        """The decided size of the next (global) batch."""
        return self.run.controller.batch_size

    @property
    def last_stats(self) -> BatchStats | None:
        """The (all-reduced) statistics of the last step."""
        return self.backend.last_stats

    def batch_sampler(self, num_examples: int, *, seed: int | None = None, max_epochs: float | None = None,
                      max_batches: int | None = None) -> CABSBatchSampler:
        """A :class:`CABSBatchSampler` of this process's share of the decided batches
        (seed: the trainer's by default); its position is part of checkpoints and digests."""
        if self.data is not None:
            raise ValueError("this trainer draws from data=...: call step() without a batch")
        seed = self.seed if seed is None else seed
        self._make_loop(self.controller, num_examples, seed)
        self.sampler = CABSBatchSampler(num_examples, lambda: self.batch_size, seed=seed, max_epochs=max_epochs,
                                        max_batches=max_batches, world_size=self._processes, rank=self._rank)
        return self.sampler

    def _sync(self) -> None:
        if self.sampler is not None:
            self.run = self.run._replace(sampler=self.sampler.state)

    def step(self, inputs: Any = None, targets: Any = None, mask: Tensor | None = None) -> StepInfo:
        """One CABS step on this process's share of the batch, or on the decided batch
        drawn from ``data``; returns the controller's :class:`cabs_core.StepInfo`."""
        if inputs is None and self.data is None:
            raise ValueError("pass a batch to step(), or give the trainer data=(inputs, targets)")
        self._sync()
        batch = None if inputs is None else (inputs, targets, mask)
        self.run, _, self.last_info = self.loop.step(self.run, self.model, self.data, batch=batch)
        return self.last_info

    def _loaded(self, run: Any, extra: dict[str, Any]) -> None:
        self.run = run
        if self.sampler is not None:
            self.sampler.state, self.sampler.batches = run.sampler, int(extra.get("batches", 0))

    def _extra(self) -> dict[str, Any]:
        return {} if self.sampler is None else {"batches": self.sampler.batches}

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint envelope (controller, sampler; plain values): save it next to
        ``model.state_dict()`` (and the optimizer's) with ``torch.save``."""
        self._sync()
        return self.loop.state_dict(self.run, **self._extra())

    def load_state_dict(self, d: dict[str, Any], *, allow: Sequence[str] = ()) -> None:
        """Resume from :meth:`state_dict`; another configuration raises
        :class:`cabs_core.CheckpointMismatchError` unless its keys are in ``allow``."""
        if isinstance(d, dict) and d.get("sampler") is not None and self.run.sampler is None:
            raise ValueError("the checkpoint has a sampler state: call batch_sampler(...) before loading")
        self._loaded(self.loop.load_state_dict(d, allow=allow), d)

    def save(self, path: str | os.PathLike[str]) -> None:
        """One ``.npz`` file, written atomically (:meth:`CABSLoop.save`): the envelope,
        the model's parameters and buffers, then the optimizer's tensors (its state dict,
        each tensor replaced by its array's number, is an entry of the envelope)."""
        arrays, opt = list(self.model.state_dict().values()), None
        if self.optimizer is not None:
            sd, n = self.optimizer.state_dict(), len(arrays)
            opt = {"param_groups": sd["param_groups"], "state": {i: {} for i in sd["state"]}}
            for i, entries in sd["state"].items():
                for key, v in entries.items():
                    opt["state"][i][key] = {"array": len(arrays) - n} if isinstance(v, Tensor) else v
                    arrays += [v] if isinstance(v, Tensor) else []
        arrays = [t.detach().cpu().float() if t.dtype == torch.bfloat16 else t.detach().cpu() for t in arrays]
        self._sync()
        self.loop.save(path, self.run, arrays, optimizer=opt, **self._extra())

    def restore(self, path: str | os.PathLike[str], *, allow: Sequence[str] = ()) -> None:
        """Load a :meth:`save` file into this trainer, its model and optimizer (all checked first)."""
        run, arrays, extra = self.loop.load(path, allow=allow)
        tensors, opt = list(self.model.state_dict().values()), extra.get("optimizer")
        if (opt is None) != (self.optimizer is None):
            raise ValueError(f"{os.fspath(path)}: the checkpoint holds {'no' if opt is None else 'an'} optimizer "
                             f"state, this trainer has {'no' if self.optimizer is None else 'an'} optimizer")
        check_arrays(path, arrays[: len(tensors)], tensors)
        with torch.no_grad():
            for t, a in zip(tensors, arrays):
                t.copy_(torch.from_numpy(a))
        if opt is not None:
            state = {int(i): {k: torch.from_numpy(arrays[len(tensors) + v["array"]]) if isinstance(v, dict) else v
                              for k, v in e.items()} for i, e in opt["state"].items()}
            self.optimizer.load_state_dict({"state": state, "param_groups": opt["param_groups"]})
        self._loaded(run, extra)
