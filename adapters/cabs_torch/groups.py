"""The group (micro-batch) estimator of tr(Sigma) for models whose examples are
coupled, e.g. by BatchNorm in training mode (docs/spec.md section 6, beyond the paper).

The batch is split into k micro-batches of sizes b_j, each run through its own
forward and backward pass (BatchNorm then normalises within the micro-batch,
as "ghost batch norm"). From the k micro-batch mean gradients the core's
:func:`cabs_core.group_variance` estimates tr(Sigma) without per-example
gradients: sum_j b_j ||g_bar_j - g_bar||^2 / (k - 1).

The controller consumes the within-batch form xi = (S - ||sum g||^2 / m) / (m - ddof);
:class:`MicroBatchStats` hands it the S for which that xi is the group estimate:
S = ||sum g||^2 / m + xi_group (m - ddof).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cabs_core import BatchStats, group_variance

from .stats import _as_tuple, _take, trainable_parameters
from .sums import LossFn, _batch_size, _check_losses, _stat_dtype


class MicroBatchStats:
    """Statistics from ``num_groups`` micro-batches (k >= 2), one forward and
    backward pass each; ``ddof`` must be the controller's (``controller.ddof``).

    Costs one pass per micro-batch and keeps k mean gradients. Masks (padding)
    are not supported: every example of the batch counts.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, num_groups: int, *, ddof: int = 1) -> None:
        if not isinstance(num_groups, int) or num_groups < 2:
            raise ValueError(f"num_groups must be an integer >= 2, got {num_groups!r}")
        if ddof not in (0, 1):
            raise ValueError(f"ddof must be 0 or 1, got {ddof!r}")
        self.model, self.loss_fn, self.num_groups, self.ddof = model, loss_fn, num_groups, ddof

    @property
    def params(self) -> list[nn.Parameter]:
        return trainable_parameters(self.model)

    def __call__(self, inputs: Any, targets: Any = None, mask: Tensor | None = None, *,
                 verify: bool | None = None) -> BatchStats:
        """The batch's statistics; ``verify`` is accepted for the trainer and unused (no fast path)."""
        if mask is not None:
            raise ValueError("MicroBatchStats does not take a mask: pass only real examples")
        params = self.params
        inputs = _as_tuple(inputs)
        m = _batch_size(inputs)
        k = self.num_groups
        if m < k:
            raise ValueError(f"a batch of {m} examples cannot be split into {k} micro-batches")
        bounds = [(j * m // k, (j + 1) * m // k) for j in range(k)]
        dtype = _stat_dtype(params[0].device)
        means: list[list[Tensor]] = [[] for _ in params]
        grad_sum = [torch.zeros_like(p) for p in params]
        loss_sum = torch.zeros((), dtype=dtype, device=params[0].device)
        for lo, hi in bounds:
            x, y = _take(inputs, slice(lo, hi)), _take(targets, slice(lo, hi))
            losses = self.loss_fn(self.model(*x), y)
            _check_losses(losses, hi - lo)
            grads = torch.autograd.grad(losses.sum(), params, allow_unused=True)
            loss_sum = loss_sum + losses.detach().to(dtype).sum()
            for i, (p, g) in enumerate(zip(params, grads)):
                g = torch.zeros_like(p) if g is None else g
                grad_sum[i] += g
                means[i].append(g / (hi - lo))
        sizes = torch.stack([torch.full((), hi - lo, dtype=dtype, device=params[0].device) for lo, hi in bounds])
        xi = group_variance([torch.stack(ms) for ms in means], sizes)
        g2 = sum((g.pow(2).sum().to(dtype) for g in grad_sum), torch.zeros((), dtype=dtype, device=sizes.device))
        count = torch.full((), m, dtype=dtype, device=sizes.device)
        sq = g2 / m + xi.to(dtype) * (m - self.ddof)
        return BatchStats(count, loss_sum, tuple(grad_sum), sq)
