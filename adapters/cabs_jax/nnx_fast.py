"""The fast exact path for Flax NNX models (:class:`cabs_jax.NNXLoss`), with the linen fast path's coverage.

Each forward pass merges a fresh copy of the module (``nnx.merge``, as :meth:`NNXLoss.apply` does) and
switches the class of every layer the fast path accounts for in that copy to a subclass whose
``__call__`` (and ``Embed.attend``) records the layer's input ``a`` and adds a zero perturbation to its
output, so that the backward pass gives ``b = dL/dz`` (the linen recorder's idea, on NNX objects; the
module the user passed is never touched). The per-example squared norms then come from the formulas of
:mod:`cabs_jax.flax_fast`, fed an unbound linen layer of the same configuration:

- ``nnx.Linear`` (as ``nn.Dense``), ``nnx.LinearGeneral`` (``nn.DenseGeneral``, hence the projections of
  ``nnx.MultiHeadAttention``), ``nnx.Conv``, ``nnx.Embed`` (lookup and ``attend``: a tied head with the
  exact cross term), ``nnx.LayerNorm``;
- a module whose trainable ``nnx.Param`` s are all its own (no submodule holds one) called with one
  array, e.g. learned positions added with broadcasting, a learned scale, ``nnx.RMSNorm``,
  ``nnx.GroupNorm``: its own VJP on each example alone (exact for a module that treats examples
  separately; the probe's value check catches one that does not). A supported layer whose parameters are
  only partly trainable (``wrt``) takes this rule too.

The guarantees are linen's (:mod:`cabs_jax.verify`): a trainable parameter no recorded call accounts for
(a layer type without a rule whose module also has submodules with parameters, an ``nnx.Param`` of a
module that also has layers, a layer of a subclass, BatchNorm), a layer called twice, a layer inside a
lifted transformation (``nnx.remat``, ``nnx.scan``, ``jax.checkpoint``), a captured tensor without the
leading example axis, or a parameter used outside its layer's call (the probe's accounting) make
``method="fast"`` raise :class:`~cabs_core.UnsupportedModelError` naming the parameter or layer, and
``"auto"`` warn once and take the exact generic path.
"""

from __future__ import annotations

import contextvars
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from cabs_core import BatchStats, UnsupportedModelError

from . import flax_fast
from .flax_fast import OWN, Use, _check_config, _path_sq_norms, _unsupported, check_example_axis, eval_shapes
from .nnx import NNXLoss
from .stats import PyTree, batch_size_of, check_weights, compute_dtype, float_dtype, generic_stats, stat_dtype

#: the NNX layers with a formula, as the kind of the linen layer whose formula they share
KINDS: dict[type, str] = {
    nnx.Linear: "Dense",
    nnx.LinearGeneral: "DenseGeneral",
    nnx.Conv: "Conv",
    nnx.Embed: "Embed",
    nnx.LayerNorm: "LayerNorm",
}

#: the parameter attributes of each kind (None where the layer has no such parameter, e.g. no bias)
PARAM_ATTRS = {
    "Dense": ("kernel", "bias"),
    "DenseGeneral": ("kernel", "bias"),
    "Conv": ("kernel", "bias"),
    "Embed": ("embedding",),
    "LayerNorm": ("scale", "bias"),
}

#: attributes that must keep their constructor default (a custom product, convolution, dtype promotion
#: or weight mask changes what the formulas assume), and flags that must be off
DEFAULTS = {
    "Dense": ("dot_general", "promote_dtype"),
    "DenseGeneral": ("dot_general", "dot_general_cls", "promote_dtype"),
    "Conv": ("conv_general_dilated", "promote_dtype", "mask"),
    "Embed": ("promote_dtype",),
    "LayerNorm": ("promote_dtype", "axis_name", "axis_index_groups"),
}

#: modules kept off the own-parameters rule, as linen keeps nn.BatchNorm off it
NOT_OWN: tuple[type, ...] = (nnx.BatchNorm,)

Path = tuple[Any, ...]  # a graph path as NNX gives it (attribute names, list indices)


@dataclass(frozen=True)
class NNXUse(Use):
    """A recorded call (:class:`cabs_jax.flax_fast.Use`; ``module`` is an unbound linen layer of the same
    configuration, None for the own-parameters rule) with the layer's graph path and the indices of its
    trainable parameters among ``jax.tree.leaves(params)``."""

    raw_path: Path = ()
    leaves: tuple[int, ...] = ()


@dataclass(frozen=True)
class _Layer:
    """A layer of the merged copy the recorder accounts for."""

    path: tuple[str, ...]
    raw_path: Path
    kind: str
    cfg: nn.Module | None
    names: tuple[str, ...]
    leaves: tuple[int, ...]

    @property
    def where(self) -> str:
        return "/".join(self.path) or self.kind


_ACTIVE: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar("cabs_nnx_recorder", default=None)
_SUBCLASSES: dict[type, type] = {}


def _intercepting(cls: type) -> type:
    """``cls`` with ``__call__`` (and ``attend``) routed through the active recorder (cached)."""
    sub = _SUBCLASSES.get(cls)
    if sub is not None:
        return sub

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _dispatch(self, "__call__", cls.__call__, args, kwargs)

    namespace: dict[str, Any] = {"__call__": call, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
    if cls is nnx.Embed:

        def attend(self: Any, *args: Any, **kwargs: Any) -> Any:
            return _dispatch(self, "attend", nnx.Embed.attend, args, kwargs)

        namespace["attend"] = attend
    sub = _SUBCLASSES[cls] = type(cls.__name__, (cls,), namespace)
    return sub


def _dispatch(mod: Any, method: str, fun: Callable, args: tuple, kwargs: dict) -> Any:
    rec = _ACTIVE.get()
    entry = None if rec is None else rec.layers.get(id(mod))
    if entry is None or entry[0] is not mod:  # a copy made inside a transform, or no recording: plain call
        return fun(mod, *args, **kwargs)
    return rec.record(entry[1], method, lambda *a, **k: fun(mod, *a, **k), args, kwargs)  # type: ignore[union-attr]


def _str_path(path: Path) -> tuple[str, ...]:
    return tuple(str(k) for k in path)


def _leaf_paths(params: PyTree) -> list[Path]:
    """The graph path of every leaf of the trainable state, in the order of ``jax.tree.leaves``."""
    out = []
    for key_path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        out.append(tuple(k.key for k in key_path if isinstance(k, jax.tree_util.DictKey)))
    return out


def _linen_config(kind: str, mod: Any, where: str) -> nn.Module:
    """An unbound linen layer of ``mod``'s configuration (what the shared formulas read), refusing
    configurations they do not cover."""
    signature = inspect.signature(type(mod).__init__).parameters
    for name in DEFAULTS[kind]:
        param = signature.get(name)
        expected = None if param is None or param.default is inspect.Parameter.empty else param.default
        if getattr(mod, name, None) is not expected:
            raise _unsupported(where, f"nnx.{type(mod).__name__} with a custom {name} (the formulas assume "
                               f"the default, {getattr(expected, '__name__', expected)})")
    if kind == "Dense":
        return nn.Dense(mod.out_features, use_bias=mod.use_bias, parent=None)
    if kind == "DenseGeneral":
        if len(mod.batch_axis):
            raise _unsupported(where, "LinearGeneral with batch_axis (a kernel per batch index)")
        return nn.DenseGeneral(mod.out_features, axis=mod.axis, use_bias=mod.use_bias, parent=None)
    if kind == "Conv":
        return nn.Conv(mod.out_features, mod.kernel_size, strides=mod.strides, padding=mod.padding,
                       input_dilation=mod.input_dilation, kernel_dilation=mod.kernel_dilation,
                       feature_group_count=mod.feature_group_count, use_bias=mod.use_bias, parent=None)
    if kind == "Embed":
        return nn.Embed(mod.num_embeddings, mod.features, parent=None)
    return nn.LayerNorm(epsilon=mod.epsilon, use_bias=mod.use_bias, use_scale=mod.use_scale,
                        reduction_axes=mod.reduction_axes, feature_axes=mod.feature_axes,
                        use_fast_variance=mod.use_fast_variance, parent=None)


def _layers(model: nnx.Module, params: PyTree) -> list[tuple[nnx.Module, _Layer]]:
    """The modules of the merged copy ``model`` the recorder accounts for: a supported layer whose
    parameters are all trainable, else a module whose trainable parameters are all its own."""
    leaf_paths = _leaf_paths(params)
    index = {p: i for i, p in enumerate(leaf_paths)}
    modules = {path: node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)}

    def owner(p: Path) -> Path:
        return max((q for q in modules if p[: len(q)] == q and len(q) < len(p)), key=len)

    own: dict[Path, list[Path]] = {}
    for p in leaf_paths:
        own.setdefault(owner(p), []).append(p)
    out = []
    for path, names in own.items():
        mod = modules[path]
        where = "/".join(_str_path(path)) or type(mod).__name__
        below = any(q[: len(path)] == path and o != path for o, qs in own.items() for q in qs)
        kind = KINDS.get(type(mod))  # the exact type: a subclass may change the computation
        if kind is not None:
            held = [a for a in PARAM_ATTRS[kind] if isinstance(getattr(mod, a, None), nnx.Variable)]
            if sorted(path + (a,) for a in held) != sorted(names):
                kind = None  # partly trainable: its trainable parameters take the own-parameters rule
        if kind is not None:
            cfg = _linen_config(kind, mod, where)
            rel = tuple(p[len(path):][0] for p in names)
            out.append((mod, _Layer(_str_path(path), path, kind, cfg, tuple(map(str, rel)),
                                    tuple(index[p] for p in names))))
        elif not isinstance(mod, NOT_OWN) and not below:
            rel = tuple("/".join(map(str, p[len(path):])) for p in names)
            out.append((mod, _Layer(_str_path(path), path, OWN, None, rel, tuple(index[p] for p in names))))
    return out


class _Recorder:
    """Records the calls of the layers of one merged copy and perturbs their outputs
    (:class:`cabs_jax.flax_fast._Recorder`'s checks, on NNX layers)."""

    def __init__(self, perturbations: dict | None = None, trace_of: Any = None) -> None:
        self.perturbations = perturbations
        self.uses: dict[tuple, NNXUse] = {}
        self.layers: dict[int, tuple[Any, _Layer]] = {}
        self.outer_trace = getattr(trace_of, "_trace", None)

    def record(self, layer: _Layer, method: str, next_fun: Callable, args: tuple, kwargs: dict) -> Any:
        where = layer.where if method == "__call__" else f"{layer.where}.{method}"
        kind = layer.kind
        if kind == OWN and (kwargs or len(args) != 1 or not hasattr(args[0], "shape")):
            raise _unsupported(
                where, f"a module with its own parameters ({', '.join(layer.names)}) called with other than one "
                "array argument: the fast path needs its input to differentiate it per example"
            )
        key = (layer.path, method)
        if key in self.uses:
            raise _unsupported(where, f"{kind} called more than once per forward pass (shared weights)")
        if kind != OWN and kwargs.get("out_sharding", 0) is None:
            kwargs = {k: v for k, v in kwargs.items() if k != "out_sharding"}  # nnx layers' default (no sharding)
        if kwargs or len(args) != 1:
            raise _unsupported(where, f"{kind} called with extra arguments ({', '.join(kwargs) or len(args)})")
        if kind != OWN:
            _check_config(kind, layer.cfg, where, args[0])
        y = next_fun(*args)
        if self.outer_trace is not None and getattr(y, "_trace", self.outer_trace) is not self.outer_trace:
            raise _unsupported(
                where, "layer runs inside a lifted transformation (nnx.remat, nnx.scan, jax.checkpoint, ...), "
                "where its input and output gradient cannot be captured"
            )
        if kind == OWN and not hasattr(y, "shape"):
            raise _unsupported(where, f"a module with its own parameters ({', '.join(layer.names)}) returns a "
                               f"{type(y).__name__}, not one array")
        self.uses[key] = NNXUse(layer.path, kind, method, layer.cfg, args[0], y, layer.names,
                                raw_path=layer.raw_path, leaves=layer.leaves)
        if self.perturbations is not None:
            y = y + self.perturbations[key]
        return y


def _forward(nloss: NNXLoss, params: PyTree, x: Any, recorder: _Recorder) -> Any:
    """The model's output on ``x`` from a merged copy whose accounted layers report to ``recorder``."""
    model = nnx.merge(nloss.graphdef, params, nloss.rest)
    for mod, layer in _layers(model, params):
        try:
            object.__setattr__(mod, "__class__", _intercepting(type(mod)))
        except TypeError as e:  # a class that cannot be subclassed or switched
            raise _unsupported(layer.where, f"its class cannot be intercepted ({e})") from None
        recorder.layers[id(mod)] = (mod, layer)
    token = _ACTIVE.set(recorder)
    try:
        return model(x)
    finally:
        _ACTIVE.reset(token)


def _plan(nloss: NNXLoss, params: PyTree, x: Any, m: int) -> tuple[NNXUse, ...]:
    """Abstractly trace one forward pass of ``m`` examples: every accounted call, refusing models whose
    trainable parameters are not all covered and captured tensors without a leading axis of length ``m``."""

    def forward(p: PyTree, x: Any) -> Any:
        recorder = _Recorder(trace_of=jax.tree.leaves(p)[0])
        _forward(nloss, p, x, recorder)
        forward.uses = recorder.uses  # type: ignore[attr-defined]
        return {key: (u.a, u.y) for key, u in recorder.uses.items()}

    shapes = eval_shapes(forward, params, x)
    uses = tuple(
        NNXUse(u.path, u.kind, u.method, u.module, *shapes[key], u.names, raw_path=u.raw_path, leaves=u.leaves)
        for key, u in forward.uses.items()  # type: ignore[attr-defined]
    )
    owned = {i for u in uses for i in u.leaves}
    for i, p in enumerate(_leaf_paths(params)):
        if i not in owned:
            name = "/".join(map(str, p))
            raise UnsupportedModelError(
                f"parameter {name!r} does not belong to an nnx.Linear, LinearGeneral, Conv, Embed or LayerNorm "
                "layer the fast path knows, nor to a module called once with one array whose trainable "
                "parameters are all its own (nnx.Param attributes of a module without submodules that hold "
                "parameters)",
                layer=name,
                reason="a parameter outside the supported layers",
            )
    check_example_axis(uses, m)
    return uses


def _at(model: Any, path: Path) -> Any:
    for k in path:
        model = model[k] if isinstance(k, int) else getattr(model, k)
    return model


def _layer_fn(nloss: NNXLoss, params: PyTree, u: NNXUse) -> Callable[[list, Any], Any]:
    """``f(own, a)``: the layer's method on ``a`` with its trainable leaves ``own`` (a merged copy of
    the original classes; the other leaves are those of ``params``)."""
    leaves, treedef = jax.tree.flatten(params)

    def f(own: list, a: Any) -> Any:
        new = list(leaves)
        for i, v in zip(u.leaves, own):
            new[i] = v
        model = nnx.merge(nloss.graphdef, jax.tree.unflatten(treedef, new), nloss.rest)
        return getattr(_at(model, u.raw_path), u.method)(a)

    return f


def _own_sq_norms(nloss: NNXLoss, params: PyTree, u: NNXUse, a: Any, b: jax.Array, m: int) -> jax.Array:
    """Per-example squared norm (m,) of the gradient of a module's own trainable parameters: its VJP on
    each example alone, in chunks of at most ``flax_fast.OWN_CHUNK_ENTRIES`` gradient entries."""
    leaves = jax.tree.leaves(params)
    own = [leaves[i] for i in u.leaves]
    f = _layer_fn(nloss, params, u)
    wide = compute_dtype(b.dtype)
    b = b.astype(u.y.dtype)

    def one(ab: tuple) -> jax.Array:
        ai, bi = ab
        _, vjp = jax.vjp(lambda o: f(o, ai[None]), own)
        return sum(jnp.sum(jnp.square(g.astype(wide))) for g in vjp(bi[None])[0])

    size = max(1, sum(math.prod(jnp.shape(x)) for x in own))
    return jax.lax.map(one, (a, b), batch_size=max(1, min(m, flax_fast.OWN_CHUNK_ENTRIES // size)))


def _fast_parts(nloss: NNXLoss, params: PyTree, batch: PyTree, w: jax.Array, uses: tuple[NNXUse, ...]) -> tuple:
    """One forward and backward pass: (BatchStats, parameter gradients, captured inputs and output
    gradients by (path, method), per-example squared norms by layer path)."""
    m = batch_size_of(batch)
    dtype = stat_dtype(params)
    w = jnp.asarray(w).astype(dtype)
    x = nloss.inputs(batch)
    zeros = {(u.path, u.method): jnp.zeros(u.y.shape, u.y.dtype) for u in uses}

    def weighted_loss(p: PyTree, eps: dict) -> tuple[jax.Array, tuple]:
        recorder = _Recorder(eps)
        out = _forward(nloss, p, x, recorder)
        losses = jax.vmap(nloss.output_loss)(out, batch).astype(dtype)
        losses = jnp.where(w != 0, losses, 0)
        return jnp.sum(w * losses), (losses, {k: u.a for k, u in recorder.uses.items()})

    (param_grads, out_grads), (losses, inputs) = jax.grad(weighted_loss, argnums=(0, 1), has_aux=True)(params, zeros)
    by_path: dict[tuple[str, ...], list[NNXUse]] = {}
    for u in uses:
        by_path.setdefault(u.path, []).append(u)
    wide_grads = {k: b.astype(compute_dtype(b.dtype)) for k, b in out_grads.items()}
    sq_by_path = {}
    with jax.default_matmul_precision("highest"):
        for path, group in by_path.items():
            if group[0].kind == OWN:
                u = group[0]
                key = (u.path, u.method)
                sq = _own_sq_norms(nloss, params, u, inputs[key], wide_grads[key], m)
            else:
                sq = _path_sq_norms(group, inputs, wide_grads, m, params, {})  # type: ignore[arg-type]
            sq_by_path[path] = sq.astype(dtype)
    sq = sum(sq_by_path.values(), jnp.zeros((m,), dtype))
    sq_sum = jnp.sum(jnp.where(w != 0, sq, 0))
    leaves = zip(jax.tree.leaves(param_grads), jax.tree.leaves(params))
    grad_sum = tuple(g.astype(jnp.result_type(p)) for g, p in leaves)
    stats = BatchStats(jnp.sum(w), jnp.sum(w * losses), grad_sum, sq_sum)
    return stats, param_grads, inputs, out_grads, sq_by_path


def probe_numbers(nloss: NNXLoss, params: PyTree, batch: PyTree) -> tuple:
    """:func:`cabs_jax.flax_fast.probe_numbers` for an NNX model: the fast and the generic S, and per layer
    (in order of first use) the norm of its gradient rebuilt from its captured terms minus its full
    gradient, the full gradient's norm and the layer's S."""
    k = batch_size_of(batch)
    uses = _plan(nloss, params, nloss.inputs(batch), k)
    stats, param_grads, inputs, out_grads, sq_by_path = _fast_parts(
        nloss, params, batch, jnp.ones((k,), float_dtype(params)), uses
    )
    generic = generic_stats(nloss, params, batch)
    full = jax.tree.leaves(param_grads)
    rebuilt: dict[tuple[str, ...], list] = {}
    for u in uses:
        key = (u.path, u.method)
        f = _layer_fn(nloss, params, u)
        own = [jax.tree.leaves(params)[i] for i in u.leaves]
        _, vjp = jax.vjp(lambda o, a=inputs[key], f=f: f(o, a), own)
        g = vjp(out_grads[key])[0]
        rebuilt[u.path] = g if u.path not in rebuilt else [x + y for x, y in zip(rebuilt[u.path], g)]
    accounting = {}
    for u in uses:
        if "/".join(u.path) in accounting:
            continue
        g, want = rebuilt[u.path], [full[i] for i in u.leaves]
        diff = jnp.sqrt(sum(jnp.sum((a - b) ** 2) for a, b in zip(g, want)))
        norm = jnp.sqrt(sum(jnp.sum(b**2) for b in want))
        accounting["/".join(u.path)] = (diff, norm, jnp.sum(sq_by_path[u.path]))
    return stats.sq_norm_sum, generic.sq_norm_sum, accounting


def fast_stats_unchecked(nloss: NNXLoss, params: PyTree, batch: PyTree, weights: jax.Array | None = None) -> BatchStats:
    """The fast path without the probe (the caller has established it for this signature)."""
    m = batch_size_of(batch)
    w = check_weights(weights, m, stat_dtype(params))
    uses = _plan(nloss, params, nloss.inputs(batch), m)
    return _fast_parts(nloss, params, batch, w, uses)[0]


__all__ = ["fast_stats_unchecked", "probe_numbers"]
