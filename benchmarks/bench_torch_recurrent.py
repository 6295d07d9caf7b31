"""Quick timing of CABS's statistics on a small recurrent classifier (issue 20, item 3).

Embedding 1000x64 -> nn.LSTM(64, 128) or nn.GRU(64, 128), batch_first -> last step ->
Linear(128, 10), sequence 32, float32, random data, batch 16 and 64. Prints the time
of a plain step (``loss.mean().backward()``) and the ratios of a verified fast step
(``PerExampleStats(method="fast")`` after its probe, no re-probe) and of the generic
path to it. Methods take turns ``rounds`` times (3 steps of plain and fast, 1 of
generic per round); the minimum is reported. Not a test.

    python benchmarks/bench_torch_recurrent.py [threads] [lstm|gru] [rounds]
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from cabs_torch import PerExampleStats
from torch import nn


def main() -> None:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    cell = {"lstm": nn.LSTM, "gru": nn.GRU}[sys.argv[2] if len(sys.argv) > 2 else "lstm"]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    torch.set_num_threads(threads)

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.rnn, self.head = nn.Embedding(1000, 64), cell(64, 128, batch_first=True), nn.Linear(128, 10)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            out, _ = self.rnn(self.emb(tokens))
            return self.head(out[:, -1])

    def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y, reduction="none")

    torch.manual_seed(0)
    model = Classifier()
    for batch in (16, 64):
        x, y = torch.randint(0, 1000, (batch, 32)), torch.randint(0, 10, (batch,))
        best = time_methods(model, ce, x, y, rounds)
        print(f"{cell.__name__} b{batch}: plain {best['plain'] * 1e3:.1f} ms, "
              f"fast {best['fast'] / best['plain']:.2f}x, generic {best['generic'] / best['plain']:.2f}x", flush=True)


def time_methods(model: nn.Module, loss_fn: Any, x: torch.Tensor, y: torch.Tensor, rounds: int) -> dict[str, float]:
    """The minimum time in seconds of a plain, a verified fast and a generic step, taking turns."""
    def plain() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    fast = PerExampleStats(model, loss_fn, method="fast", verify_every=None)
    generic = PerExampleStats(model, loss_fn, method="generic")
    fast(x, y)  # the probe
    generic(x, y)
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, step, reps in (("plain", plain, 3), ("fast", lambda: fast(x, y), 3),
                                 ("generic", lambda: generic(x, y), 1)):
            for _ in range(reps):
                start = time.perf_counter()
                step()
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    return best


if __name__ == "__main__":
    main()
