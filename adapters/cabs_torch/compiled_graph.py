"""``compile=True`` for models whose parameters are used by functional operations (issue 20, item 2):
transformers (``F.linear`` with a tied head, Hugging Face ``Conv1D`` through ``torch.addmm``,
``F.embedding`` with positions from ``arange(T)`` or a ``(1, T)`` buffer, ``F.layer_norm``, broadcasts
of ``cls_token`` / ``pos_embed`` / LayerScale parameters).

Design: the eager probe (:class:`.stats.PerExampleStats`, operation-level capture :mod:`.ops`) establishes
the decomposition of one input signature: every use of every parameter, in order, with its rule and
where the examples lie. Then the model's forward pass is captured as one graph by TorchDynamo
(``torch.compile`` with a backend that keeps the graph, ``fullgraph=True``, static shapes: one capture
per batch size). In that graph the parameters are inputs, so the uses are found again as the nodes
where a parameter (or a tensor computed only from parameters, buffers and constants) meets a tensor
that carries the examples. They must be the probe's uses one for one (same operation, same
parameters, same shapes with the examples' extent removed); anything else is refused
(:class:`UnsupportedModelError` naming the node), so that the compiled statistics are those the probe
verified. Each use node gets a zero *perturbation* added to its output (its gradient is the output
gradient b) and its input ``a`` becomes an extra output; ``torch.func.grad_and_value`` over the
parameters and the perturbations, and the eager path's reductions (module rules, operation rules,
broadcasts, ties with their cross terms: :func:`.sums.uses_sq_norm_sums`), run in one function that
``torch.compile`` compiles.

``nn.MultiheadAttention`` (also inside ``nn.TransformerEncoderLayer``): TorchDynamo keeps
``F.multi_head_attention_forward`` as one opaque node; during the capture the module calls torch's own
function under another name, which TorchDynamo inlines (:func:`_inlinable_functional`), so its
``in_proj_weight`` and ``out_proj`` uses are nodes.

Not covered (refused, ``auto`` then takes the eager fast path with a warning): registered rules,
broadcasts of tensors computed from parameters other than the parameter itself or an embedding lookup
(the eager path's batched vector-Jacobian product), in-place broadcasts (``x += pos``), group and batch
normalisation, graph breaks (data-dependent control flow), outputs other than one tensor.
"""

from __future__ import annotations

import contextlib
import operator
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.func import grad_and_value

from cabs_core.exactness import UnsupportedModelError

from .compiled import _is_max_pool, _own_code
from .layers import Pieces
from .ops import masked, operand_grads, to_examples
from .sums import (
    FAST_CHUNK_ELEMENTS,
    LossFn,
    _check_losses,
    _count_and_loss,
    _stat_dtype,
    layer_sq_norm_sums,
    tied_layers_sq_norm_sums,
    uses_sq_norm_sums,
)

_LINEAR = {F.linear}
_EMBEDDING = {F.embedding}
_LAYER_NORM = {F.layer_norm}
_RMS_NORM = {F.rms_norm} if hasattr(F, "rms_norm") else set()
_CONV = {torch.conv1d, torch.conv2d, F.conv1d, F.conv2d}
_ADDMM = {torch.addmm}
_MATMUL = {torch.matmul, operator.matmul, torch.mm}
# in-place forms (x += pos, x.mul_(gamma)) are left out, so refused: in the graph a later read of x
# aliases the changed tensor, which would bypass the perturbation or change a product's other factor
_ADD = {operator.add, torch.add}
_SUB = {operator.sub, torch.sub}
_MUL = {operator.mul, torch.mul}
_CAT = {torch.cat, torch.concat}
_METHODS = {"add": "add", "sub": "sub", "mul": "mul", "matmul": "matmul", "mm": "matmul"}
_EXPAND_METHODS = {"expand", "expand_as"}
_CHANNEL_NORMS = {F.group_norm, F.batch_norm, torch.batch_norm, torch.group_norm}

#: eager module rules and the graph operation that implements them
_MODULE_KINDS: dict[type[nn.Module], str] = {nn.Linear: "linear", nn.Embedding: "embedding",
                                             nn.LayerNorm: "layer_norm", nn.Conv1d: "conv", nn.Conv2d: "conv"}
if hasattr(nn, "RMSNorm"):
    _MODULE_KINDS[nn.RMSNorm] = "rms_norm"


class _Site:
    """A use site as the rules see it (attributes ``weight``, ``bias``, ``eps``, ...); hashed by identity."""

    def __init__(self, **attrs: Any) -> None:
        self.__dict__.update(attrs)


@dataclass(eq=False)
class _Bcast:
    """A broadcast of a parameter (or of an embedding lookup of positions) over the examples."""

    kind: str  # "add", "mul", "slice"
    name: str  # the parameter's qualified name: the piece's key
    shape: tuple[int, ...]  # the broadcast operand's shape
    sign: float = 1.0
    dim: int = 0
    start: int = 0
    length: int = 0
    lookup: bool = False  # the operand is a lookup of a table at example-free ids (positions)
    padding_idx: int | None = None


def bcast_pieces(site: _Bcast, a: Tensor | None, b: Tensor) -> Pieces:
    """Per-example gradient of the parameter behind a broadcast operand (:func:`.ops.broadcast_pieces`):
    b reduced to the operand's shape per example (times the other factor for ``*``); for a lookup,
    ``a`` holds the looked-up ids per example and the result is an embedding piece."""
    n = b.shape[0]
    g = operand_grads(site, None if site.lookup else a, b, site.shape)
    if site.lookup:
        assert a is not None
        ids = a.reshape(n, -1)
        e = g.reshape(n, ids.shape[1], -1)
        if site.padding_idx is not None:
            e = e * (ids != site.padding_idx).unsqueeze(-1).to(e.dtype)
        return {site.name: ("emb", ids, e)}
    return {site.name: ("dense", g.reshape(n, -1))}


@dataclass
class _Use:
    """One use of parameters found in the captured graph."""

    node: fx.Node
    kind: str  # linear, addmm, matmul, embedding, layer_norm, rms_norm, conv, add, mul, slice
    params: dict[str, str]  # role (weight, bias, or the broadcast) -> qualified parameter name
    a: fx.Node | None = None  # the rule's input (ids for an embedding; the other factor of a product)
    bcast: _Bcast | None = None
    ids: fx.Node | None = None  # a broadcast lookup's ids


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _kind(node: fx.Node) -> str | None:
    if node.op == "call_method":
        return _METHODS.get(str(node.target))
    if node.op != "call_function":
        return None
    t = node.target
    for kinds, name in ((_LINEAR, "linear"), (_EMBEDDING, "embedding"), (_LAYER_NORM, "layer_norm"),
                        (_RMS_NORM, "rms_norm"), (_CONV, "conv"), (_ADDMM, "addmm"), (_MATMUL, "matmul"),
                        (_ADD, "add"), (_SUB, "sub"), (_MUL, "mul"), (_CAT, "cat")):
        if t in kinds:
            return name
    return None


def _shape(node: Any) -> tuple[int, ...] | None:
    v = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return tuple(v.shape) if isinstance(v, Tensor) else None


_INLINED: dict[str, types.ModuleType] = {}


def _inlinable_functional() -> types.ModuleType:
    """A stand-in for ``torch.nn.functional`` as seen by ``torch.nn.modules.activation`` (whose
    ``nn.MultiheadAttention`` calls ``F.multi_head_attention_forward``) during a capture.

    TorchDynamo keeps ``F.multi_head_attention_forward`` as one opaque node, so the uses of
    ``in_proj_weight`` and ``out_proj`` inside it would be no nodes of the graph. The stand-in's
    ``multi_head_attention_forward`` is torch's own function (its code object) under another name and
    module, with ``has_torch_function*`` answering False (as :func:`.ops._reentered` does for the eager
    capture) and ``_check_key_padding_mask`` a no-op (``torch._check_with`` with a message closure is
    not traceable; the eager probe ran the real check on the same shapes): TorchDynamo then inlines it
    and its ``F.linear`` calls become nodes. Registered in ``sys.modules`` because TorchDynamo resolves
    a function's globals through its module's name."""
    if "F" not in _INLINED:
        orig = F.multi_head_attention_forward
        glob = types.ModuleType("cabs_torch._dynamo_mha_globals")
        glob.__dict__.update(orig.__globals__)
        glob.__name__ = "cabs_torch._dynamo_mha_globals"
        for name in ("has_torch_function", "has_torch_function_unary", "has_torch_function_variadic"):
            glob.__dict__[name] = lambda *a, **k: False
        glob.__dict__["_check_key_padding_mask"] = lambda *a, **k: None
        code = orig.__code__.replace(co_name="_cabs_mha_forward")
        if hasattr(code, "co_qualname"):
            code = code.replace(co_qualname="_cabs_mha_forward")
        mha = types.FunctionType(code, glob.__dict__, "_cabs_mha_forward", orig.__defaults__, orig.__closure__)
        mha.__kwdefaults__ = orig.__kwdefaults__
        mha.__module__ = glob.__name__
        functional = types.ModuleType("cabs_torch._dynamo_functional")
        functional.__dict__.update(F.__dict__)
        functional.__name__ = "cabs_torch._dynamo_functional"
        functional.multi_head_attention_forward = mha  # type: ignore[attr-defined]
        sys.modules[glob.__name__] = glob
        sys.modules[functional.__name__] = functional
        _INLINED["F"] = functional
    return _INLINED["F"]


@contextlib.contextmanager
def _mha_inlined() -> Iterator[None]:
    """``nn.MultiheadAttention`` calls the inlinable copy of its function while the capture traces."""
    import torch.nn.modules.activation as activation
    before = activation.F
    activation.F = _inlinable_functional()  # type: ignore[assignment]
    try:
        yield
    finally:
        activation.F = before  # type: ignore[assignment]


def _capture(model: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[fx.GraphModule, list[Any], Any]:
    """The model's forward pass as one TorchDynamo graph (static shapes), the tensors behind its
    placeholders, and the model's output."""
    box: dict[str, Any] = {}

    def backend(gm: fx.GraphModule, example_inputs: list[Any]) -> Any:
        box["gm"], box["inputs"] = gm, list(example_inputs)
        return gm.forward

    class Caller:
        def call(self, *xs: Tensor) -> Any:
            return model(*xs)

    fn = _own_code(Caller().call)  # a code object of its own: no cache shared with other captures
    try:
        with torch.enable_grad(), _mha_inlined():
            out = torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(*inputs)
    except Exception as err:  # dynamo raises many types (Unsupported, graph breaks, user errors)
        raise UnsupportedModelError(
            f"compile=True could not capture the model's forward pass as one graph with torch.compile "
            f"(fullgraph=True): {' '.join(str(err).split())[:300]}. Use compile=False (the eager fast "
            f"path handles any control flow).", layer=None, reason="torch.compile graph capture failed") from err
    return box["gm"], box["inputs"], out


def _refuse(what: str, layer: str | None = None) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"compile=True cannot establish the probed per-example decomposition in the compiled graph: {what}. "
        f"Use compile=False (the eager fast path, exact for this model); method='auto' does so with a warning.",
        layer=layer, reason=f"compile=True: {what}")


class GraphFastStats:
    """``(inputs, targets, weights) -> (count, loss_sum, grad_sum, S)`` for one input signature and
    batch size m, from the signature's probed capture structure (see the module docstring).

    plan: the :class:`.stats._Plan` (parameters, records, tie groups, names); structure: the probe's
    accepted capture structure; inputs: a batch of m examples (the capture runs the model once)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, plan: Any, structure: tuple[Any, ...],
                 inputs: tuple[Tensor, ...], m: int, backend: str | None = None, **compile_options: Any) -> None:
        self.model, self.loss_fn, self.m = model, loss_fn, m
        self.params = plan.params
        self.names = plan.names
        gm, example, out = _capture(model, inputs)
        if not isinstance(out, Tensor):
            raise _refuse(f"the model returns {type(out).__name__}, not one tensor")
        graph = gm.graph
        output = next(n for n in graph.nodes if n.op == "output")
        outs = output.args[0]
        if not (isinstance(outs, (tuple, list)) and len(outs) == 1 and isinstance(outs[0], fx.Node)):
            raise _refuse("the captured graph does not return the model's output as one tensor")
        buffers = {id(b): n for n, b in model.named_buffers()}
        frozen = {id(p): n for n, p in model.named_parameters() if not p.requires_grad}
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(example):
            raise _refuse("the captured graph's inputs are not the model's tensors")
        # how to feed each placeholder: ("param", name) | ("input", i) | ("buffer", name) | ("frozen", name)
        # | ("const", tensor)
        self.feed: list[tuple[str, Any]] = []
        deps: dict[fx.Node, frozenset[str] | None] = {}
        for node, t in zip(placeholders, example):
            if not isinstance(t, Tensor):
                raise _refuse(f"graph input {node.name} is not a tensor")
            if id(t) in plan.tracked:
                self.feed.append(("param", plan.tracked[id(t)]))
                deps[node] = frozenset((plan.tracked[id(t)],))
                continue
            hit = [i for i, x in enumerate(inputs) if x is t]
            if hit:
                self.feed.append(("input", hit[0]))
                deps[node] = None
            elif id(t) in buffers:
                self.feed.append(("buffer", buffers[id(t)]))
                deps[node] = frozenset()
            elif id(t) in frozen:
                self.feed.append(("frozen", frozen[id(t)]))
                deps[node] = frozenset()
            else:
                self.feed.append(("const", t))
                deps[node] = frozenset()
        uses = self._find_uses(graph, deps)
        self.entries = self._match(plan, structure, uses)
        self.backend = backend or self._backend(graph)
        self._rewrite(gm, uses)
        self._group(plan)
        self._step = torch.compile(_own_code(self._step_fn), backend=self.backend, **compile_options)
        self._zeros: list[Tensor] | None = None  # the zero perturbations, one per use node

    # ------------------------------------------------------------------------- the graph's uses

    @staticmethod
    def _find_uses(graph: fx.Graph, deps: dict[fx.Node, frozenset[str] | None]) -> list[_Use]:
        """Nodes where a parameter (or an example-free tensor computed from one) meets the examples."""
        uses: list[_Use] = []
        for node in graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            ds = [deps.get(a, frozenset()) for a in node.all_input_nodes]
            if any(d is None for d in ds):
                deps[node] = None
                if any(ds_ for ds_ in ds if ds_):
                    uses.extend(GraphFastStats._classify(node, deps))
            else:
                deps[node] = frozenset().union(*ds)  # type: ignore[arg-type]
        return uses

    @staticmethod
    def _classify(node: fx.Node, deps: dict[fx.Node, frozenset[str] | None]) -> list[_Use]:
        kind = _kind(node)

        def param(n: Any) -> str | None:
            """The parameter a node is (a placeholder of a trainable parameter), else None."""
            d = deps.get(n) if isinstance(n, fx.Node) else None
            if isinstance(n, fx.Node) and n.op == "placeholder" and d and len(d) == 1:
                return next(iter(d))
            return None

        def direct(*nodes: Any) -> dict[str, str] | None:
            out = {}
            for role, n in zip(("weight", "bias"), nodes):
                if n is None:
                    continue
                p = param(n)
                d = deps.get(n) if isinstance(n, fx.Node) else frozenset()
                if p is None and d:  # a weight computed from parameters (weight norm, LoRA merge)
                    return None
                if p is not None:
                    out[role] = p
            return out

        def what() -> str:
            label = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
            params = sorted(set().union(*(deps.get(a) or () for a in node.all_input_nodes)))
            return f"parameter {', '.join(params)} meets the examples in {label} (graph node {node.name})"

        if kind in ("linear", "layer_norm", "rms_norm", "conv", "embedding"):
            x = _arg(node, 0, "input")
            w = _arg(node, 1, "weight") if kind in ("linear", "conv", "embedding") else \
                _arg(node, 2, "weight")
            b = None if kind in ("embedding", "rms_norm") else (
                _arg(node, 2, "bias") if kind in ("linear", "conv") else _arg(node, 3, "bias"))
            params = direct(w, b)
            if params is None or deps.get(x) is not None:
                raise _refuse(what())
            if kind == "embedding" and (_arg(node, 3, "max_norm") is not None or _arg(node, 5, "scale_grad_by_freq")
                                        or _arg(node, 6, "sparse")):
                raise _refuse(what())
            return [_Use(node, kind, params, a=x)]
        if kind == "addmm":
            b, x, w = _arg(node, 0, "input"), _arg(node, 1, "mat1"), _arg(node, 2, "mat2")
            params = direct(w, b)
            if params is None or deps.get(x) is not None or node.kwargs.get("beta", 1) != 1 \
                    or node.kwargs.get("alpha", 1) != 1:
                raise _refuse(what())
            return [_Use(node, "addmm", params, a=x)]
        if kind == "matmul":
            x, w = node.args[0], node.args[1]
            params = direct(w, None)
            if params is None or deps.get(x) is not None:
                raise _refuse(what())
            return [_Use(node, "addmm", params, a=x)]
        if kind in ("add", "sub", "mul"):
            if len(node.args) != 2 or set(node.kwargs) - {"alpha"} or node.kwargs.get("alpha", 1) != 1:
                raise _refuse(what())
            u, v = node.args
            free_first = isinstance(u, fx.Node) and deps.get(u) is not None
            p, x = (u, v) if free_first else (v, u)
            bc = GraphFastStats._broadcast(p, deps, kind if kind == "mul" else "add",
                                           sign=-1.0 if kind == "sub" and not free_first else 1.0)
            if bc is None:
                raise _refuse(what())
            bcast, ids = bc
            return [_Use(node, bcast.kind, {"bcast": bcast.name}, a=x if kind == "mul" else None, bcast=bcast,
                         ids=ids)]
        if kind == "cat":
            tensors = _arg(node, 0, "tensors")
            dim = _arg(node, 1, "dim", 0)
            out_shape = _shape(node)
            if not isinstance(tensors, (list, tuple)) or out_shape is None:
                raise _refuse(what())
            dim %= len(out_shape)
            found, start = [], 0
            for t in tensors:
                sh = _shape(t)
                if sh is None:
                    raise _refuse(what())
                if isinstance(t, fx.Node) and deps.get(t):
                    bc = GraphFastStats._broadcast(t, deps, "slice", dim=dim, start=start, length=sh[dim])
                    if bc is None:
                        raise _refuse(what())
                    found.append(_Use(node, "slice", {"bcast": bc[0].name}, bcast=bc[0], ids=bc[1]))
                start += sh[dim]
            return found
        raise _refuse(what())

    @staticmethod
    def _broadcast(p: Any, deps: dict[fx.Node, frozenset[str] | None], kind: str,
                   **kw: Any) -> tuple[_Bcast, fx.Node | None] | None:
        """The broadcast of an example-free operand: the parameter behind ``expand`` calls, or an
        embedding lookup at example-free ids; None for anything else."""
        if not isinstance(p, fx.Node):
            return None
        shape = _shape(p)
        src = p
        while src.op == "call_method" and src.target in _EXPAND_METHODS or (
                src.op == "call_function" and src.target is torch.broadcast_to):
            src = src.args[0]
        src_shape = _shape(src)
        if shape is None or src_shape is None:
            return None
        d = deps.get(src)
        if src.op == "placeholder" and d and len(d) == 1:
            return _Bcast(kind, next(iter(d)), src_shape, **kw), None
        if src.op == "call_function" and src.target in _EMBEDDING and kind != "mul":
            # (a lookup's use carries its ids where a product's carries the other factor: products refused)
            ids, w = _arg(src, 0, "input"), _arg(src, 1, "weight")
            dw = deps.get(w) if isinstance(w, fx.Node) else None
            if not (isinstance(w, fx.Node) and w.op == "placeholder" and dw and len(dw) == 1
                    and deps.get(ids) == frozenset()):
                return None
            if _arg(src, 3, "max_norm") is not None or _arg(src, 5, "scale_grad_by_freq") or _arg(src, 6, "sparse"):
                return None
            pad = _arg(src, 2, "padding_idx")
            if pad is not None and pad < 0:
                pad += _shape(w)[0]  # type: ignore[index]
            return _Bcast(kind, next(iter(dw)), src_shape, lookup=True, padding_idx=pad, **kw), ids
        return None

    # ------------------------------------------------------------------------- the probe's uses

    def _match(self, plan: Any, structure: tuple[Any, ...], uses: list[_Use]) -> list[dict[str, Any]]:
        """Pair the graph's uses with the probe's, one for one, and check them; per use: its site, rule,
        the example placement and the graph nodes it reads."""
        from .ops import BroadcastSite, OpSite

        probed = [c for c in structure if not (len(c) == 2 and c[1] == "free")]
        if any(len(c) != 4 for c in probed):
            raise _refuse("a probed call's output does not reach the loss")
        if len(probed) != len(uses):
            raise _refuse(f"the probe saw {len(probed)} parameter uses, the captured graph has {len(uses)} "
                          f"({[u.node.name for u in uses]})")
        m = self.m
        entries = []
        for j, (call, use) in enumerate(zip(probed, uses)):
            rec, spec, a_key, out_key = call
            where = f"use {j} ({rec.name}) against graph node {use.node.name}"
            if rec.index >= 0:  # a module with a module rule
                kind = _MODULE_KINDS.get(type(rec.mod))
                own = {n: plan.tracked[id(p)] for n, p in rec.mod.named_parameters(recurse=False)
                       if id(p) in plan.tracked}
                if kind is None or kind != use.kind or own != use.params:
                    raise _refuse(f"{where}: {type(rec.mod).__name__} {sorted(own.values())} is "
                                  f"{use.kind} {sorted(use.params.values())} in the graph", rec.name)
                site, rule = rec.mod, rec.rule
            elif isinstance(rec.mod, OpSite):
                label = rec.mod.label.split("(")[0]
                own = {n: plan.tracked[id(p)] for n, p in rec.mod.params.items()
                       if isinstance(p, Tensor) and id(p) in plan.tracked}
                if label not in ("linear", "addmm", "matmul", "embedding", "layer_norm", "rms_norm") or \
                        {"matmul": "addmm"}.get(label, label) != use.kind or own != use.params:
                    raise _refuse(f"{where}: {label} {sorted(own.values())} is {use.kind} "
                                  f"{sorted(use.params.values())} in the graph", rec.name)
                site = _Site(**rec.mod.params, **rec.mod.config)
                rule = rec.rule
            elif isinstance(rec.mod, BroadcastSite):
                bs, bc = rec.mod, use.bcast
                if bc is None or bs.kind != bc.kind or bs.names != [bc.name] or \
                        (bs.lookup is not None) != bc.lookup or tuple(bs.source.shape) != bc.shape or \
                        (bs.kind == "add" and bs.sign != bc.sign) or \
                        (bs.kind == "slice" and (bs.dim, bs.start, bs.length) != (bc.dim, bc.start, bc.length)):
                    raise _refuse(f"{where}: the probed broadcast {bs.label} differs from the graph's", rec.name)
                site, rule = bc, bcast_pieces
            else:
                raise _refuse(f"{where}: a use of a kind the compiled path does not cover", rec.name)
            a_shape, out_shape = _shape(use.a) if use.a is not None else None, _shape(use.node)
            if out_shape is None:
                raise _refuse(f"{where}: no shape", rec.name)
            if isinstance(rec.mod, BroadcastSite):
                want = (bc.kind, bc.shape, None if a_shape is None else masked(a_shape, (0, 1, 1), m))
                ok = a_key == want and masked(out_shape, spec, m) == out_key and spec == (0, 1, 1)
            else:
                ok = a_shape is not None and masked(a_shape, spec, m) == a_key and masked(out_shape, spec, m) == out_key
            if not ok:
                raise _refuse(f"{where}: shapes {a_shape} -> {out_shape} differ from the probe's {a_key} -> {out_key}",
                              rec.name)
            entries.append({"rec": rec, "site": site, "rule": rule, "spec": spec, "use": use})
        return entries

    @staticmethod
    def _backend(graph: fx.Graph) -> str:
        """``aot_eager`` for graphs with a max pooling or a channel norm (the inductor bug of
        :mod:`.compiled` is a max pooling's backward), ``inductor`` otherwise, also with convolutions
        (a ViT's patch embedding: checked exact against the loop, tests/adapter_torch/test_compiled.py)."""
        for node in graph.nodes:
            if node.op == "call_function" and node.target in _CHANNEL_NORMS:
                return "aot_eager"
            if _is_max_pool(node, {}):
                return "aot_eager"
        return "inductor"

    # ------------------------------------------------------------------------- rewrite and reduce

    def _rewrite(self, gm: fx.GraphModule, uses: list[_Use]) -> None:
        """Add a zero perturbation to each use node's output (one per node) and return the rules'
        inputs (and lookups' ids) beside the output."""
        graph = gm.graph
        anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]
        nodes = list(dict.fromkeys(u.node for u in uses))
        self.pert_shapes = []
        index: dict[fx.Node, int] = {}
        for i, node in enumerate(nodes):
            with graph.inserting_after(anchor):
                anchor = graph.placeholder(f"_cabs_perturbation_{i}")
            with graph.inserting_after(node):
                perturbed = graph.call_function(operator.add, (node, anchor))
            node.replace_all_uses_with(perturbed, delete_user_cb=lambda user, p=perturbed: user is not p)
            index[node] = i
            v = node.meta["example_value"]
            self.pert_shapes.append((tuple(v.shape), v.dtype))
        extras: list[fx.Node] = []
        for e in self.entries:
            use = e["use"]
            e["b"] = index[use.node]
            src = use.ids if use.ids is not None else use.a
            e["a"] = None if src is None else len(extras)
            e["lookup"] = use.ids is not None
            if src is not None:
                extras.append(src)
        output = next(n for n in graph.nodes if n.op == "output")
        output.args = ((output.args[0][0], tuple(extras)),)
        graph.lint()
        self.graph = fx.GraphModule(gm, graph)

    def _group(self, plan: Any) -> None:
        """Which uses are reduced alone, with their tie group, or with the operation-level uses that share
        their parameters (the eager path's grouping, :meth:`.stats.PerExampleStats._fast`)."""
        op_ids = {id(p) for e in self.entries if e["rec"].index < 0 for p in self._site_params(plan, e)}
        dyn = {e["rec"] for e in self.entries if e["rec"].index < 0}
        dyn |= {rec for rec in plan.records.values() if any(i in op_ids for i in rec.pids)}
        for tie in plan.tie_groups:
            if any(r in dyn for r in tie.records):
                dyn |= set(tie.records)
        tied = {r for tie in plan.tie_groups for r in tie.records}
        self.alone = [r for r in dict.fromkeys(e["rec"] for e in self.entries) if r not in dyn and r not in tied]
        self.ties = [[(tuple(p.shape), [(rec.mod, n) for rec, n in uses]) for p, uses in tie.params]
                     for tie in plan.tie_groups if not any(r in dyn for r in tie.records)]
        self.tie_members = [[r for r in tie.records] for tie in plan.tie_groups
                            if not any(r in dyn for r in tie.records)]
        owners: dict[int, list[tuple[Any, str]]] = {}
        shapes: dict[int, tuple[int, ...]] = {}
        by_name = dict(zip(plan.names, plan.params))
        for e in self.entries:
            if e["rec"].index < 0:
                for role, name in e["use"].params.items():
                    p = by_name[name]
                    key = name if role == "bcast" else role
                    if (e["site"], key) not in owners.setdefault(id(p), []):
                        owners[id(p)].append((e["site"], key))
                    shapes[id(p)] = tuple(p.shape)
        for rec in dyn:
            if rec.index >= 0:
                for n, p in rec.mod.named_parameters(recurse=False, remove_duplicate=False):
                    if p.requires_grad:
                        owners.setdefault(id(p), []).append((rec.mod, n))
                        shapes[id(p)] = tuple(p.shape)
        self.dyn = [e for e in self.entries if e["rec"] in dyn]
        self.dyn_params = [(shapes[i], o) for i, o in owners.items()]

    @staticmethod
    def _site_params(plan: Any, e: dict[str, Any]) -> list[Tensor]:
        by_name = dict(zip(plan.names, plan.params))
        return [by_name[n] for n in e["use"].params.values()]

    def _step_fn(self, train: dict[str, Tensor], feed: list[Tensor | None], inputs: tuple[Tensor, ...],
                 targets: Any, weights: Tensor | None, perturbations: list[Tensor]
                 ) -> tuple[Tensor, Tensor, tuple[Tensor, ...], Tensor]:
        m = self.m

        def loss(train: dict[str, Tensor], perturbations: list[Tensor]) -> tuple[Tensor, Any]:
            args = [train[v] if k == "param" else (inputs[v] if k == "input" else t)
                    for (k, v), t in zip(self.feed, feed)]
            out, extras = self.graph(*args, *perturbations)
            losses = self.loss_fn(out, targets)
            _check_losses(losses, m)
            weighted = losses if weights is None else losses * weights.to(losses.dtype)
            return weighted.sum(), (losses.detach(), [x.detach() for x in extras])

        (grads, output_grads), (_, (losses, extras)) = grad_and_value(loss, argnums=(0, 1), has_aux=True)(
            train, perturbations)
        dtype = _stat_dtype(losses.device)
        count, loss_sum = _count_and_loss(losses, weights, dtype)
        calls: dict[Any, list[tuple[Tensor | None, Tensor]]] = {}
        for e in self.entries:
            spec = e["spec"]
            b = to_examples(output_grads[e["b"]], spec, m)
            if e["a"] is None:
                a = None
            elif e["lookup"]:  # a lookup at example-free ids: the same ids for every example
                ids = extras[e["a"]]
                a = ids.reshape(1, -1).expand(m, -1)
            else:
                a = to_examples(extras[e["a"]], spec, m)
            calls.setdefault(e["rec"], []).append((a, b))
        totals = []
        for rec in self.alone:
            c = calls.get(rec, [])
            if c:
                totals.extend(layer_sq_norm_sums(rec.mod, rec.rule, [a for a, _ in c], [b for _, b in c],
                                                 FAST_CHUNK_ELEMENTS))
        for params, members in zip(self.ties, self.tie_members):
            tc = {rec.mod: calls.get(rec, []) for rec in members}
            totals.extend(tied_layers_sq_norm_sums(tc, params, FAST_CHUNK_ELEMENTS))
        if self.dyn:
            dc: dict[Any, tuple[Any, list[tuple[Tensor | None, Tensor]]]] = {}
            seen = set()
            for e in self.dyn:
                if e["rec"] in seen:
                    continue
                seen.add(e["rec"])
                dc[e["site"]] = (e["rule"], calls.get(e["rec"], []))
            totals.extend(uses_sq_norm_sums(dc, self.dyn_params, FAST_CHUNK_ELEMENTS))
        sq = torch.stack([t.to(dtype) for t in totals]).sum()
        return count, loss_sum, tuple(grads[n] for n in train), sq

    def __call__(self, inputs: tuple[Tensor, ...], targets: Any, weights: Tensor | None
                 ) -> tuple[Tensor, Tensor, tuple[Tensor, ...], Tensor]:
        named = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        train = {n: p.detach() for n, p in zip(self.names, self.params)}
        feed = [None if k in ("param", "input") else
                (buffers[v] if k == "buffer" else (named[v].detach() if k == "frozen" else v))
                for k, v in self.feed]
        device = self.params[0].device
        if self._zeros is None or any(z.device != device for z in self._zeros[:1]):
            # made once: the step never writes them, it only differentiates with respect to them
            self._zeros = [torch.zeros(shape, dtype=dt, device=device) for shape, dt in self.pert_shapes]
        return self._step(train, feed, inputs, targets, weights, self._zeros)


__all__ = ["GraphFastStats", "bcast_pieces"]
