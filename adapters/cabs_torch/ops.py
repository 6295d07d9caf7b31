"""Operation-level capture for the fast path (issue 20): every use of a trainable
parameter outside a module with a module rule, seen as a call of a torch
function during the statistics pass.

:class:`ParamUses` is a ``torch.overrides.TorchFunctionMode`` active during the
model's forward pass. It sees every torch function call and keeps, for the
tensors of the pass, whether they are *example-free*: computed only from
parameters, buffers and constants (``torch.arange(T)``, a ``(1, T)`` position-id
buffer, ``cls_token.expand(B, -1, -1)``), so that they carry no example axis and
their values are the same for every example. A call whose arguments include a
trainable parameter (or an example-free tensor computed from one) and a tensor
that carries the examples is one *use* of those parameters:

- a *weight op* (``F.linear``, ``torch.addmm``/``matmul`` with a parameter as the
  right operand, ``F.embedding``, ``F.layer_norm``, ``F.rms_norm``,
  ``F.group_norm``, and functions registered with :func:`register_rule`): its
  input and the gradient of its output are captured, as the module hooks do,
  and the per-layer rules of :mod:`.layers` apply;
- a *broadcast* (``+``, ``-``, ``*`` and ``torch.cat`` with an example-free
  operand): the example's gradient of the example-free operand is the output
  gradient of that example reduced over the broadcast axes (times the other
  factor for ``*``); through an example-free embedding lookup it becomes an
  embedding piece (positions), through anything else the parameters' per-example
  gradients come from a batched vector-Jacobian product of that small graph;
- any other op (``torch.einsum``, ``torch.where``, ``F.scaled_dot_product_attention``
  with a parameter-derived ``attn_mask``, ``masked_fill`` ...) whose example-carrying
  operands and output have the examples on axis 0 (folded example-major allowed):
  an *operation VJP* use (:class:`VjpSite`): per example, the gradients of its
  example-free operands come from a vmapped ``torch.func.vjp`` of that one op on
  the example's rows, then reach the parameters as for a broadcast (an operand
  expanded along the rows, ``W.expand(m, d, d)``, is replayed as its source
  expanded to the example's rows). It materialises (examples, *operand shape)
  per chunk; a use whose one example needs more than :data:`OP_VJP_MAX_ELEMENTS`
  elements is refused by name;
- anything else (an in-place op, an op that draws random numbers, examples elsewhere
  than on axis 0, rows selected by the data such as ``h[mask]`` whose rows per
  example are no fixed block) is *unattributed*: the statistics pass stops and the
  fast path steps aside for that signature.

Python functions of torch that dispatch to the mode as a whole
(``F.multi_head_attention_forward``) are run with the mode active inside them,
so that their ``F.linear`` calls are seen one by one.
"""

from __future__ import annotations

import inspect
import math
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vjp as _vjp
from torch.func import vmap as _vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from cabs_core.exactness import UnsupportedModelError

from .layers import (
    RULES,
    Pieces,
    Rule,
    embedding_pieces,
    group_norm_pieces,
    layer_norm_pieces,
    linear_pieces,
    rms_norm_pieces,
)

__all__ = ["OP_VJP_MAX_ELEMENTS", "OpSite", "ParamUses", "VjpSite", "register_rule"]

#: the most elements one example of an operation VJP use (:class:`VjpSite`) may materialise: the
#: per-example gradients of the op's example-free operands plus those of the parameters they are
#: computed from. A use above it is refused by name (``fast`` raises, ``auto`` takes the generic path);
#: below it, chunks of examples are sized by the fast path's chunk budget (``FAST_CHUNK_ELEMENTS``)
OP_VJP_MAX_ELEMENTS = 2**24


@dataclass(eq=False)
class OpSite:
    """What a rule sees of one functional use of parameters: the parameters as
    attributes (``weight``, ``bias``, or the names a registered rule declares) and
    the call's other arguments (``normalized_shape``, ``eps``, ``args``, ...)."""

    label: str
    params: dict[str, Tensor | None]
    config: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        d = self.__dict__
        if name in d.get("params", {}):
            return d["params"][name]
        if name in d.get("config", {}):
            return d["config"][name]
        raise AttributeError(name)


def addmm_pieces(site: OpSite, a: Tensor, b: Tensor) -> Pieces:
    """``bias + x @ weight`` with weight (p, q) (the layout of Hugging Face's ``Conv1D``):
    a Linear layer with the transposed weight; the piece is built in the weight's own layout."""
    n = a.shape[0]
    A = a.reshape(n, -1, a.shape[-1])
    B = b.reshape(n, -1, b.shape[-1])
    out: Pieces = {}
    if site.weight is not None and site.weight.requires_grad:
        out["weight"] = ("lin", B, A)  # g = A^T B, (p, q): the weight's layout
    if site.bias is not None and site.bias.requires_grad:
        out["bias"] = ("dense", B.sum(1))
    return out


# ----------------------------------------------------------------------------- registration

#: functions with an operation rule: func -> (input argument index, {parameter name: argument index}, rule)
FUNCTION_RULES: dict[Callable[..., Any], tuple[int, dict[str, int], Rule]] = {}


def register_rule(target: type[nn.Module] | Callable[..., Any], rule: Rule, *,
                  input_arg: int = 0, param_args: dict[str, int] | None = None) -> None:
    """Declare the fast path's rule for a custom layer or a functional op.

    ``target`` a module type: ``rule(module, a, b)`` receives the module, its
    input ``a`` (the first positional argument) and the gradient ``b`` of the
    summed loss with respect to its output, both with the examples on axis 0,
    and returns the per-example gradients of the module's own parameters as
    pieces keyed by parameter name (see :mod:`cabs_torch.layers`: ``("dense", G)``
    with G (n, ...) the per-example gradients; ``("lin", A, B)`` for a weight
    shared over positions, g_i = sum_t B_it A_it^T; ``("emb", ids, B)``).

    ``target`` a function (called as ``target(*args)`` with tensors): the
    function's argument ``input_arg`` carries the examples and ``param_args``
    names the arguments that are parameters; ``rule(site, a, b)`` receives an
    :class:`OpSite` whose attributes are those parameters (and ``args``, the
    call's positional arguments).

    A wrong rule is not trusted: the probe compares the fast S with the
    single-example definition and rebuilds each parameter's gradient from the
    rule's pieces, so ``auto`` falls back (warning) and ``fast`` raises."""
    if isinstance(target, type) and issubclass(target, nn.Module):
        RULES[target] = rule
        return
    if not callable(target):
        raise TypeError(f"register_rule: target must be an nn.Module subclass or a function, got {target!r}")
    if not param_args:
        raise ValueError("register_rule: a function's rule needs param_args, e.g. {'weight': 1}")
    FUNCTION_RULES[target] = (input_arg, dict(param_args), rule)


# ----------------------------------------------------------------------------- the mode

_INPLACE = {Tensor.__iadd__, Tensor.add_, Tensor.__isub__, Tensor.sub_, Tensor.__imul__, Tensor.mul_}
_ADD = {torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__, Tensor.__iadd__, Tensor.add_}
_SUB = {torch.sub, Tensor.sub, Tensor.__sub__, Tensor.__isub__, Tensor.sub_}
_RSUB = {Tensor.__rsub__}
_MUL = {torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__, Tensor.__imul__, Tensor.mul_}
_CAT = {torch.cat, torch.concat}
_EXPAND = {Tensor.expand, Tensor.expand_as, torch.broadcast_to}
# ops on one tensor (and numbers) that commute with an expansion: applied to an expanded tensor, they
# give the expansion of the op applied to its source (positions shifted by an offset, a contiguous copy)
_KEEPS_EXPANSION = {torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__, torch.sub, Tensor.sub, Tensor.__sub__,
                    Tensor.__rsub__, torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__, Tensor.contiguous,
                    Tensor.clone}
_MATMUL = {torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.mm, Tensor.mm}
_TRANSPOSES = {Tensor.T.__get__, Tensor.mT.__get__, Tensor.t, torch.t, Tensor.transpose, torch.transpose}  # type: ignore[attr-defined]
_GETTERS = (Tensor.shape.__get__, Tensor.dtype.__get__, Tensor.device.__get__)  # type: ignore[attr-defined]
# ops whose output's length depends on the values of their inputs (h[mask] is Tensor.__getitem__ with a boolean index)
# methods that read only the dtype, device or shape of their second argument
_READS_META_OF_OTHER = {Tensor.type_as, Tensor.to, Tensor.view_as, Tensor.reshape_as}
_RESHAPES = {Tensor.view, Tensor.reshape, torch.reshape, Tensor.unflatten, torch.unflatten}
_DATA_SHAPED = {torch.masked_select, Tensor.masked_select, torch.nonzero, Tensor.nonzero, torch.argwhere,
                Tensor.argwhere, torch.unique, Tensor.unique, torch.unique_consecutive, Tensor.unique_consecutive,
                torch.repeat_interleave, Tensor.repeat_interleave}


def _writes(func: Any) -> bool:
    """Whether ``func`` changes its first argument in place (``add_``, ``x[i] = v``, ``x += v``)."""
    name = getattr(func, "__name__", "")
    return func in _INPLACE or name == "__setitem__" or (name.endswith("_") and not name.endswith("__"))


def _tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Tensor]:
    out = []
    for v in (*args, *kwargs.values()):
        if isinstance(v, Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(t for t in v if isinstance(t, Tensor))
    return out


def _outputs(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for t in out if isinstance(t, Tensor)]
    return []


class ReplayFailed(UnsupportedModelError):
    """The per-example replay of an operation VJP use failed after the probe (an operand changed in place,
    an op whose per-example shapes differ from the probe's): the call falls back (``fast`` raises)."""


class Unattributed(Exception):
    """A parameter met the examples in an op the fast path has no rule for."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(eq=False)
class FreeLookup:
    """An example-free embedding lookup ``weight[ids]`` (positions)."""

    ids: Tensor
    weight: Tensor
    padding_idx: int | None


@dataclass(eq=False)
class BroadcastSite:
    """An example-free tensor ``source`` (a parameter, or computed from parameters) broadcast over
    the examples by an add/sub/mul/cat. ``a`` of the captured call is the other factor of a ``*``."""

    label: str
    kind: str  # "add" (coefficient sign), "mul", "slice" (of a cat)
    source: Tensor
    deps: list[Tensor]  # the trainable parameters ``source`` is computed from
    names: list[str]  # their names in the pieces
    sign: float = 1.0
    dim: int = 0
    start: int = 0
    length: int = 0
    lookup: FreeLookup | None = None

    @property
    def chains(self) -> bool:
        """Whether the source is computed from parameters (not a parameter, not a lookup): a batched VJP
        of its graph, which the backward pass must keep."""
        return self.lookup is None and not (len(self.deps) == 1 and self.deps[0] is self.source)


def operand_grads(site: Any, a: Tensor | None, b: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Per example, the gradient of a broadcast's example-free operand of ``shape``: the output
    gradient b (n, ...) (its slice for a ``cat``, times the other factor a for ``*``, negated for a
    subtracted operand) summed over the axes the operand is broadcast along; (n, *shape)."""
    if site.kind == "slice":
        g = b.narrow(site.dim, site.start, site.length)
    elif site.kind == "mul":
        assert a is not None
        g = b * a
    else:
        g = b if site.sign == 1.0 else -b
    full = (1,) * (g.dim() - len(shape)) + shape  # the operand's shape, aligned with g's axes
    dims = [j for j in range(1, g.dim()) if full[j] == 1 and g.shape[j] != 1]
    if dims:
        g = g.sum(dims, keepdim=True)
    return g.reshape(b.shape[0], *shape)


def broadcast_pieces(site: BroadcastSite, a: Tensor | None, b: Tensor) -> Pieces:
    """Per-example gradients of the parameters behind an example-free operand: the
    output gradient b (n, ...) reduced to the source's shape per example."""
    n = b.shape[0]
    g = operand_grads(site, a, b, tuple(site.source.shape))
    if site.lookup is not None:  # a position table: an embedding piece at the looked-up rows
        ids = site.lookup.ids.reshape(1, -1).expand(n, -1)
        e = g.reshape(n, ids.shape[1], -1)
        if site.lookup.padding_idx is not None:
            e = e * (ids != site.lookup.padding_idx).unsqueeze(-1).to(e.dtype)
        return {site.names[0]: ("emb", ids, e)}
    if not site.chains:  # the parameter itself
        return {site.names[0]: ("dense", g.reshape(n, -1))}
    grads = _batched_vjp(site.source, site.deps, g)
    return {name: ("dense", gr.reshape(n, -1)) for name, gr in zip(site.names, grads)}


def _batched_vjp(out: Tensor, leaves: list[Tensor], g: Tensor) -> list[Tensor]:
    """Per-example vector-Jacobian products of the example-free graph out(leaves), (n, *leaf.shape)."""
    with torch.enable_grad():
        try:
            res = torch.autograd.grad(out, leaves, g, retain_graph=True, allow_unused=True, is_grads_batched=True)
        except RuntimeError:  # no batching rule for some backward formula: one example at a time
            rows = [torch.autograd.grad(out, leaves, g[i], retain_graph=True, allow_unused=True)
                    for i in range(g.shape[0])]
            res = tuple(None if rows[0][j] is None else torch.stack([r[j] for r in rows])
                        for j in range(len(leaves)))
    return [torch.zeros((g.shape[0], *p.shape), dtype=g.dtype, device=g.device) if r is None else r.detach()
            for p, r in zip(leaves, res)]


@dataclass(eq=False)
class VjpSite:
    """One call of an op without a rule in which example-free operands computed from parameters
    (``es``) meet example-carrying ones (``xs``, kept in the call's layout, the examples' rows on
    axis 0): the call is replayed per example by :func:`op_vjp_pieces`."""

    label: str
    func: Callable[..., Any]
    tree: Any  # the pytree structure of the call's (args, kwargs)
    leaves: list[Any]  # its leaves, with the operands' slots left None
    x_slots: list[int]
    e_slots: list[int]
    xs: list[Tensor]  # example-carrying operands, detached
    es: list[Tensor]  # example-free operands (with their graph, for the chain to the parameters)
    e_deps: list[list[int]]  # per operand in es, the indices of its parameters in deps
    deps: list[Tensor]  # the trainable parameters behind es
    names: list[str]  # their names in the pieces
    out_rest: tuple[int, ...]  # the output's shape without axis 0
    versions: list[int] = field(default_factory=list)  # the operands' version counters at the call
    autocast: tuple[str, torch.dtype] | None = None  # the autocast the call ran under (device type, dtype)
    #: per operand in es, None, or for an operand expanded along the rows (``W.expand(m, d, d)``,
    #: ``token.expand_as(h)``) its shape without axis 0: es then holds the expansion's source, and a
    #: replay on r rows passes ``source.expand(r, *rest)``
    e_rest: list[tuple[int, ...] | None] = field(default_factory=list)

    def call(self, xs: list[Tensor] | tuple[Tensor, ...], es: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
        """The op on these operands (the call's other arguments unchanged), under the call's autocast."""
        leaves = list(self.leaves)
        for j, t in zip(self.x_slots, xs):
            leaves[j] = t
        for j, t, rest in zip(self.e_slots, es, self.e_rest or [None] * len(es)):
            leaves[j] = t if rest is None else t.expand(xs[0].shape[0], *rest)
        args, kwargs = tree_unflatten(leaves, self.tree)
        if self.autocast is None:
            return self.func(*args, **kwargs)
        with torch.autocast(self.autocast[0], dtype=self.autocast[1]):
            return self.func(*args, **kwargs)

    def is_param(self, j: int) -> bool:
        """Whether operand ``es[j]`` is a parameter itself (its gradient is the parameter's)."""
        d = self.e_deps[j]
        return len(d) == 1 and self.deps[d[0]] is self.es[j]

    @property
    def chains(self) -> bool:
        """Whether an operand is computed from parameters (not a parameter itself): a VJP of its graph."""
        return not all(map(self.is_param, range(len(self.es))))

    def example_elements(self) -> int:
        """Elements one example materialises: its operands' gradients, and the parameters' behind them."""
        chained = {i for j, d in enumerate(self.e_deps) if not self.is_param(j) for i in d}
        return sum(e.numel() for e in self.es) + sum(self.deps[i].numel() for i in chained)

    def work_per_example(self, a: Tensor | None, b: Tensor) -> int:
        """Scratch elements per example of :func:`op_vjp_pieces` (for the chunking of the sums)."""
        rows = max(1, a[0].numel()) if a is not None else 1
        return sum(rows * math.prod(x.shape[1:]) for x in self.xs) + 2 * b[0].numel() + self.example_elements()

    def check_unchanged(self) -> None:
        """The operands still hold the call's values (not changed in place after it)."""
        if [t._version for t in (*self.xs, *self.es)] != self.versions:
            raise ReplayFailed(
                f"{self.label}: an operand of the operation was changed in place after the call, so the "
                f"per-example replay of the call cannot see its values. method='generic' is exact for any "
                f"model; method='auto' falls back to it.", layer=", ".join(self.names),
                reason="an operand changed in place after an operation VJP use")


def op_vjp_pieces(site: VjpSite, a: Tensor, b: Tensor) -> Pieces:
    """Per-example gradients of the parameters behind an operation VJP use: ``a`` holds, per
    example, the indices of its rows in the call's operands (n, rows...), ``b`` the output
    gradient (n, rows..., *out_rest). Per example, a ``torch.func.vjp`` of the op on the example's
    rows (the example-free operands shared) with the example's output gradient, vmapped over the
    examples (one example at a time where vmap has no batching rule); then each operand's graph
    to its parameters as for a broadcast (:func:`_batched_vjp`), or the gradient itself for a
    parameter used directly."""
    site.check_unchanged()
    n = b.shape[0]
    rows = a.reshape(n, -1)
    r = rows.shape[1]
    idx = rows.reshape(-1).to(device=site.xs[0].device)
    xs = tuple(x.index_select(0, idx).reshape(n, r, *x.shape[1:]) for x in site.xs)
    cot = b.reshape(n, r, *site.out_rest)
    es = tuple(e.detach() for e in site.es)

    def one(xs_i: tuple[Tensor, ...], cot_i: Tensor) -> tuple[Tensor, ...]:
        out, pull = _vjp(lambda *e: site.call(xs_i, e), *es)
        return pull(cot_i.to(out.dtype))  # the replay's dtype (autocast is off here)

    def one_autograd(xs_i: tuple[Tensor, ...], cot_i: Tensor) -> tuple[Tensor, ...]:
        leaves = [e.requires_grad_() for e in map(torch.Tensor.detach, es)]
        with torch.enable_grad():
            out = site.call(xs_i, leaves)
            grads = torch.autograd.grad(out, leaves, cot_i.to(out.dtype), allow_unused=True)
        return tuple(torch.zeros_like(e) if g is None else g for e, g in zip(es, grads))

    try:
        grads = _vmap(one, randomness="error")(xs, cot)
    except RuntimeError:  # no batching rule for some op of the replay: one example at a time (autograd), exact
        try:
            per = [one_autograd(tuple(x[i] for x in xs), cot[i]) for i in range(n)]
        except Exception as err:
            raise ReplayFailed(
                f"{site.label}: the per-example replay of the operation failed ({type(err).__name__}: {err}); "
                f"method='generic' is exact for any model, method='auto' falls back to it.",
                layer=", ".join(site.names), reason="the per-example replay of an operation failed") from err
        grads = tuple(torch.stack([p[j] for p in per]) for j in range(len(es)))
    acc: dict[int, Tensor] = {}
    for j, (e, g, d) in enumerate(zip(site.es, grads, site.e_deps)):
        if site.is_param(j):
            parts = [g]
        else:
            parts = _batched_vjp(e, [site.deps[i] for i in d], g.to(e.dtype))
        for i, gi in zip(d, parts):
            acc[i] = gi if i not in acc else acc[i] + gi
    return {site.names[i]: ("dense", _wide_float(g).reshape(n, -1)) for i, g in sorted(acc.items())}


def ragged_rows(shape: tuple[int, ...]) -> str:
    """Why a tensor whose rows depend on the data cannot be captured (the end of a refusal's sentence)."""
    return (f"on a tensor of shape {shape} whose rows depend on the data (selected by a boolean mask, "
            f"masked_select, nonzero, ...), so the rows of one example there cannot be placed")


def _wide_float(t: Tensor) -> Tensor:
    """bfloat16 / float16 as float32 (the sums of squares' precision); others unchanged."""
    return t.float() if t.is_floating_point() and torch.finfo(t.dtype).bits < 32 else t


def _rng_states(device: torch.device) -> list[Tensor]:
    """The random generators' states an op on ``device`` may draw from (CPU, and the device's)."""
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _reentered(func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` (a Python function of torch) without its own ``__torch_function__``
    dispatch, so that the mode sees the calls inside it."""
    cached = _REENTERED.get(func)
    if cached is None:
        g = dict(func.__globals__)
        for name in ("has_torch_function", "has_torch_function_unary", "has_torch_function_variadic"):
            g[name] = lambda *a, **k: False
        cached = types.FunctionType(func.__code__, g, func.__name__, func.__defaults__, func.__closure__)
        cached.__kwdefaults__ = func.__kwdefaults__
        _REENTERED[func] = cached
    return cached


_REENTERED: dict[Callable[..., Any], Callable[..., Any]] = {}


class ParamUses(TorchFunctionMode):
    """The mode of one forward pass of the statistics (see the module docstring).

    tracked: trainable parameters by id, with their names; constants: ids of the
    other parameters and the buffers; sink: receives the uses
    (``sink.weight_use(key, label, rule, site, a, out, hints, min_trailing)``,
    ``sink.broadcast_use(key, site, a, out)``, ``sink.unattributed(message, name)``);
    skip: parameters whose uses a module hook records right now (inside their module)."""

    def __init__(self, tracked: dict[int, str], constants: set[int], sink: Any) -> None:
        super().__init__()
        self.tracked = tracked
        self.constants = constants
        self.sink = sink
        self.skip: set[int] = set()
        self.hints: list[tuple[int, int]] = []
        self.batch: int | None = None  # the number of examples of the pass (the probe's k in a probe)
        self._free: dict[int, tuple[weakref.ref[Tensor], frozenset[int]]] = {}
        self._expanded: dict[int, tuple[weakref.ref[Tensor], Tensor]] = {}  # expanded tensor -> its source
        self._lookups: dict[int, tuple[weakref.ref[Tensor], FreeLookup]] = {}  # lookup output -> the lookup
        self._transposed: dict[int, tuple[weakref.ref[Tensor], Tensor]] = {}  # W.T -> W (a 2-D parameter)
        self._params: dict[int, Tensor] = {}
        self._ragged: dict[int, weakref.ref[Tensor]] = {}  # tensors whose rows depend on the data (h[mask])
        self.sites: dict[Any, Any] = {}

    def clear(self) -> None:
        self._free.clear()
        self._ragged.clear()
        self._expanded.clear()
        self._lookups.clear()
        self._transposed.clear()
        self._params.clear()
        self.skip.clear()
        self.hints.clear()

    # -- example-free bookkeeping

    def deps(self, t: Tensor) -> frozenset[int] | None:
        """The trainable parameters (ids) an example-free tensor is computed from; None if it carries examples."""
        i = id(t)
        if i in self.tracked:
            self._params[i] = t
            return frozenset() if i in self.skip else frozenset((i,))
        if i in self.constants:
            return frozenset()
        e = self._free.get(i)
        if e is not None and e[0]() is t:
            return e[1]
        return None

    def is_free(self, t: Tensor) -> bool:
        return self.deps(t) is not None

    def is_ragged(self, t: Tensor) -> bool:
        """Whether ``t``'s number of rows depends on the data (``h[mask]``, ``masked_select``, ``nonzero``,
        and what is computed from such a tensor with a shape of its own): the rows of one example there
        are not a fixed block, so no per-example rule can place them."""
        e = self._ragged.get(id(t))
        return e is not None and e() is t

    def _data_shaped(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether the call's output has a length that depends on the values of a tensor that carries the
        examples (``h[mask]``, ``nonzero(mask)``; not ``h[:, keep]`` with an example-free ``keep``)."""
        if func is Tensor.__getitem__:
            return any(t.dtype in (torch.bool, torch.uint8) and not self.is_free(t) for t in _tensors(args[1:], kwargs))
        if func in _DATA_SHAPED or (func is torch.where and len(args) + len(kwargs) == 1):
            return any(not self.is_free(t) for t in _tensors(args, kwargs))
        return False

    def _mark_ragged(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        shaped = self._data_shaped(func, args, kwargs)
        if not (shaped or self._ragged):
            return
        outs = _outputs(out)
        tensors = _tensors(args, kwargs)
        if not outs or not tensors:
            return
        if not shaped:
            ragged = [t for t in tensors if self.is_ragged(t)]
            if not ragged:
                return
            # a result shaped like a regular operand (torch.zeros_like(h).masked_scatter(mask, z)) is regular,
            # and so are the rows laid out by the model as (examples, ...) (BART's and T5's classification
            # heads: h[eos_mask].view(m, -1, d), which they check has as many rows per example)
            regular = {tuple(t.shape) for t in tensors if not self.is_ragged(t)}
            laid_out = func in _RESHAPES and self.batch is not None
            outs = [t for t in outs if tuple(t.shape) not in regular
                    and not (laid_out and t.dim() >= 2 and t.shape[0] == self.batch)]
        for t in outs:
            self._ragged[id(t)] = weakref.ref(t)

    def _mark(self, out: Any, deps: frozenset[int]) -> None:
        for t in _outputs(out):
            if id(t) not in self.tracked:  # p.detach(), p.data, computed under no_grad: no gradient reaches p
                self._free[id(t)] = (weakref.ref(t), deps if t.requires_grad else frozenset())

    # -- dispatch

    def __torch_function__(self, func: Any, types_: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _GETTERS:
            return func(*args, **kwargs)
        out = self._dispatch(func, args, kwargs)
        self._mark_ragged(func, args, kwargs, out)
        return out

    def _dispatch(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        tensors = _tensors(args, kwargs)
        if not tensors:  # a factory: example-free
            out = func(*args, **kwargs)
            self._mark(out, frozenset())
            return out
        deps = [self.deps(t) for t in tensors]
        if all(d is not None for d in deps):
            return self._free_call(func, args, kwargs, frozenset().union(*deps))  # type: ignore[arg-type]
        if not any(deps):  # no parameter meets the examples here
            out = func(*args, **kwargs)
            if _writes(func) and isinstance(args[0], Tensor) and self._free.pop(id(args[0]), None) is not None:
                # the examples written into an example-free tensor (buf[mask] = h): it carries them now
                self._expanded.pop(id(args[0]), None)
                self._lookups.pop(id(args[0]), None)
            return out
        ragged = [t for t in tensors if self.is_ragged(t) and not self.is_free(t)]
        if ragged:  # h[mask] @ W: the rows of one example there are not a block a rule can place
            name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
            params = self._names(tensors)
            self.sink.unattributed(
                f"parameter {params} meets the examples in {name} {ragged_rows(tuple(ragged[0].shape))} (use "
                f"method='generic', exact for any model; method='auto' falls back to it)", params)
        return self._use(func, args, kwargs)

    def _free_call(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], deps: frozenset[int]) -> Any:
        src = self.expanded_source(args[0]) if args and isinstance(args[0], Tensor) else None
        if src is not None and func in _KEEPS_EXPANSION and not _tensors(args[1:], kwargs):
            # BART's positions (arange(T).expand(m, -1) + offset), MPNet's bias (.expand(...).contiguous()):
            # the result (a real tensor, so the model may write to it) is the expansion of the op on the source
            small = self._free_call(func, (src, *args[1:]), kwargs, deps)
            out = func(*args, **kwargs)
            self._mark(out, deps)
            self._expanded[id(out)] = (weakref.ref(out), self.expanded_source(small) or small)
            return out
        if args and isinstance(args[0], Tensor) and _writes(func):  # its values change: no longer an expansion
            self._expanded.pop(id(args[0]), None)                  # or a lookup of the table
            self._lookups.pop(id(args[0]), None)
        if src is not None and func is F.embedding:
            # a lookup of expanded ids (BERT's token types from a (1, T) buffer) as the expansion of the
            # lookup: the same values, and the broadcast then reaches the table through the (1, T) lookup
            small = self._free_call(func, (src, *args[1:]), kwargs, deps)
            out = self._free_call(Tensor.expand, (small, (*args[0].shape, small.shape[-1])), {}, deps)
            return out
        out = func(*args, **kwargs)
        self._mark(out, deps)
        if func in _TRANSPOSES and isinstance(out, Tensor) and out.dim() == 2 and id(args[0]) in self.tracked \
                and out.shape == args[0].shape[::-1]:  # W.T, W.t(), W.transpose(0, 1) of a 2-D parameter
            self._transposed[id(out)] = (weakref.ref(out), args[0])
        if func in _EXPAND and isinstance(out, Tensor):
            src = args[0]
            self._expanded[id(out)] = (weakref.ref(out), self.expanded_source(src) or src)
        if func is F.embedding and isinstance(out, Tensor) and len(deps) == 1:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if id(weight) in self.tracked and not _embedding_options(args, kwargs)[1]:
                ids = args[0] if args else kwargs["input"]
                self._lookups[id(out)] = (weakref.ref(out), FreeLookup(ids, weight,
                                                                       _embedding_options(args, kwargs)[0]))
        return out

    def expanded_source(self, t: Tensor) -> Tensor | None:
        """The tensor ``t`` was expanded from (before any expansion), or None."""
        e = self._expanded.get(id(t))
        return e[1] if e is not None and e[0]() is t else None

    def _names(self, tensors: list[Tensor]) -> str:
        ids = set().union(*(self.deps(t) or frozenset() for t in tensors))
        return ", ".join(sorted(self.tracked[i] for i in ids)) or "?"

    def _use(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if func is Tensor.expand_as and len(args) == 2 and not kwargs and self.is_free(args[0]):
            # p.expand_as(h): only h's shape is read, so the values stay example-free: p.expand(h.shape)
            return self._free_call(Tensor.expand, (args[0], tuple(args[1].shape)), {}, self.deps(args[0]))
        if func in _READS_META_OF_OTHER and len(args) == 2 and self.is_free(args[0]) \
                and isinstance(args[1], Tensor):
            # p.type_as(h), p.to(h), p.view_as(h[0]): only h's dtype, device or shape is read
            out = func(*args, **kwargs)
            self._mark(out, self.deps(args[0]))  # type: ignore[arg-type]
            return out
        if func in FUNCTION_RULES:
            return self._registered(func, args, kwargs)
        if func is F.linear:
            return self._weight_op(func, args, kwargs, "linear", ("input", "weight", "bias"), linear_pieces, 1)
        if func is torch.addmm or func in _MATMUL:
            return self._addmm(func, args, kwargs)
        if func is F.embedding:
            return self._embedding(func, args, kwargs)
        if func is F.layer_norm:
            return self._norm(func, args, kwargs, "layer_norm", ("input", "normalized_shape", "weight", "bias", "eps"),
                              layer_norm_pieces)
        if hasattr(F, "rms_norm") and func is F.rms_norm:
            return self._norm(func, args, kwargs, "rms_norm", ("input", "normalized_shape", "weight", "eps"),
                              rms_norm_pieces)
        if func is F.group_norm:
            return self._norm(func, args, kwargs, "group_norm", ("input", "num_groups", "weight", "bias", "eps"),
                              group_norm_pieces)
        if func in _ADD or func in _SUB or func in _RSUB or func in _MUL:
            return self._elementwise(func, args, kwargs)
        if func in _CAT:
            return self._cat(func, args, kwargs)
        if inspect.isfunction(func) and getattr(func, "__module__", "").startswith("torch"):
            # a Python function of torch (F.multi_head_attention_forward): run it with the mode inside
            hints = []
            if func is F.multi_head_attention_forward and isinstance(args[0], Tensor) and args[0].dim() == 3:
                hints = [(args[0].shape[0], 1)]  # its out-projection sees (T * m, E), time-major
            self.hints.extend(hints)
            try:
                with self:
                    return _reentered(func)(*args, **kwargs)
            finally:
                del self.hints[len(self.hints) - len(hints):]
        return self._op_vjp(func, args, kwargs)

    def _refuse(self, func: Any, tensors: list[Tensor]) -> Any:
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
        params = self._names(tensors)
        self.sink.unattributed(
            f"parameter {params} meets the examples in {name}, an operation the fast path has no rule for "
            f"(register one with cabs_torch.register_rule, or use method='generic', exact for any model; "
            f"method='auto' falls back to it)", params)
        raise AssertionError("sink.unattributed returned")  # pragma: no cover

    def _op_vjp(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """An op without a rule: an operation VJP use (:class:`VjpSite`), or refused (in place,
        random, not one tensor out, over :data:`OP_VJP_MAX_ELEMENTS` per example)."""
        tensors = _tensors(args, kwargs)
        if _writes(func) or "out" in kwargs or self._data_shaped(func, args, kwargs):
            # in place: the replay could not see the values before the write; p[mask]: the rows of an
            # example in the output depend on the data
            return self._refuse(func, tensors)
        leaves, tree = tree_flatten((args, kwargs))
        x_slots, e_slots, e_deps = [], [], []
        for j, v in enumerate(leaves):
            if not isinstance(v, Tensor):
                continue
            d = self.deps(v)
            if d is None:
                x_slots.append(j)
            elif d and (v.is_floating_point() or v.is_complex()):
                e_slots.append(j)
                e_deps.append(d)
        if not e_slots:  # parameters only through integer or boolean tensors: no gradient reaches them here
            return func(*args, **kwargs)
        if not x_slots:  # the examples inside a container the mode does not look into
            return self._refuse(func, tensors)
        xs = [leaves[j] for j in x_slots]
        states = _rng_states(xs[0].device)
        out = func(*args, **kwargs)
        if any(not torch.equal(s, t) for s, t in zip(states, _rng_states(xs[0].device))):
            return self._refuse(func, tensors)  # it draws random numbers (dropout): a replay would differ
        if not isinstance(out, Tensor) or out.is_complex():  # several outputs; a complex one (torch.polar)
            return self._refuse(func, tensors)
        ids = sorted(frozenset().union(*e_deps), key=lambda i: self.tracked[i])
        params = [self._params[i] for i in ids]
        names = [self.tracked[i] for i in ids]
        es, e_rest = [], []
        rows = xs[0].shape[0] if xs[0].dim() else 1
        for j in e_slots:
            v, src = leaves[j], self.expanded_source(leaves[j])
            if src is not None and rows != 1 and v.dim() and v.shape[0] == rows and (
                    src.dim() < v.dim() or src.shape[0] == 1):
                # expanded along the rows (W.expand(m, d, d) in a bmm): every row the source's values, so
                # one example's rows are the source expanded to them (and no operand grows with m)
                es.append(src)
                e_rest.append(tuple(v.shape[1:]))
            else:
                es.append(v)
                e_rest.append(None)
        op = getattr(func, "__name__", None) or repr(func)
        site = VjpSite(f"{op}({', '.join(names)})", func, tree,
                       [None if j in x_slots or j in e_slots else
                        (v.detach() if isinstance(v, Tensor) else v) for j, v in enumerate(leaves)],
                       x_slots, e_slots, [x.detach() for x in xs], es,
                       [[ids.index(i) for i in sorted(d)] for d in e_deps],
                       params, names, tuple(out.shape[1:]))
        site.e_rest = e_rest
        site.versions = [t._version for t in (*site.xs, *site.es)]
        kind = xs[0].device.type
        if kind in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(kind):
            site.autocast = (kind, torch.get_autocast_dtype(kind))
        elements = site.example_elements()
        if elements > OP_VJP_MAX_ELEMENTS:
            self.sink.unattributed(
                f"parameter {', '.join(names)} meets the examples in {op}, an operation without a rule of its own, "
                f"and its per-example replay would materialise {elements} gradient elements per "
                f"example, over the cap cabs_torch.ops.OP_VJP_MAX_ELEMENTS = {OP_VJP_MAX_ELEMENTS} (register a "
                f"rule with cabs_torch.register_rule, or use method='generic', exact for any model; method='auto' "
                f"falls back to it)", ", ".join(names))
        n_calls = self.sink.next_index()
        self.sites[("opvjp", n_calls)] = site
        self.sink.op_use(("opvjp", n_calls), site, out)
        return out

    # -- weight ops

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any], names: tuple[str, ...]) -> list[Any]:
        vals = list(args[: len(names)]) + [None] * max(0, len(names) - len(args))
        for j, n in enumerate(names):
            if n in kwargs:
                vals[j] = kwargs[n]
        return vals

    def _param_or_none(self, t: Any) -> bool:
        """A trainable parameter used directly, a constant, or absent."""
        if t is None or not isinstance(t, Tensor):
            return True
        d = self.deps(t)
        return d is not None and (not d or (len(d) == 1 and id(t) in d))

    def _key(self, label: str, tensors: list[Any], extra: Any = ()) -> tuple[Any, ...]:
        return (label, *(id(t) if isinstance(t, Tensor) else None for t in tensors), extra)

    def _site(self, label: str, params: dict[str, Any], extra: Any = (),
              config: dict[str, Any] | None = None) -> tuple[tuple[Any, ...], OpSite]:
        """The key and the :class:`OpSite` of a use of ``params`` by the op ``label`` (made on its first call)."""
        key = self._key(label, list(params.values()), extra)
        site = self.sites.get(key)
        if site is None:
            named = self._names([t for t in params.values() if t is not None])
            site = self.sites.setdefault(key, OpSite(f"{label}({named})", params, dict(config or {})))
        return key, site

    def _weight_op(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], label: str,
                   names: tuple[str, ...], rule: Rule, min_trailing: int) -> Any:
        x, weight, bias = self._bind(args, kwargs, names)[:3]
        if not (isinstance(x, Tensor) and not self.is_free(x)):
            return self._refuse(func, _tensors(args, kwargs))
        if not (self._param_or_none(weight) and self._param_or_none(bias)):
            if func is F.linear and self._param_or_none(weight) and isinstance(bias, Tensor):
                # a bias computed from parameters (BEiT's cat(q_bias, zeros, v_bias)): x W^T, then + bias
                # as a broadcast of an example-free tensor (its parameters through the bias's own graph)
                return self._elementwise(torch.add, (self._weight_op(func, (x, weight), {}, label, names, rule,
                                                                     min_trailing), bias), {})
            return self._op_vjp(func, args, kwargs)  # a weight computed from parameters (LoRA): replayed
        key, site = self._site(label, {"weight": weight, "bias": bias})
        out = func(*args, **kwargs)
        self.sink.weight_use(key, site, rule, x, out, min_trailing)
        return out

    def _addmm(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``torch.addmm(bias, x, W)`` and ``x @ W`` (Hugging Face's ``Conv1D``): ``x W (+ bias)``."""
        if func is torch.addmm:
            bias, x, weight, beta, alpha = self._bind(args, kwargs, ("input", "mat1", "mat2", "beta", "alpha"))
            ok = beta in (None, 1) and alpha in (None, 1) and isinstance(bias, Tensor) and bias.dim() == 1
        else:
            (x, weight), bias, ok = self._bind(args, kwargs, ("input", "other")), None, True
        entry = self._transposed.get(id(weight))
        if entry is not None and entry[0]() is weight:  # x @ W.T (Falcon's linear layers): F.linear(x, W)
            weight, rule, label = entry[1], linear_pieces, "linear"
        else:
            rule, label = addmm_pieces, "addmm" if func is torch.addmm else "matmul"
        if not (ok and isinstance(x, Tensor) and x.dim() >= 2 and not self.is_free(x) and isinstance(weight, Tensor)
                and weight.dim() == 2 and self._param_or_none(weight) and self._param_or_none(bias)):
            return self._op_vjp(func, args, kwargs)  # another product with a parameter: replayed per example
        key, site = self._site(label, {"weight": weight, "bias": bias})
        out = func(*args, **kwargs)
        self.sink.weight_use(key, site, rule, x, out, 1)
        return out

    def _embedding(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        ids, weight = self._bind(args, kwargs, ("input", "weight"))
        padding_idx, refused = _embedding_options(args, kwargs)
        if refused or not isinstance(ids, Tensor):
            return self._refuse(func, _tensors(args, kwargs))
        if not self._param_or_none(weight):  # a table computed from parameters: replayed per example
            return self._op_vjp(func, args, kwargs)
        key, site = self._site("embedding", {"weight": weight}, padding_idx,
                               {"padding_idx": padding_idx, "scale_grad_by_freq": False, "sparse": False})
        out = func(*args, **kwargs)
        self.sink.weight_use(key, site, embedding_pieces, ids, out, 0)
        return out

    def _norm(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], label: str,
              names: tuple[str, ...], rule: Rule) -> Any:
        vals = dict(zip(names, self._bind(args, kwargs, names)))
        x, weight, bias = vals["input"], vals.get("weight"), vals.get("bias")
        if not (isinstance(x, Tensor) and not self.is_free(x)):
            return self._refuse(func, _tensors(args, kwargs))
        if not (self._param_or_none(weight) and self._param_or_none(bias)):  # Gemma's (1 + weight): replayed
            return self._op_vjp(func, args, kwargs)
        config = {k: v for k, v in vals.items() if k not in ("input", "weight", "bias")}
        if "normalized_shape" in config:
            shape = config["normalized_shape"]
            config["normalized_shape"] = (shape,) if isinstance(shape, int) else tuple(shape)
        if config.get("eps") is None and label != "rms_norm":
            config["eps"] = 1e-5
        key, site = self._site(label, {"weight": weight, "bias": bias},
                               tuple(sorted((k, str(v)) for k, v in config.items())), config)
        out = func(*args, **kwargs)
        trailing = -1 if label == "group_norm" else len(config["normalized_shape"])  # -1: examples on axis 0
        self.sink.weight_use(key, site, rule, x, out, trailing)
        return out

    def _registered(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        input_arg, param_args, rule = FUNCTION_RULES[func]
        x = args[input_arg]
        params = {n: args[j] if j < len(args) else None for n, j in param_args.items()}
        if not (isinstance(x, Tensor) and not self.is_free(x) and all(map(self._param_or_none, params.values()))):
            return self._refuse(func, _tensors(args, kwargs))
        key, site = self._site(getattr(func, "__name__", "op"), params)
        site.config["args"] = args
        out = func(*args, **kwargs)
        self.sink.weight_use(key, site, rule, x, out, 0)
        return out

    # -- broadcasts

    def _source(self, t: Tensor) -> tuple[Tensor, frozenset[int]]:
        """The example-free tensor behind ``t`` before any expansion, and its parameters."""
        src = self.expanded_source(t)
        src = t if src is None else src
        return src, self.deps(src) or frozenset()

    def _broadcast_site(self, key: tuple[Any, ...], kind: str, t: Tensor, **kw: Any) -> BroadcastSite:
        src, deps = self._source(t)
        params = [self._params[i] for i in sorted(deps, key=lambda i: self.tracked[i])]
        entry = self._lookups.get(id(src))
        lookup = entry[1] if entry is not None and entry[0]() is src else None
        site = self.sites.get(key)
        if site is None or site.source is not src:  # a new source tensor each forward pass
            names = [self.tracked[id(p)] for p in params]
            if lookup is not None:
                names = [self.tracked[id(lookup.weight)]]
                params = [lookup.weight]
            site = BroadcastSite(f"{kind}({', '.join(names)})", kind, src, params, names, lookup=lookup, **kw)
            self.sites[key] = site
        return site

    def _elementwise(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if len(args) != 2 or not all(isinstance(t, Tensor) for t in args) or kwargs.get("alpha", 1) != 1 \
                or set(kwargs) - {"alpha"}:
            return self._refuse(func, _tensors(args, kwargs))
        u, v = args
        free_first = self.is_free(u)
        if free_first and func in _INPLACE:  # an example-free tensor changed in place by the examples
            return self._refuse(func, _tensors(args, kwargs))
        p, x = (u, v) if free_first else (v, u)
        if func in _MUL and func in _INPLACE:  # the other factor before the in-place product overwrites it
            x = x.detach().clone()
        out = func(*args, **kwargs)
        n_calls = self.sink.next_index()
        if func in _MUL:
            site = self._broadcast_site(("bcast", n_calls), "mul", p)
            self.sink.broadcast_use(("bcast", n_calls), site, x, out)
        else:
            sign = -1.0 if (func in _SUB and not free_first) or (func in _RSUB and free_first) else 1.0
            site = self._broadcast_site(("bcast", n_calls), "add", p, sign=sign)
            self.sink.broadcast_use(("bcast", n_calls), site, None, out)
        return out

    def _cat(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        tensors = args[0] if args else kwargs.get("tensors")
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or set(kwargs) - {"dim", "tensors"}:
            return self._refuse(func, _tensors(args, kwargs))
        out = func(*args, **kwargs)
        dim = dim % out.dim()
        start = 0
        for t in tensors:
            d = self.deps(t)
            if d:
                n_calls = self.sink.next_index()
                site = self._broadcast_site(("bcast", n_calls), "slice", t, dim=dim, start=start,
                                            length=t.shape[dim])
                self.sink.broadcast_use(("bcast", n_calls), site, None, out)
            start += t.shape[dim]
        return out


def _embedding_options(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int | None, bool]:
    """(padding_idx normalised, refused) of an F.embedding call: max_norm (renormalises the table in
    place), scale_grad_by_freq and sparse have no rule."""
    names = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
    vals = dict(zip(names, args))
    vals.update(kwargs)
    padding_idx = vals.get("padding_idx")
    weight = vals.get("weight")
    if padding_idx is not None and padding_idx < 0 and isinstance(weight, Tensor):
        padding_idx += weight.shape[0]
    refused = vals.get("max_norm") is not None or bool(vals.get("scale_grad_by_freq")) or bool(vals.get("sparse"))
    return padding_idx, refused


def fold_spec(shape: tuple[int, ...], k: int, hints: list[tuple[int, int]], folds: bool,
              min_trailing: int) -> tuple[int, int, int] | None:
    """Where the k examples of a probe lie in a captured tensor of ``shape``:
    (axis, outer, inner) such that axis ``axis`` is (outer, k, inner) flattened;
    None if they cannot be placed. k differs from every other dimension of the
    inputs, so an axis of length k is the examples'; a folded axis (outer * k *
    inner, e.g. (m * T, p) before a Linear) is taken as example-major unless a
    hint says otherwise; the probe's S and accounting checks verify the choice."""
    if shape and shape[0] == k:  # the leading axis, as before issue 20 (an inner axis may equal k)
        return (0, 1, 1)
    if min_trailing < 0:  # the rule needs the examples on axis 0, unfolded
        return None
    last = len(shape) - min_trailing
    axes = [j for j in range(min(last, len(shape))) if shape[j] == k]
    if len(axes) == 1:
        return (axes[0], 1, 1)
    if axes or not folds:
        return None
    for j in range(min(last, len(shape))):
        size = shape[j]
        if size % k or size == 0:
            continue
        for outer, inner in hints:
            if outer * k * inner == size:
                return (j, outer, inner)
        return (j, 1, size // k)
    return None


def to_examples(t: Tensor, spec: tuple[int, int, int], m: int) -> Tensor:
    """``t`` with its examples (lying as ``spec`` says) on axis 0, the rest in order."""
    axis, outer, inner = spec
    if (outer, inner) != (1, 1):
        t = t.unflatten(axis, (outer, m, inner))
        axis += 1
    return t if axis == 0 else t.movedim(axis, 0)


def masked(shape: tuple[int, ...], spec: tuple[int, int, int], m: int) -> tuple[Any, ...]:
    """``shape`` with the examples' extent replaced by None (when it is outer * m * inner)."""
    axis, outer, inner = spec
    if axis >= len(shape) or shape[axis] != outer * m * inner:
        return tuple(shape)
    return tuple(None if j == axis else s for j, s in enumerate(shape))


def work_per_example(a_shape: tuple[int, ...], b_shape: tuple[int, ...], m: int) -> int:
    return math.prod(a_shape) // max(1, m) + 2 * math.prod(b_shape) // max(1, m)
