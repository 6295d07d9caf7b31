"""Exact per-step statistics of docs/spec.md section 4 for any ``nn.Module``.

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
layer, ``generic`` otherwise. Nothing here copies to the host on an ordinary
step: the only device-to-host transfer of a step is the controller's.

The fast path's guarantee (issue 12, :mod:`cabs_core.exactness`): it returns S
only for a model and input *signature* it has verified. On the first call of a
signature (and every ``verify_every`` calls) a *probe* runs the fast path on the
first k examples (k differs from every other dimension of the inputs, targets
and buffers, and of the parameters where a k <= m allows): every captured layer
input and output must have k rows, each parameter's gradient rebuilt from the
captured terms must equal its full gradient (no use outside the layers), and
the fast S must equal the generic definition's S (k single-example backward
passes) on those k examples. Every other call checks that the layers are
called in the same way (same calls, same non-example shapes, m rows). If a
check fails, ``fast`` raises :class:`UnsupportedModelError` naming the layer;
``auto`` warns once (:class:`FastPathFallbackWarning`) and uses the exact
generic path for that signature from then on.
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge
from torch.utils._pytree import tree_flatten, tree_map

from cabs_core import BatchStats
from cabs_core.exactness import (
    VERIFY_EVERY,
    BatchNormTrainingError,
    FastPathFallbackWarning,
    UnsupportedModelError,
    accounting_scale,
    check_close,
    probe_batch_size,
    rtol_for,
    verify_due,
)

from .compiled import FX_TRACE_FAILED, CompiledFastStats
from .layers import (
    RULES,
    Piece,
    Rule,
    piece_grad_sum,
    rule_for,
    tied_sq_norm_sum,
)
from .ops import (
    BroadcastSite,
    OpSite,
    ParamUses,
    ReplayFailed,
    VjpSite,
    fold_spec,
    masked,
    ragged_rows,
    to_examples,
)
from .sums import (
    FAST_CHUNK_ELEMENTS,
    LossFn,
    _batch_size,
    _check_losses,
    _count_and_loss,
    _full_precision,
    _LossShapeError,
    _stat_dtype,
    _wide,
    functional_state,
    layer_sq_norm_sums,
    tied_layers_sq_norm_sums,
    uses_sq_norm_sums,
)

Method = Literal["auto", "fast", "generic"]


#: elements of per-example gradients per chunk of the generic path, when no
#: chunk size is given
GENERIC_CHUNK_ELEMENTS = 2**25


__all__ = [
    "BatchNormTrainingError", "FastPathFallbackWarning", "PerExampleStats", "UnsupportedModelError",
    "check_batch_norm", "per_example_stats", "resolve_method", "trainable_parameters",
    "unsupported_reasons",
]


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
                f"variance from micro-batches instead: CABSTrainer(..., micro_batches=k) or "
                f"cabs_torch.MicroBatchStats (the core's group estimator, cabs_core.group_variance)."
            )


def unsupported_reasons(model: nn.Module, ops: bool = True) -> list[str]:
    """Why the fast path cannot handle ``model`` at all (empty when it may: then
    the probe decides, per input signature, whether it does).

    ops: the operation-level capture (:mod:`.ops`) is on (the eager fast path),
    so a module without a module rule is no reason: its parameters' uses are seen
    op by op, and an op without a rule stops the probe. Recurrent layers
    (``nn.RNNBase``) without a rule are refused here. ``ops=False`` (the compiled
    path): every module with parameters needs a module rule."""
    reasons = []
    for mname, mod in model.named_modules():
        own = [(n, p) for n, p in mod.named_parameters(recurse=False, remove_duplicate=False) if p.requires_grad]
        if not own:
            continue
        label = f"{mname or '<root>'} ({type(mod).__name__})"
        rule = rule_for(mod)
        if rule is None:
            if not ops or isinstance(mod, nn.RNNBase) or type(mod) in RULES:
                why = getattr(RULES.get(type(mod)), "refuses", lambda _: None)(mod)  # a declined configuration
                reasons.append(f"{label} has parameters and no fast rule" + (f" ({why})" if why else ""))
        elif ({n for n, _ in own} - getattr(rule, "param_names", lambda _: {"weight", "bias"})(mod)
              and RULES.get(type(mod)) in _BUILTIN_RULES):
            reasons.append(f"{label} has parameters other than weight and bias")
    # parameters shared between supported modules (tied embeddings) are supported: the
    # per-example gradient sums the uses' terms, cross terms included (layers.tied_sq_norm_sum)
    return sorted(set(reasons))


#: the rules cabs_torch ships (a registered rule may own parameters of any name)
_BUILTIN_RULES = frozenset(RULES.values())


def resolve_method(model: nn.Module, method: Method, ops: bool = True) -> Literal["fast", "generic"]:
    """The method ``auto`` / ``fast`` / ``generic`` stands for on ``model`` (``ops``: :func:`unsupported_reasons`)."""
    if method not in ("auto", "fast", "generic"):
        raise ValueError(f"method must be 'auto', 'fast' or 'generic', got {method!r}")
    if method == "generic":
        return "generic"
    reasons = unsupported_reasons(model, ops)
    if not reasons:
        return "fast"
    if method == "fast":
        raise UnsupportedModelError(
            "method='fast' cannot compute exact per-example statistics for this model: "
            + "; ".join(reasons)
            + ". Use method='generic' (torch.func, any model) or method='auto'."
        )
    return "generic"


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


def _from_numpy(tree: Any, device: torch.device | None) -> Any:
    """NumPy arrays in a batch become tensors on the model's device (users feed NumPy batches)."""
    return tree_map(lambda t: torch.as_tensor(t, device=device) if isinstance(t, np.ndarray) else t, tree)


def _zero_masked_rows(tree: Any, keep: Tensor, m: int) -> Any:
    """Floating tensors of ``tree`` with their masked rows (``keep`` False) set to 0 by a select,
    so that a NaN or inf in a padding example reaches no sum."""
    def select(t: Any) -> Any:
        if not (isinstance(t, Tensor) and t.is_floating_point() and t.dim() > 0 and t.shape[0] == m):
            return t
        return torch.where(keep.reshape((m,) + (1,) * (t.dim() - 1)), t, torch.zeros((), dtype=t.dtype,
                                                                                      device=t.device))
    return tree_map(select, tree)


def _as_tuple(inputs: Any) -> tuple[Any, ...]:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


# ----------------------------------------------------------------------------- fast path


@dataclass(eq=False)
class _Record:
    """One supported layer during a fast step: its inputs and output gradients per call."""

    name: str
    rule: Rule
    mod: nn.Module
    index: int  # position in the plan's records (capture structure)
    rank_one: bool = False  # an nn.Linear: on (m, p) inputs, the rank-one formula applies
    tied: bool = False  # shares a parameter with another layer: reduced with its tie group after backward
    dyn: bool = False  # this pass: shares a parameter with an operation-level use, reduced with them
    pids: tuple[int, ...] = ()  # ids of the module's own parameters (a module layer)
    inputs: list[Tensor] = field(default_factory=list)
    grads: dict[int, Tensor] = field(default_factory=dict)
    totals: list[Tensor] = field(default_factory=list)
    called: bool = False
    deferred: bool = False  # some call's output gradient comes from autograd.grad, not a hook
    keep: bool = False  # a probe: keep the calls' (input, output gradient) for the accounting check
    kept: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    def reset(self) -> None:
        self.inputs.clear()
        self.grads.clear()
        self.totals.clear()
        self.kept.clear()
        self.called = self.deferred = self.keep = self.dyn = False

    def calls(self) -> list[tuple[Tensor, Tensor]]:
        """(input, output gradient) of the calls whose output reached the loss."""
        return [(self.inputs[c], self.grads[c]) for c in sorted(self.grads)]

    def finish(self, mod: Any, chunk_elements: int) -> None:
        """Append the layer's share of S to ``totals`` and free the captured tensors."""
        calls = self.calls()
        if self.keep:
            self.kept.extend(calls)
        if calls:
            self.totals.extend(layer_sq_norm_sums(mod, self.rule, [a for a, _ in calls], [b for _, b in calls],
                                                  chunk_elements))
        self.inputs.clear()
        self.grads.clear()


@dataclass(eq=False)
class _TieGroup:
    """Supported layers that share parameters (an embedding table that is also the
    output projection): their share of S has cross terms, so they are reduced together."""

    records: list[_Record]
    #: every trainable parameter of these layers: (parameter, its owners as (record, name))
    params: list[tuple[nn.Parameter, list[tuple[_Record, str]]]]

    def finish(self, chunk_elements: int) -> list[Tensor]:
        calls = {}
        for rec in self.records:
            calls[rec.mod] = rec.calls()
            if rec.keep:
                rec.kept.extend(calls[rec.mod])
            rec.inputs.clear()
            rec.grads.clear()
        owners = [(tuple(p.shape), [(rec.mod, name) for rec, name in uses]) for p, uses in self.params]
        return tied_layers_sq_norm_sums(calls, owners, chunk_elements)


def _autocast_rtol(device: torch.device) -> float:
    """The checks' tolerance for the dtype autocast computes in on ``device`` (0.0 when it is off)."""
    if device.type in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(device.type):
        return rtol_for(str(torch.get_autocast_dtype(device.type)))
    return 0.0


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


# ----------------------------------------------------------------------------- generic path


def _generic(
    model: nn.Module, loss_fn: LossFn, inputs: tuple[Any, ...], targets: Any, weights: Tensor | None,
    params: list[nn.Parameter], chunk_size: int | None, sq_only: bool = False,
) -> tuple[Tensor, Tensor, tuple[Tensor, ...], Tensor]:
    """count, loss_sum, grad_sum, S from per-example gradients (``sq_only``: a
    probe's reference S; grad_sum is left empty)."""
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
    batched = vmap(grad_and_value(one), in_dims=in_dims, randomness="different")

    def looped(tp: dict[str, Tensor], x: Any, y: Any) -> tuple[dict[str, Tensor], Tensor]:
        """vmap's result from a loop of single examples through the module itself (plain autograd), for
        modules torch.func cannot take: vmap fails on nn.LSTM / nn.GRU / nn.RNN (their cells add the
        batched input gates in place into the gates of h_0, made inside the module without the vmapped
        axis), and even torch.func.grad fails on nn.LSTM over a PackedSequence."""
        outs = []
        with torch.enable_grad():
            for i in range(_batch_size(x)):
                loss = loss_fn(model(*_take(x, slice(i, i + 1))), _take(y, slice(i, i + 1)))
                _check_losses(loss, 1)
                g = torch.autograd.grad(loss[0], params, allow_unused=True)
                outs.append(([torch.zeros_like(p) if gk is None else gk for p, gk in zip(params, g)],
                             loss.detach()[0]))
        return ({name: torch.stack([g[k] for g, _ in outs]) for k, name in enumerate(names)},
                torch.stack([v for _, v in outs]))

    if chunk_size is None:
        chunk_size = max(1, GENERIC_CHUNK_ELEMENTS // max(1, sum(p.numel() for p in params)))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device = params[0].device
    dtype = _stat_dtype(device)
    # grad_sum accumulated in >= float32 over the chunks, returned in each parameter's dtype
    sums = [] if sq_only else [torch.zeros_like(p, dtype=_wide(p).dtype) for p in params]
    sq = torch.zeros((), dtype=dtype, device=device)
    all_losses = []
    if model not in _VMAP_FAILED and any(isinstance(mod, nn.RNNBase) for mod in model.modules()):
        # LSTM/GRU/RNN: vmap raises on their cells, or (float32 LSTM on CPU) runs oneDNN's layer through
        # its per-example fallback, 1.7x slower than the loop (LSTM(64, 128), 32 steps, batch 64)
        _VMAP_FAILED.add(model)
    per_example = looped if model in _VMAP_FAILED else batched
    for s in range(0, m, chunk_size):
        sl = slice(s, s + chunk_size)
        x, y = _take(inputs, sl), _take(targets, sl)
        if per_example is batched:
            try:
                g, losses = batched(train, x, y)
            except RuntimeError:
                # vmap has no batching rule for some modules (nn.LSTM / nn.GRU: "output with shape
                # [1, 24] doesn't match the broadcast shape [6, 1, 24]"): single examples, exact
                _VMAP_FAILED.add(model)
                per_example = looped
        if per_example is looped:
            g, losses = looped(train, x, y)
        losses = losses.detach()
        all_losses.append(losses)
        n = losses.shape[0]
        w = None if weights is None else weights[sl]
        with _full_precision(sq):
            for k, name in enumerate(names):
                gk = _wide(g[name])  # squares of bfloat16/float16 gradients in float32
                gw = gk if w is None else gk * w.to(gk.dtype).reshape((n,) + (1,) * (gk.dim() - 1))
                if not sq_only:
                    sums[k] += gw.sum(0)
                sq = sq + torch.dot(gw.reshape(-1), gk.reshape(-1)).to(dtype)
        del g
    losses = torch.cat(all_losses)
    grad_sums = tuple(t.to(p.dtype) for t, p in zip(sums, params))
    return _count_and_loss(losses, weights, dtype) + (grad_sums, sq)


def _loop_sq_norm_sum(model: nn.Module, loss_fn: LossFn, inputs: tuple[Any, ...], targets: Any,
                      params: list[nn.Parameter], k: int) -> Tensor:
    """S of the k examples from k single-example backward passes: the generic
    path's definition (each example through the model alone), without vmap's
    fixed cost, which dominates at a probe's few examples."""
    dtype = _stat_dtype(params[0].device)
    sq = torch.zeros((), dtype=dtype, device=params[0].device)
    for i in range(k):
        losses = loss_fn(model(*_take(inputs, slice(i, i + 1))), _take(targets, slice(i, i + 1)))
        _check_losses(losses, 1)
        for g in torch.autograd.grad(losses[0], params, allow_unused=True):
            if g is not None:
                g = _wide(g).reshape(-1)
                with _full_precision(g):
                    sq = sq + torch.dot(g, g).to(dtype)
    return sq


#: models on which vmap failed: the generic path loops over single examples for them
_VMAP_FAILED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


# ----------------------------------------------------------------------------- public entry


class _NoRule(UnsupportedModelError):
    """A parameter met the examples in an operation without a rule (whatever the probe's size)."""


class _StructureChanged(Exception):
    """The layers were called differently from the probed calls of this signature."""

    def __init__(self, message: str, layer: str | None) -> None:
        super().__init__(message)
        self.layer = layer


#: one layer call in a capture structure: (record index, input shape, output shape),
#: or (record index,) for a call whose output does not reach the loss
_Call = tuple[Any, ...]


@dataclass
class _Verdict:
    """What the probes established for one input signature."""

    ok: bool
    structures: list[tuple[_Call, ...]] = field(default_factory=list)  # accepted, example axis removed
    reason: str = ""
    _by_m: dict[int, list[tuple[_Call, ...]]] = field(default_factory=dict)

    def accept(self, structure: tuple[_Call, ...]) -> None:
        if structure not in self.structures:
            self.structures.append(structure)
            self._by_m.clear()

    def expected(self, m: int) -> list[tuple[_Call, ...]]:
        """The accepted structures (their shapes hold None where the examples lie, whatever m)."""
        return self.structures


@dataclass
class _Plan:
    key: tuple[tuple[int, bool], ...]
    params: list[nn.Parameter]
    how: Literal["fast", "generic"]
    records: dict[nn.Module, _Record]
    batch_norms: list[tuple[str, nn.Module]]
    compiled: Any = None  # a CompiledFastStats when compile=True and the method is fast
    tie_groups: list[_TieGroup] = field(default_factory=list)
    owners: list[list[tuple[_Record, str]]] = field(default_factory=list)  # per parameter, its layers
    names: list[str] = field(default_factory=list)  # per parameter, its qualified name
    param_dims: set[int] = field(default_factory=set)  # the parameters' dimensions
    buffer_dims: set[int] = field(default_factory=set)  # the buffers' dimensions
    rtol: float = 0.0  # the checks' tolerance: the loosest of the parameters' dtypes
    verdicts: dict[Any, _Verdict] = field(default_factory=dict)
    ops: bool = False  # the operation-level capture (.ops) runs during the forward pass
    tracked: dict[int, str] = field(default_factory=dict)  # trainable parameters by id: their names
    constants: set[int] = field(default_factory=set)  # ids of frozen parameters and buffers
    op_records: dict[Any, _Record] = field(default_factory=dict)  # operation-level use sites seen so far
    op_sites: dict[Any, Any] = field(default_factory=dict)  # their sites (.ops), by key
    #: compile=True, per (signature, batch size, probed structure): a .compiled_graph.GraphFastStats, or
    #: False where the compiled path was refused (the eager fast path answers)
    graphs: dict[Any, Any] = field(default_factory=dict)


def _module_calls_only(structure: tuple[_Call, ...] | list[_Call]) -> bool:
    """A probed structure of module-layer calls only (no operation-level use, no example-free call)."""
    return all(c[0].index >= 0 and not (len(c) == 2 and c[1] == "free") for c in structure)


def _signature(inputs: tuple[Any, ...], targets: Any, weights: Tensor | None) -> tuple[Any, ...]:
    """The inputs' and targets' structure, shapes without the example axis and
    dtypes: calls of one signature share the probe's verdict."""
    def leaf(t: Any) -> Any:
        if isinstance(t, Tensor):
            return (tuple(t.shape[1:]), t.dtype, t.device.type) if t.dim() else ("scalar", t.dtype)
        return t if t is None or isinstance(t, (bool, int, float, str)) else type(t).__name__
    if len(inputs) == 1 and isinstance(inputs[0], Tensor) and isinstance(targets, Tensor):
        return (leaf(inputs[0]),), leaf(targets), weights is None
    return tuple(map(leaf, tree_flatten(inputs)[0])), tuple(map(leaf, tree_flatten(targets)[0])), weights is None


def _other_dims(tree: Any) -> set[int]:
    """Every dimension of every tensor in a pytree but the example axis."""
    return {d for t in tree_flatten(tree)[0] if isinstance(t, Tensor) for d in t.shape[1:]}


class PerExampleStats:
    """Exact statistics of docs/spec.md section 4 for ``model`` and a per-example loss.

    model: any module whose examples do not interact (BatchNorm in training
        mode is refused, see :class:`BatchNormTrainingError`).
    loss_fn: ``loss_fn(model_output, targets)`` -> per-example losses l_i, shape (m,).
    method: ``"auto"`` (fast where every trainable layer is supported and the
        probe verifies it, generic otherwise), ``"fast"`` (raise
        :class:`UnsupportedModelError` where it cannot) or ``"generic"``.
    chunk_size: examples per ``vmap`` call of the generic path (default: about
        2**25 gradient elements per chunk).
    compile: run the fast path as one ``torch.compile``d function
        (:mod:`.compiled`: the model traced by ``torch.fx``, output gradients
        from zero perturbations), which fuses the sums of squares into the
        kernels that produce them. Needs a model ``torch.fx`` can trace and a C++
        compiler on CPU; compiles on the first call and again when shapes
        change (pad batches to a few sizes, ``CABSController.padding_buckets``).
        Layers: those of the fast path (:data:`.compiled.COMPILED_LAYERS`);
        graphs with convolutions, channel norms or max pooling compile with
        ``aot_eager`` (an inductor bug: see :mod:`.compiled`). Models with
        operation-level uses (transformers: tied heads, positions, broadcasts,
        ``nn.MultiheadAttention``) take :mod:`.compiled_graph` (a TorchDynamo
        capture matched use for use to the probe; one compilation per batch
        size); where it cannot establish the probed decomposition, ``fast``
        raises and ``auto`` warns and uses the eager fast path. The generic path
        is never compiled. The probes run eagerly.
    verify_every: re-probe every ``verify_every`` calls (default
        :data:`cabs_core.exactness.VERIFY_EVERY`); ``None`` or 0: only the first
        call of each input signature.

    The fast path returns S only for a verified signature (see the module's
    docstring); ``auto`` falls back to the generic path with one
    :class:`FastPathFallbackWarning` per signature, ``fast`` raises. The
    analysis of the model (supported layers, method, verdicts) is cached and
    redone when the set of trainable parameters changes. Call the object once
    per step.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, method: Method = "auto",
                 chunk_size: int | None = None, compile: bool = False,
                 verify_every: int | None = VERIFY_EVERY) -> None:
        if method not in ("auto", "fast", "generic"):
            raise ValueError(f"method must be 'auto', 'fast' or 'generic', got {method!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        verify_due(1, verify_every)  # validates
        self.model, self.loss_fn, self.method, self.chunk_size = model, loss_fn, method, chunk_size
        self.compile, self.verify_every = compile, verify_every
        self.calls = 0  # calls so far: the probe schedule's step
        self.probes = 0  # probes run so far (for tests and benchmarks)
        self._plan: _Plan | None = None

    @property
    def params(self) -> list[nn.Parameter]:
        """The parameters ``grad_sum`` follows: :func:`trainable_parameters`."""
        return self.plan().params

    @property
    def resolved_method(self) -> Literal["fast", "generic"]:
        """What ``method`` stands for on this model now (before the probes: a
        signature that fails its probe under ``auto`` uses ``generic``)."""
        return self.plan().how

    def plan(self) -> _Plan:
        key = _parameter_key(self.model)
        if self._plan is None or self._plan.key != key:
            params = trainable_parameters(self.model)
            if not params:
                raise ValueError("the model has no trainable parameters")
            how = resolve_method(self.model, self.method)
            rtol = 0.0
            if how == "fast":
                try:  # the checks' tolerance: the loosest of the parameters' dtypes
                    rtol = max(rtol_for(str(p.dtype)) for p in params)
                except ValueError as err:
                    if self.method == "fast":
                        raise UnsupportedModelError(f"the fast path cannot verify itself here: {err}") from err
                    how = "generic"
            records: dict[nn.Module, _Record] = {}
            owned: dict[int, list[tuple[_Record, str]]] = {}
            if how == "fast":
                for name, mod in self.model.named_modules():
                    rule = rule_for(mod)
                    own = [(n, p) for n, p in mod.named_parameters(recurse=False, remove_duplicate=False)
                           if p.requires_grad]
                    if rule is not None and own:
                        rec = records[mod] = _Record(name, rule, mod, len(records), rank_one=type(mod) is nn.Linear,
                                                     pids=tuple(id(p) for p in mod.parameters(recurse=False)))
                        for n, p in own:
                            owned.setdefault(id(p), []).append((rec, n))
            bns: list[tuple[str, nn.Module]] = [
                (n, m) for n, m in self.model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            ]
            plan = _Plan(key, params, how, records, bns)
            plan.owners = [owned.get(id(p), []) for p in params]
            by_id = {id(p): n for n, p in self.model.named_parameters()}
            plan.names = [by_id[id(p)] for p in params]
            plan.param_dims = {d for t in self.model.parameters() for d in t.shape}
            plan.buffer_dims = {d for t in self.model.buffers() for d in t.shape}
            plan.rtol = rtol
            plan.ops = True
            plan.tracked = {id(p): n for p, n in zip(params, plan.names)}
            plan.constants = ({id(p) for p in self.model.parameters() if not p.requires_grad}
                              | {id(b) for b in self.model.buffers()})
            plan.tie_groups = _tie_groups(params, plan.owners)
            self._plan = plan
            if self.compile and how == "fast" and not unsupported_reasons(self.model, ops=False):
                # module layers only: the fx-traced compiled path (.compiled); a signature whose probe sees
                # operation-level uses takes the graph-captured one (.compiled_graph) instead
                try:
                    plan.compiled = CompiledFastStats(
                        self.model, self.loss_fn, params, {rec.name for rec in records.values()},
                        tie_groups=[[(tuple(p.shape), [(rec.mod, n) for rec, n in uses]) for p, uses in g.params]
                                    for g in plan.tie_groups])
                except UnsupportedModelError as err:  # fx cannot trace it: the graph-captured path
                    if err.reason != FX_TRACE_FAILED:
                        raise
                    plan.compiled = None
        return self._plan

    def __call__(self, inputs: Any, targets: Any = None, mask: Tensor | None = None, *,
                 verify: bool | None = None) -> BatchStats:
        """Statistics of one batch as a :class:`cabs_core.BatchStats`.

        inputs: a tensor or a tuple of tensors (positional arguments of the model),
            each with a leading example axis of length m; ``targets`` likewise (any pytree).
        mask: optional 0/1 mask of shape (m,): examples with mask 0 (padding)
            change none of the sums.
        verify: probe the fast path on this call (None: every ``verify_every``
            calls, the schedule of :func:`cabs_core.exactness.verify_due`).

        ``grad_sum`` follows :attr:`params`; it is the ordinary gradient of
        sum_i w_i l_i. ``count``, ``loss_sum`` and ``sq_norm_sum`` are float64
        0-d tensors on the model's device (float32 on MPS). Parameters' ``.grad``
        are not touched, and nothing is copied to the host (a probe compares
        its results on the host).
        """
        plan = self.plan()
        for _, mod in plan.batch_norms:
            if mod.training or not mod.track_running_stats:
                check_batch_norm(self.model)  # raises, naming the layer and the options
        device = plan.params[0].device if plan.params else None
        inputs, targets, weights = _from_numpy((_as_tuple(inputs), targets, mask), device)
        m = _batch_size(inputs)
        if weights is not None and tuple(weights.shape) != (m,):
            raise ValueError(f"mask must have shape ({m},), got {tuple(weights.shape)}")
        if weights is not None:  # padding rows cannot poison the sums: select, never multiply (0 * inf = nan)
            inputs, targets = _zero_masked_rows((inputs, targets), weights != 0, m)
        if m == 0:  # spec section 5: an empty batch has count 0 (the controller skips the step)
            zero = torch.zeros((), dtype=_stat_dtype(device or torch.device("cpu")), device=device)
            return BatchStats(zero, zero.clone(), tuple(torch.zeros_like(p) for p in plan.params), zero.clone())
        step, self.calls = self.calls, self.calls + 1
        if plan.how == "fast":
            due = verify_due(step, self.verify_every) if verify is None else verify
            result = self._verified_fast(plan, inputs, targets, weights, m, due)
            if result is not None:
                return BatchStats(*result)
        count, loss_sum, grad_sum, sq = _generic(
            self.model, self.loss_fn, inputs, targets, weights, plan.params, self.chunk_size)
        return BatchStats(count, loss_sum, grad_sum, sq)

    # ------------------------------------------------------------------------- verification

    def _verified_fast(self, plan: _Plan, inputs: tuple[Any, ...], targets: Any, weights: Tensor | None, m: int,
                       due: bool) -> tuple[Tensor, Tensor, tuple[Tensor, ...], Tensor] | None:
        """The fast path's result if this signature is verified (probing it first
        when new or due), None where the generic path must answer."""
        sig = _signature(inputs, targets, weights)
        verdict = plan.verdicts.get(sig)
        if verdict is None or (due and verdict.ok):
            verdict = self._probe(plan, sig, inputs, targets, m)
        if verdict is None or not verdict.ok:
            return None
        if self.compile:
            result = self._compiled(plan, sig, verdict, inputs, targets, weights, m)
            if result is not None:
                return result
        for attempt in range(2):
            try:
                return self._fast(plan, inputs, targets, weights, m, verdict.expected(m))[:4]
            except ReplayFailed as err:  # the decomposition the probe verified does not hold for this batch
                return self._fail(plan, sig, err)
            except _StructureChanged as change:
                if attempt == 0:  # a new way of calling the layers: probe it on this batch
                    verdict = self._probe(plan, sig, inputs, targets, m)
                    if verdict is None or not verdict.ok:
                        return None
                    continue
                err = UnsupportedModelError(
                    f"the layers were called differently on a batch of {m} examples than on the probe batch "
                    f"({change}): the fast path cannot establish its per-example decomposition for this batch. "
                    f"Use method='generic' (exact for any model) or method='auto' (falls back to it).",
                    layer=change.layer, reason=f"layer calls differ between the full and the probe batch: {change}")
                return self._fail(plan, sig, err)
        return None

    def _compiled(self, plan: _Plan, sig: Any, verdict: _Verdict, inputs: tuple[Any, ...], targets: Any,
                  weights: Tensor | None, m: int) -> tuple[Tensor, Tensor, tuple[Tensor, ...], Tensor] | None:
        """compile=True: the fx-traced function for a signature of module layers only, else the graph
        captured for this signature and batch size (:mod:`.compiled_graph`); None where the eager fast
        path must answer (the compiled path could not establish the probed decomposition: ``fast``
        raises, ``auto`` warns once per signature and batch size)."""
        structure = verdict.structures[0]
        if plan.compiled is not None and _module_calls_only(structure):  # the traced graph's calls
            return plan.compiled(inputs, targets, weights, m, [tuple(c[3][1:]) for c in structure])
        key = (sig, m, structure)
        graph = plan.graphs.get(key)
        if graph is None:
            from .compiled_graph import GraphFastStats
            try:
                graph = GraphFastStats(self.model, self.loss_fn, plan, structure, inputs, m)
            except UnsupportedModelError as err:
                if self.method == "fast":
                    raise
                graph = False
                warnings.warn(FastPathFallbackWarning(
                    f"cabs_torch: compile=True uses the eager fast path (exact, not compiled) for this model "
                    f"and input signature, because {err}"), stacklevel=4)
            plan.graphs[key] = graph
        if graph is False:
            return None
        return graph(inputs, targets, weights)

    def _fail(self, plan: _Plan, sig: Any, err: UnsupportedModelError) -> None:
        """``fast``: raise; ``auto``: warn once and use the generic path for this signature."""
        if self.method == "fast":
            raise err
        plan.verdicts[sig] = _Verdict(False, reason=str(err))
        warnings.warn(FastPathFallbackWarning(
            f"cabs_torch: method='auto' uses the exact generic path (slower) for this model and input "
            f"signature from now on, because {err}"), stacklevel=4)
        return None

    def _probe(self, plan: _Plan, sig: Any, inputs: tuple[Any, ...], targets: Any, m: int) -> _Verdict | None:
        """Run the fast path on the first k examples and check it (provenance,
        accounting, S against the generic path). Returns the signature's updated
        verdict, or None when this batch cannot decide (no probe size fits, or a
        non-finite result): then the generic path answers this call."""
        # k differs from every dimension of the inputs, targets and buffers, and if a k <= m
        # allows, of the parameters (those are second lines of defence: a layer applied to
        # a weight is an unseen use for the accounting check, and fast S != generic S)
        strict = plan.buffer_dims | _other_dims(inputs) | _other_dims(targets)
        k = probe_batch_size(m, strict | plan.param_dims) or probe_batch_size(m, strict)
        if k is None:
            return None
        modes = [(mod, mod.training) for mod in self.model.modules()]
        self.model.eval()  # dropout off, so that the fast and generic paths see the same function
        try:
            try:
                structure = self._probe_at(plan, inputs, targets, m, k)
            except UnsupportedModelError as err:
                if isinstance(err, (BatchNormTrainingError, _NoRule)):
                    raise
                # a dimension the model creates may equal k (T + 1 after a cls token is concatenated):
                # the examples are then ambiguous in its tensors. One more probe, of another size, with
                # the same checks; the first error stands if it fails too
                k2 = probe_batch_size(m, strict | plan.param_dims | {k}) or probe_batch_size(m, strict | {k})
                if k2 is None:
                    raise
                try:
                    structure = self._probe_at(plan, inputs, targets, m, k2)
                except UnsupportedModelError as err2:
                    if isinstance(err2, BatchNormTrainingError):
                        raise
                    raise err from None
        except UnsupportedModelError as err:
            if isinstance(err, BatchNormTrainingError):
                raise
            return self._fail(plan, sig, err)
        finally:
            for mod, mode in modes:
                mod.training = mode
        if structure is None:
            return None
        verdict = plan.verdicts.setdefault(sig, _Verdict(True))
        verdict.accept(tuple(structure))
        return verdict

    def _probe_at(self, plan: _Plan, inputs: tuple[Any, ...], targets: Any, m: int, k: int) -> list[_Call] | None:
        """One probe on the first k examples (raises UnsupportedModelError where a check fails);
        its capture structure, or None when a result is not finite."""
        self.probes += 1
        px, py = _take(inputs, slice(0, k)), _take(targets, slice(0, k))
        try:
            _, _, grads, sq, structure, kept = self._fast(plan, px, py, None, k, None, keep=True)
        except _LossShapeError as err:  # say it for the user's batch, not the probe's
            raise _LossShapeError(err.shape, m, k) from None
        if plan.compiled is not None and _module_calls_only(structure):
            self._check_compiled_calls(plan, structure)
        generic = _loop_sq_norm_sum(self.model, self.loss_fn, px, py, plan.params, k)
        fast_s, generic_s = float(sq), float(generic)  # the probe's host transfer
        if not (math.isfinite(fast_s) and math.isfinite(generic_s)):
            return None
        rtol = max(plan.rtol, _autocast_rtol(plan.params[0].device))  # autocast: its dtype's tolerance
        with _full_precision(plan.params[0]):
            self._check_accounting(plan, grads, kept, k, rtol)
        check_close(f"S on a probe batch of {k} examples (fast vs generic)", abs(fast_s - generic_s),
                    abs(generic_s), rtol)
        return structure

    @staticmethod
    def _rows_error(rec: _Record, what: str, shape: tuple[int, ...], k: int) -> UnsupportedModelError:
        """The probe could not place its k examples in a captured tensor."""
        return UnsupportedModelError(
            f"layer {rec.name!r} ({type(rec.mod).__name__}) was called on a probe batch of {k} examples "
            f"with an {what} of shape {shape}: no axis of it is the examples' (examples folded into another "
            f"axis, a tensor without the example axis such as a positional embedding or a buffer, or part of "
            f"the batch), so the fast path's per-example decomposition does not hold there. method='generic' "
            f"is exact for any model; method='auto' falls back to it.",
            layer=rec.name, reason=f"{what} of shape {shape} on a probe batch of {k} examples")

    @staticmethod
    def _check_accounting(plan: _Plan, grads: tuple[Tensor | None, ...], kept: dict[_Record, list[Any]],
                          k: int, rtol: float) -> None:
        """Each parameter's gradient rebuilt from its uses' captured terms (module
        layers, operation-level uses, broadcasts) equals its full gradient: a
        difference is a use the fast path does not see."""
        dyn: dict[int, list[tuple[_Record, str]]] = {}
        for rec in kept:
            if isinstance(rec.mod, (OpSite, BroadcastSite, VjpSite)):
                for p, pname in _site_params(rec.mod):
                    dyn.setdefault(id(p), []).append((rec, pname))
        # each use's pieces, computed once (a recurrent rule recomputes its layer), and the same with
        # every term's magnitude: the rule on |a| and |b| (so that a sum over positions that cancels, a
        # key projection's bias under softmax, keeps the size of its terms), or for a rule that is not
        # bilinear in them (nn.LSTM) the pieces' factors' magnitudes
        pieces: dict[_Record, list[tuple[dict[str, Piece], dict[str, Piece]]]] = {}
        for p, g, owners, name in zip(plan.params, grads, plan.owners, plan.names):
            shape = tuple(p.shape)
            uses: list[Piece] = []
            magnitude = None  # the rebuilt sum with every term's magnitude: the scale of its rounding
            for rec, pname in [*owners, *dyn.get(id(p), [])]:
                if rec not in pieces:
                    pieces[rec] = []
                    for a, b in kept.get(rec, []):
                        a, b = None if a is None else _wide(a), _wide(b)
                        call = rec.rule(rec.mod, a, b)
                        mags = ({n: _abs_piece(pc) for n, pc in call.items()} if hasattr(rec.rule, "pack")
                                else rec.rule(rec.mod, _abs(a), _abs(b)))
                        pieces[rec].append((call, mags))
                for call, mags in pieces[rec]:
                    piece = call.get(pname)
                    if piece is not None:
                        uses.append(piece)
                        term = piece_grad_sum(mags[pname], k, shape).abs()
                        magnitude = term if magnitude is None else magnitude + term
            full = _wide(torch.zeros_like(p) if g is None else g.detach())
            rebuilt = None
            for piece in uses:
                term = piece_grad_sum(piece, k, shape).to(full.dtype)
                rebuilt = term if rebuilt is None else rebuilt + term
            full_norm = float(torch.linalg.vector_norm(full))
            if not uses and full_norm > 0 and not any(rec.called for rec, _ in owners):
                mods = ", ".join(repr(rec.name) for rec, _ in owners)
                seen = f"module {mods} was never called (its weight is used functionally?)" if mods else \
                    "no use of it was seen"
                raise UnsupportedModelError(
                    f"parameter {name} received a gradient, but {seen}: the fast path cannot see that use. "
                    f"method='generic' is exact for any model; method='auto' falls back to it.",
                    layer=name, reason="a gradient without a call of its layer")
            s_param = float(tied_sq_norm_sum(uses, k, shape)) if uses else 0.0
            diff = float(torch.linalg.vector_norm(full if rebuilt is None else rebuilt - full))
            # a gradient that cancels to about 0 (a key projection's bias under softmax, a saturated
            # output) is compared with the size of the terms it sums, the scale of its rounding error
            scale = max(accounting_scale(full_norm, k, s_param),
                        0.0 if magnitude is None else float(torch.linalg.vector_norm(magnitude)))
            check_close(f"the gradient of {name!r} rebuilt from its layers' captured terms (a use outside "
                        f"the layer?)", diff, scale, rtol, layer=name)

    @staticmethod
    def _check_compiled_calls(plan: _Plan, structure: list[_Call]) -> None:
        """compile=True: the probed calls are the traced graph's (same layers, in order, all reaching the
        loss, the examples on axis 0)."""
        eager = [c[0].name for c in structure]
        if eager != plan.compiled.calls or any(len(c) != 4 or c[1] != (0, 1, 1) for c in structure):
            raise UnsupportedModelError(
                f"compile=True: the layer calls seen in the eager probe ({eager}) differ from the traced "
                f"graph's ({plan.compiled.calls}), or a call's output does not reach the loss: the compiled "
                f"statistics would not match. Use compile=False (the eager fast path).",
                layer=None, reason="the traced graph's layer calls differ from the eager ones")

    # ------------------------------------------------------------------------- the fast step

    def _fast(self, plan: _Plan, inputs: tuple[Any, ...], targets: Any, weights: Tensor | None, m: int,
              expected: list[tuple[_Call, ...]] | None, keep: bool = False,
              ) -> tuple[Tensor, Tensor, tuple[Tensor, ...], Tensor, list[_Call], dict[_Record, list[Any]]]:
        """One fast step. ``expected``: the accepted capture structures (raise
        :class:`_StructureChanged` after the forward pass if this one's differs);
        None: a probe of m examples, which places the examples in every captured
        tensor (an axis of length m, or for operation-level uses a folded axis).
        ``keep``: also return each use's (input, output gradient) per call."""
        records = plan.records
        probe = expected is None
        deferred: list[GradientEdge] = []  # output edges of rank-one Linear calls, sent to autograd.grad
        owners: list[tuple[_Record, int, _ViewOf | None, tuple[int, int, int]]] = []
        structure: list[_Call] = []
        used: dict[_Record, None] = {}  # operation-level use sites of this pass, in order
        # the operation-level capture runs in probes, and between probes where the probed calls had
        # operation-level uses or example-free inputs; a model of module layers only runs without it
        # (a functional use added later by control flow is then caught by the next probe, as before)
        needed = probe or any(c[0].index < 0 or (len(c) == 2 and c[1] == "free") for st in expected for c in st)
        mode = ParamUses(plan.tracked, plan.constants, None) if plan.ops and needed else None

        def spec_of(rec: _Record, a: Tensor, out: Tensor, min_trailing: int, folds: bool) -> tuple[int, int, int]:
            pos = len(structure)
            if not probe:  # where the probe found the examples for this call
                spec = next((st[pos][1] for st in expected
                             if pos < len(st) and st[pos][0] is rec and len(st[pos]) == 4), (0, 1, 1))
                if None not in masked(tuple(a.shape), spec, m):  # not there (rows per example vary between batches)
                    raise _StructureChanged(f"layer {rec.name!r} got an input of shape {tuple(a.shape)} without "
                                            f"the {m} examples where the probe found them", rec.name)
                return spec
            if mode is not None and mode.is_ragged(a):
                raise UnsupportedModelError(
                    f"layer {rec.name!r} ({type(rec.mod).__name__}) was called {ragged_rows(tuple(a.shape))}. "
                    f"method='generic' is exact for any model; method='auto' falls back to it.", layer=rec.name,
                    reason=f"input of shape {tuple(a.shape)} with data-dependent rows")
            hints = mode.hints if mode is not None else []
            spec = fold_spec(tuple(a.shape), m, hints, folds, min_trailing)
            if spec is None:
                raise self._rows_error(rec, "input", tuple(a.shape), m)
            if None not in masked(tuple(out.shape), spec, m):
                raise self._rows_error(rec, "output", tuple(out.shape), m)
            return spec

        def capture(rec: _Record, a: Tensor | None, out: Tensor, spec: tuple[int, int, int],
                    a_key: Any) -> None:
            structure.append((rec, spec, a_key, masked(tuple(out.shape), spec, m)))
            rec.inputs.append(None if a is None else to_examples(a.detach(), spec, m))
            k = len(rec.inputs) - 1
            node, nr, view = _output_edge(out)
            if rec.rank_one and a is not None and a.dim() == 2 and spec == (0, 1, 1):
                rec.deferred = True  # its output gradient is small: collect it with the parameters'
                deferred.append(GradientEdge(node, nr))
                owners.append((rec, k, view, spec))
                return

            def prehook(grad_outputs: tuple[Tensor | None, ...]) -> None:
                g = grad_outputs[nr]
                if g is None:
                    return
                rec.grads[k] = to_examples(_view_grad(g, view), spec, m)
                if not (rec.deferred or rec.tied or rec.dyn) and len(rec.grads) == len(rec.inputs):
                    rec.finish(rec.mod, FAST_CHUNK_ELEMENTS)  # all in: reduce (backward runs without grad mode)

            node.register_prehook(prehook)

        def op_record(key: Any, site: Any, rule: Rule) -> _Record:
            rec = plan.op_records.get(key)
            if rec is None:
                rec = plan.op_records[key] = _Record(site.label, rule, site, -1)
            rec.mod, rec.rule, rec.called, rec.keep = site, rule, True, keep
            used[rec] = None
            return rec

        class Sink:
            """Where the operation-level capture (:class:`.ops.ParamUses`) reports the uses."""

            @staticmethod
            def next_index() -> int:
                return len(structure)

            @staticmethod
            def weight_use(key: Any, site: OpSite, rule: Rule, a: Tensor, out: Any, min_trailing: int) -> None:
                rec = op_record(key, site, rule)
                if not isinstance(out, Tensor) or not out.requires_grad:
                    structure.append((rec,))
                    return
                spec = spec_of(rec, a, out, min_trailing, True)
                capture(rec, a, out, spec, masked(tuple(a.shape), spec, m))

            @staticmethod
            def broadcast_use(key: Any, site: BroadcastSite, a: Tensor | None, out: Tensor) -> None:
                from .ops import broadcast_pieces
                rec = op_record(key, site, broadcast_pieces)
                if not out.requires_grad:
                    structure.append((rec,))
                    return
                src = tuple(site.source.shape)
                spec = (0, 1, 1)
                if probe:
                    # the examples on axis 0, or folded into it example-major when no other axis is theirs
                    # (Swin's (m * windows, heads, N, N) attention scores plus a relative-position bias)
                    folded = (out.dim() > 0 and out.shape[0] != m and out.shape[0] % m == 0
                              and m not in out.shape[1:])
                    spec = (0, 1, out.shape[0] // m) if folded else spec
                    bad = (out.dim() == 0 or (out.shape[0] != m and not folded) or m in src
                           or len(src) > out.dim() or (len(src) == out.dim() and src[0] != 1)
                           or (a is not None and (a.dim() != out.dim() or a.shape[0] != out.shape[0])))
                    if bad:
                        shape = tuple(out.shape) if a is None else tuple(a.shape)
                        raise self._rows_error(rec, "output" if a is None else "input", shape, m)
                else:  # where the probe found the examples for this call
                    spec = spec_of(rec, out, out, 0, True)
                a_key = (site.kind, src, None if a is None else masked(tuple(a.shape), spec, m))
                capture(rec, a, out, spec, a_key)

            @staticmethod
            def op_use(key: Any, site: VjpSite, out: Tensor) -> None:
                from .ops import op_vjp_pieces
                rec = op_record(key, site, op_vjp_pieces)
                if not (out.requires_grad and out.is_floating_point()):
                    structure.append((rec,))
                    return
                x0 = site.xs[0]
                if probe and (out.dim() == 0 or any(x.dim() == 0 or x.shape[0] != out.shape[0] for x in site.xs)):
                    shapes = [tuple(x.shape) for x in site.xs]
                    op = site.label.split("(")[0]
                    raise _NoRule(f"parameter {', '.join(site.names)} meets the examples in {op}, "
                                  f"an operation without a rule of its own, and the examples are not on axis 0 of "
                                  f"every example-carrying operand ({shapes}) and of the output ({tuple(out.shape)}), "
                                  f"so it cannot be replayed per example (register a rule with "
                                  f"cabs_torch.register_rule, or use method='generic', exact for any model; "
                                  f"method='auto' falls back to it)", layer=", ".join(site.names),
                                  reason=f"operands {shapes} -> output {tuple(out.shape)}")
                spec = spec_of(rec, x0, out, x0.dim() - 1, True)
                rows = torch.arange(out.shape[0], device=out.device)
                if probe and spec != (0, 1, 1):
                    # axis 0 folds the examples only if no other axis is theirs (a time-major (T, k, d), T a
                    # multiple of k): an axis of length k elsewhere is refused (a probe of another k may decide)
                    for shape in (*(tuple(x.shape) for x in site.xs), tuple(out.shape)):
                        if m in shape[1:]:
                            raise self._rows_error(rec, "input" if shape != tuple(out.shape) else "output", shape, m)
                if probe:  # the op on one example's rows gives that example's rows of the output (shape)
                    first = to_examples(rows, spec, m)[0].reshape(-1)
                    try:
                        with torch.no_grad():
                            one = site.call([x.index_select(0, first) for x in site.xs],
                                            [e.detach() for e in site.es])
                        ok = isinstance(one, Tensor) and tuple(one.shape) == (first.numel(), *site.out_rest)
                    except RuntimeError:
                        ok = False
                    if not ok:
                        raise self._rows_error(rec, "output", tuple(out.shape), m)
                a_key = (site.label, tuple(masked(tuple(x.shape), spec, m) for x in site.xs),
                         tuple(tuple(e.shape) for e in site.es))
                capture(rec, rows, out, spec, a_key)

            @staticmethod
            def unattributed(message: str, name: str) -> None:
                if probe:
                    raise _NoRule(message, layer=name, reason=message)
                raise _StructureChanged(message, name)

        if mode is not None:
            mode.sink = Sink()
            mode.sites = plan.op_sites
            mode.batch = m

        def pre_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if mode is None:
                return
            a = args[0] if args else next(iter(kwargs.values()), None)
            if not (isinstance(a, Tensor) and mode.is_free(a)):  # e.g. a PackedSequence: the module's own
                mode.skip.update(records[mod].pids)

        def forward_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
            rec = records[mod]
            rec.called = True
            a = args[0] if args else next(iter(kwargs.values()))
            returned = None
            pack = getattr(rec.rule, "pack", None)
            if pack is not None and not (mode is not None and isinstance(a, Tensor) and mode.is_free(a)):
                # a layer of several inputs and outputs (nn.LSTM): one example-major tensor each way, and the
                # model receives views of the packed output (recurrent.py); its parameters' uses there are
                # the layer's own (still skipped by the operation-level capture)
                a, out, returned = pack(mod, args, kwargs, out, rec.keep)
            if mode is not None:
                mode.skip.difference_update(rec.pids)
                if isinstance(a, Tensor) and mode.is_free(a):  # positions: seen where they meet the examples
                    structure.append((rec, "free"))
                    return returned
            if not isinstance(out, Tensor) or not out.requires_grad:
                structure.append((rec,))
                return returned
            spec = spec_of(rec, a, out, _trailing_axes(mod), True)
            capture(rec, a, out, spec, masked(tuple(a.shape), spec, m))
            return returned

        params = plan.params
        handles = [mod.register_forward_hook(forward_hook, with_kwargs=True) for mod in records]
        handles += [mod.register_forward_pre_hook(pre_hook, with_kwargs=True) for mod in records]
        for rec in records.values():
            rec.keep = keep
        kept: dict[_Record, list[Any]] = {}
        try:
            if mode is not None:
                with mode:
                    out = self.model(*inputs)
                mode.clear()
            else:
                out = self.model(*inputs)
            if not probe and tuple(structure) not in expected:
                raise _StructureChanged(*self._first_difference(structure, expected[0]))
            group = self._dynamic_group(plan, list(used))
            losses = self.loss_fn(out, targets)
            _check_losses(losses, m)
            weighted = losses if weights is None else losses * weights.to(losses.dtype)
            device = params[0].device
            dtype = _stat_dtype(device)
            count, loss_sum = _count_and_loss(losses.detach(), weights, dtype)
            retain = any(isinstance(r.mod, (BroadcastSite, VjpSite)) and r.mod.chains for r in used)
            grads = torch.autograd.grad(weighted.sum(), [*params, *deferred], allow_unused=True,
                                        retain_graph=retain)
            totals: list[Tensor] = []
            with torch.no_grad():
                for (rec, k, view, spec), g in zip(owners, grads[len(params):]):
                    if g is not None:
                        rec.grads[k] = to_examples(_view_grad(g, view), spec, m)
                for mod, rec in records.items():
                    if rec.grads and not rec.tied and not rec.dyn:  # deferred, or a layer used several times
                        rec.finish(mod, FAST_CHUNK_ELEMENTS)
                for tie in plan.tie_groups:
                    if not any(r.dyn for r in tie.records):
                        totals.extend(tie.finish(FAST_CHUNK_ELEMENTS))
            if group is not None:  # the batched VJPs of broadcast sources need grad mode
                totals.extend(self._finish_group(*group, keep))
            grads = grads[: len(params)]
            for rec in [*records.values(), *used]:
                totals.extend(rec.totals)
                if keep:
                    kept[rec] = list(rec.kept)
        finally:
            for h in handles:
                h.remove()
            for rec in [*records.values(), *plan.op_records.values()]:
                rec.reset()
            for key in [k for k, v in plan.op_sites.items() if isinstance(v, (BroadcastSite, VjpSite))]:
                del plan.op_sites[key]  # they hold the pass's tensors
        if not totals:
            sq = torch.zeros((), dtype=dtype, device=device)
        elif all(t.dtype == totals[0].dtype and t.device == device for t in totals):
            sq = torch.stack(totals).sum(dtype=dtype)
        else:
            sq = torch.stack([t.to(device=device, dtype=dtype) for t in totals]).sum()
        grad_sum = tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))
        return count, loss_sum, grad_sum, sq, structure, kept

    @staticmethod
    def _dynamic_group(plan: _Plan, used: list[_Record]) -> tuple[list[_Record], list[Any]] | None:
        """The operation-level uses of this pass, with the module layers (and their tie
        groups) that share a parameter with them: reduced together after backward."""
        if not used:
            return None
        ids = {id(p) for rec in used for p, _ in _site_params(rec.mod)}
        members = list(used)
        for rec in plan.records.values():
            if any(i in ids for i in rec.pids):
                members.append(rec)
        for tie in plan.tie_groups:
            if any(r in members for r in tie.records):
                members.extend(r for r in tie.records if r not in members)
        for rec in members:
            rec.dyn = True
        owners: dict[int, list[tuple[Any, str]]] = {}
        shapes: dict[int, tuple[int, ...]] = {}
        for rec in members:
            pairs = (_site_params(rec.mod) if rec in used else
                     [(p, n) for n, p in rec.mod.named_parameters(recurse=False, remove_duplicate=False)
                      if p.requires_grad])
            for p, name in pairs:
                owners.setdefault(id(p), []).append((rec.mod, name))
                shapes[id(p)] = tuple(p.shape)
        return members, [(shapes[i], uses) for i, uses in owners.items()]

    @staticmethod
    def _finish_group(members: list[_Record], params: list[Any], keep: bool) -> list[Tensor]:
        calls = {}
        for rec in members:
            calls[rec.mod] = (rec.rule, rec.calls())
            if keep:
                rec.kept.extend(calls[rec.mod][1])
            rec.inputs.clear()
            rec.grads.clear()
        return uses_sq_norm_sums(calls, params, FAST_CHUNK_ELEMENTS)

    @staticmethod
    def _first_difference(structure: list[_Call], expected: tuple[_Call, ...]) -> tuple[str, str | None]:
        """The first layer call that differs from the probed structure: a message and the layer's name."""
        for i, call in enumerate(structure):
            want = expected[i] if i < len(expected) else None
            if call != want:
                got = f"shapes {call[2]} -> {call[3]}" if len(call) == 4 else "no gradient"
                name = call[0].name
                return f"call {i} of the forward pass: layer {name!r} with {got}", name
        return f"{len(expected) - len(structure)} fewer layer calls than on the probe batch", None


def _abs(t: Tensor | None) -> Tensor | None:
    """|t| for a floating tensor (the magnitudes of a rule's terms); others unchanged."""
    return t.abs() if t is not None and t.is_floating_point() else t


def _abs_piece(piece: Piece) -> Piece:
    """The piece with the magnitudes of its factors (token ids unchanged): its gradient sum bounds
    the terms the parameter's gradient adds up, the scale of the rounding of the accounting check."""
    return tuple(t.abs() if isinstance(t, Tensor) and t.is_floating_point() else t for t in piece)


def _trailing_axes(mod: nn.Module) -> int:
    """How many trailing axes of a module's input its rule needs in place (the example
    axis may be any axis before them); -1: the examples must be on axis 0."""
    if type(mod) is nn.Linear:
        return 1
    if type(mod) is nn.Embedding:
        return 0
    if type(mod) is nn.LayerNorm or (hasattr(nn, "RMSNorm") and type(mod) is nn.RMSNorm):
        return len(mod.normalized_shape)
    return -1


def _site_params(site: Any) -> list[tuple[Tensor, str]]:
    """The trainable parameters an operation-level use site covers, with their piece names."""
    if isinstance(site, (BroadcastSite, VjpSite)):
        return list(zip(site.deps, site.names))
    return [(p, n) for n, p in site.params.items() if isinstance(p, Tensor) and p.requires_grad]


def _tie_groups(params: list[nn.Parameter], owners: list[list[tuple[_Record, str]]]) -> list[_TieGroup]:
    """The layers that share parameters, in groups (connected through shared parameters)."""
    group_of: dict[_Record, int] = {}
    groups: list[list[_Record]] = []
    for uses in owners:
        recs = list(dict.fromkeys(rec for rec, _ in uses))
        if len(recs) < 2:
            continue
        ids = {group_of[r] for r in recs if r in group_of}
        merged = [r for i in sorted(ids) for r in groups[i]]
        for i in ids:
            groups[i] = []
        merged.extend(r for r in recs if r not in merged)
        groups.append(merged)
        for r in merged:
            group_of[r] = len(groups) - 1
    out = []
    for recs in groups:
        if not recs:
            continue
        for r in recs:
            r.tied = True
        members = set(recs)
        out.append(_TieGroup(recs, [(p, uses) for p, uses in zip(params, owners)
                                    if any(rec in members for rec, _ in uses)]))
    return out


def per_example_stats(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any = None,
    *,
    mask: Tensor | None = None,
    method: Method = "auto",
    chunk_size: int | None = None,
    compile: bool = False,
    verify_every: int | None = VERIFY_EVERY,
) -> BatchStats:
    """One-off :class:`PerExampleStats` ``(model, loss_fn, method, chunk_size, compile)(inputs, targets,
    mask)``; in a training loop keep a :class:`PerExampleStats` (it caches the model's analysis and,
    with ``compile=True``, the compiled function)."""
    return PerExampleStats(model, loss_fn, method=method, chunk_size=chunk_size, compile=compile,
                           verify_every=verify_every)(inputs, targets, mask)
