"""What the eager fast path (:mod:`.stats`) and the compiled one (:mod:`.compiled`)
share: the per-layer sums of squares of S, the count and loss sums, and the
checks of a step's losses. Both import it; neither imports the other's module
at import time (issue 13: they imported each other)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .layers import Rule, combine_pieces, linear_rank_one_sq_sum, piece_sq_norm_sum, rule_for, tied_sq_norm_sum

LossFn = Callable[[Any, Any], Tensor]


#: elements of scratch memory per chunk of the fast path's per-layer work. Small
#: enough that a chunk's per-example weight gradients stay in cache while they
#: are squared and summed: on the paper's CNN at batch 128 (2 CPU cores),
#: alternating runs of benchmarks/bench_torch_stats.py gave the fast step 1.48x
#: and 1.49x of a plain step with 2**22, 1.52x and 1.79x with 2**25.
FAST_CHUNK_ELEMENTS = 2**22


def _batch_size(inputs: tuple[Any, ...]) -> int:
    for x in inputs:
        if isinstance(x, Tensor) and x.dim() > 0:
            return x.shape[0]
    raise ValueError("inputs must contain a tensor with a leading example axis")


class _LossShapeError(ValueError):
    """loss_fn did not return one loss per example."""

    def __init__(self, shape: Any, m: int, probe: int | None = None) -> None:
        where = "" if probe is None else f" for a probe of the first {probe} examples"
        super().__init__(f"loss_fn must return per-example losses of shape ({m},), got {shape}{where}; "
                         f"use reduction='none' (e.g. F.cross_entropy(out, y, reduction='none'))")
        self.shape = shape


def _check_losses(losses: Tensor, m: int) -> None:
    if not isinstance(losses, Tensor) or losses.shape != (m,):
        raise _LossShapeError(tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__, m)


def _stat_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def functional_state(model: nn.Module, params: list[nn.Parameter]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The model's state for ``torch.func.functional_call``, detached: ``params``
    by name (in the order of ``params``, that of ``grad_sum``), and the other
    parameters and the buffers."""
    named = dict(model.named_parameters())
    by_id = {id(p): n for n, p in named.items()}
    train = {by_id[id(p)]: p.detach() for p in params}
    fixed = {n: p.detach() for n, p in named.items() if n not in train}
    fixed.update(dict(model.named_buffers()))
    return train, fixed


def tied_layers_sq_norm_sums(calls: dict[nn.Module, list[tuple[Tensor, Tensor]]],
                             params: list[tuple[tuple[int, ...], list[tuple[nn.Module, str]]]],
                             chunk_elements: int) -> list[Tensor]:
    """The share of S of module layers that share parameters (tied embeddings): :func:`uses_sq_norm_sums`
    with each layer's rule (:func:`.layers.rule_for`); calls: per layer, (input, output gradient) of its
    calls that reached the loss; params: per parameter of these layers, its shape and owners (layer, name)."""
    rules = {mod: (rule_for(mod), c) for mod, c in calls.items()}
    assert all(r is not None for r, _ in rules.values())  # the layers were chosen by rule_for
    return uses_sq_norm_sums(rules, params, chunk_elements)  # type: ignore[arg-type]


def layer_sq_norm_sums(mod: Any, rule: Rule, inputs: list[Tensor], grads: list[Tensor],
                       chunk_elements: int) -> list[Tensor]:
    """One layer's share of S, as 0-d tensors to add up, from its calls' inputs
    and output gradients (the calls whose output reached the loss): the
    rank-one formula for a Linear layer called once on (m, p) inputs, the
    layer's rule in chunks of examples otherwise. Low-precision (bfloat16,
    float16) inputs and gradients are upcast to float32 chunk by chunk, and
    autocast is off, so the squares and their sums are formed in >= float32."""
    with _full_precision(grads[0]):
        if len(inputs) == 1 and isinstance(mod, nn.Linear) and inputs[0].dim() == 2:
            return [linear_rank_one_sq_sum(mod, _wide(inputs[0]), _wide(grads[0]))]
        n = inputs[0].shape[0]
        per_example = sum(_work_per_example(mod, a, b) for a, b in zip(inputs, grads))
        step = max(1, min(n, chunk_elements // max(1, per_example)))
        totals = []
        for s in range(0, n, step):
            pieces = combine_pieces([rule(mod, _wide(a[s : s + step]), _wide(b[s : s + step]))
                                     for a, b in zip(inputs, grads)])
            totals.extend(piece_sq_norm_sum(piece) for piece in pieces.values())
        return totals


def _wide(t: Tensor) -> Tensor:
    """A floating tensor of fewer than 32 bits (bfloat16, float16) as float32; others unchanged."""
    return t.float() if t.is_floating_point() and torch.finfo(t.dtype).bits < 32 else t


def _full_precision(t: Tensor) -> Any:
    """A context in which autocast (``torch.autocast`` around the user's call) is off on
    ``t``'s device, so that the statistics' products run in their operands' dtypes."""
    if t.device.type in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(t.device.type):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


def _work_per_example(mod: nn.Module, a: Tensor, b: Tensor) -> int:
    """Rough scratch elements per example of a layer's rule (unfolded input,
    output gradient and the smaller of Gram matrices / per-example gradient)."""
    a_el, b_el = a[0].numel(), b[0].numel()
    kernel = math.prod(getattr(mod, "kernel_size", (1,)))
    q = b.shape[1] if isinstance(mod, (nn.Conv1d, nn.Conv2d)) else b.shape[-1]
    t = max(1, b_el // max(1, q))
    p = max(1, a_el * kernel // t)
    return a_el * kernel + 2 * b_el + min(t * t, p * q)


def _count_and_loss(losses: Tensor, weights: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    if weights is None:
        return torch.full((), losses.shape[0], dtype=dtype, device=losses.device), losses.sum(dtype=dtype)
    w = weights.to(dtype)
    return w.sum(), (w * losses.to(dtype)).sum()


def uses_sq_norm_sums(calls: dict[Any, tuple[Rule, list[tuple[Tensor | None, Tensor]]]],
                      params: list[tuple[tuple[int, ...], list[tuple[Any, str]]]],
                      chunk_elements: int) -> list[Tensor]:
    """The share of S of parameters seen through several uses (operation-level
    uses, broadcasts, the layers that share parameters with them), as 0-d
    tensors to add up.

    calls: per use site, its rule and the (input or None, output gradient) of its
    calls, examples on axis 0; params: per parameter, its shape and its uses
    (site, piece name). In chunks of examples each parameter's pieces are combined
    with their cross terms (:func:`.layers.tied_sq_norm_sum`)."""
    live = {site: rc for site, rc in calls.items() if rc[1]}
    if not live:
        return []
    first = next(iter(live.values()))[1][0][1]
    n = first.shape[0]
    work = sum(_work_per_example(site, a, b) if isinstance(site, nn.Module) and a is not None
               else site.work_per_example(a, b) if hasattr(site, "work_per_example")  # an operation VJP use
               else (0 if a is None else a[0].numel()) + 2 * b[0].numel()
               for site, (_, c) in live.items() for a, b in c)
    step = max(1, min(n, chunk_elements // max(1, work)))
    totals = []
    with _full_precision(first):
        for s in range(0, n, step):
            pieces = {}
            for site, (rule, c) in live.items():
                pieces[site] = combine_pieces([rule(site, None if a is None else _wide(a[s : s + step]),
                                                    _wide(b[s : s + step])) for a, b in c])
            rows = min(n, s + step) - s
            for shape, owners in params:
                uses = [pieces[site][name] for site, name in owners if site in pieces and name in pieces[site]]
                if uses:
                    totals.append(tied_sq_norm_sum(uses, rows, shape))
    return totals
