"""Training with CABS in PyTorch: :class:`CABSTrainer` runs the core's step
(:class:`cabs_core.loop.CABSLoop`) through :class:`TorchBackend`, which supplies
only what torch must do: exact statistics (:class:`PerExampleStats`), the update
(plain SGD or any ``torch.optim.Optimizer`` fed the mean gradient) and the
model's arrays for checkpoints. :class:`CABSBatchSampler` feeds a ``DataLoader``
batches of the decided sizes.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.data import Sampler

from cabs_core import BatchStats, CABSController, ControllerState, SamplerState, StepInfo, next_batch, reduce_stats
from cabs_core import combine as _combine
from cabs_core.exactness import VERIFY_EVERY
from cabs_core.loop import CABSLoop, MicroBatch, check_arrays, check_learning_rate

from .groups import MicroBatchStats
from .stats import LossFn, Method, PerExampleStats


class CABSBatchSampler(Sampler[list[int]]):
    """A ``batch_sampler`` for ``DataLoader`` drawing ``batch_size()`` indices per
    batch from the core's sampler (:func:`cabs_core.next_batch`), this rank's
    contiguous share when ``world_size > 1``; stops after ``max_epochs`` epochs or
    ``max_batches`` batches if given. Use ``num_workers=0``: a DataLoader with
    workers draws batches ahead, before the decision for them is made."""

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
        n, w, r = len(idx), self.world_size, self.rank  # cabs_core.shard: contiguous, the first ranks one more
        return idx[r * (n // w) + min(r, n % w) : (r + 1) * (n // w) + min(r + 1, n % w)]

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
    """:class:`cabs_core.loop.Backend` for an eager ``nn.Module`` on one process.
    A batch is ``(inputs, targets, mask or None)``; the model is updated in place."""

    shards, processes, process_index, pads = 1, 1, 0, False

    def __init__(self, stats_fn: PerExampleStats | MicroBatchStats, optimizer: torch.optim.Optimizer | None) -> None:
        self.stats_fn, self.optimizer = stats_fn, optimizer
        self.last_stats: BatchStats | None = None

    def take(self, source: Any, rows: np.ndarray) -> Any:
        n = self.num_examples(source)
        if len(rows) == n and (n == 0 or (rows[0] == 0 and (np.diff(rows) == 1).all())):
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
        return _combine(a, b)

    def all_reduce(self, stats: BatchStats) -> BatchStats:
        self.last_stats = stats
        return stats

    def scalars(self, stats: BatchStats) -> Any:
        return reduce_stats(stats)

    def learning_rate(self, model: nn.Module) -> float | None:
        return None if self.optimizer is None else _one_lr(self.optimizer)

    @torch.no_grad()
    def apply(self, model: nn.Module, stats: BatchStats, lr: float) -> nn.Module:
        count = stats.count.clamp_min(1)
        params = self.stats_fn.params
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
        return np.asarray(words)[None]


class CABSTrainer:
    """CABS training of ``model`` (docs/torch.md): each :meth:`step` computes the
    exact statistics of the batch, updates the controller (one host transfer)
    and, unless they were non-finite, updates the parameters with the batch's
    mean gradient: plain SGD at ``controller.lr`` (``optimizer=None``) or
    ``optimizer.step()`` with ``p.grad`` = the mean gradient (its lr, after any
    scheduler, is the rate the decision couples to; it must equal
    ``controller.lr`` at construction).

    data: ``(inputs, targets)`` tensors or arrays to draw the decided batches
    from (seeded by ``seed``); without it pass each batch to :meth:`step`, e.g.
    from a ``DataLoader`` with :meth:`batch_sampler`. max_micro_batch: at most
    this many examples per pass (statistics added; the same decisions).
    micro_batches=k: the group estimator (:class:`MicroBatchStats`, BatchNorm in
    training mode). method, chunk_size, compile, verify_every: of
    :class:`PerExampleStats`. buckets: unused by this eager backend.
    """

    _processes, _rank, _check_every = 1, 0, 0

    def __init__(self, model: nn.Module, loss_fn: LossFn, controller: CABSController, *, data: Any = None,
                 optimizer: torch.optim.Optimizer | None = None, method: Method = "auto",
                 chunk_size: int | None = None, buckets: Sequence[int] | None = None, seed: int = 0,
                 max_micro_batch: int | None = None, micro_batches: int | None = None, compile: bool = False,
                 verify_every: int | None = VERIFY_EVERY) -> None:
        if micro_batches is None:
            stats_fn: Any = PerExampleStats(model, loss_fn, method=method, chunk_size=chunk_size, compile=compile,
                                            verify_every=verify_every)
        elif max_micro_batch is not None:
            raise ValueError("micro_batches (the group estimator) and max_micro_batch cannot be combined")
        else:
            stats_fn = MicroBatchStats(model, loss_fn, micro_batches, ddof=getattr(controller, "ddof", 1))
        self.model, self.stats_fn, self.optimizer, self.seed = model, stats_fn, optimizer, seed
        self.backend = self._backend()
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
        self.sampler: CABSBatchSampler | None = None
        self.last_info: StepInfo | None = None

    def _backend(self) -> TorchBackend:
        return TorchBackend(self.stats_fn, self.optimizer)

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
        """A :class:`CABSBatchSampler` of this process's share of the decided batches;
        its position is part of the trainer's checkpoints and agreement checks."""
        if self.data is not None:
            raise ValueError("this trainer draws from data=...: call step() without a batch")
        seed = self.seed if seed is None else seed
        self._make_loop(self.controller, num_examples, seed)
        self.sampler = CABSBatchSampler(num_examples, lambda: self.batch_size, seed=seed, max_epochs=max_epochs,
                                        max_batches=max_batches, world_size=self._processes, rank=self._rank)
        return self.sampler

    def step(self, inputs: Any = None, targets: Any = None, mask: Tensor | None = None) -> StepInfo:
        """One CABS step on the given batch (this process's share), or on the decided
        batch drawn from ``data``; returns what the controller decided."""
        if inputs is None:
            if self.data is None:
                raise ValueError("pass a batch to step(), or give the trainer data=(inputs, targets)")
            self.run, _, info = self.loop.step(self.run, self.model, self.data)
        else:
            if self.sampler is not None:
                self.run = self.run._replace(sampler=self.sampler.state)
            self.run, _, info = self.loop.step(self.run, self.model, batch=(inputs, targets, mask))
        self.last_info = info
        return info

    def _extra(self) -> dict[str, Any]:
        return {} if self.sampler is None else {"batches": self.sampler.batches}

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint envelope (controller, sampler; plain values): save it next to
        ``model.state_dict()`` (and the optimizer's) with ``torch.save``."""
        return self.loop.state_dict(self.run, **self._extra())

    def load_state_dict(self, d: dict[str, Any], *, allow: Sequence[str] = ()) -> None:
        """Resume from :meth:`state_dict`; a different configuration raises
        :class:`cabs_core.CheckpointMismatchError` unless its keys are in ``allow``."""
        if isinstance(d, dict) and d.get("sampler") is not None and self.run.sampler is None:
            raise ValueError("the checkpoint has a sampler state: call batch_sampler(...) before loading")
        self.run = self.loop.load_state_dict(d, allow=allow)
        if self.sampler is not None:
            self.sampler.state, self.sampler.batches = self.run.sampler, int(d.get("batches", 0))

    def _arrays(self) -> tuple[list[Tensor], dict[str, Any] | None]:
        """Parameters and buffers, then the optimizer's tensors; the optimizer's
        state dict with each tensor replaced by ``{"array": k}`` (JSON)."""
        tensors = list(self.model.state_dict().values())
        if self.optimizer is None:
            return tensors, None
        sd, n = self.optimizer.state_dict(), len(tensors)
        state: dict[str, dict[str, Any]] = {}
        for i, entries in sd["state"].items():
            state[str(i)] = {}
            for key, v in entries.items():
                if isinstance(v, Tensor):
                    v, _ = {"array": len(tensors) - n}, tensors.append(v)
                state[str(i)][key] = v
        return tensors, {"state": state, "param_groups": sd["param_groups"]}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the envelope, the model's parameters and buffers and the optimizer's
        state to one ``.npz`` file, atomically (:meth:`CABSLoop.save`)."""
        tensors, opt = self._arrays()
        arrays = [t.detach().cpu().float() if t.dtype == torch.bfloat16 else t.detach().cpu() for t in tensors]
        self.loop.save(path, self.run, arrays, optimizer=opt, **self._extra())

    def restore(self, path: str | os.PathLike[str], *, allow: Sequence[str] = ()) -> None:
        """Load a :meth:`save` file into this trainer, its model and optimizer (everything
        is checked before anything changes)."""
        try:
            run, arrays, extra = self.loop.load(path, allow=allow)
        except (zipfile.BadZipFile, EOFError) as e:  # CABSLoop.load lets these through (torn or empty file)
            raise ValueError(f"{os.fspath(path)}: not a CABS checkpoint file ({e})") from e
        model = list(self.model.state_dict().values())
        saved = extra.get("optimizer")
        if (saved is None) != (self.optimizer is None):
            raise ValueError(f"{os.fspath(path)}: the checkpoint holds {'no' if saved is None else 'an'} optimizer "
                             f"state, this trainer has {'an' if self.optimizer is not None else 'no'} optimizer")
        check_arrays(path, arrays[: len(model)], model)
        if run.sampler is not None and self.data is None and self.sampler is None:
            raise ValueError("the checkpoint has a sampler state: call batch_sampler(...) before restoring")
        with torch.no_grad():
            for t, a in zip(model, arrays):
                t.copy_(torch.from_numpy(a))
        if saved is not None:
            def tensor(v: Any) -> Any:
                return torch.from_numpy(arrays[len(model) + v["array"]]) if isinstance(v, dict) else v
            state = {int(i): {k: tensor(v) for k, v in e.items()} for i, e in saved["state"].items()}
            self.optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
        self.run = run
        if self.sampler is not None:
            self.sampler.state, self.sampler.batches = run.sampler, int(extra.get("batches", 0))
