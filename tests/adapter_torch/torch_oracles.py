"""Shared oracles for the torch adapter tests: a brute-force loop of
single-example backward passes (float64), and the paper's CNN. Imported by the
test files (``from torch_oracles import ...``) and by conftest.py's fixtures."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

# tiny models: a second thread only spins and slows a busy machine (test_stats.py under load:
# 259 s with one thread, 353 s with two)
torch.set_num_threads(1)


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def paper_cnn() -> nn.Module:
    """The paper's MNIST CNN: conv5x5x32, maxpool 2, conv5x5x64, maxpool 2, dense 1024, dense 10."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(7 * 7 * 64, 1024), nn.ReLU(), nn.Linear(1024, 10),
    )


def brute_force(model: nn.Module, loss_fn: Callable, x: Any, y: Any) -> dict[str, Any]:
    """count, loss_sum, grad_sum, S and per-example gradients from m separate
    single-example forward/backward passes."""
    params = [p for p in model.parameters() if p.requires_grad]
    xs = x if isinstance(x, tuple) else (x,)
    m = xs[0].shape[0]
    per_example, losses = [], []
    for i in range(m):
        loss = loss_fn(model(*(t[i : i + 1] for t in xs)), y[i : i + 1])
        assert loss.shape == (1,)
        grads = torch.autograd.grad(loss[0], params, allow_unused=True)
        per_example.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
        losses.append(loss.detach()[0])
    grad_sum = [sum(g[k] for g in per_example) for k in range(len(params))]
    sq = sum(sum(gk.double().pow(2).sum() for gk in g) for g in per_example)
    return {
        "count": m,
        "loss_sum": float(sum(losses)),
        "grad_sum": grad_sum,
        "sq_norm_sum": float(sq),
        "per_example": [torch.stack([g[k] for g in per_example]) for k in range(len(params))],
    }


def assert_stats_match(stats: Any, ref: dict[str, Any], rtol: float = 1e-10) -> None:
    assert float(stats.count) == ref["count"]
    assert float(stats.loss_sum) == pytest.approx(ref["loss_sum"], rel=rtol, abs=1e-12)
    assert float(stats.sq_norm_sum) == pytest.approx(ref["sq_norm_sum"], rel=rtol)
    assert len(stats.grad_sum) == len(ref["grad_sum"])
    for g, r in zip(stats.grad_sum, ref["grad_sum"]):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=rtol, atol=1e-12)
