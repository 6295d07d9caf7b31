"""A reference :class:`cabs_core.loop.Backend` in NumPy: linear least squares with exact
per-example gradients, plain SGD or SGD with momentum, optional data parallelism
simulated with threads.

It is the smallest complete backend: what a port to a new framework implements
(docs/porting.md), and the oracle the adapters' trainers are compared with on
the same problem (same data, same initial weights, same seed: the same
decisions).

Model: per example i, l_i = (x_i . w - y_i)^2 / 2, g_i = (x_i . w - y_i) x_i.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from cabs_core import BatchStats, ScalarStats, batch_stats_from_per_example, combine, reduce_stats
from cabs_core.loop import MicroBatch


def problem(
    num_examples: int = 256, dim: int = 5, *, seed: int = 0
) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """Data ``(x, y)`` (float64) of a noisy linear model and the initial weights (zeros)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_examples, dim))
    y = x @ rng.normal(size=dim) + 0.5 * rng.normal(size=num_examples)
    return (x, y), np.zeros(dim)


class World:
    """Processes simulated by threads: sums and gathers meet at a barrier."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._barrier = threading.Barrier(processes)
        self._slots: list[Any] = [None] * processes

    def exchange(self, index: int, value: Any) -> list[Any]:
        """Every process's ``value``, in process order (collective)."""
        self._slots[index] = value
        self._barrier.wait()
        out = list(self._slots)
        self._barrier.wait()
        return out


class LinearBackend:
    """The reference backend. ``model`` is ``(w, velocity)``; ``momentum`` 0 is plain
    SGD (w <- w - lr g_bar); ``lr_schedule(step)`` makes the optimizer's rate move."""

    pads = True

    def __init__(
        self,
        *,
        shards: int = 1,
        world: World | None = None,
        process_index: int = 0,
        momentum: float = 0.0,
        lr_schedule: Callable[[int], float] | None = None,
    ) -> None:
        self.shards, self.world, self.process_index = shards, world, process_index
        self.processes = 1 if world is None else world.processes
        self.momentum, self.lr_schedule = momentum, lr_schedule
        self.updates = 0
        self.probes = 0

    def take(self, source: Any, rows: np.ndarray) -> Any:
        x, y = source
        return x[rows], y[rows]

    def num_examples(self, source: Any) -> int:
        return len(source[0])

    def statistics(self, model: Any, batch: Any, micro: MicroBatch, *, verify: bool) -> BatchStats:
        self.probes += int(verify)
        (x, y), (w, _) = batch, model
        if len(y) == 0:
            return BatchStats(np.float64(0), np.float64(0), (np.zeros_like(w),), np.float64(0))
        r = x @ w - y
        return batch_stats_from_per_example(0.5 * r**2, [r[:, None] * x], micro.mask.astype(np.float64))

    def combine(self, a: BatchStats, b: BatchStats) -> BatchStats:
        return combine(a, b)

    def all_reduce(self, stats: BatchStats) -> BatchStats:
        if self.world is None:
            return stats
        parts = self.world.exchange(self.process_index, stats)
        out = parts[0]
        for p in parts[1:]:
            out = combine(out, p)
        return out

    def scalars(self, model: Any, stats: BatchStats) -> tuple[ScalarStats, float | None]:
        return reduce_stats(stats), None if self.lr_schedule is None else self.lr_schedule(self.updates)

    def apply(self, model: Any, stats: BatchStats, lr: float) -> Any:
        w, v = model
        g = stats.grad_sum[0] / max(float(stats.count), 1.0)
        v = self.momentum * v + g
        self.updates += 1
        return w - lr * v, v

    def gather(self, words: np.ndarray) -> np.ndarray:
        if self.world is None:
            return np.asarray(words)[None]
        return np.stack(self.world.exchange(self.process_index, np.asarray(words)))
