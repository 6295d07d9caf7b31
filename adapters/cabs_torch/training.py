"""Training with CABS in PyTorch: an SGD step that also decides the next batch
size, and a ``batch_sampler`` for ``torch.utils.data.DataLoader`` that delivers
batches of the decided sizes.

One step (docs/spec.md sections 1-2): theta <- theta - lr * g_bar with g_bar the
current batch's mean gradient; the controller folds the batch's statistics into
its averages and decides m_{t+1} = c * lr * xi_avg / (L_avg - L* + eps). The
only device-to-host transfer of a step is the controller's (four scalars).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Sampler

from cabs_core import (
    BatchStats,
    CABSController,
    ControllerState,
    SamplerState,
    StepInfo,
    next_batch,
    shard,
)
from cabs_core.exactness import VERIFY_EVERY

from .groups import MicroBatchStats
from .stats import LossFn, Method, PerExampleStats

_STATE_FORMAT = "cabs-torch-state/1"


class CABSBatchSampler(Sampler[list[int]]):
    """Batches of example indices whose sizes follow the CABS decisions.

    Pass it as ``DataLoader(dataset, batch_sampler=sampler)``. Before each
    batch it asks ``batch_size()`` (e.g. ``lambda: opt.batch_size``) and draws
    that many indices from the core's sampler (:func:`cabs_core.next_batch`:
    a seeded permutation per epoch, batches crossing epoch boundaries), then
    keeps this rank's share (:func:`cabs_core.shard`) when ``world_size > 1``.

    Stops after ``max_epochs`` epochs (as a float, examples_seen / N) or
    ``max_batches`` batches if given; runs forever otherwise. Iterating again
    continues the stream where it stopped.

    With ``num_workers > 0`` the DataLoader draws ``num_workers *
    prefetch_factor`` batches ahead of the training loop, so the batch used at
    step t has the size decided at an earlier step, and the sampler's state is
    ahead of training. Use ``num_workers=0`` (in-memory data) for exact sizes
    and exact resumption; see ``docs/torch.md``.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: Callable[[], int],
        *,
        seed: int = 0,
        max_epochs: float | None = None,
        max_batches: int | None = None,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        self.state = SamplerState(num_examples, seed)
        self.batch_size = batch_size
        self.max_epochs, self.max_batches = max_epochs, max_batches
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size) = [0, {world_size}), got {rank}")
        self.world_size, self.rank = world_size, rank
        self.batches = 0

    def next_indices(self) -> np.ndarray:
        """The next batch of this rank's example indices (int64), advancing the state."""
        idx, self.state = next_batch(self.state, int(self.batch_size()))
        self.batches += 1
        return shard(idx, self.world_size, self.rank) if self.world_size > 1 else idx

    def __iter__(self) -> Iterator[list[int]]:
        while (self.max_epochs is None or self.state.epoch < self.max_epochs) and (
            self.max_batches is None or self.batches < self.max_batches
        ):
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
            raise ValueError(
                f"checkpoint is for {state.num_examples} examples, this sampler has {self.state.num_examples}"
            )
        self.state, self.batches = state, int(d["batches"])


class CABSSGD:
    """SGD with CABS batch sizes: theta <- theta - lr * g_bar, lr = ``controller.lr``.

    ``step(inputs, targets)`` computes the exact statistics of the batch
    (:class:`PerExampleStats`), updates the controller (one host transfer),
    applies the update with the batch's mean gradient and returns the next
    batch size. ``controller.nonfinite == "skip"`` steps with NaN/inf
    statistics change neither the parameters nor the controller; with the
    default ``"raise"`` they raise :class:`cabs_core.NonFiniteStatisticsError`
    before anything changes. A step skipped for its count (m < 2 in paper
    mode) still applies its mean gradient (m = 1), as docs/spec.md section 2 says.

    ``micro_batches=k`` estimates the variance from k micro-batches instead
    (:class:`MicroBatchStats`, for BatchNorm in training mode).
    ``weight_decay`` adds ``weight_decay * theta`` to the update (decoupled
    from the statistics; consider ``loss_floor`` then). ``compile=True`` runs
    the statistics compiled (see :class:`PerExampleStats`). ``verify_every``:
    the fast path re-verifies its per-example decomposition (the probe of
    :class:`PerExampleStats`) every ``verify_every`` steps (default
    :data:`cabs_core.exactness.VERIFY_EVERY`; None or 0: only on the first step
    of each input signature), so that a model whose control flow changes later
    is still caught.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        controller: CABSController,
        *,
        method: Method = "auto",
        chunk_size: int | None = None,
        micro_batches: int | None = None,
        weight_decay: float = 0.0,
        compile: bool = False,
        verify_every: int | None = VERIFY_EVERY,
    ) -> None:
        if not isinstance(controller, CABSController):
            raise TypeError(f"controller must be a cabs_core.CABSController, got {type(controller).__name__}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        self.model, self.controller, self.weight_decay = model, controller, weight_decay
        self.stats_fn: PerExampleStats | MicroBatchStats
        if micro_batches is None:
            self.stats_fn = PerExampleStats(model, loss_fn, method=method, chunk_size=chunk_size, compile=compile,
                                            verify_every=verify_every)
        else:
            self.stats_fn = MicroBatchStats(model, loss_fn, micro_batches, ddof=controller.ddof)
        self.state: ControllerState = controller.init()
        self.last_info: StepInfo | None = None
        self.last_stats: BatchStats | None = None
        self.sampler: CABSBatchSampler | None = None

    @property
    def batch_size(self) -> int:
        """The decided size of the next batch."""
        return self.state.batch_size

    @property
    def lr(self) -> float:
        return self.controller.lr

    def batch_sampler(self, num_examples: int, *, seed: int = 0, max_epochs: float | None = None,
                      max_batches: int | None = None, world_size: int = 1, rank: int = 0) -> CABSBatchSampler:
        """A :class:`CABSBatchSampler` following this optimizer's decisions; its
        state is part of :meth:`state_dict`."""
        self.sampler = CABSBatchSampler(num_examples, lambda: self.batch_size, seed=seed, max_epochs=max_epochs,
                                        max_batches=max_batches, world_size=world_size, rank=rank)
        return self.sampler

    def step(self, inputs: Any, targets: Any = None, weights: Tensor | None = None) -> int:
        """One SGD step on this batch; returns the next batch size."""
        stats = self.stats_fn(inputs, targets, weights)
        state, info = self.controller.update(self.state, stats)  # the step's host transfer
        self.state, self.last_info, self.last_stats = state, info, stats
        if info.reason != "nonfinite":
            self.apply(stats)
        return info.batch_size

    @torch.no_grad()
    def apply(self, stats: BatchStats) -> None:
        """theta <- theta - lr * (grad_sum / count) (+ weight decay); no host transfer."""
        params = self.stats_fn.params
        scale = -self.controller.lr / stats.count.clamp_min(1)
        for p, g in zip(params, stats.grad_sum):
            if self.weight_decay:
                p.mul_(1 - self.controller.lr * self.weight_decay)
            p.add_(g * scale.to(g.dtype))

    def state_dict(self) -> dict[str, Any]:
        """Controller state, step counters and the attached sampler's position
        (plain Python values; save it with ``torch.save`` next to the model's)."""
        d: dict[str, Any] = {"format": _STATE_FORMAT, "controller": self.state.to_dict()}
        if self.sampler is not None:
            d["sampler"] = self.sampler.state_dict()
        return d

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a cabs_torch state (format {d.get('format')!r}, expected {_STATE_FORMAT!r})")
        state = ControllerState.from_dict(d["controller"])
        if not self.controller.bs_min <= state.batch_size <= self.controller.bs_max:
            raise ValueError(
                f"checkpoint batch size {state.batch_size} lies outside this controller's bounds "
                f"[{self.controller.bs_min}, {self.controller.bs_max}]"
            )
        if "sampler" in d:
            if self.sampler is None:
                raise ValueError("the checkpoint has a sampler state: call batch_sampler(...) before loading")
            self.sampler.load_state_dict(d["sampler"])
        self.state = state
