"""What the single-process reference (the test process) and the ranks (worker.py)
share: the data, the model, the controller and the training loop. Loaded by file
path in both, so it needs no package."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cabs_core import CABSController

N_EXAMPLES, SEED, STEPS, RESUME_AT = 240, 3, 12, 5


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_EXAMPLES, 8, generator=g, dtype=torch.float64)
    w = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = (x @ w + 0.8 * torch.randn(N_EXAMPLES, 3, generator=g, dtype=torch.float64)).argmax(1)
    return x, y


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def controller() -> CABSController:
    # no multiple_of: odd global batches give uneven shards (the first rank holds one more);
    # c = 10 makes the decisions move within a few steps (about 20 -> 26 here)
    return CABSController(lr=0.5, bs_min=4, bs_max=96, bs_init=5, c=10.0)


def train(opt: Any, sampler: Any, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[dict[str, Any]]:
    """``steps`` steps of ``opt`` on ``sampler``'s batches; per step the batch's
    (local) size and the decision."""
    log = []
    for _ in range(steps):
        idx = torch.from_numpy(sampler.next_indices())
        decision = opt.step(x[idx], y[idx]).batch_size
        log.append({"local_batch": len(idx), "decision": decision, "digest": opt.state.digest()})
    return log


def flat_params(m: nn.Module) -> list[float]:
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()]).tolist()
