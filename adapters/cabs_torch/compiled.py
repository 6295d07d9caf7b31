"""The fast path as one function for ``torch.compile`` (``PerExampleStats(..., compile=True)``).

The eager fast path reads each layer's output gradient b with hooks and then
sums squares over b and the layer input a: extra passes over memory that the
plain step does not make. Here the model is traced with ``torch.fx`` and
rewritten: after each call of a supported layer the graph adds a zero
*perturbation* (an extra input), and the layer's input becomes an extra
output. The gradient of the loss with respect to a perturbation is b (the
JAX adapter's method). ``torch.func.grad_and_value`` over the parameters and
the perturbations, and the layer rules of :mod:`.layers`, run in one function
that ``torch.compile`` compiles, fusing the sums into the kernels that
produce a and b.

Perturbation shapes come from the eager probe of each input signature
(:class:`.stats.PerExampleStats`), which also establishes that every layer
call carries the examples on its leading axis, that no parameter is used
outside its layers and that the probed calls are the traced graph's; the
example axis is taken from the batch. Layers that share parameters (a tied
embedding and output projection) are reduced together with their cross terms.

Layers: ``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm``, ``nn.RMSNorm``,
``nn.Conv1d``, ``nn.Conv2d``, ``nn.GroupNorm``, eval-mode ``nn.BatchNorm1d/2d/3d``.
Inductor (torch 2.13, CPU) returns wrong gradients for this construction when
a max pooling follows a perturbed layer output (the paper's CNN: conv, ReLU,
max pool): the backward of the max pooling is a scatter into a zeroed buffer,
and inductor fuses a read of that buffer into the kernel that zeroes it, before
the scatter (docs/torch.md, "Known compiler problem"). Graphs with a
convolution, a channel normalisation or a max pooling are therefore compiled
with ``backend="aot_eager"`` (AOTAutograd's traced graph, eager kernels;
:func:`compile_backend`): exact, and on the paper's CNN faster than the eager
fast path.
"""

from __future__ import annotations

import itertools
import operator
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.func import functional_call, grad_and_value

from cabs_core.exactness import UnsupportedModelError

from .layers import rule_for
from .sums import (
    FAST_CHUNK_ELEMENTS,
    LossFn,
    _batch_size,
    _check_losses,
    _count_and_loss,
    _stat_dtype,
    functional_state,
    layer_sq_norm_sums,
    tied_layers_sq_norm_sums,
)

#: the ``reason`` of the error :func:`rewrite_for_statistics` raises when torch.fx cannot trace the model
#: (the graph-captured path of :mod:`.compiled_graph` may still capture it)
FX_TRACE_FAILED = "torch.fx cannot trace the model"


def rewrite_for_statistics(model: nn.Module, layers: set[str]) -> tuple[fx.GraphModule, list[str]]:
    """The model as an fx graph that takes ``(*inputs, *perturbations)`` and
    returns ``(output, [input of each call of a layer in layers])``, each such
    call's output plus its perturbation. Also the called layers' names, one per
    call, in the order of the perturbations."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as err:  # fx raises many types for untraceable Python
        raise UnsupportedModelError(
            f"compile=True needs a model that torch.fx can trace, and tracing failed: {err}. "
            f"Use compile=False (the eager fast path handles any control flow).",
            layer=None, reason=FX_TRACE_FAILED,
        ) from err
    graph = gm.graph
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target in layers]
    anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]
    inputs = []
    for i, node in enumerate(calls):
        with graph.inserting_after(anchor):
            anchor = graph.placeholder(f"_cabs_perturbation_{i}")
        with graph.inserting_after(node):
            perturbed = graph.call_function(operator.add, (node, anchor))
        node.replace_all_uses_with(perturbed, delete_user_cb=lambda user, p=perturbed: user is not p)
        inputs.append(node.args[0])
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = ((output.args[0], inputs),)
    graph.lint()
    return fx.GraphModule(gm, graph), [str(n.target) for n in calls]


#: layer types whose graphs are compiled with ``aot_eager`` (see :func:`compile_backend`)
AOT_EAGER_LAYERS = (nn.Conv1d, nn.Conv2d, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: the layer types whose compiled statistics are checked against the loop oracle
COMPILED_LAYERS = (nn.Linear, nn.Embedding, nn.LayerNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
                   *AOT_EAGER_LAYERS)


_MAX_POOL_FUNCTIONS = {getattr(F, f"{kind}max_pool{d}d") for kind in ("", "adaptive_") for d in (1, 2, 3)}


def _is_max_pool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A max pooling (module, functional or method call) in the traced graph."""
    if node.op == "call_module":
        name = type(modules[str(node.target)]).__name__
    elif node.op in ("call_function", "call_method"):
        if node.target in _MAX_POOL_FUNCTIONS:  # F.max_pool2d is a dispatcher named "fn"
            return True
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    else:
        return False
    return "maxpool" in name.lower().replace("_", "")


def compile_backend(graph: fx.GraphModule, modules: dict[str, nn.Module], calls: list[str]) -> str:
    """``"aot_eager"`` for a graph with a convolution, a GroupNorm/BatchNorm or
    a max pooling, ``"inductor"`` otherwise. Inductor (torch 2.13, CPU)
    miscompiles the perturbed graph of a max pooling's backward (docs/torch.md,
    "Known compiler problem"); ``aot_eager`` runs the same AOTAutograd graph
    with eager kernels, exactly."""
    if any(isinstance(modules[name], AOT_EAGER_LAYERS) for name in calls):
        return "aot_eager"
    if any(_is_max_pool(node, modules) for node in graph.graph.nodes):
        return "aot_eager"
    return "inductor"


_instances = itertools.count()


def _own_code(method: Any) -> Any:
    """``method`` bound to a copy of its function with a code object of its own.

    torch.compile keeps its caches, its recompilation limit and the shapes it
    has seen (after which it recompiles with dynamic shapes) per code object:
    without a copy every CompiledFastStats in a process would share them, and a
    second model would recompile with dynamic shapes (minutes for a small CNN)
    or, past the recompilation limit, silently run eagerly."""
    fn = method.__func__
    name = f"{fn.__name__}_{next(_instances)}"
    code = fn.__code__.replace(co_name=name, co_qualname=name) if hasattr(fn.__code__, "co_qualname") \
        else fn.__code__.replace(co_name=name)
    own = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    return types.MethodType(own, method.__self__)


class CompiledFastStats:
    """``(inputs, targets, weights) -> (count, loss_sum, grad_sum, S)`` for one
    model analysis (``params`` in ``grad_sum`` order, the supported ``layers``)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, params: list[nn.Parameter], layers: set[str],
                 chunk_elements: int = FAST_CHUNK_ELEMENTS,
                 tie_groups: list[list[tuple[tuple[int, ...], list[tuple[nn.Module, str]]]]] | None = None,
                 **compile_options: Any) -> None:
        self.model, self.loss_fn = model, loss_fn
        modules = dict(model.named_modules())
        refused = sorted(f"{name} ({type(modules[name]).__name__})" for name in layers
                         if type(modules[name]) not in COMPILED_LAYERS)
        if refused:
            raise UnsupportedModelError(
                f"compile=True supports {', '.join(t.__name__ for t in COMPILED_LAYERS)}; this model has "
                f"{', '.join(refused)} (not checked under torch.compile yet). "
                f"Use compile=False (the eager fast path)."
            )
        self.graph, self.calls = rewrite_for_statistics(model, layers)
        self.params = params  # grad_sum order
        self.call_modules = [modules[name] for name in self.calls]
        self.chunk_elements = chunk_elements
        #: per group of layers sharing parameters: each parameter's shape and owners (layer, name)
        self.tie_groups = tie_groups or []
        #: the torch.compile backend: ``compile_options["backend"]``, else :func:`compile_backend`
        self.backend = compile_options.pop("backend", None) or compile_backend(self.graph, modules, self.calls)
        self._step = torch.compile(_own_code(self._step_fn), backend=self.backend, **compile_options)

    def _step_fn(self, train: dict[str, Tensor], fixed: dict[str, Tensor], inputs: tuple[Tensor, ...],
                 targets: Any, weights: Tensor | None, perturbations: list[Tensor]
                 ) -> tuple[Tensor, Tensor, tuple[Tensor, ...], Tensor]:
        def loss(train: dict[str, Tensor], perturbations: list[Tensor]) -> tuple[Tensor, Any]:
            out, layer_inputs = functional_call(self.graph, {**train, **fixed}, (*inputs, *perturbations))
            losses = self.loss_fn(out, targets)
            _check_losses(losses, _batch_size(inputs))
            weighted = losses if weights is None else losses * weights.to(losses.dtype)
            return weighted.sum(), (losses.detach(), [a.detach() for a in layer_inputs])

        (grads, output_grads), (_, (losses, layer_inputs)) = grad_and_value(loss, argnums=(0, 1), has_aux=True)(
            train, perturbations)
        dtype = _stat_dtype(losses.device)
        count, loss_sum = _count_and_loss(losses, weights, dtype)
        per_module: dict[nn.Module, tuple[list[Tensor], list[Tensor]]] = {}
        for mod, a, b in zip(self.call_modules, layer_inputs, output_grads):
            per_module.setdefault(mod, ([], []))
            per_module[mod][0].append(a)
            per_module[mod][1].append(b)
        totals = []
        tied = {mod for group in self.tie_groups for _, owners in group for mod, _ in owners}
        for group in self.tie_groups:
            members = {mod for _, owners in group for mod, _ in owners}
            calls = {mod: list(zip(*per_module[mod])) for mod in members if mod in per_module}
            totals.extend(tied_layers_sq_norm_sums(calls, group, self.chunk_elements))
        for mod, (a_list, b_list) in per_module.items():
            if mod in tied:
                continue
            rule = rule_for(mod)
            assert rule is not None  # the layers were chosen by rule_for
            totals.extend(layer_sq_norm_sums(mod, rule, a_list, b_list, self.chunk_elements))
        sq = torch.stack([t.to(dtype) for t in totals]).sum()
        return count, loss_sum, tuple(grads[n] for n in train), sq

    def __call__(self, inputs: tuple[Tensor, ...], targets: Any, weights: Tensor | None, m: int,
                 output_shapes: list[tuple[int, ...]]) -> tuple[Tensor, Tensor, tuple[Tensor, ...], Tensor]:
        """One step; ``output_shapes``: per layer call, its output's shape without
        the example axis, from the signature's eager probe."""
        train, fixed = functional_state(self.model, self.params)
        ref = next(iter(train.values()))
        perturbations = [torch.zeros((m, *shape), dtype=ref.dtype, device=ref.device) for shape in output_shapes]
        return self._step(train, fixed, inputs, targets, weights, perturbations)
