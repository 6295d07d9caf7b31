"""Exact per-step statistics of SPEC section 4 for any ``nn.Module``.

:func:`per_example_stats` returns a :class:`cabs_core.BatchStats`: the count m,
sum_i l_i, sum_i g_i (per parameter) and S = sum_i ||g_i||^2, the quantities of
the paper's within-batch variance estimator xi = (S - m ||g_bar||^2) / (m - 1).

Two exact methods:

- ``fast``: one forward and one backward pass of the summed loss. Forward hooks
  keep each supported layer's input, tensor hooks on its output receive the
  output gradient; the layer's share of ||g_i||^2 is computed from those
  (:mod:`.layers`) in bounded chunks of examples, then discarded.
- ``generic``: ``torch.func`` (``functional_call`` + ``vmap(grad)``) for any
  model, in chunks of ``chunk_size`` examples so that memory stays bounded.

``auto`` takes ``fast`` when every trainable parameter belongs to a supported
layer, ``generic`` otherwise. Nothing here copies to the host: the only
device-to-host transfer of a step is the controller's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge
from torch.utils._pytree import tree_map

from cabs_core import BatchStats

from .layers import Rule, combine_pieces, linear_rank_one_sq_sum, piece_sq_norm_sum, rule_for

Method = Literal["auto", "fast", "generic"]
LossFn = Callable[[Any, Any], Tensor]

#: elements of scratch memory per chunk of the fast path's per-layer work. Small
#: enough that a chunk's per-example weight gradients stay in cache while they
#: are squared and summed: on the paper's CNN at batch 128 (2 CPU cores),
#: alternating runs of benchmarks/bench_torch_stats.py gave the fast step 1.48x
#: and 1.49x of a plain step with 2**22, 1.52x and 1.79x with 2**25.
FAST_CHUNK_ELEMENTS = 2**22

#: elements of per-example gradients per chunk of the generic path, when no
#: chunk size is given
GENERIC_CHUNK_ELEMENTS = 2**25


class UnsupportedModelError(ValueError):
    """The fast path cannot compute exact statistics for this model."""


class BatchNormTrainingError(ValueError):
    """BatchNorm normalises with batch statistics: the examples are coupled."""


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the statistics cover, in the order of ``grad_sum``."""
    return [p for p in model.parameters() if p.requires_grad]


def check_batch_norm(model: nn.Module) -> None:
    """Raise :class:`BatchNormTrainingError` if a BatchNorm layer uses batch statistics."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and (mod.training or not mod.track_running_stats):
            why = "is in training mode" if mod.training else "has track_running_stats=False"
            raise BatchNormTrainingError(
                f"BatchNorm layer {name!r} ({type(mod).__name__}) {why}: it normalises each example "
                f"with statistics of the whole batch, so the examples' gradients are coupled and "
                f"per-example gradients (hence CABS's variance estimate) are meaningless; hook-based "
                f"tools compute garbage here without warning. Options: (1) put the BatchNorm layers in "
                f"eval mode (running statistics; supported by the fast path); (2) replace them by "
                f"GroupNorm or LayerNorm; (3) keep BatchNorm in training mode and estimate the "
                f"variance from micro-batches instead: CABSSGD(..., micro_batches=k) or "
                f"cabs_torch.MicroBatchStats (the core's group estimator, cabs_core.group_variance)."
            )


def unsupported_reasons(model: nn.Module) -> list[str]:
    """Why the fast path cannot handle ``model`` (empty when it can)."""
    reasons = []
    owners: dict[int, dict[int, str]] = {}  # parameter -> the modules that own it
    for mname, mod in model.named_modules():
        own = [(n, p) for n, p in mod.named_parameters(recurse=False, remove_duplicate=False) if p.requires_grad]
        if not own:
            continue
        for n, p in own:
            owners.setdefault(id(p), {})[id(mod)] = f"{mname}.{n}" if mname else n
        label = f"{mname or '<root>'} ({type(mod).__name__})"
        if rule_for(mod) is None:
            reasons.append(f"{label} has parameters and no fast rule")
        elif {n for n, _ in own} - {"weight", "bias"}:
            reasons.append(f"{label} has parameters other than weight and bias")
    for names in owners.values():
        if len(names) > 1:  # tied weights: the per-example gradient has cross terms between layers
            reasons.append(f"parameter shared between {', '.join(sorted(names.values()))}")
    return sorted(set(reasons))


def resolve_method(model: nn.Module, method: Method) -> Literal["fast", "generic"]:
    """The method ``auto`` / ``fast`` / ``generic`` stands for on ``model``."""
    if method not in ("auto", "fast", "generic"):
        raise ValueError(f"method must be 'auto', 'fast' or 'generic', got {method!r}")
    if method == "generic":
        return "generic"
    reasons = unsupported_reasons(model)
    if not reasons:
        return "fast"
    if method == "fast":
        raise UnsupportedModelError(
            "method='fast' cannot compute exact per-example statistics for this model: "
            + "; ".join(reasons)
            + ". Use method='generic' (torch.func, any model) or method='auto'."
        )
    return "generic"


def _batch_size(inputs: tuple[Any, ...]) -> int:
    for x in inputs:
        if isinstance(x, Tensor) and x.dim() > 0:
            return x.shape[0]
    raise ValueError("inputs must contain a tensor with a leading example axis")


def _check_losses(losses: Tensor, m: int) -> None:
    if not isinstance(losses, Tensor) or losses.shape != (m,):
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"loss_fn must return per-example losses of shape ({m},), got {shape}; "
            f"use reduction='none' (e.g. F.cross_entropy(out, y, reduction='none'))"
        )


def _stat_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _take(tree: Any, sl: slice) -> Any:
    """The examples ``sl`` of every tensor in a pytree (other leaves unchanged)."""
    return tree_map(lambda t: t[sl] if isinstance(t, Tensor) else t, tree)


def _parameter_key(model: nn.Module) -> tuple[tuple[int, bool], ...]:
    """Identity and ``requires_grad`` of every parameter, checked each step to
    notice a changed model: a direct walk of the module tree, several times
    cheaper than ``model.parameters()`` (which matters for models of many modules)."""
    key, stack = [], [model]
    while stack:
        mod = stack.pop()
        key.extend((id(p), p.requires_grad) for p in mod._parameters.values() if p is not None)
        stack.extend(m for m in mod._modules.values() if m is not None)
    return tuple(key)


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


def _as_tuple(inputs: Any) -> tuple[Any, ...]:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


# ----------------------------------------------------------------------------- fast path


@dataclass
class _Record:
    """One supported layer during a fast step: its inputs and output gradients per call."""

    name: str
    rule: Rule
    rank_one: bool = False  # an nn.Linear: on (m, p) inputs, the rank-one formula applies
    inputs: list[Tensor] = field(default_factory=list)
    grads: dict[int, Tensor] = field(default_factory=dict)
    totals: list[Tensor] = field(default_factory=list)
    called: bool = False
    deferred: bool = False  # some call's output gradient comes from autograd.grad, not a hook

    def reset(self) -> None:
        self.inputs.clear()
        self.grads.clear()
        self.totals.clear()
        self.called = self.deferred = False

    def finish(self, mod: Any, chunk_elements: int) -> None:
        """Append the layer's share of S to ``totals`` and free the captured tensors."""
        calls = sorted(self.grads)
        if calls:
            self.totals.extend(layer_sq_norm_sums(
                mod, self.rule, [self.inputs[c] for c in calls], [self.grads[c] for c in calls], chunk_elements))
        self.inputs.clear()
        self.grads.clear()


def layer_sq_norm_sums(mod: Any, rule: Rule, inputs: list[Tensor], grads: list[Tensor],
                       chunk_elements: int) -> list[Tensor]:
    """One layer's share of S, as 0-d tensors to add up, from its calls' inputs
    and output gradients (the calls whose output reached the loss): the
    rank-one formula for a Linear layer called once on (m, p) inputs, the
    layer's rule in chunks of examples otherwise."""
    if len(inputs) == 1 and isinstance(mod, nn.Linear) and inputs[0].dim() == 2:
        return [linear_rank_one_sq_sum(mod, inputs[0], grads[0])]
    n = inputs[0].shape[0]
    per_example = sum(_work_per_example(mod, a, b) for a, b in zip(inputs, grads))
    step = max(1, min(n, chunk_elements // max(1, per_example)))
    totals = []
    for s in range(0, n, step):
        pieces = combine_pieces([rule(mod, a[s : s + step], b[s : s + step]) for a, b in zip(inputs, grads)])
        totals.extend(piece_sq_norm_sum(piece) for piece in pieces.values())
    return totals


@dataclass(frozen=True)
class _ViewOf:
    """Where a layer's output lies in the tensor it is a view of (its base)."""

    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    base_size: tuple[int, ...]
    base_stride: tuple[int, ...]


def _output_edge(out: Tensor) -> tuple[Any, int, _ViewOf | None]:
    """The autograd node and output number that receive the gradient of a layer's
    output, recorded in the forward pass.

    The node stays in the graph when the output is later modified in place
    (``nn.ReLU(inplace=True)``), so its gradient is the one of the layer's own
    output. A view (``nn.Linear`` on (m, T, p) inputs returns a view of its
    matmul) is rebased by an in-place change: its own node leaves the graph and
    the gradient arrives at its base instead, created inside the layer. Then the
    base's node is used and :class:`_ViewOf` maps its gradient back to the output.
    """
    base = out._base if out._is_view() else None
    if base is None:
        return out.grad_fn, out.output_nr, None
    view = _ViewOf(tuple(out.shape), out.stride(), out.storage_offset() - base.storage_offset(),
                   tuple(base.shape), base.stride())
    return base.grad_fn, base.output_nr, view


def _view_grad(g: Tensor, view: _ViewOf | None) -> Tensor:
    """The gradient of a layer's output from the gradient ``g`` at its node."""
    if view is None:
        return g.detach()
    if g.stride() != view.base_stride:  # lay it out like the base, so the view's strides apply
        g = torch.empty_strided(view.base_size, view.base_stride, dtype=g.dtype, device=g.device).copy_(g)
    return g.detach().as_strided(view.size, view.stride, view.offset)


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


# ----------------------------------------------------------------------------- generic path


def _generic(
    model: nn.Module, loss_fn: LossFn, inputs: tuple[Any, ...], targets: Any, weights: Tensor | None,
    params: list[nn.Parameter], chunk_size: int | None,
) -> tuple[Tensor, Tensor, tuple[Tensor, ...], Tensor]:
    from torch.func import functional_call, grad_and_value, vmap

    train, fixed = functional_state(model, params)
    names = list(train)
    m = _batch_size(inputs)

    def one(tp: dict[str, Tensor], x: tuple[Any, ...], y: Any) -> Tensor:
        x1 = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, x)
        y1 = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, y)
        loss = loss_fn(functional_call(model, {**tp, **fixed}, x1), y1)
        _check_losses(loss, 1)
        return loss[0]

    in_dims = (None, tree_map(lambda t: 0 if isinstance(t, Tensor) else None, inputs),
               tree_map(lambda t: 0 if isinstance(t, Tensor) else None, targets))
    per_example = vmap(grad_and_value(one), in_dims=in_dims, randomness="different")
    if chunk_size is None:
        chunk_size = max(1, GENERIC_CHUNK_ELEMENTS // max(1, sum(p.numel() for p in params)))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device = params[0].device
    dtype = _stat_dtype(device)
    sums = [torch.zeros_like(p) for p in params]
    sq = torch.zeros((), dtype=dtype, device=device)
    all_losses = []
    for s in range(0, m, chunk_size):
        sl = slice(s, s + chunk_size)
        x, y = _take(inputs, sl), _take(targets, sl)
        g, losses = per_example(train, x, y)
        losses = losses.detach()
        all_losses.append(losses)
        n = losses.shape[0]
        w = None if weights is None else weights[sl]
        for k, name in enumerate(names):
            gk = g[name]
            gw = gk if w is None else gk * w.to(gk.dtype).reshape((n,) + (1,) * (gk.dim() - 1))
            sums[k] += gw.sum(0)
            sq = sq + (gw * gk).reshape(n, -1).sum(1).sum().to(dtype)
        del g
    losses = torch.cat(all_losses)
    return _count_and_loss(losses, weights, dtype) + (tuple(sums), sq)


# ----------------------------------------------------------------------------- public entry


@dataclass
class _Plan:
    key: tuple[tuple[int, bool], ...]
    params: list[nn.Parameter]
    how: Literal["fast", "generic"]
    records: dict[nn.Module, _Record]
    batch_norms: list[tuple[str, nn.Module]]
    compiled: Any = None  # a CompiledFastStats when compile=True and the method is fast


class PerExampleStats:
    """Exact statistics of SPEC section 4 for ``model`` and a per-example loss.

    model: any module whose examples do not interact (BatchNorm in training
        mode is refused, see :class:`BatchNormTrainingError`).
    loss_fn: ``loss_fn(model_output, targets)`` -> per-example losses l_i, shape (m,).
    method: ``"auto"`` (fast where every trainable layer is supported, generic
        otherwise), ``"fast"`` (refuse unsupported models) or ``"generic"``.
    chunk_size: examples per ``vmap`` call of the generic path (default: about
        2**25 gradient elements per chunk).
    compile: run the fast path as one ``torch.compile``d function
        (:mod:`.compiled`: the model traced by ``torch.fx``, output gradients
        from zero perturbations), which fuses the sums of squares into the
        kernels that produce them. Needs a model ``torch.fx`` can trace and a C++
        compiler on CPU; compiles on the first call and again when shapes
        change (pad batches to a few sizes, ``CABSController.padding_buckets``).
        Layers: Linear, Embedding, LayerNorm, RMSNorm; models with others raise
        :class:`UnsupportedModelError` (convolutions: see :mod:`.compiled`). The
        generic path is never compiled.

    The analysis of the model (supported layers, method) is cached and redone
    when the set of trainable parameters changes. Call the object once per step.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, method: Method = "auto",
                 chunk_size: int | None = None, compile: bool = False) -> None:
        if method not in ("auto", "fast", "generic"):
            raise ValueError(f"method must be 'auto', 'fast' or 'generic', got {method!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        self.model, self.loss_fn, self.method, self.chunk_size = model, loss_fn, method, chunk_size
        self.compile = compile
        self._plan: _Plan | None = None

    @property
    def params(self) -> list[nn.Parameter]:
        """The parameters ``grad_sum`` follows: :func:`trainable_parameters`."""
        return self.plan().params

    @property
    def resolved_method(self) -> Literal["fast", "generic"]:
        """What ``method`` stands for on this model now."""
        return self.plan().how

    def plan(self) -> _Plan:
        key = _parameter_key(self.model)
        if self._plan is None or self._plan.key != key:
            params = trainable_parameters(self.model)
            if not params:
                raise ValueError("the model has no trainable parameters")
            how = resolve_method(self.model, self.method)
            records = {}
            if how == "fast":
                for name, mod in self.model.named_modules():
                    rule = rule_for(mod)
                    if rule is not None and any(p.requires_grad for p in mod.parameters(recurse=False)):
                        records[mod] = _Record(name, rule, rank_one=type(mod) is nn.Linear)
            bns: list[tuple[str, nn.Module]] = [
                (n, m) for n, m in self.model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            ]
            self._plan = _Plan(key, params, how, records, bns)
            if self.compile and how == "fast":
                from .compiled import CompiledFastStats

                self._plan.compiled = CompiledFastStats(
                    self.model, self.loss_fn, params, {rec.name for rec in records.values()})
        return self._plan

    def __call__(self, inputs: Any, targets: Any = None, weights: Tensor | None = None) -> BatchStats:
        """Statistics of one batch as a :class:`cabs_core.BatchStats`.

        inputs: a tensor or a tuple of tensors (positional arguments of the model),
            each with a leading example axis of length m; ``targets`` likewise (any pytree).
        weights: optional 0/1 mask of shape (m,): examples with weight 0 (padding)
            change none of the sums.

        ``grad_sum`` follows :attr:`params`; it is the ordinary gradient of
        sum_i w_i l_i. ``count``, ``loss_sum`` and ``sq_norm_sum`` are float64
        0-d tensors on the model's device (float32 on MPS). Parameters' ``.grad``
        are not touched, and nothing is copied to the host.
        """
        plan = self.plan()
        for _, mod in plan.batch_norms:
            if mod.training or not mod.track_running_stats:
                check_batch_norm(self.model)  # raises, naming the layer and the options
        inputs = _as_tuple(inputs)
        m = _batch_size(inputs)
        if weights is not None and tuple(weights.shape) != (m,):
            raise ValueError(f"weights must have shape ({m},), got {tuple(weights.shape)}")
        if plan.compiled is not None:
            count, loss_sum, grad_sum, sq = plan.compiled(inputs, targets, weights, m)
        elif plan.how == "fast":
            count, loss_sum, grad_sum, sq = self._fast(plan, inputs, targets, weights, m)
        else:
            count, loss_sum, grad_sum, sq = _generic(
                self.model, self.loss_fn, inputs, targets, weights, plan.params, self.chunk_size
            )
        return BatchStats(count, loss_sum, grad_sum, sq)

    def _fast(self, plan: _Plan, inputs: tuple[Any, ...], targets: Any, weights: Tensor | None, m: int
              ) -> tuple[Tensor, Tensor, tuple[Tensor, ...], Tensor]:
        records = plan.records
        deferred: list[GradientEdge] = []  # output edges of rank-one Linear calls, sent to autograd.grad
        owners: list[tuple[_Record, int, _ViewOf | None]] = []

        def forward_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            rec = records[mod]
            rec.called = True
            if not isinstance(out, Tensor) or not out.requires_grad:
                return
            a = (args[0] if args else next(iter(kwargs.values()))).detach()
            rec.inputs.append(a)
            k = len(rec.inputs) - 1
            node, nr, view = _output_edge(out)
            if rec.rank_one and a.dim() == 2:  # its output gradient is small: collect it with the parameters'
                rec.deferred = True
                deferred.append(GradientEdge(node, nr))
                owners.append((rec, k, view))
                return

            def prehook(grad_outputs: tuple[Tensor | None, ...]) -> None:
                g = grad_outputs[nr]
                if g is None:
                    return
                rec.grads[k] = _view_grad(g, view)
                if not rec.deferred and len(rec.grads) == len(rec.inputs):  # all calls in: reduce now
                    rec.finish(mod, FAST_CHUNK_ELEMENTS)  # (backward runs without grad mode)

            node.register_prehook(prehook)

        params = plan.params
        handles = [mod.register_forward_hook(forward_hook, with_kwargs=True) for mod in records]
        try:
            out = self.model(*inputs)
            losses = self.loss_fn(out, targets)
            _check_losses(losses, m)
            weighted = losses if weights is None else losses * weights.to(losses.dtype)
            device = params[0].device
            dtype = _stat_dtype(device)
            count, loss_sum = _count_and_loss(losses.detach(), weights, dtype)
            grads = torch.autograd.grad(weighted.sum(), [*params, *deferred], allow_unused=True)
            with torch.no_grad():
                for (rec, k, view), g in zip(owners, grads[len(params):]):
                    if g is not None:
                        rec.grads[k] = _view_grad(g, view)
                for mod, rec in records.items():
                    if rec.grads:  # deferred, or a layer used several times with some outputs unused
                        rec.finish(mod, FAST_CHUNK_ELEMENTS)
            grads = grads[: len(params)]
            totals: list[Tensor] = []
            for mod, rec in records.items():
                if not rec.called:
                    self._check_unused(mod, rec, params, grads)
                totals.extend(rec.totals)
        finally:
            for h in handles:
                h.remove()
            for rec in records.values():
                rec.reset()
        if not totals:
            sq = torch.zeros((), dtype=dtype, device=device)
        elif all(t.dtype == totals[0].dtype and t.device == device for t in totals):
            sq = torch.stack(totals).sum(dtype=dtype)
        else:
            sq = torch.stack([t.to(device=device, dtype=dtype) for t in totals]).sum()
        grad_sum = tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))
        return count, loss_sum, grad_sum, sq

    @staticmethod
    def _check_unused(mod: nn.Module, rec: _Record, params: list[nn.Parameter], grads: tuple[Any, ...]) -> None:
        """A layer never called whose parameters got gradients: used functionally."""
        index = {id(p): i for i, p in enumerate(params)}
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in index and grads[index[id(p)]] is not None:
                raise UnsupportedModelError(
                    f"parameter {rec.name}.{pname} received a gradient, but module {rec.name!r} "
                    f"was never called (its weight is used functionally?): the fast path cannot "
                    f"see it. Use method='generic'."
                )


def per_example_stats(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any = None,
    *,
    weights: Tensor | None = None,
    method: Method = "auto",
    chunk_size: int | None = None,
    compile: bool = False,
) -> BatchStats:
    """One-off :class:`PerExampleStats` ``(model, loss_fn, method, chunk_size, compile)(inputs, targets,
    weights)``; in a training loop keep a :class:`PerExampleStats` (it caches the model's analysis and,
    with ``compile=True``, the compiled function)."""
    return PerExampleStats(model, loss_fn, method=method, chunk_size=chunk_size, compile=compile)(
        inputs, targets, weights)
