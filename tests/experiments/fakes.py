"""A CABS run without a framework, for the driver's tests: a real controller stepped on
synthetic statistics, drawing the seed's stream like an adapter's trainer."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cabs_core import CABSController, SamplerState, ScalarStats, StepInfo, next_batch


class FakeCABS:
    """``take(indices) -> m`` hands the batch to the fake trainer; ``stats(m)`` gives its statistics."""

    def __init__(self, take: Callable[[np.ndarray], int], controller: CABSController, seed: int, num_examples: int,
                 stats: Callable[[int], ScalarStats]) -> None:
        self.take, self.ctl, self.stats = take, controller, stats
        self.state, self.sampler = controller.init(), SamplerState(num_examples, seed)

    @property
    def batch_size(self) -> int:
        return self.state.batch_size

    @property
    def examples_seen(self) -> int:
        return self.sampler.examples_seen

    def step(self) -> StepInfo:
        idx, self.sampler = next_batch(self.sampler, self.state.batch_size)
        self.state, info = self.ctl.update(self.state, self.stats(self.take(idx)))
        return info
