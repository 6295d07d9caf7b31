"""The fast exact path for Equinox models (issue 15): :class:`~cabs_jax.EquinoxLoss` with
``eqx.nn.Linear``, ``eqx.nn.Conv`` (1d/2d/3d, groups), ``eqx.nn.Embedding`` and ``eqx.nn.LayerNorm``
layers (``eqx.nn.MultiheadAttention`` is four ``Linear``s), plus any other trainable array.

An Equinox module maps ONE example; the batch is our ``jax.vmap`` over it, and layers inside are
often called under further, inner ``jax.vmap``s (a ``Linear`` over a sequence). In a copy of the
module (``eqx.tree_at``; the user's module is never changed) every supported layer is replaced by a
recording wrapper whose output passes through a *tap*: an identity with a custom VJP whose forward
records the layer's input ``a`` and whose backward records the output gradient ``b``. Both records
go through a ``jax.custom_batching.custom_vmap`` identity whose batching rule keeps the value batched
along axis 0 at every vmap level, inner and outer, and records it there; the last (outermost) record
is the value at the level of the batch, shape ``(m, positions..., layer shape)``: every vmap axis a
position, row i example i by construction (a per-example zero "anchor" makes every tap batched over
the examples, so a layer applied to a constant gets per-example output gradients too). The
per-example squared norms of the layer's gradient then follow from ``(a, b)`` with the formulas of
:mod:`cabs_core.per_example` (cross terms between positions and between several calls of one layer
included: the calls are concatenated along the positions).

A recorded layer's weight read as an attribute (``emb.weight``, ``lin.weight``) is a
:class:`_RawWeight`: ``h @ W.T`` and ``W @ h`` (a tied head) are recorded as further uses y = W a
of the weight (for an Embedding: the lookup's term, the projection's term and their cross term,
:func:`cabs_core.embedding_linear_cross_sq_norms`; for a Linear: more positions of the layer).
Where a raw weight is used otherwise (``jnp.einsum``, indexing: a TypeError), the plan is traced
again with raw uses materialised. Every other trainable array (learned positions, a custom
module's parameters, layers stacked for ``lax.scan``) and every materialised raw use gets a
per-example zero perturbation ``delta_i`` whose gradient is its per-example gradient: m times the
array's size, bounded by :data:`MATERIALISE_ENTRIES`. A materialised raw use of a recorded layer's
parameter adds ``||R_i||^2 + 2 <G_i, R_i>`` to the layer's norm, the cross term
``<G_i, R_i> = sum_t <b_it, J_W layer(a_it) R_i>`` from one JVP of the layer.

As for linen (:mod:`cabs_jax.verify`), S is returned only once a probe has established the
decomposition for the model and input signature: every captured tensor's leading axis carries the
probe's k examples, each parameter's gradient rebuilt from the captured terms equals its full
gradient (an unseen use, e.g. through ``jax.tree.leaves(self)`` inside the forward pass, fails
this), and the fast S equals the generic S. Layers inside ``lax.scan``, ``jax.checkpoint``, ``cond``
or other inner traces cannot be recorded: the fast path refuses them by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap

from cabs_core import (
    BatchStats,
    UnsupportedModelError,
    bias_sq_norms,
    embedding_linear_cross_sq_norms,
    embedding_sq_norms,
    linear_sq_norms,
    scale_sq_norms,
)

from .flax_fast import _sliced_patches
from .stats import PyTree, batch_size_of, check_weights, compute_dtype, float_dtype, generic_stats, stat_dtype

#: the layer types the fast path records, by exact type (a subclass may change what the call does)
KINDS: dict[type, str] = {
    eqx.nn.Linear: "Linear",
    eqx.nn.Conv: "Conv",
    eqx.nn.Conv1d: "Conv",
    eqx.nn.Conv2d: "Conv",
    eqx.nn.Conv3d: "Conv",
    eqx.nn.Embedding: "Embedding",
    eqx.nn.LayerNorm: "LayerNorm",
}

#: the array fields of each kind (its parameters)
PARAMS = {"Linear": ("weight", "bias"), "Conv": ("weight", "bias"), "Embedding": ("weight",),
          "LayerNorm": ("weight", "bias")}

#: at most this many per-example gradient entries (m times the size of the arrays) are materialised
#: for trainable arrays outside the supported layers and raw uses of layer parameters
MATERIALISE_ENTRIES = 2**26


def _unsupported(where: str, reason: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{where}: {reason}", layer=where, reason=reason)


# ----------------------------------------------------------------------------- recording


class _Recorder:
    """The records of one traced forward (and backward) pass: per call key (layer index, call
    number) the values of ``a``, ``y`` and ``b`` recorded at each vmap level, outermost last; the
    raw accesses ``(layer index, field)``."""

    def __init__(self) -> None:
        self.a: dict[tuple, list] = {}  # values, recorded by the tap's forward rule
        self.b: dict[tuple, list] = {}  # values, recorded by its backward rule
        self.a_shape: dict[tuple, list] = {}  # shapes and dtypes, recorded by every evaluation
        self.y_shape: dict[tuple, list] = {}
        self.calls: dict[int, int] = {}
        self.order: list[tuple[int, int]] = []
        self.matmul: set[tuple[int, int]] = set()  # the keys that are a raw weight's matrix product
        self.raw: list[tuple[int, str]] = []
        self.objects = True  # raw weights of Linear/Embedding as _RawWeight (else materialised)
        self.made_objects = False  # a _RawWeight was handed out

    def key(self, idx: int, matmul: bool = False) -> tuple[int, int]:
        n = self.calls.get(idx, 0)
        self.calls[idx] = n + 1
        self.order.append((idx, n))
        if matmul:
            self.matmul.add((idx, n))
        return idx, n


_ACTIVE: list[_Recorder] = []


def _batched(x: Any, batched: bool, size: int) -> Any:
    return x if batched else jnp.broadcast_to(x, (size, *jnp.shape(x)))


def _record_fn(store: dict, key: tuple, value: bool = True) -> Callable:
    """An identity ``rec(x, anchor) -> x`` whose vmap rule keeps ``x`` batched on axis 0 and records
    it (``value`` False: only its shape and dtype, for a trace whose values may not be used later)."""

    @custom_vmap
    def rec(x: jax.Array, anchor: jax.Array) -> jax.Array:
        return x

    @rec.def_vmap
    def _rule(size: int, in_batched: list, x: jax.Array, anchor: jax.Array) -> tuple:
        x, anchor = _batched(x, in_batched[0], size), _batched(anchor, in_batched[1], size)
        store.setdefault(key, []).append(x if value else jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)))
        return rec(x, anchor), True

    return rec


def _tap(rec: _Recorder, key: tuple, a: jax.Array, y: jax.Array, anchor: jax.Array) -> jax.Array:
    """``y`` (plus the zero anchor), recording ``a`` and ``y`` forward and the output gradient backward."""
    shape_a, shape_y = _record_fn(rec.a_shape, key, False), _record_fn(rec.y_shape, key, False)
    rec_a, rec_b = _record_fn(rec.a, key), _record_fn(rec.b, key)

    @jax.custom_vjp
    def tap(a: jax.Array, y: jax.Array, anchor: jax.Array) -> jax.Array:
        # the primal: traced on its own under jit (its values stay there), so shapes only
        shape_a(a, anchor)
        return shape_y(y + anchor.astype(y.dtype), anchor)

    def fwd(a: jax.Array, y: jax.Array, anchor: jax.Array) -> tuple:
        rec_a(a, anchor)
        return tap(a, y, anchor), anchor

    def bwd(anchor: jax.Array, g: jax.Array) -> tuple:
        return None, rec_b(g, anchor), jnp.zeros_like(anchor)

    tap.defvjp(fwd, bwd)
    return tap(a, y, anchor)


class _Tapped(eqx.Module):
    """A supported layer whose calls are recorded; a raw access to one of its trainable parameters
    (``wrapper.weight``) returns the parameter plus that use's per-example perturbation."""

    layer: eqx.Module
    anchor: jax.Array
    raw: dict
    idx: int = eqx.field(static=True)
    trainable: tuple[str, ...] = eqx.field(static=True)
    kind: str = eqx.field(static=True)

    @property
    def __class__(self) -> type:  # isinstance(wrapper, eqx.nn.Linear) holds in the user's code, as before
        return type(self.layer)

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        rec = _ACTIVE[-1]
        out = self.layer(x, *args, **kwargs)
        y, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
        y = _tap(rec, rec.key(self.idx), jnp.asarray(x), y, self.anchor)
        return y if rest is None else (y, *rest)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("layer", "anchor", "raw", "idx", "trainable", "kind"):
            raise AttributeError(name)
        value = getattr(self.layer, name)
        if name not in self.trainable or not _ACTIVE:
            return value
        if name in self.raw:
            return value + self.raw[name]
        rec = _ACTIVE[-1]
        if rec.objects and name == "weight" and self.kind in ("Linear", "Embedding"):
            rec.made_objects = True
            return _RawWeight(value, self, False)
        rec.raw.append((self.idx, name))  # planned: materialised through a per-example perturbation
        return value


class _RawWeight:
    """The weight W (out, in) of a recorded Linear or Embedding read as an attribute: ``W @ h``
    (h a vector) and ``h @ W.T`` (h (..., in)) are recorded as uses y = W a of the weight (a tied
    head); any other operation raises TypeError, and the plan then materialises the raw uses."""

    def __init__(self, value: jax.Array, owner: _Tapped, transposed: bool) -> None:
        self.value, self.owner, self.transposed = value, owner, transposed

    @property
    def T(self) -> _RawWeight:  # noqa: N802  (the array attribute it stands for)
        return _RawWeight(self.value, self.owner, not self.transposed)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.value.shape)) if self.transposed else tuple(self.value.shape)

    @property
    def dtype(self) -> Any:
        return self.value.dtype

    @property
    def ndim(self) -> int:
        return self.value.ndim

    def _use(self, h: Any) -> jax.Array:
        rec, o = _ACTIVE[-1], self.owner
        h = jnp.asarray(h)
        y = jnp.matmul(h, self.value.T)
        return _tap(rec, rec.key(o.idx, matmul=True), h, y, o.anchor)

    def __matmul__(self, h: Any) -> jax.Array:  # W @ h
        if self.transposed or jnp.ndim(h) != 1:
            raise TypeError("only W @ h (h a vector) and h @ W.T of a recorded layer's weight are recorded")
        return self._use(h)

    def __rmatmul__(self, h: Any) -> jax.Array:  # h @ W.T
        if not self.transposed or jnp.ndim(h) < 1:
            raise TypeError("only W @ h (h a vector) and h @ W.T of a recorded layer's weight are recorded")
        return self._use(h)



# ----------------------------------------------------------------------------- the plan


def _key_name(k: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _get(node: Any, keypath: tuple) -> Any:
    for k in keypath:
        if hasattr(k, "name"):
            node = getattr(node, k.name)
        elif hasattr(k, "idx"):
            node = node[k.idx]
        else:
            node = node[k.key]
    return node


@dataclass(frozen=True)
class Layer:
    """A supported layer with trainable parameters: its index, key path, kind and trainable fields."""

    idx: int
    keypath: tuple
    kind: str
    trainable: tuple[str, ...]

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(_key_name(k) for k in self.keypath)

    @property
    def where(self) -> str:
        return "/".join(self.path) or "model"


@dataclass(frozen=True)
class Use:
    """One recorded call (``method`` = its number), a raw use (``"raw:<field>"``) or a materialised
    array (``"array"``), with the shapes of what is captured (``a``, ``y``: ShapeDtypeStruct)."""

    path: tuple[str, ...]
    method: str
    a: Any
    y: Any
    where: str
    layer: Layer | None = None
    leaf: int | None = None  # index in jax.tree.leaves(params) of a materialised array
    objects: bool = True  # the plan records W @ h / h @ W.T raw uses (False: materialises them)
    stack: None = None  # what flax_fast.structure reads of a linen use inside nn.scan (never here)


def _as_declared(kind: str, layer: eqx.Module) -> bool:
    """Whether the layer's parameters have the shapes its configuration declares (not, e.g., a stack
    of layers made with ``eqx.filter_vmap`` to be applied with ``lax.scan``)."""
    w = jnp.shape(layer.weight) if getattr(layer, "weight", None) is not None else None
    b = jnp.shape(layer.bias) if getattr(layer, "bias", None) is not None else None
    if kind == "Linear":
        size = {"scalar": 1}
        want_w = (size.get(layer.out_features, layer.out_features), size.get(layer.in_features, layer.in_features))
        return w == want_w and b in (None, (want_w[0],))
    if kind == "Conv":
        want_w = (layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)
        return w == want_w and b in (None, (layer.out_channels,) + (1,) * layer.num_spatial_dims)
    if kind == "Embedding":
        return w == (layer.num_embeddings, layer.embedding_size)
    return w in (None, tuple(layer.shape)) and b in (None, tuple(layer.shape))


def _layers(eloss: Any, params: PyTree) -> tuple[list[Layer], list[tuple[int, tuple]]]:
    """The supported layers with trainable parameters, and the other trainable leaves (index, key path)."""
    module = eqx.combine(params, eloss.static)
    found = jax.tree_util.tree_flatten_with_path(module, is_leaf=lambda n: type(n) in KINDS)[0]
    layers = []
    for keypath, node in found:
        if type(node) not in KINDS or not _as_declared(KINDS[type(node)], node):
            continue  # e.g. layers stacked for lax.scan: their arrays are materialised (or refused)
        kind = KINDS[type(node)]
        sub = _get(params, keypath)
        trainable = tuple(f for f in PARAMS[kind] if getattr(sub, f, None) is not None)
        if trainable:
            layers.append(Layer(len(layers), tuple(keypath), kind, trainable))
    owned = {tuple(L.keypath) + (jax.tree_util.GetAttrKey(f),) for L in layers for f in L.trainable}
    free = []
    for i, (keypath, _) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0]):
        if tuple(keypath) not in owned:
            free.append((i, tuple(keypath)))
    return layers, free


def _model(eloss: Any, params: PyTree, layers: list[Layer], deltas: dict, anchor: jax.Array) -> Any:
    """The module of one example: materialised arrays perturbed, supported layers wrapped."""
    leaves, treedef = jax.tree.flatten(params)
    for name, d in deltas.items():
        if name.startswith("leaf"):
            i = int(name[4:])
            leaves[i] = leaves[i] + d
    module = eqx.combine(jax.tree.unflatten(treedef, leaves), eloss.static)
    if not layers:
        return module
    wrapped = [
        _Tapped(_get(module, L.keypath), anchor,
                {f: deltas[f"raw{L.idx}.{f}"] for f in L.trainable if f"raw{L.idx}.{f}" in deltas},
                L.idx, L.trainable, L.kind)
        for L in layers
    ]
    return eqx.tree_at(lambda mod: [_get(mod, L.keypath) for L in layers], module, replace=wrapped)


def _forward(eloss: Any, params: PyTree, batch: PyTree, layers: list[Layer], deltas: dict, rec: _Recorder) -> jax.Array:
    """Per-example losses (m,) of the instrumented model, recording into ``rec``."""
    m = batch_size_of(batch)
    anchors = jnp.zeros((m,), float_dtype(params))
    x = eloss.inputs(batch)

    def one(d: dict, anchor: jax.Array, xi: Any, ei: Any) -> jax.Array:
        return eloss.output_loss(_model(eloss, params, layers, d, anchor)(xi), ei)

    _ACTIVE.append(rec)
    try:
        return jax.vmap(one)(deltas, anchors, x, batch)
    finally:
        _ACTIVE.pop()


def _last(store: dict, key: tuple, what: str, where: str) -> Any:
    if not store.get(key):
        raise _unsupported(where, f"its {what} was not recorded at the level of the batch (a layer called "
                           "inside an inner trace such as lax.scan, jax.checkpoint or lax.cond)")
    return store[key][-1]


def _foreign(x: Any) -> bool:
    """Whether ``x`` is a tracer of another trace than the current one (a record made inside an
    inner trace such as ``lax.scan``'s body). JAX's trace context is internal: where it is not
    available this check is skipped, and such a record still fails loudly when JAX finds it
    (an UnexpectedTracerError, which the probe turns into a refusal)."""
    try:
        from jax._src import core as _core

        current = _core.trace_ctx.trace
    except (ImportError, AttributeError):
        return False
    return isinstance(x, jax.core.Tracer) and getattr(x, "_trace", current) is not current


def _inner_trace_error(e: Exception) -> UnsupportedModelError:
    reason = (f"a layer runs inside an inner trace (lax.scan, jax.checkpoint, lax.cond, ...), where the fast path "
              f"cannot record its input and output gradient ({str(e).splitlines()[0]})")
    return UnsupportedModelError(reason, reason=reason)


def _plan(eloss: Any, params: PyTree, x: Any, m: int) -> tuple[Use, ...]:
    """Abstractly trace one forward pass of ``m`` examples with model input ``x``: every recorded
    call, raw use and materialised array, checking that each carries the m examples on axis 0."""
    layers, free = _layers(eloss, params)
    by_idx = {L.idx: L for L in layers}
    rec = _Recorder()
    objects = True

    def forward(p: PyTree, xs: Any) -> Any:
        rec.__init__()
        rec.objects = objects
        _ACTIVE.append(rec)
        try:
            def one(anchor: jax.Array, xi: Any) -> Any:
                return _model(eloss, p, layers, {}, anchor)(xi)

            return jax.vmap(one)(jnp.zeros((m,), float_dtype(p)), xs)
        finally:
            _ACTIVE.pop()

    try:
        try:
            jax.eval_shape(forward, params, x)
        except (TypeError, ValueError):
            if not rec.made_objects:
                raise
            objects = False  # a raw weight used otherwise than W @ h or h @ W.T: materialise its raw uses
            jax.eval_shape(forward, params, x)
    except jax.errors.UnexpectedTracerError as e:
        raise _inner_trace_error(e) from None
    uses: list[Use] = []
    for key in rec.order:
        L = by_idx[key[0]]
        a, y = _last(rec.a_shape, key, "input", L.where), _last(rec.y_shape, key, "output", L.where)
        uses.append(Use(L.path, f"{key[1]}@" if key in rec.matmul else str(key[1]), a, y, L.where, layer=L,
                        objects=objects))
    leaves = jax.tree.leaves(params)
    for idx, field_name in dict.fromkeys(rec.raw):
        L = by_idx[idx]
        p = getattr(_get(params, L.keypath), field_name)
        s = jax.ShapeDtypeStruct((m, *jnp.shape(p)), jnp.result_type(p))
        uses.append(Use(L.path, f"raw:{field_name}", s, s, L.where, layer=L, objects=objects))
    for i, keypath in free:
        s = jax.ShapeDtypeStruct((m, *jnp.shape(leaves[i])), jnp.result_type(leaves[i]))
        path = tuple(_key_name(k) for k in keypath)
        uses.append(Use(path, "array", s, s, "/".join(path) or "params", leaf=i, objects=objects))
    materialised = [u for u in uses if u.method == "array" or u.method.startswith("raw:")]
    entries = sum(math.prod(u.a.shape) for u in materialised)
    if entries > MATERIALISE_ENTRIES:
        big = max(materialised, key=lambda u: math.prod(u.a.shape))
        raise _unsupported(big.where, f"{entries} per-example gradient entries of arrays outside the supported "
                           f"layers' calls would be materialised (largest {big.where!r} {big.method}, "
                           f"{tuple(big.a.shape)}); the limit is eqx_fast.MATERIALISE_ENTRIES = {MATERIALISE_ENTRIES}")
    for u in uses:
        for what, t in (("input", u.a), ("output", u.y)):
            if len(t.shape) < 1 or t.shape[0] != m:
                raise _unsupported(u.where, f"its recorded {what} {tuple(t.shape)} has no leading axis of the "
                                   f"batch's {m} examples")
    return tuple(uses)


def _deltas(uses: tuple[Use, ...]) -> dict:
    """Zero per-example perturbations of the materialised arrays and raw uses."""
    out = {}
    for u in uses:
        if u.method == "array":
            out[f"leaf{u.leaf}"] = jnp.zeros(u.a.shape, u.a.dtype)
        elif u.method.startswith("raw:"):
            out[f"raw{u.layer.idx}.{u.method[4:]}"] = jnp.zeros(u.a.shape, u.a.dtype)
    return out


# ----------------------------------------------------------------------------- per-layer norms


def _in_ndim(L: Layer, layer: eqx.Module) -> int:
    """The number of axes of one call's input (the rest of a record are example and positions)."""
    if L.kind == "Linear":
        return 0 if layer.in_features == "scalar" else 1
    if L.kind == "Conv":
        return layer.num_spatial_dims + 1
    if L.kind == "Embedding":
        return 0
    return len(layer.shape)


def _out_ndim(L: Layer, layer: eqx.Module) -> int:
    if L.kind == "Linear":
        return 0 if layer.out_features == "scalar" else 1
    if L.kind == "Conv":
        return layer.num_spatial_dims + 1
    if L.kind == "Embedding":
        return 1
    return len(layer.shape)


def _flat(a: jax.Array, b: jax.Array, L: Layer, layer: eqx.Module, m: int) -> tuple[jax.Array, jax.Array]:
    """``a`` (m * positions, *input) and ``b`` (m * positions, *output) of one call."""
    ni, no = _in_ndim(L, layer), _out_ndim(L, layer)
    a = a.reshape((-1, *a.shape[a.ndim - ni:]) if ni else (-1,))
    b = b.reshape((-1, *b.shape[b.ndim - no:]) if no else (-1,))
    if a.shape[0] != b.shape[0] or a.shape[0] % m:
        raise _unsupported(L.where, f"recorded input and output gradient disagree on positions ({a.shape}, {b.shape})")
    return a, b


def _conv_rows(layer: eqx.nn.Conv, a: jax.Array, b: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """Patches (m, T, K, C_in) and output gradients (m, T, C_out) of a Conv's calls."""
    x = a
    if layer.padding_mode != "ZEROS":
        x = jax.vmap(layer._nonzero_pad)(x)
        padding: Any = "VALID"
    else:
        padding = layer.padding
    x = jnp.moveaxis(x, 1, -1)  # channels last
    patches = _sliced_patches(x, tuple(layer.kernel_size), tuple(layer.stride), tuple(layer.dilation), padding)
    k, c = patches.shape[-2], patches.shape[-1]
    b3 = jnp.moveaxis(b, 1, -1).reshape(m, -1, b.shape[1])
    return patches.reshape(m, -1, k, c), b3


def _matmul_rows(matmuls: list[tuple[jax.Array, jax.Array]], m: int, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Inputs (m, T, in) and output gradients (m, T, out) of a weight's ``W @ h`` / ``h @ W.T`` uses."""
    a3 = jnp.concatenate([a.reshape(m, -1, a.shape[-1]) for a, _ in matmuls], 1).astype(dtype)
    b3 = jnp.concatenate([b.reshape(m, -1, b.shape[-1]) for _, b in matmuls], 1).astype(dtype)
    return a3, b3


def _layer_sq_norms(L: Layer, layer: eqx.Module, calls: list[tuple[jax.Array, jax.Array]], m: int,
                    dtype: Any, matmuls: list[tuple[jax.Array, jax.Array]] = ()) -> jax.Array:
    """Per-example squared norm (m,) of the gradient of the layer's trainable parameters from
    its calls' records (concatenated along the positions: cross terms between calls included) and
    its weight's recorded matrix products ``matmuls`` (a tied head; Linear and Embedding only)."""
    flat = [_flat(a, b.astype(dtype), L, layer, m) for a, b in calls]
    sq = jnp.zeros((m,), dtype)
    if L.kind == "Linear":
        rows = [(a.reshape(m, -1, 1 if a.ndim == 1 else a.shape[-1]).astype(dtype),
                 b.reshape(m, -1, 1 if b.ndim == 1 else b.shape[-1])) for a, b in flat]
        if matmuls:
            rows.append(_matmul_rows(list(matmuls), m, dtype))  # the same orientation y = W a
        if "weight" in L.trainable:
            a3, b3 = jnp.concatenate([a for a, _ in rows], 1), jnp.concatenate([b for _, b in rows], 1)
            sq = sq + linear_sq_norms(a3, b3)
        if "bias" in L.trainable and flat:
            sq = sq + bias_sq_norms(jnp.concatenate([b for _, b in rows[: len(flat)]], 1))
        return sq
    if L.kind == "Embedding":
        if flat:
            ids = jnp.concatenate([a.reshape(m, -1) for a, _ in flat], 1)
            e3 = jnp.concatenate([b.reshape(m, -1, b.shape[-1]) for _, b in flat], 1)
            sq = sq + embedding_sq_norms(ids, e3)
        if matmuls:
            h3, b3 = _matmul_rows(list(matmuls), m, dtype)
            sq = sq + linear_sq_norms(h3, b3)
            if flat:  # the lookup's and the projection's gradients' inner product, no one-hot formed
                sq = sq + 2 * embedding_linear_cross_sq_norms(ids, e3, h3, b3)
        return sq
    if L.kind == "Conv":
        rows = [_conv_rows(layer, a.astype(dtype), b, m) for a, b in flat]
        patches = jnp.concatenate([p for p, _ in rows], 1)
        b3 = jnp.concatenate([g for _, g in rows], 1)
        if "weight" in L.trainable:
            g = layer.groups
            ci, co = patches.shape[-1] // g, b3.shape[-1] // g
            for j in range(g):
                pj = patches[..., j * ci:(j + 1) * ci].reshape(m, patches.shape[1], -1)
                sq = sq + linear_sq_norms(pj, b3[..., j * co:(j + 1) * co])
        return sq + bias_sq_norms(b3) if "bias" in L.trainable else sq
    # LayerNorm: y = weight * xhat + bias over all of its shape, xhat as Equinox computes it
    d = math.prod(layer.shape)
    x = jnp.concatenate([a.reshape(m, -1, d) for a, _ in flat], 1)
    x = x.astype(jnp.result_type(x.dtype, jnp.float32))
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.maximum(0.0, jnp.var(x, axis=-1, keepdims=True))
    xhat = ((x - mean) * jax.lax.rsqrt(var + layer.eps)).astype(dtype)
    b3 = jnp.concatenate([b.reshape(m, -1, d) for _, b in flat], 1)
    if "weight" in L.trainable:
        sq = sq + scale_sq_norms(xhat, b3)
    return sq + bias_sq_norms(b3) if "bias" in L.trainable else sq


def _layer_parts(eloss: Any, params: PyTree, L: Layer) -> tuple[PyTree, eqx.Module]:
    """The layer's trainable part and its constant rest."""
    return _get(params, L.keypath), _get(eloss.static, L.keypath)


def _raw_cross(eloss: Any, params: PyTree, L: Layer, calls: list, raw: dict, m: int, dtype: Any,
               matmuls: list = ()) -> jax.Array:
    """sum over calls and positions of <b, J_params layer(a) . R_i>: the inner product (m,) of the
    recorded calls' per-example gradient with the raw uses' per-example gradients ``raw`` {field: R}."""
    lp, ls = _layer_parts(eloss, params, L)
    layer = eqx.combine(lp, ls)
    total = jnp.zeros((m,), dtype)
    for a, b in calls:
        af, bf = _flat(a, b, L, layer, m)
        t = af.shape[0] // m
        af, bf = af.reshape(m, t, *af.shape[1:]), bf.reshape(m, t, *bf.shape[1:])

        def one(ai: jax.Array, bi: jax.Array, ri: dict) -> jax.Array:
            tangent = jax.tree.map(jnp.zeros_like, lp)
            tangent = eqx.tree_at(lambda x: [getattr(x, f) for f in ri], tangent, replace=[ri[f] for f in ri])

            def f(p: PyTree) -> jax.Array:
                return jax.vmap(eqx.combine(p, ls))(ai)

            _, dy = jax.jvp(f, (lp,), (tangent,))
            return jnp.sum(dy.astype(dtype) * bi.astype(dtype))

        total = total + jax.vmap(one)(af, bf, raw)
    if matmuls and "weight" in raw:  # sum_t b_t^T R_i a_t
        a3, b3 = _matmul_rows(list(matmuls), m, dtype)
        total = total + jnp.einsum("mto,moi,mti->m", b3, raw["weight"].astype(dtype), a3)
    return total


# ----------------------------------------------------------------------------- the statistics


def _fast_parts(eloss: Any, params: PyTree, batch: PyTree, w: jax.Array, uses: tuple[Use, ...]) -> tuple:
    """One forward and backward pass: (BatchStats, parameter gradients, per-example gradients of the
    materialised arrays {name: (m, ...)}, records {call key: (a, b)}, per-example norms by path)."""
    m = batch_size_of(batch)
    dtype = stat_dtype(params)
    w = jnp.asarray(w).astype(dtype)
    layers, _ = _layers(eloss, params)
    by_idx = {L.idx: L for L in layers}
    rec = _Recorder()

    objects = uses[0].objects if uses else True

    def weighted_loss(p: PyTree, d: dict) -> tuple:
        rec.__init__()
        rec.objects = objects
        losses = _forward(eloss, p, batch, layers, d, rec).astype(dtype)
        losses = jnp.where(w != 0, losses, 0)
        return jnp.sum(w * losses), losses

    try:
        (param_grads, delta_grads), losses = jax.grad(weighted_loss, argnums=(0, 1), has_aux=True)(
            params, _deltas(uses))
        records = {}
        for key in rec.order:
            where = by_idx[key[0]].where
            records[key] = (_last(rec.a, key, "input", where), _last(rec.b, key, "output gradient", where))
            if any(_foreign(v) for v in records[key]):
                raise _unsupported(where, "it is called inside an inner trace (lax.scan, jax.checkpoint, lax.cond, "
                                   "...), where the fast path cannot record its input and output gradient")
    except jax.errors.UnexpectedTracerError as e:
        raise _inner_trace_error(e) from None
    sq_by_path: dict[tuple[str, ...], jax.Array] = {}
    wide = compute_dtype(dtype)
    with jax.default_matmul_precision("highest"):
        for L in layers:
            calls = [records[k] for k in rec.order if k[0] == L.idx and k not in rec.matmul]
            matmuls = [records[k] for k in rec.order if k[0] == L.idx and k in rec.matmul]
            raw = {f: delta_grads[f"raw{L.idx}.{f}"] for f in L.trainable if f"raw{L.idx}.{f}" in delta_grads}
            if not calls and not matmuls and not raw:
                continue
            sq = jnp.zeros((m,), wide)
            if calls or matmuls:
                layer = eqx.combine(*_layer_parts(eloss, params, L))
                sq = sq + _layer_sq_norms(L, layer, calls, m, wide, matmuls)
            for r in raw.values():
                sq = sq + jnp.sum(jnp.square(r.astype(wide)).reshape(m, -1), axis=1)
            if (calls or matmuls) and raw:
                sq = sq + 2 * _raw_cross(eloss, params, L, calls, raw, m, wide, matmuls)
            sq_by_path[L.path] = sq.astype(dtype)
        for u in uses:
            if u.method == "array":
                g = delta_grads[f"leaf{u.leaf}"].astype(wide)
                sq_by_path[u.path] = jnp.sum(jnp.square(g).reshape(m, -1), axis=1).astype(dtype)
    sq = sum(sq_by_path.values(), jnp.zeros((m,), dtype))
    sq_sum = jnp.sum(jnp.where(w != 0, sq, 0))  # b carries w_i, the norms w_i^2 = w_i for a 0/1 mask
    leaves = zip(jax.tree.leaves(param_grads), jax.tree.leaves(params))
    grad_sum = tuple(g.astype(jnp.result_type(p)) for g, p in leaves)
    stats = BatchStats(jnp.sum(w), jnp.sum(w * losses), grad_sum, sq_sum)
    return stats, param_grads, delta_grads, records, sq_by_path, layers, rec.order, rec.matmul


def _catching_inner_traces(fn: Callable) -> Callable:
    """``fn`` raising :class:`UnsupportedModelError` where a record escaped from an inner trace
    (a layer inside ``lax.scan``, ``jax.checkpoint``, ``lax.cond``: its records are that trace's)."""

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except jax.errors.UnexpectedTracerError as e:
            raise _inner_trace_error(e) from None

    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    return wrapped


@_catching_inner_traces
def probe_numbers(eloss: Any, params: PyTree, batch: PyTree) -> tuple:
    """What the probe compares on a small batch (traceable): the fast and the generic S and, per
    layer or array in order of first use, (norm of its gradient rebuilt from the captured terms -
    its full gradient, the full gradient's norm, its S)."""
    k = batch_size_of(batch)
    uses = _plan(eloss, params, eloss.inputs(batch), k)
    stats, param_grads, delta_grads, records, sq_by_path, layers, order, matmul = _fast_parts(
        eloss, params, batch, jnp.ones((k,), float_dtype(params)), uses)
    generic = generic_stats(eloss, params, batch)
    by_path = {L.path: L for L in layers}
    accounting = {}
    for path in dict.fromkeys(u.path for u in uses):
        u0 = next(u for u in uses if u.path == path)
        if u0.method == "array":
            got_leaves = [jnp.sum(delta_grads[f"leaf{u0.leaf}"], axis=0)]
            full_leaves = [jax.tree.leaves(param_grads)[u0.leaf]]
        else:
            L = by_path[path]
            lp, ls = _layer_parts(eloss, params, L)
            total = jax.tree.map(jnp.zeros_like, lp)
            for key in order:
                if key[0] != L.idx:
                    continue
                a, b = records[key]
                if key in matmul:  # W @ a: the weight's gradient sum_t b_t a_t^T
                    g = jnp.einsum("to,ti->oi", b.reshape(-1, b.shape[-1]), a.reshape(-1, a.shape[-1]))
                    total = eqx.tree_at(lambda x: x.weight, total, total.weight + g)
                    continue
                af, bf = _flat(a, b, L, eqx.combine(lp, ls), k)
                _, vjp = jax.vjp(lambda p, af=af, ls=ls: jax.vmap(eqx.combine(p, ls))(af), lp)
                total = jax.tree.map(jnp.add, total, vjp(bf)[0])
            for f in L.trainable:
                name = f"raw{L.idx}.{f}"
                if name in delta_grads:
                    r = jnp.sum(delta_grads[name], axis=0)
                    total = eqx.tree_at(lambda x, f=f: getattr(x, f), total, getattr(total, f) + r)
            got_leaves, full_leaves = jax.tree.leaves(total), jax.tree.leaves(_get(param_grads, L.keypath))
        diff = jnp.sqrt(sum(jnp.sum((x - y) ** 2) for x, y in zip(got_leaves, full_leaves)))
        norm = jnp.sqrt(sum(jnp.sum(y**2) for y in full_leaves))
        accounting["/".join(path)] = (diff, norm, jnp.sum(sq_by_path.get(path, jnp.zeros(()))))
    return stats.sq_norm_sum, generic.sq_norm_sum, accounting


@_catching_inner_traces
def fast_stats_unchecked(eloss: Any, params: PyTree, batch: PyTree, weights: jax.Array | None = None) -> BatchStats:
    """The fast path without the probe (the caller has established it for this signature)."""
    m = batch_size_of(batch)
    w = check_weights(weights, m, stat_dtype(params))
    uses = _plan(eloss, params, eloss.inputs(batch), m)
    return _fast_parts(eloss, params, batch, w, uses)[0]


#: :func:`fast_stats_unchecked` compiled (the loss static), for eager calls
fast_stats_jit = jax.jit(fast_stats_unchecked, static_argnums=0)

__all__ = ["KINDS", "MATERIALISE_ENTRIES", "fast_stats_unchecked", "probe_numbers"]
