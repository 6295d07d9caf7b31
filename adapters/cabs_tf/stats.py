"""Per-example statistics of docs/spec.md section 4 for Keras 3 models (TensorFlow
backend) and for lists of ``tf.Variable`` s with a per-example loss.

:class:`PerExampleStats` returns, for a batch ``(x, y)`` with a 0/1 weight mask
``w``, the summed gradient ``sum_i w_i g_i`` (one tensor per variable, the
ordinary gradient times m) and ONE float64 tensor of the four scalars of
:class:`cabs_core.ScalarStats`: ``[m, sum_i l_i, S = sum_i ||g_i||^2,
||sum_i g_i||^2]``. The host reads it with ``ScalarStats.from_vector(v.numpy())``:
one device-to-host copy per step. Two exact paths:

- ``fast``: one forward and one backward pass. Each supported layer
  (Dense, EinsumDense, Conv1D, Conv2D, Embedding, ReversibleEmbedding and its
  ``reverse=True`` calls, keras-hub's PositionEmbedding, LayerNormalization; an
  Embedding's table used as the output projection, ``ops.matmul(h, E.T)``, and
  positions ``pos(arange(T))`` broadcast over the examples are found in the
  traced graph) records its inputs
  ``a`` and its pre-activation output ``z``; the backward pass gives
  ``b = dL/dz``, and ||g_i||^2 of the layer follows from ``a`` and ``b``
  (:mod:`cabs_tf.per_example`). No whole-model per-example gradient exists.
- ``generic``: per-example gradients of all variables with
  ``tf.vectorized_map`` in chunks of ``chunk_size`` examples (memory
  ~ chunk_size x parameters). If pfor cannot vectorise an op it falls back
  to a while loop; we detect this and warn (:class:`PforFallbackWarning`).

The fast path returns S only when it has established its decomposition for
this model and input signature (see :meth:`PerExampleStats.verify`): a probe on a
small batch of k examples (k differs from every other dimension) must show
every captured layer input and output gradient with leading axis k, the
per-layer terms must rebuild every parameter's full gradient (no use of a
weight outside its layer), and the fast S must equal a loop over single
examples. Otherwise ``auto`` falls back to ``generic`` with one
:class:`cabs_core.FastPathFallbackWarning` per signature and ``fast`` raises
:class:`cabs_core.UnsupportedModelError`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers as kl  # noqa: E402
from keras import ops  # noqa: E402

from cabs_core.exactness import (  # noqa: E402
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
from cabs_core.per_example import gram_is_cheaper  # noqa: E402

from .per_example import (  # noqa: E402
    bias_sq_norms,
    embedding_sq_norms,
    linear_sq_norms,
    scale_shift_sq_norms,
    tied_embedding_sq_norms,
)

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        f"cabs_tf needs Keras 3 with the TensorFlow backend, but Keras runs on {keras.backend.backend()!r}: "
        f"set KERAS_BACKEND=tensorflow before importing keras"
    )

Method = Literal["auto", "fast", "generic"]
Nest = Any  # a tensor, or a nest (tuple/dict) of tensors with a leading example axis


class PforFallbackWarning(UserWarning):
    """tf.vectorized_map could not vectorise an op and runs a slow while loop."""


__all__ = ["BatchNormTrainingError", "FastPathFallbackWarning", "PforFallbackWarning", "PerExampleStats",
           "TiedProjection", "UnsupportedModelError", "VERIFY_EVERY"]


#: Keras's tied embedding (``reverse=True`` projects back with the table; keras-hub's GPT2/Gemma
#: backbones use it, and keras-hub's own ``ReversibleEmbedding`` is a subclass that changes nothing)
_REVERSIBLE = getattr(kl, "ReversibleEmbedding", None)
_FAST_TYPES = tuple(t for t in (kl.Dense, kl.EinsumDense, kl.Conv1D, kl.Conv2D, kl.Embedding, kl.LayerNormalization,
                                _REVERSIBLE) if t is not None)


def _is_reversible(layer: Any) -> bool:
    """A ``keras.layers.ReversibleEmbedding``, or keras-hub's subclass of it that overrides nothing of its
    computation (``keras_hub.layers.ReversibleEmbedding``)."""
    if _REVERSIBLE is None or not isinstance(layer, _REVERSIBLE):
        return False
    cls = type(layer)
    return cls is _REVERSIBLE or (cls.__module__.startswith("keras_hub.") and all(
        getattr(cls, n) is getattr(_REVERSIBLE, n) for n in ("call", "build", "compute_mask")))


def _is_position_embedding(layer: Any) -> bool:
    """keras-hub's ``PositionEmbedding`` (a learned (sequence_length, d) table whose first T rows,
    broadcast over the examples, are the layer's output)."""
    cls = type(layer)
    return cls.__name__ == "PositionEmbedding" and cls.__module__.startswith("keras_hub.") \
        and hasattr(layer, "position_embeddings")


def _lookup_table(layer: Any) -> Any:
    """The table of a layer whose calls are lookups (Embedding, ReversibleEmbedding, keras-hub's
    PositionEmbedding), else None."""
    if isinstance(layer, kl.Embedding):
        return layer.embeddings
    if _is_position_embedding(layer):
        return layer.position_embeddings
    return None


def _reverse_table(layer: Any) -> Any:
    """The separate reverse-projection table (d, V) of an untied ReversibleEmbedding, else None."""
    return getattr(layer, "reverse_embeddings", None) if _is_reversible(layer) and not layer.tie_weights else None


class _EinsumRoles:
    """The roles of the letters of an :class:`keras.layers.EinsumDense` equation
    ``in,kernel->out`` (an ellipsis expanded to upper-case letters for an input of
    rank ``rank``), from which the layer's per-example gradient follows:

    - ``e``: the example axis, the input's and the output's first letter (not in
      the kernel);
    - ``h``: kernel letters also in the input and the output (a weight block per
      value, e.g. per head);
    - ``t``: input letters shared with the output, not in the kernel (positions,
      summed in the Gram form);
    - ``p``: kernel letters only in the input (contracted); ``q``: kernel letters
      only in the output; ``r``: input letters in neither (summed out first).

    The per-example kernel gradient is ``g_i[kernel] = sum_{t, r} a_i b_i``; per
    value of ``h`` it is :func:`linear_sq_norms` of ``a`` as (T, P) and ``b`` as (T, Q).
    """

    def __init__(self, equation: str, rank: int | None) -> None:
        eq = equation.replace(" ", "")
        match = re.fullmatch(r"([a-zA-Z.]+),([a-zA-Z]+)->([a-zA-Z.]+)", eq)
        if match is None:
            raise ValueError(f"equation {equation!r} is not of the form 'in,kernel->out'")
        a, k, z = match.groups()
        if "..." in a:
            if a.count("...") != 1 or z.count("...") != 1 or "." in a.replace("...", "") + z.replace("...", ""):
                raise ValueError(f"equation {equation!r}: one ellipsis in the input and the output")
            n = max((rank if rank is not None else len(a) - 2) - (len(a) - 3), 1)
            fresh = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq)[:n]
            a, z = a.replace("...", fresh), z.replace("...", fresh)
        elif "." in a or "." in z:
            raise ValueError(f"equation {equation!r}: an ellipsis must appear in the input and the output")
        for name, spec in (("input", a), ("kernel", k), ("output", z)):
            if len(set(spec)) != len(spec):
                raise ValueError(f"equation {equation!r}: a repeated letter in the {name} (a diagonal)")
        if rank is not None and rank != len(a):
            raise ValueError(f"equation {equation!r} does not fit an input of rank {rank}")
        stray = [c for c in k if c not in a and c not in z]
        if stray:
            raise ValueError(f"equation {equation!r}: kernel letters {stray} in neither the input nor the output")
        e = a[0]
        if z[0] != e or e in k:
            raise ValueError(
                f"equation {equation!r}: the example axis (the input's first letter {e!r}) must be the output's "
                f"first letter and not a kernel letter")
        self.a, self.k, self.z, self.e = a, k, z, e
        self.h = "".join(c for c in k if c in a and c in z)
        self.t = "".join(c for c in a[1:] if c in z and c not in k)
        self.p = "".join(c for c in k if c in a and c not in z)
        self.q = "".join(c for c in k if c in z and c not in a)
        self.r = "".join(c for c in a[1:] if c not in z and c not in k)

    def blocks(self, a: tf.Tensor, b: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """``a`` as (m, H, T, P) and ``b`` as (m, H, T, Q), H, T, P, Q flattened
        products of their letters' sizes (1 for none)."""
        e, h, t, p, q = self.e, self.h, self.t, self.p, self.q
        a2 = tf.einsum(f"{self.a}->{e}{h}{t}{p}", a)
        b2 = tf.einsum(f"{self.z}->{e}{h}{t}{q}", b)
        dims = {c: n for c, n in zip(self.a + self.z, list(a.shape) + list(b.shape))}

        def size(letters: str) -> int:
            return math.prod(int(dims[c]) for c in letters)

        return (tf.reshape(a2, [-1, size(h), size(t), size(p)]),
                tf.reshape(b2, [-1, size(h), size(t), size(q)]))


def _einsum_roles(layer: keras.Layer, rank: int | None = None) -> _EinsumRoles:
    """The roles of an EinsumDense layer's letters, or UnsupportedModelError naming it."""
    try:
        return _EinsumRoles(layer.equation, rank)
    except ValueError as e:
        raise UnsupportedModelError(
            f"EinsumDense {layer.name!r}: {e}; the fast path cannot establish its per-example gradient. "
            f"method='generic' is exact for any model.", layer=layer.name,
            reason=f"EinsumDense equation {layer.equation!r}: {e}") from None


class TiedProjection(keras.layers.Layer):
    """The output projection tied to an :class:`keras.layers.Embedding`:
    ``z = h E^T`` with the embedding's table E (V, d), so logits over the
    vocabulary share the input embedding's weights (the standard language-model
    layout). Use it instead of ``ops.matmul(h, ops.transpose(emb.embeddings))``:
    the fast path then computes the tied table's per-example gradient exactly
    (the sum of both uses, :func:`cabs_tf.per_example.tied_embedding_sq_norms`),
    where the bare matmul is an unseen use that makes ``auto`` fall back."""

    def __init__(self, embedding: kl.Embedding, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(embedding, kl.Embedding):
            raise TypeError(f"TiedProjection needs a keras.layers.Embedding, got {type(embedding).__name__}")
        self.embedding = embedding

    def call(self, h: tf.Tensor) -> tf.Tensor:
        return ops.matmul(h, ops.transpose(self.embedding.embeddings))


class _ReverseUse:
    """Stands for the ``reverse=True`` calls of a ReversibleEmbedding, ``z = h E^T``
    (tied) or ``z = h R`` (``tie_weights=False``, its own table R (d, V)): recorded
    like :class:`TiedProjection` calls, grouped with the layer's lookups."""

    def __init__(self, embedding: kl.Embedding) -> None:
        self.embedding = embedding
        self.name = f"{embedding.name} (reverse=True)"


class _BareTiedUse:
    """Stands for the uses of an Embedding's table as an output projection
    outside any layer, ``z = h E^T`` (``ops.matmul(h, ops.transpose(emb.embeddings))``,
    ``emb.embeddings.T``, ``tf.matmul(h, E, transpose_b=True)``): recorded like
    :class:`TiedProjection` calls, so the table's per-example gradient is the
    sum of the lookups' and the projections' terms."""

    def __init__(self, embedding: kl.Embedding) -> None:
        self.embedding = embedding
        self.name = f"{embedding.name} (table used as an output projection)"


_PASS_THROUGH = ("Identity", "Cast")
_MATMULS = {"MatMul": ("transpose_a", "transpose_b"), "BatchMatMulV2": ("adj_x", "adj_y"),
            "BatchMatMul": ("adj_x", "adj_y"), "BatchMatMulV3": ("adj_x", "adj_y")}


def _ancestors(calls: list[tuple], table: tf.Tensor) -> set[str]:
    """Names of the ops of the recorded calls ``(layer, a, z)`` that read the
    table: from each output ``z`` back along floating inputs, stopping at the
    table and at the call's input ``a``."""
    seen: set[str] = set()
    for _, a, z in calls:
        stop = {table.name, a.name}
        todo = [z.op]
        while todo:
            op = todo.pop()
            if op.name in seen:
                continue
            seen.add(op.name)
            todo.extend(t.op for t in op.inputs if t.name not in stop and t.dtype.is_floating)
    return seen


def _bare_tied_uses(table: tf.Tensor, lookups: list[tuple]) -> list[tuple[tf.Tensor, tf.Tensor, bool]]:
    """The uses ``z = h E^T`` of an Embedding's table ``E`` (V, d) outside the
    recorded calls ``lookups`` of the layer and its :class:`TiedProjection` s,
    found in the graph among the ops that consume ``table`` (the value every
    read of the table returned during the forward pass):
    ``[(h, z, folded)]``; ``folded``: ``h`` (m, ..., d) entered the product
    reshaped to (m * T, d) (``ops.matmul`` on a 3-D input is a tensordot).
    Any other use is left unseen: the probe's accounting check then refuses
    the fast path for this table, never a wrong S."""
    ours = _ancestors(lookups, table)
    uses: list[tuple[tf.Tensor, tf.Tensor, bool]] = []

    def follow(t: tf.Tensor, transposed: bool) -> None:
        for op in t.consumers():
            if op.name in ours:
                continue
            if op.type in _PASS_THROUGH:
                follow(op.outputs[0], transposed)
            elif op.type == "Transpose" and op.inputs[0].name == t.name:
                perm = tf.get_static_value(op.inputs[1])
                if perm is not None and list(perm) in ([1, 0], [0, 1]):
                    follow(op.outputs[0], transposed ^ (list(perm) == [1, 0]))
            elif op.type == "Reshape" and op.inputs[0].name == t.name and op.outputs[0].shape == t.shape:
                follow(op.outputs[0], transposed)
            elif op.type in _MATMULS and op.inputs[1].name == t.name and op.inputs[0].name != t.name:
                adj_a, adj_b = (op.get_attr(n) for n in _MATMULS[op.type])
                if adj_a or not (transposed ^ adj_b):
                    continue  # not h E^T: unseen, the accounting check refuses
                h, z = op.inputs[0], op.outputs[0]
                src = h.op.inputs[0] if h.op.type == "Reshape" else None
                if (h.shape.rank == 2 and src is not None and src.shape.rank is not None and src.shape.rank >= 3
                        and src.shape[-1] == h.shape[-1] and src.shape.num_elements() == h.shape.num_elements()):
                    uses.append((src, z, True))
                else:
                    uses.append((h, z, False))

    follow(table, False)
    return uses


def _leading(x: Nest) -> int | None:
    """The batch's static number of examples (None if unknown)."""
    d = tf.nest.flatten(x)[0].shape[0]
    return None if d is None else int(d)


_RESHAPES = ("ExpandDims", "Reshape", "StridedSlice", "BroadcastTo")


def _broadcast_lookups(calls: list[tuple], n: int | None) -> list[tuple]:
    """The recorded calls, with each Embedding lookup WITHOUT the example axis
    (positions: ``pos(ops.arange(T))`` of shape (T, d)) whose every use is an
    addition broadcast over the n examples (``x + pos(arange(T))``, also after
    ``[None]``) recorded instead as a lookup of ids broadcast to (n, T) with
    output the sum (n, T, d): the per-example gradient of the table is then
    the lookup's usual one. Any other use leaves the call as it was (the
    probe's provenance check refuses it). Graph mode only (it reads the graph)."""
    if n is None:
        return calls
    out = []
    for layer, a, z in calls:
        sums = _broadcast_sums(z, [n, *z.shape]) if isinstance(layer, kl.Embedding) and z.shape.is_fully_defined() \
            else None
        if not sums:
            out.append((layer, a, z))
            continue
        ids = tf.broadcast_to(a, [n, *a.shape])
        out.extend((layer, ids, s) for s in sums)
    return out


def _broadcast_sums(z: tf.Tensor, shape: list[int]) -> list[tf.Tensor] | None:
    """The outputs of shape ``shape`` of the additions that every use of ``z``
    reaches (through casts and reshapes that only add a leading 1), or None."""
    sums: list[tf.Tensor] = []

    def follow(t: tf.Tensor) -> bool:
        ops_ = t.consumers()
        if not ops_:
            return True
        for op in ops_:
            o = op.outputs[0] if op.outputs else None
            if o is None:
                return False
            if op.type in _PASS_THROUGH and o.shape == t.shape or op.type in _RESHAPES and o.shape == [1, *t.shape]:
                if not follow(o):
                    return False
            elif op.type in ("AddV2", "Add") and o.shape == shape:
                sums.append(o)
            else:
                return False
        return True

    return sums if follow(z) and sums else None


def _fast_refusal(layer: keras.Layer) -> str | None:
    """Why the fast path cannot take this layer (None: it can)."""
    if _is_position_embedding(layer):
        return None
    if type(layer) not in _FAST_TYPES and not _is_reversible(layer):
        return (f"{type(layer).__name__} is not one of Dense, EinsumDense, Conv1D, Conv2D, Embedding, "
                f"ReversibleEmbedding, LayerNormalization (or keras-hub's ReversibleEmbedding, PositionEmbedding)")
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
        return "LoRA or quantised weights"
    if _is_reversible(layer) and layer.mask_zero:
        return "ReversibleEmbedding with mask_zero=True (it sets its mask inside its call)"
    if isinstance(layer, (kl.Conv1D, kl.Conv2D)):
        if layer.data_format != "channels_last":
            return "data_format='channels_first'"
        if layer.padding not in ("valid", "same"):
            return f"padding={layer.padding!r}"
    if isinstance(layer, kl.EinsumDense):
        try:
            _EinsumRoles(layer.equation, None)
        except ValueError as e:
            return f"EinsumDense {e}"
    if isinstance(layer, kl.LayerNormalization):
        if layer.rms_scaling:
            return "rms_scaling=True"
        if not _last_axis_only(layer):
            return f"axis={layer.axis} (only the last axis)"
    return None


def _last_axis_only(layer: kl.LayerNormalization, rank: int | None = None) -> bool:
    """Whether a LayerNormalization normalises over the last axis alone."""
    axis = list(layer.axis) if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    if rank is None:
        shapes = list((getattr(layer, "_build_shapes_dict", None) or {}).values())
        rank = len(shapes[0]) if shapes and shapes[0] is not None else None
    return axis == [-1] or (rank is not None and axis == [rank - 1])


def _check_model(model: keras.Layer) -> list[str]:
    """Refuse what no exact path can do; return the fast path's refusals."""
    if not model.built or not model.trainable_variables:
        raise ValueError(
            f"model {model.name!r} has no trainable variables yet: build it (call it once on a batch) "
            f"before computing CABS statistics"
        )
    refusals = []
    covered: set[int] = set()
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer, kl.BatchNormalization) and layer.trainable:
            raise BatchNormTrainingError(
                f"layer {layer.name!r} is a BatchNormalization in training mode: it normalises with "
                f"statistics of the whole batch, so an example's loss depends on the other examples and "
                f"per-example gradients (the variance tr(Sigma) CABS needs) are not defined. Options: "
                f"freeze it (layer.trainable = False runs it in inference mode with its moving "
                f"statistics), or replace it by LayerNormalization or GroupNormalization."
            )
        for attr in ("kernel_regularizer", "bias_regularizer", "activity_regularizer",
                     "embeddings_regularizer", "gamma_regularizer", "beta_regularizer"):
            if getattr(layer, attr, None) is not None:
                raise UnsupportedModelError(
                    f"layer {layer.name!r} has a {attr}: a batch-level penalty is not part of any "
                    f"example's loss l_i. Add the penalty to the per-example loss instead, or use "
                    f"decoupled weight decay (and consider CABSController's loss_floor)."
                )
        own = [v for v in getattr(layer, "_trainable_variables", []) if v.trainable] if layer.trainable else []
        if own:
            reason = _fast_refusal(layer)
            if reason is None:
                covered.update(id(v) for v in own)
            else:
                refusals.append(f"{layer.name!r}: {reason}")
    missing = [v.path for v in model.trainable_variables if id(v) not in covered]
    if missing and not refusals:
        refusals.append(f"variables not owned by a supported layer: {missing}")
    return refusals


class _WhileLoopLog(logging.Handler):
    """Collects TensorFlow's log lines about pfor converting with a while loop."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "while_loop" in msg or "while loop" in msg:
            self.messages.append(msg.strip())


class _Recorder:
    """Replaces ``call`` of the supported layers during one forward pass
    (the trace), recording (inputs, pre-activation output) per call."""

    def __init__(self, layers: Sequence[keras.Layer], reverse_uses: dict[int, _ReverseUse] | None = None):
        self.layers = list(layers)
        self.reverse_uses = {} if reverse_uses is None else reverse_uses  # per layer, kept across traces
        self.calls: list[tuple[keras.Layer, tf.Tensor, tf.Tensor]] = []  # (layer, a, z) in call order

    def __enter__(self) -> _Recorder:
        for layer in self.layers:
            object.__setattr__(layer, "call", self._make_call(layer))
        return self

    def __exit__(self, *exc: object) -> None:
        for layer in self.layers:
            object.__delattr__(layer, "call")

    def _make_call(self, layer: keras.Layer) -> Callable[..., tf.Tensor]:
        def rec_append(az: tuple[tf.Tensor, tf.Tensor]) -> None:
            self.calls.append((layer, *az))

        def call(inputs: tf.Tensor, *args: Any, **kwargs: Any) -> tf.Tensor:
            if isinstance(layer, TiedProjection):
                z = ops.matmul(inputs, ops.transpose(layer.embedding.embeddings))
                rec_append((inputs, z))
                return z
            if _is_reversible(layer) and (kwargs.get("reverse") if "reverse" in kwargs else bool(args and args[0])):
                table = ops.transpose(layer.embeddings) if layer.tie_weights else layer.reverse_embeddings
                h = inputs
                if layer.reverse_dtype is not None:
                    h, table = ops.cast(h, layer.reverse_dtype), ops.cast(table, layer.reverse_dtype)
                z = ops.matmul(h, table)
                use = self.reverse_uses.setdefault(id(layer), _ReverseUse(layer))
                self.calls.append((use, h, z))
                cap = layer.logit_soft_cap
                return z if cap is None else ops.multiply(ops.tanh(ops.divide(z, cap)), cap)
            if _is_position_embedding(layer):
                if kwargs.get("positions") is not None:
                    raise UnsupportedModelError(
                        f"{layer.name!r}: PositionEmbedding called with positions", layer=layer.name,
                        reason="PositionEmbedding called with explicit positions")
                start = kwargs.get("start_index", args[0] if args else 0)
                n_t, d = inputs.shape[-2], inputs.shape[-1]
                ids = tf.broadcast_to(tf.range(n_t, dtype=tf.int32) + tf.cast(start, tf.int32),
                                      tf.shape(inputs)[:-1])
                rows = tf.slice(ops.cast(layer.position_embeddings, layer.compute_dtype),
                                tf.stack([tf.cast(start, tf.int32), 0]), [n_t, d])
                z = tf.broadcast_to(rows, tf.shape(inputs))
                rec_append((ids, z))
                return z
            if isinstance(layer, kl.Embedding):
                ids = inputs if inputs.dtype in (tf.int32, tf.int64) else ops.cast(inputs, "int32")
                z = ops.cast(ops.take(layer.embeddings, ids, axis=0), layer.compute_dtype)
                rec_append((ids, z))
                return z
            if isinstance(layer, kl.LayerNormalization):
                if not _last_axis_only(layer, inputs.shape.rank):
                    raise UnsupportedModelError(
                        f"{layer.name!r}: axis={layer.axis} (only the last axis)", layer=layer.name,
                        reason=f"LayerNormalization over axis={layer.axis}, not the last axis alone",
                    )
                xhat = ops.layer_normalization(inputs, None, None, -1, layer.epsilon)
                z = xhat
                if layer.gamma is not None:
                    z = z * layer.gamma
                if layer.beta is not None:
                    z = z + layer.beta
                z = ops.cast(z, layer.compute_dtype)
                rec_append((xhat, z))
                return z
            if isinstance(layer, kl.Dense):
                z = ops.matmul(inputs, layer.kernel)
            elif isinstance(layer, kl.EinsumDense):
                _einsum_roles(layer, inputs.shape.rank)  # refuses what the fast path cannot establish
                z = ops.einsum(layer.equation, inputs, layer.kernel)
            else:  # Conv1D / Conv2D, channels_last
                z = layer.convolution_op(inputs, layer.kernel)
            if layer.bias is not None:
                z = ops.add(z, layer.bias)
            rec_append((inputs, z))
            return layer.activation(z) if layer.activation is not None else z

        return call


def _conv_views(layer: keras.Layer, a: tf.Tensor) -> list[tf.Tensor]:
    """The unfolded input of a conv layer, one kernel offset at a time.

    For offset k (row-major over the kernel window) ``A_k`` (m, T, C_in) holds
    the input each of the T output positions sees there, so the im2col patch
    of position t is ``concat_k A_k[:, t]`` (kernel layout (kh, kw, C_in)).
    Padding, strides and dilation follow TensorFlow's convolution."""
    if isinstance(layer, kl.Conv1D):
        a = a[:, None]
        k, s, d = (1, *layer.kernel_size), (1, *layer.strides), (1, *layer.dilation_rate)
    else:
        k, s, d = layer.kernel_size, layer.strides, layer.dilation_rate
    pads, outs = [], []
    for n, kk, ss, dd in zip(a.shape[1:3], k, s, d):
        span = (kk - 1) * dd + 1
        if layer.padding == "same":
            out = -(-n // ss)
            total = max((out - 1) * ss + span - n, 0)
            pads.append([total // 2, total - total // 2])
        else:
            out = (n - span) // ss + 1
            pads.append([0, 0])
        outs.append(out)
    ap = tf.pad(a, [[0, 0], *pads, [0, 0]])
    c = a.shape[3]
    return [
        tf.reshape(
            ap[:, i * d[0] : i * d[0] + (outs[0] - 1) * s[0] + 1 : s[0],
               j * d[1] : j * d[1] + (outs[1] - 1) * s[1] + 1 : s[1], :],
            [-1, outs[0] * outs[1], c],
        )
        for i in range(k[0])
        for j in range(k[1])
    ]


def _conv_sq_norms(views: list[tf.Tensor], b: tf.Tensor) -> tf.Tensor:
    """:func:`linear_sq_norms` on the patches ``concat_k A_k``, without building
    them when the per-example gradient is materialised and C_in is large:
    ||g_i||^2 = sum_k ||b_i^T A_k,i||^2 (g_i's rows for offset k)."""
    t, c, q = b.shape[1], views[0].shape[2], b.shape[2]
    if c < 16 or gram_is_cheaper(t, len(views) * c, q):
        return linear_sq_norms(tf.concat(views, axis=2), b)
    out = []
    for v in views:
        g = tf.matmul(b, v, transpose_a=True)  # (m, q, C_in): offset k of the per-example gradient
        out.append(tf.reduce_sum(g * g, axis=[1, 2]))
    return tf.add_n(out)


#: examples whose per-example conv kernel gradients are computed at once (independent loop iterations)
_CONV_PARALLEL = 32


def _conv_loop_ok(layer: keras.Layer) -> bool:
    """Whether a conv layer's per-example kernel gradients can come from one
    ``Conv2DBackpropFilter`` per example: dilation 1 (the CPU kernel refuses
    dilation rates above 1)."""
    return all(int(d) == 1 for d in layer.dilation_rate)


def _conv_loop(layer: keras.Layer, calls: list[tuple], want_sum: bool) -> tuple[tf.Tensor, tf.Tensor | None]:
    """``(||g_i||^2 of the kernel, shape (m,), sum_i g_i or None)`` of a conv
    layer (dilation 1) over all its calls, the per-example kernel gradient
    ``g_i`` computed by TensorFlow's own filter gradient, ``Conv2DBackpropFilter``,
    on example i alone (a Conv1D as a conv of height 1; a grouped conv as one
    conv per group, its kernel's output channels in group order). ``g_i`` is
    summed over the calls before the norm (shared weights), and never held for
    more than ``_CONV_PARALLEL`` examples at once. This is the per-example
    gradient of :func:`linear_sq_norms` on the conv patches without building
    them: one filter gradient per example costs about what the batch's filter
    gradient costs."""
    one_d = isinstance(layer, kl.Conv1D)
    pairs = [(a[:, None], b[:, None]) if one_d else (a, b) for a, _, b, _ in calls]
    kh, kw = (1, *layer.kernel_size) if one_d else layer.kernel_size
    strides = [1, 1, *layer.strides, 1] if one_d else [1, *layer.strides, 1]
    padding = layer.padding.upper()
    g = _groups(layer)
    cg, qg = int(layer.kernel.shape[-2]), int(layer.kernel.shape[-1]) // g
    dtype = pairs[0][1].dtype

    def example(i: tf.Tensor) -> tf.Tensor:
        """g_i as (kh, kw, C / groups, Q)."""
        per_call = []
        for a, b in pairs:
            ai, bi = a[i][None], b[i][None]
            per_call.append(tf.concat([
                tf.raw_ops.Conv2DBackpropFilter(
                    input=ai[..., j * cg:(j + 1) * cg], filter_sizes=[kh, kw, cg, qg],
                    out_backprop=bi[..., j * qg:(j + 1) * qg], strides=strides, padding=padding)
                for j in range(g)], axis=3) if g > 1 else tf.raw_ops.Conv2DBackpropFilter(
                    input=ai, filter_sizes=[kh, kw, cg, qg], out_backprop=bi, strides=strides, padding=padding))
        return tf.add_n(per_call) if len(per_call) > 1 else per_call[0]

    m = tf.shape(pairs[0][0])[0]
    sq = tf.TensorArray(dtype, size=m)
    acc = tf.zeros([kh, kw, cg, g * qg], dtype)

    def body(i: tf.Tensor, sq: tf.TensorArray, acc: tf.Tensor) -> tuple:
        gi = example(i)
        return i + 1, sq.write(i, tf.reduce_sum(gi * gi)), acc + gi if want_sum else acc

    _, sq, acc = tf.while_loop(lambda i, *_: i < m, body, (tf.constant(0), sq, acc),
                               parallel_iterations=_CONV_PARALLEL)
    return sq.stack(), (tf.reshape(acc, layer.kernel.shape) if want_sum else None)


def _flat(t: tf.Tensor) -> tf.Tensor:
    """(m, ..., q) -> (m, T, q) with T the product of the middle axes."""
    return tf.reshape(t, [-1, math.prod(t.shape[1:-1]), t.shape[-1]])


def _groups(layer: keras.Layer) -> int:
    return int(getattr(layer, "groups", 1) or 1)


def _group_slices(layer: keras.Layer, views: list[tf.Tensor], b: tf.Tensor) -> list[tuple[list[tf.Tensor], tf.Tensor]]:
    """A grouped convolution is ``groups`` independent convolutions: group g
    sees input channels g*C/G.. and writes output channels g*Q/G.."""
    g = _groups(layer)
    if g == 1:
        return [(views, b)]
    c, q = views[0].shape[2] // g, b.shape[2] // g
    return [([v[:, :, i * c : (i + 1) * c] for v in views], b[:, :, i * q : (i + 1) * q]) for i in range(g)]


def _wide_dtype(dtype: Any) -> tf.DType:
    """float32 for float16/bfloat16, ``dtype`` otherwise."""
    dtype = tf.as_dtype(dtype)
    return tf.float32 if dtype in (tf.float16, tf.bfloat16) else dtype


def _wide(t: tf.Tensor) -> tf.Tensor:
    """A float16/bfloat16 tensor as float32 (others unchanged): squares and sums of
    low-precision activations and gradients are formed in >= float32."""
    return tf.cast(t, tf.float32) if t.dtype in (tf.float16, tf.bfloat16) else t


def _wide_calls(calls: list[tuple]) -> list[tuple]:
    """``(a, z, b, is_projection)`` calls with a and b upcast by :func:`_wide`."""
    return [(_wide(a), z, _wide(b), proj) for a, z, b, proj in calls]


def _stat_dtype(variables: Sequence[Any]) -> tf.DType:
    """The dtype of count, loss sum and S on the device: float64 if a variable is
    float64, else float32 (never a mixed-precision policy's float16)."""
    return tf.float64 if any(tf.as_dtype(v.dtype) == tf.float64 for v in variables) else tf.float32


def _layer_sq_norms(layer: keras.Layer, calls: list[tuple], trainable: set[int]) -> tf.Tensor:
    """Per-example ||g_i||^2 over this layer's trainable variables, shape (m,).

    ``calls``: ``(a, z, b, is_projection)`` per call (``is_projection``: a
    :class:`TiedProjection` use of an Embedding's table). A layer called
    several times (shared weights) has g_i = sum over all calls and
    positions, so the calls are concatenated along T. Float16/bfloat16 inputs
    and output gradients (mixed precision) are upcast to float32 first."""
    calls = _wide_calls(calls)
    table = _lookup_table(layer)
    if table is not None:
        lookups = [c for c in calls if not c[3]]
        proj = [c for c in calls if c[3] is True]  # z = h E^T
        untied = [c for c in calls if c[3] == "untied"]  # z = h R, R an untied ReversibleEmbedding's own table
        out = tf.zeros_like(_flat(calls[0][2])[:, 0, 0])
        if id(table) in trainable and (lookups or proj):
            tokens = b = h = b2 = None
            if lookups:
                tokens = tf.concat([tf.reshape(a, [-1, math.prod(a.shape[1:])]) for a, *_ in lookups], axis=1)
                b = tf.concat([_flat(g) for _, _, g, _ in lookups], axis=1)
            if proj:
                h = tf.concat([_flat(a) for a, *_ in proj], axis=1)
                b2 = tf.concat([_flat(g) for _, _, g, _ in proj], axis=1)
            out = (tied_embedding_sq_norms(tokens, b, h, b2) if lookups and proj
                   else embedding_sq_norms(tokens, b) if lookups else linear_sq_norms(h, b2))
        if untied and id(_reverse_table(layer)) in trainable:
            out = out + linear_sq_norms(tf.concat([_flat(a) for a, *_ in untied], axis=1),
                                        tf.concat([_flat(g) for _, _, g, _ in untied], axis=1))
        return out
    if isinstance(layer, kl.EinsumDense):
        return _einsum_sq_norms(layer, calls, trainable)
    b = tf.concat([_flat(g) for _, _, g, _ in calls], axis=1)
    if isinstance(layer, kl.LayerNormalization):
        xhat = tf.concat([_flat(a) for a, *_ in calls], axis=1)
        parts = {id(layer.gamma) if layer.gamma is not None else 0: lambda: scale_shift_sq_norms(xhat, b),
                 id(layer.beta) if layer.beta is not None else 1: lambda: bias_sq_norms(b)}
        out = [fn() for k, fn in parts.items() if k in trainable]
        return tf.add_n(out) if out else tf.zeros_like(b[:, 0, 0])
    if id(layer.kernel) not in trainable:
        out = tf.zeros_like(b[:, 0, 0])
    elif isinstance(layer, kl.Dense):
        out = linear_sq_norms(tf.concat([_flat(a) for a, *_ in calls], axis=1), b)
    elif _conv_by_example(layer, calls):
        out = _conv_loop(layer, calls, want_sum=False)[0]
    else:
        per_call = [_conv_views(layer, a) for a, *_ in calls]
        views = [tf.concat(vs, axis=1) for vs in zip(*per_call)]
        out = tf.add_n([_conv_sq_norms(v, bg) for v, bg in _group_slices(layer, views, b)])
    if layer.bias is not None and id(layer.bias) in trainable:
        out = out + bias_sq_norms(b)
    return out


def _conv_by_example(layer: keras.Layer, calls: list[tuple]) -> bool:
    """Whether a conv layer's kernel term is computed from its per-example
    gradients (:func:`_conv_loop`, T p q multiply-adds per example and group)
    rather than the Gram form on the patches (T^2 (p + q)): dilation 1 and the
    Gram form not cheaper (T: positions over all calls, p = kh kw C / groups,
    q = Q / groups)."""
    if not isinstance(layer, (kl.Conv1D, kl.Conv2D)) or not _conv_loop_ok(layer):
        return False
    t = sum(math.prod(b.shape[1:-1]) for _, _, b, _ in calls)
    g = _groups(layer)
    p, q = math.prod(layer.kernel.shape[:-1]), int(layer.kernel.shape[-1]) // g
    return not gram_is_cheaper(t, p, q)


def _einsum_bias_letters(layer: keras.Layer, roles: _EinsumRoles) -> str:
    """The output letters an EinsumDense bias spans (its shape has 1 at the
    other letters from the first bias letter on)."""
    return "".join(c for c in roles.z if c in layer.bias_axes)


def _einsum_bias_grads(layer: keras.Layer, roles: _EinsumRoles, b: tf.Tensor, per_example: bool) -> tf.Tensor:
    """The bias gradient of one EinsumDense call: per example (m, n_bias) or summed (n_bias,)."""
    letters = _einsum_bias_letters(layer, roles)
    keep = (roles.e if per_example else "") + letters
    g = tf.einsum(f"{roles.z}->{keep}", b)
    return tf.reshape(g, [-1, math.prod(int(n) for n in layer.bias.shape)]) if per_example else tf.reshape(g, [-1])


def _einsum_sq_norms(layer: keras.Layer, calls: list[tuple], trainable: set[int]) -> tf.Tensor:
    """||g_i||^2 of an EinsumDense layer's kernel and bias over all its calls:
    per block value of the kernel's letters shared by input and output, the
    positions of every call concatenated, :func:`linear_sq_norms` (Gram form or
    the materialised per-example gradient, whichever is cheaper)."""
    out = None
    if id(layer.kernel) in trainable:
        blocks = [_einsum_roles(layer, a.shape.rank).blocks(a, g) for a, _, g, _ in calls]
        a4 = tf.concat([x for x, _ in blocks], axis=2)
        b4 = tf.concat([y for _, y in blocks], axis=2)
        _, nh, nt, npp = a4.shape
        sq = linear_sq_norms(tf.reshape(a4, [-1, nt, npp]), tf.reshape(b4, [-1, nt, b4.shape[3]]))
        out = tf.reduce_sum(tf.reshape(sq, [-1, nh]), axis=1)
    if layer.bias is not None and id(layer.bias) in trainable:
        g = tf.add_n([_einsum_bias_grads(layer, _einsum_roles(layer, a.shape.rank), b, True) for a, _, b, _ in calls])
        sb = tf.reduce_sum(g * g, axis=1)
        out = sb if out is None else out + sb
    if out is None:
        b = calls[0][2]
        out = tf.zeros_like(tf.reshape(b, [tf.shape(b)[0], -1])[:, 0])
    return out


def _rebuilt_grads(layer: keras.Layer, calls: list[tuple]) -> dict[int, tf.Tensor]:
    """The gradient of each of the layer's variables rebuilt from the captured
    per-layer terms, summed over examples and positions: ``{id(variable): grad}``.
    It equals the variable's full gradient only if the captured calls are
    every use of the variable (the accounting check). Computed in >= float32."""
    calls = _wide_calls(calls)
    out: dict[int, tf.Tensor] = {}
    table = _lookup_table(layer)
    if table is not None:
        grad = tf.zeros(table.shape, calls[0][2].dtype)
        for a, _, g, is_projection in calls:
            if is_projection == "untied":  # z = h R: dR = h^T b
                reverse = _reverse_table(layer)
                r = tf.matmul(tf.reshape(a, [-1, a.shape[-1]]), tf.reshape(g, [-1, g.shape[-1]]), transpose_a=True)
                out[id(reverse)] = out[id(reverse)] + r if id(reverse) in out else r
            elif is_projection:  # z = h E^T: dE = b^T h
                grad += tf.matmul(tf.reshape(g, [-1, g.shape[-1]]), tf.reshape(a, [-1, a.shape[-1]]),
                                  transpose_a=True)
            else:
                grad += tf.math.unsorted_segment_sum(tf.reshape(g, [-1, g.shape[-1]]),
                                                     tf.cast(tf.reshape(a, [-1]), tf.int32), int(table.shape[0]))
        out[id(table)] = grad
        return out
    if isinstance(layer, kl.EinsumDense):
        for a, _, g, _ in calls:
            roles = _einsum_roles(layer, a.shape.rank)
            terms = {id(layer.kernel): tf.einsum(f"{roles.a},{roles.z}->{roles.k}", a, g)}
            if layer.bias is not None:
                terms[id(layer.bias)] = tf.reshape(_einsum_bias_grads(layer, roles, g, per_example=False),
                                                   layer.bias.shape)
            for vid, t in terms.items():
                out[vid] = out[vid] + t if vid in out else t
        return out
    b = tf.concat([_flat(g) for _, _, g, _ in calls], axis=1)
    q = b.shape[2]
    b2 = tf.reshape(b, [-1, q])
    if isinstance(layer, kl.LayerNormalization):
        xhat = tf.reshape(tf.concat([_flat(a) for a, *_ in calls], axis=1), [-1, q])
        if layer.gamma is not None:
            out[id(layer.gamma)] = tf.reshape(tf.reduce_sum(xhat * b2, axis=0), layer.gamma.shape)
        if layer.beta is not None:
            out[id(layer.beta)] = tf.reshape(tf.reduce_sum(b2, axis=0), layer.beta.shape)
        return out
    if isinstance(layer, kl.Dense):
        a = tf.concat([_flat(a) for a, *_ in calls], axis=1)
        out[id(layer.kernel)] = tf.matmul(tf.reshape(a, [-1, a.shape[2]]), b2, transpose_a=True)
    else:
        per_call = [_conv_views(layer, a) for a, *_ in calls]
        views = [tf.concat(vs, axis=1) for vs in zip(*per_call)]
        groups = _group_slices(layer, views, b)
        offsets = [
            tf.concat([tf.einsum("mtc,mtq->cq", vs[o], bg) for vs, bg in groups], axis=1)
            for o in range(len(views))
        ]
        out[id(layer.kernel)] = tf.reshape(tf.stack(offsets), layer.kernel.shape)
    if layer.bias is not None:
        out[id(layer.bias)] = tf.reduce_sum(b2, axis=0)
    return out


def _example_axis_reason(layer: keras.Layer, a: tf.Tensor, z: tf.Tensor, n: int | None) -> str | None:
    """Why a captured call does not carry the examples on its leading axis of
    length ``n`` (None: it has that axis)."""
    min_rank = 1 if _lookup_table(layer) is not None else 2
    if a.shape.rank is None or a.shape.rank < min_rank or z.shape.rank is None or z.shape.rank < 2:
        return (f"it was called on a tensor of shape {tuple(a.shape)} (output {tuple(z.shape)}) without "
                f"a leading example axis")
    if a.shape[0] != n or z.shape[0] != n:
        return (f"it was called on a tensor of shape {tuple(a.shape)} whose leading axis is not the batch's "
                f"example axis (expected length {n}): examples folded into or moved off the leading axis "
                f"(reshape, time-major layout, expand_dims, a slice of the batch, a tensor without the "
                f"example axis)")
    return None


def _sq_sum64(t: tf.Tensor) -> tf.Tensor:
    """sum(t**2) as float64 for the probe's weight-sized sums, without a float64
    copy of the weight: squared and summed in rows of 256 (else of the last axis,
    if at most 512) in float32, the row sums in float64. A row of n terms carries a
    relative rounding error below n * u (u = 2**-24, the unit roundoff: 1.5e-5 for 256
    float32 terms, 3e-5 for 512, against the check's 2e-4); other dtypes and shapes
    are cast to float64 first."""
    t = tf.convert_to_tensor(t)
    n = t.shape.num_elements()
    if t.dtype == tf.float32 and n is not None and n % 256 == 0:
        rows = tf.reshape(t, [-1, 256])
    elif t.dtype == tf.float32 and t.shape.rank is not None and t.shape.rank >= 2 and 0 < t.shape[-1] <= 512:
        rows = t
    else:
        return tf.reduce_sum(tf.cast(t, tf.float64) ** 2)
    return tf.reduce_sum(tf.cast(tf.reduce_sum(rows * rows, axis=-1), tf.float64))


#: a probe whose losses or gradients are not finite: it neither establishes nor refutes the fast path
_INCONCLUSIVE = UnsupportedModelError("the probe's losses or gradients are not finite", reason="non-finite probe")


class _StructureMismatch(UnsupportedModelError):
    """The full batch's layer calls differ from the probed ones."""


def _synthetic(t: Any, k: int, i: int) -> tf.Tensor:
    """A probe tensor shaped like ``t`` with k examples: normal floats, ids in {0, 1}."""
    shape = [k, *t.shape[1:]]
    if any(d is None for d in shape):
        raise UnsupportedModelError(
            f"an input of shape {tuple(t.shape)} has a dimension unknown at trace time, so the fast path "
            f"cannot be probed", reason="input dimension unknown at trace time")
    dtype = tf.as_dtype(t.dtype)
    seed = tf.constant([1234, i], tf.int32)
    if dtype.is_floating:
        return tf.cast(tf.random.stateless_normal(shape, seed, dtype=tf.float64), dtype)
    if dtype.is_integer:
        return tf.cast(tf.random.stateless_uniform(shape, seed, 0, 2, dtype=tf.int32), dtype)
    if dtype == tf.bool:
        return tf.random.stateless_uniform(shape, seed, 0, 2, dtype=tf.int32) > 0
    raise UnsupportedModelError(f"cannot synthesise a probe input of dtype {dtype.name}",
                                reason=f"input dtype {dtype.name}")


def _as_mask(w: tf.Tensor | None, m: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    if w is None:
        return tf.ones([m], dtype)
    w = tf.convert_to_tensor(w)
    if w.shape.rank != 1:
        raise ValueError(f"mask must have shape (m,), got {w.shape}")
    return tf.cast(w, dtype)


def _zero_masked_rows(nest: Nest, keep: tf.Tensor) -> Nest:
    """Floating tensors of ``nest`` with their masked rows (``keep`` False) set to 0 by a select,
    so that a NaN or inf in a padding example reaches no sum."""
    def select(t: Any) -> Any:
        t = tf.convert_to_tensor(t)
        if not t.dtype.is_floating or t.shape.rank in (None, 0):
            return t
        return tf.where(tf.reshape(keep, [-1] + [1] * (t.shape.rank - 1)), t, tf.zeros_like(t))
    return tf.nest.map_structure(select, nest)


def _first_dim(x: Nest) -> tf.Tensor:
    return tf.shape(tf.nest.flatten(x)[0])[0]


class _LossShapeError(ValueError):
    """The loss does not return per-example losses (a user error, never a fallback)."""


def _check_losses(losses: tf.Tensor) -> tf.Tensor:
    if losses.shape.rank != 1:
        err = _LossShapeError(
            f"the loss must return per-example losses of shape (m,), got shape {losses.shape}; "
            f"for a Keras loss pass reduction=None (e.g. keras.losses.SparseCategoricalCrossentropy("
            f"from_logits=True, reduction=None))"
        )
        err.ag_pass_through = True  # type: ignore[attr-defined]  # raised as is through tf.function's autograph
        raise err
    return losses


class PerExampleStats:
    """CABS statistics of one batch (docs/spec.md section 4), as graph code.

    ``target``: a built Keras 3 model (``loss_fn(y_true, y_pred) -> (m,)``) or a
    list of ``tf.Variable`` s (``loss_fn(x, y) -> (m,)`` computed from them).
    ``method``: ``"fast"`` (supported layers whose decomposition the probe
    establishes, else :class:`cabs_core.UnsupportedModelError`), ``"generic"``,
    or ``"auto"`` (fast where established, else generic with one
    :class:`cabs_core.FastPathFallbackWarning` per input signature).
    ``chunk_size`` bounds the examples whose per-example gradients the
    generic path holds at once. ``verify_every``: eager calls re-probe every
    that many calls of a signature (None/0: only the first); a trainer calls
    :meth:`verify` itself.

    Call it (inside ``tf.function``) as ``grad_sum, vector = step(x, y, mask)``.
    A signature first seen while tracing is probed at trace time on synthetic
    inputs of its shapes; call :meth:`verify` eagerly on a real batch first to
    probe on real data.
    """

    def __init__(
        self,
        target: keras.Layer | Sequence[tf.Variable],
        loss_fn: Callable[..., tf.Tensor],
        *,
        method: Method = "auto",
        chunk_size: int | None = None,
        verify_every: int | None = VERIFY_EVERY,
    ) -> None:
        if method not in ("auto", "fast", "generic"):
            raise ValueError(f"method must be 'auto', 'fast' or 'generic', got {method!r}")
        chunk_size = 32 if chunk_size is None else chunk_size  # None: the adapter's default
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        verify_due(1, verify_every)  # validates
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size
        self.verify_every = verify_every
        self.requested = method
        self.fallback_detected = False
        if isinstance(target, keras.Layer):
            self.model: keras.Layer | None = target
            refusals = _check_model(target)
            self.variables = list(target.trainable_variables)
            if method == "fast" and refusals:
                raise UnsupportedModelError(
                    "method='fast' cannot handle " + "; ".join(refusals) + ". Use method='generic' "
                    "(vectorised per-example gradients) or 'auto'.",
                    layer=refusals[0].split(":")[0].strip("'"), reason=refusals[0],
                )
            self.method = "generic" if method == "generic" or refusals else "fast"
            self.refusals = refusals
        else:
            self.model = None
            self.variables = list(target)
            if not self.variables or not all(isinstance(v, (tf.Variable, keras.Variable)) for v in self.variables):
                raise ValueError("target must be a built Keras model or a non-empty list of tf.Variable")
            if method == "fast":
                raise UnsupportedModelError(
                    "method='fast' needs a Keras model (it captures its layers); a list of variables "
                    "uses method='generic'", reason="not a Keras model"
                )
            self.method = "generic"
            self.refusals = []
        self._trainable = {id(v) for v in self.variables}
        # pfor's converter of Conv2DBackpropFilter fails at run time (inside its while loop) on grouped convs
        self._pfor_unsafe = [
            layer.name for layer in (self.model._flatten_layers(include_self=True, recursive=True)
                                     if self.model is not None else [])
            if isinstance(layer, (kl.Conv1D, kl.Conv2D, kl.Conv3D)) and _groups(layer) > 1 and layer.trainable
        ]
        #: per input signature: None (fast path established) or why it fell back to generic
        self.verdicts: dict[tuple, str | None] = {}
        self._structures: dict[tuple, tuple] = {}
        #: per signature: ids of the conv kernels whose batch gradient the fast step sums from the
        #: per-example gradients it computes anyway (:func:`_conv_loop`), instead of a second filter gradient
        self._by_example: dict[tuple, frozenset[int]] = {}
        self._probe_fns: dict[tuple, Any] = {}
        self._probe_layers: dict[tuple, list[str]] = {}
        self._eager_calls: dict[tuple, int] = {}
        self._bare_sentinels: dict[int, _BareTiedUse] = {}  # per Embedding: its table's uses outside the layer
        self._reverse_uses: dict[int, _ReverseUse] = {}  # per ReversibleEmbedding: its reverse=True calls
        self._fast_graph: Any = None  # the fast path as a tf.function, for eager calls that need a graph
        self._discovered = False  # set while tracing when a capture read the graph (bare ties, broadcast lookups)
        self._graph_only: set[tuple] = set()  # signatures whose fast path reads the graph
        self._signature_ids = (id(self.model), tuple(id(v) for v in self.variables))
        #: number of probes run (each costs about a fast step on k examples plus k single-example steps)
        self.probe_count = 0

    # -- the per-example loss ------------------------------------------------
    def per_example_loss(self, x: Nest, y: Nest) -> tf.Tensor:
        """l_i for every example of the batch, shape (m,)."""
        if self.model is not None:
            return _check_losses(self.loss_fn(y, self.model(x, training=True)))
        return _check_losses(self.loss_fn(x, y))

    @tf.autograph.experimental.do_not_convert  # plain Python control flow on static shapes
    def __call__(
        self, x: Nest, y: Nest, mask: tf.Tensor | None = None
    ) -> tuple[list[tf.Tensor], tf.Tensor]:
        """``(grad_sum, vector)``: sum_i w_i g_i per variable, and float64
        ``[count, loss_sum, sq_norm_sum, grad_sum_sq_norm]``."""
        dtype = _stat_dtype(self.variables)
        if tf.nest.flatten(x)[0].shape[0] == 0:  # spec section 5: count 0 (the controller skips the step)
            return [tf.zeros_like(v) for v in self.variables], tf.zeros((4,), tf.float64)
        w = _as_mask(mask, _first_dim(x), dtype)
        if mask is not None:  # padding rows cannot poison the sums: select, never multiply (0 * inf = nan)
            x, y = _zero_masked_rows((x, y), tf.not_equal(w, 0))
        fast = self.method == "fast"
        if fast:
            sig = self.signature(x, y)
            if tf.executing_eagerly():
                n = self._eager_calls.get(sig, 0)
                self._eager_calls[sig] = n + 1
                if sig not in self.verdicts or verify_due(n, self.verify_every):
                    self.verify(x, y, mask)
            elif sig not in self.verdicts:
                with tf.init_scope():
                    self._verify_synthetic(sig, x, y)
            fast = sig in self.verdicts and self.verdicts[sig] is None
        out = None
        if fast:
            structure, by_example = self._structures[sig], self._by_example.get(sig, frozenset())
            run = self._fast
            if tf.executing_eagerly() and sig in self._graph_only:
                # a table's uses outside its layer are found among a graph's ops: run this call as a graph
                if self._fast_graph is None:
                    self._fast_graph = tf.function(self._fast, autograph=False)
                run = self._fast_graph
            try:
                out = run(x, y, w, structure, by_example)
            except _StructureMismatch as e:
                self._fail(sig, e)
        if out is None:
            out = self._generic(x, y, w)
        count, loss_sum, grads, s = out
        g2 = tf.add_n([tf.reduce_sum(tf.cast(g, tf.float64) ** 2) for g in grads])
        vector = tf.stack([tf.cast(count, tf.float64), tf.cast(loss_sum, tf.float64),
                           tf.cast(s, tf.float64), g2])
        return grads, vector

    # -- establishing the fast path -------------------------------------------
    def signature(self, x: Nest, y: Nest) -> tuple:
        """What a verdict is cached by: the model, its trainable variables, and
        the shapes and dtypes of the inputs without the example axis."""
        flat = tf.nest.flatten((x, y))
        spec = tuple((tuple(t.shape)[1:], t.dtype.name if isinstance(t.dtype, tf.DType) else tf.as_dtype(t.dtype).name)
                     for t in flat)
        # the trainer looks the signature up before every step: the common (tensor, tensor) batch
        # gets the string below without its cost
        if len(flat) == 2 and not tf.nest.is_nested(x) and not tf.nest.is_nested(y):
            nest = "(0, 0)"
        else:
            nest = str(tf.nest.map_structure(lambda _: 0, (x, y)))
        return (*self._signature_ids, nest, spec)

    def _probe_size(self, x: Nest, y: Nest) -> int:
        """k: differs from every dimension of the inputs (the full batch size
        included) and of the trainable variables."""
        avoid = {int(d) for t in tf.nest.flatten((x, y)) for d in t.shape if d is not None}
        avoid |= {int(d) for v in self.variables for d in v.shape}
        k = probe_batch_size(max(avoid, default=0) + 3, avoid)
        assert k is not None
        return k

    def verify(self, x: Nest, y: Nest, mask: Any = None) -> bool:
        """Probe the fast path on k examples of this batch (eagerly, outside any
        step function) and cache the verdict for its signature. True: the fast
        path is established; False: this signature uses the generic path
        (``auto``: one :class:`FastPathFallbackWarning`). Raises
        :class:`UnsupportedModelError` under ``method="fast"`` when a check fails.
        Rows: the real (mask 1) examples, repeated cyclically up to k. A probe
        whose losses or gradients are not finite decides nothing (False, no
        verdict: the next call probes again)."""
        if self.method != "fast":
            return False
        sig = self.signature(x, y)
        if self.verdicts.get(sig, None) is not None:
            return False  # a fallen-back signature stays generic
        k = self._probe_size(x, y)
        m = int(tf.nest.flatten(x)[0].shape[0])
        real = np.arange(m) if mask is None else np.flatnonzero(np.asarray(mask) != 0)
        if len(real) == 0:
            real = np.arange(m)
        rows = tf.constant(real[np.arange(k) % len(real)], tf.int32)
        xk, yk = tf.nest.map_structure(lambda t: tf.gather(tf.convert_to_tensor(t), rows), (x, y))
        return self._run_probe(sig, xk, yk)

    def _verify_synthetic(self, sig: tuple, x: Nest, y: Nest) -> None:
        """The probe at trace time: the batch's values are not known yet, so
        the k examples are synthetic (normal floats, integer ids in {0, 1}).
        It runs eagerly in a helper thread (TensorFlow's graph-building state
        is per thread; ``tf.init_scope`` would stop the gradient tapes)."""
        k = self._probe_size(x, y)
        flat = tf.nest.flatten((x, y))
        specs = [tf.TensorSpec(t.shape, t.dtype) for t in flat]
        result: list[Exception | None] = []

        def run() -> None:
            try:
                data = tf.nest.pack_sequence_as((x, y), [_synthetic(t, k, i) for i, t in enumerate(specs)])
                result.append(self._probe_outcome(sig, *data))
            except (UnsupportedModelError, _LossShapeError) as e:
                result.append(e)
            except BaseException as e:  # noqa: BLE001 - reported to the calling thread as a failed probe
                result.append(UnsupportedModelError(f"the fast path's probe failed: {type(e).__name__}: {e}",
                                                     reason=f"probe failed: {type(e).__name__}"))

        thread = threading.Thread(target=run, name="cabs_tf-probe")
        thread.start()
        thread.join()
        if result and isinstance(result[0], _LossShapeError):
            raise result[0]
        if result and result[0] is _INCONCLUSIVE:
            result[0] = UnsupportedModelError(
                "the probe's losses or gradients are not finite on synthetic inputs (normal floats, ids in "
                "{0, 1}); call step.verify(x, y) on a real batch before tracing",
                reason="non-finite probe on synthetic inputs")
        self._settle(sig, result[0] if result else UnsupportedModelError("the probe did not run",
                                                                         reason="probe did not run"))

    def _run_probe(self, sig: tuple, xk: Nest, yk: Nest) -> bool:
        return self._settle(sig, self._probe_outcome(sig, xk, yk))

    def _settle(self, sig: tuple, failure: UnsupportedModelError | None) -> bool:
        if failure is _INCONCLUSIVE:
            return False  # no verdict: this call is generic, the next one probes again
        if failure is not None:
            self._fail(sig, failure)
            return False
        self.verdicts[sig] = None
        return True

    def _probe_outcome(self, sig: tuple, xk: Nest, yk: Nest) -> UnsupportedModelError | None:
        """Run the probe (eagerly) and compare: None if every check holds."""
        self.probe_count += 1
        fn = self._probe_fns.get(sig)
        if fn is None:
            fn = self._probe_fns[sig] = tf.function(self._probe, autograph=False)
        try:  # one copy of the six results to the host, then NumPy only
            fast_s, ref_s, diffs, scales, fast_layer, ref_layer = (t.numpy() for t in fn(xk, yk))
            if not all(np.all(np.isfinite(t)) for t in (ref_s, diffs, scales, ref_layer)):
                return _INCONCLUSIVE  # non-finite losses or gradients on these examples prove nothing
            names = [getattr(v, "path", v.name) for v in self.variables]
            fast_s, ref_s = float(fast_s), float(ref_s)
            k = int(tf.nest.flatten(xk)[0].shape[0])
            rtol = self._rtol()
            for name, d, (full, s_v) in zip(names, diffs, scales):
                check_close(f"the gradient of {name} rebuilt from the layer's captured calls (an unseen use "
                            f"of the weight outside its layer?)", d, accounting_scale(full, k, s_v), rtol,
                            layer=str(name))
            for name, f, r in zip(self._probe_layers[sig], fast_layer, ref_layer):
                check_close("the layer's share of S on the probe batch (fast path vs a loop over single "
                            "examples; examples mixed or moved?)", abs(f - r), abs(r), rtol, layer=name)
            check_close("S on the probe batch (fast path vs a loop over single examples)",
                        abs(fast_s - ref_s), abs(ref_s), rtol)
        except UnsupportedModelError as e:
            return e
        except _LossShapeError:
            raise
        except (tf.errors.OpError, ValueError, TypeError, IndexError) as e:
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            return UnsupportedModelError(
                f"the fast path's probe failed: {type(e).__name__}: {msg}", reason=f"probe failed: {msg}")
        return None

    def _rtol(self) -> float:
        """The checks' tolerance: the loosest of the variables' dtypes and, under a
        mixed-precision policy, the layers' compute dtypes (float16 for ``mixed_float16``)."""
        names = {tf.as_dtype(v.dtype).name for v in self.variables}
        if self.model is not None:
            names |= {tf.as_dtype(layer.compute_dtype).name
                      for layer in self.model._flatten_layers(include_self=True, recursive=True)
                      if getattr(layer, "compute_dtype", None) is not None}
        return max(rtol_for(n) for n in names)

    def _fail(self, sig: tuple, e: UnsupportedModelError) -> None:
        """A check failed: raise under ``fast``, else warn once and stay generic."""
        self.verdicts[sig] = e.reason or str(e)
        if self.requested == "fast":
            e.ag_pass_through = True  # type: ignore[attr-defined]  # raised as is through tf.function's autograph
            raise e
        warnings.warn(FastPathFallbackWarning(
            f"cabs_tf: method='auto' falls back to the exact generic path for this model and input "
            f"signature{f' (layer {e.layer!r})' if e.layer else ''}: {e}"), stacklevel=3)

    def _probe(self, xk: Nest, yk: Nest) -> tuple:
        """Traced once per signature: the fast path's S and each parameter's
        accounting difference on the probe batch, and S from a loop over the
        k single examples. Structural failures raise at trace time."""
        k = int(tf.nest.flatten(xk)[0].shape[0])
        w = tf.ones([k], _stat_dtype(self.variables))
        self._discovered = False
        losses, total, var_grads, calls = self._capture(xk, yk, w)
        if self._discovered:
            self._graph_only.add(self.signature(xk, yk))
        for layer, a, z, _ in calls:
            why = _example_axis_reason(layer, a, z, k)
            if why is not None:
                raise UnsupportedModelError(
                    f"the fast path cannot establish exact per-example statistics at layer {layer.name!r}: "
                    f"{why}. method='generic' is exact for any model.", layer=layer.name, reason=why)
        self._structures[self.signature(xk, yk)] = tuple(
            (id(layer), tuple(a.shape[1:]), tuple(z.shape[1:])) for layer, a, z, _ in calls)
        per_layer, layers = self._group(calls)
        self._by_example[self.signature(xk, yk)] = frozenset(
            id(layer.kernel) for layer in layers
            if isinstance(layer, (kl.Conv1D, kl.Conv2D)) and id(layer.kernel) in self._trainable
            and _conv_by_example(layer, per_layer[id(layer)]))
        sq, rebuilt, layer_s = [], {}, {}
        for layer in layers:
            t = tf.reduce_sum(_layer_sq_norms(layer, per_layer[id(layer)], self._trainable))
            sq.append(tf.cast(t, losses.dtype))
            for vid, g in _rebuilt_grads(layer, per_layer[id(layer)]).items():
                rebuilt[vid], layer_s[vid] = g, t
        fast_s = tf.add_n(sq) if sq else tf.zeros([], losses.dtype)
        diffs, scales = [], []
        for v, g in zip(self.variables, var_grads):
            r = rebuilt.get(id(v), tf.zeros_like(g))
            full = tf.sqrt(_sq_sum64(g))
            g_r = tf.reshape(g, r.shape)
            # r - g in their common dtype: its rounding (eps * |r - g|) is far below the check's tolerance
            d = r - g_r if r.dtype == g_r.dtype else tf.cast(r, tf.float64) - tf.cast(g_r, tf.float64)
            diffs.append(tf.sqrt(_sq_sum64(d)))
            s_v = tf.cast(layer_s.get(id(v), tf.zeros([], tf.float64)), tf.float64)
            scales.append(tf.stack([full, s_v]))
        def one(xy1: tuple[Nest, Nest]) -> tf.Tensor:  # ||g_i||^2 per variable of one example
            with tf.GradientTape() as tape:
                li = self.per_example_loss(*tf.nest.map_structure(lambda t: t[None], xy1))[0]
            gi = tape.gradient(li, self.variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return tf.stack([_sq_sum64(t) for t in gi])

        # a loop over the k single examples (traced once), the reference: sum_i ||g_i||^2 per variable
        ref = tf.map_fn(one, (xk, yk), fn_output_signature=tf.TensorSpec([len(self.variables)], tf.float64))
        ref_v = tf.unstack(tf.reduce_sum(ref, axis=0), num=len(self.variables))
        index = {id(v): n for n, v in enumerate(self.variables)}
        ref_layer = [tf.add_n([ref_v[index[id(v)]] for v in layer._trainable_variables if id(v) in index])
                     for layer in layers]
        fast_layer = tf.stack([tf.cast(t, tf.float64) for t in sq]) if sq else tf.zeros([0], tf.float64)
        ref_layer = tf.stack(ref_layer) if ref_layer else tf.zeros([0], tf.float64)
        self._probe_layers[self.signature(xk, yk)] = [layer.name for layer in layers]
        return fast_s, tf.add_n(ref_v), tf.stack(diffs), tf.stack(scales), fast_layer, ref_layer

    # -- fast path: one forward, one backward --------------------------------
    def _capture(self, x: Nest, y: Nest, w: tf.Tensor, skip: frozenset[int] = frozenset()) -> tuple:
        """One forward and backward pass recording every supported layer's calls:
        ``(losses, total, variable gradients, [(layer, a, z, b)])``; the gradients of
        the variables in ``skip`` (ids) are not formed (None). Inside a graph,
        an Embedding table used as an output projection outside its layer
        (``ops.matmul(h, ops.transpose(emb.embeddings))``) is recorded as a tied
        projection call too (:func:`_bare_tied_uses`)."""
        assert self.model is not None
        layers = [
            layer for layer in self.model._flatten_layers(include_self=True, recursive=True)
            if layer.trainable and any(id(v) in self._trainable for v in layer._trainable_variables)
            or isinstance(layer, TiedProjection) and layer.embedding.trainable
            and id(layer.embedding.embeddings) in self._trainable
        ]
        # tables whose uses outside the layer are looked for (graph mode: the uses are the ops consuming them)
        tables = [] if tf.executing_eagerly() else [
            layer for layer in layers if isinstance(layer, kl.Embedding) and id(layer.embeddings) in self._trainable]
        with tf.GradientTape() as tape:
            reads = [tf.identity(layer.embeddings.value) for layer in tables]
            scope = keras.StatelessScope([(layer.embeddings, r) for layer, r in zip(tables, reads)])
            with scope if tables else contextlib.nullcontext(), _Recorder(layers, self._reverse_uses) as rec:
                # a float16 loss (mixed precision) is summed in float32: count, loss sum and S never in float16
                losses = _wide(self.per_example_loss(x, y))
            if tables:  # the scope held back every variable update of the forward pass (e.g. dropout's seeds)
                mapped = {id(layer.embeddings) for layer in tables}
                for v in self.model.variables:
                    new = scope.get_current_value(v) if id(v) not in mapped else None
                    if new is not None:
                        v.assign(new)
            bare = [(self._bare_sentinel(layer), h, z, fold)
                    for layer, r in zip(tables, reads)
                    for h, z, fold in _bare_tied_uses(r, [c for c in rec.calls if c[0] is layer or getattr(
                        c[0], "embedding", None) is layer])]
            recorded = rec.calls if tf.executing_eagerly() else _broadcast_lookups(rec.calls, _leading(x))
            w = tf.cast(w, losses.dtype)
            total = tf.reduce_sum(w * losses)
        self._discovered = self._discovered or bool(bare) or recorded is not rec.calls
        wanted = [v for v in self.variables if id(v) not in skip]
        grads = tape.gradient(
            total, wanted + [z for _, _, z in recorded] + [z for _, _, z, _ in bare],
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        nv, nc = len(wanted), len(recorded)
        found = iter(grads[:nv])
        var_grads = [None if id(v) in skip else next(found) for v in self.variables]
        out_grads, bare_grads = grads[nv:nv + nc], grads[nv + nc:]
        calls = [(layer, a, z, b) for (layer, a, z), b in zip(recorded, out_grads)]
        for (sentinel, h, _, fold), b in zip(bare, bare_grads):
            if fold:  # z = reshape(h, (m * T, d)) E^T: its rows are (example, position) in row-major order
                b = tf.reshape(b, [h.shape[0], -1, b.shape[-1]])
            calls.append((sentinel, h, b, b))
        return losses, total, [None if g is None else tf.convert_to_tensor(g) for g in var_grads], calls

    def _bare_sentinel(self, embedding: kl.Embedding) -> _BareTiedUse:
        """The one stand-in per Embedding for its table's uses as an output projection."""
        if id(embedding) not in self._bare_sentinels:
            self._bare_sentinels[id(embedding)] = _BareTiedUse(embedding)
        return self._bare_sentinels[id(embedding)]

    @staticmethod
    def _group(calls: list) -> tuple[dict[int, list], list[keras.Layer]]:
        """Calls by the layer that owns the weights (a :class:`TiedProjection`'s
        calls go to its Embedding): ``{id(layer): [(a, z, b, is_projection)]}``."""
        per_layer: dict[int, list] = {}
        layers = []
        for layer, a, z, b in calls:
            proj: bool | str = isinstance(layer, (TiedProjection, _BareTiedUse, _ReverseUse))
            if isinstance(layer, _ReverseUse) and not layer.embedding.tie_weights:
                proj = "untied"
            owner = layer.embedding if proj else layer
            if id(owner) not in per_layer:
                layers.append(owner)
            per_layer.setdefault(id(owner), []).append((a, z, b, proj))
        return per_layer, layers

    def _fast(self, x: Nest, y: Nest, w: tf.Tensor, structure: tuple, by_example: frozenset[int]) -> tuple:
        """The fast step on an established signature. The kernels in ``by_example``
        (conv layers whose term :func:`_conv_loop` computes from per-example
        gradients) get their batch gradient as the sum of those, not from a second
        filter gradient of the batch: the probe established that the layer's calls
        are every use of the kernel (the accounting check), so the sum is the
        gradient (up to the order of the additions)."""
        m = tf.nest.flatten(x)[0].shape[0]
        losses, total, var_grads, calls = self._capture(x, y, w, by_example)
        seen = tuple((id(layer), tuple(a.shape[1:]), tuple(z.shape[1:])) for layer, a, z, _ in calls)
        bad = [layer.name for layer, a, z, _ in calls if _example_axis_reason(layer, a, z, m) is not None]
        if seen != structure or bad:
            where = bad[0] if bad else next(
                (layer.name for (layer, *_), s, p in zip(calls, seen, structure) if s != p),
                calls[-1][0].name if calls else None)
            raise _StructureMismatch(
                f"the layer calls on this batch of {m} examples differ from the probed ones (at layer "
                f"{where!r}): their example axis is not established. method='generic' is exact for any model.",
                layer=where, reason="layer calls differ from the probed ones")
        per_layer, layers = self._group(calls)
        sq, summed = [], {}
        for layer in layers:
            if id(getattr(layer, "kernel", None)) in by_example:
                layer_calls = _wide_calls(per_layer[id(layer)])
                t, summed[id(layer.kernel)] = _conv_loop(layer, layer_calls, want_sum=True)
                if layer.bias is not None and id(layer.bias) in self._trainable:
                    t = t + bias_sq_norms(tf.concat([_flat(g) for _, _, g, _ in layer_calls], axis=1))
                sq.append(t)
            else:
                sq.append(_layer_sq_norms(layer, per_layer[id(layer)], self._trainable))
        var_grads = [g if g is not None else tf.cast(summed[id(v)], v.dtype) if id(v) in summed
                     else tf.zeros(v.shape, v.dtype) for g, v in zip(var_grads, self.variables)]
        # b already carries the factor w_i, so sq_i = w_i^2 ||g_i||^2 = w_i ||g_i||^2 (0/1 mask)
        s = tf.reduce_sum(tf.add_n([tf.cast(t, losses.dtype) for t in sq])) if sq else tf.zeros([], losses.dtype)
        return tf.reduce_sum(w), total, var_grads, s

    # -- generic path: vectorised per-example gradients in chunks -------------
    def _per_example(self, xy: tuple[Nest, Nest]) -> tuple[tf.Tensor, list[tf.Tensor]]:
        x1, y1 = tf.nest.map_structure(lambda t: t[None], xy)
        with tf.GradientTape() as tape:
            loss = self.per_example_loss(x1, y1)[0]
        g = tape.gradient(loss, self.variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return loss, [tf.convert_to_tensor(t) for t in g]

    def _vmap(self, xy: tuple[Nest, Nest]) -> tuple[tf.Tensor, list[tf.Tensor]]:
        if self._pfor_unsafe:
            self._warn(f"fails at run time on grouped convolutions ({', '.join(self._pfor_unsafe)})")
            return self._loop(xy)
        catcher = _WhileLoopLog()
        logger = logging.getLogger("tensorflow")
        logger.addHandler(catcher)
        try:
            out = tf.vectorized_map(self._per_example, xy, fallback_to_while_loop=False)
        except ValueError as e:  # pfor has no converter for some op
            self._warn("has no vectoriser for an op: " + str(e).strip().splitlines()[-1][:300])
            try:
                return tf.vectorized_map(self._per_example, xy, fallback_to_while_loop=True)
            except (ValueError, TypeError, tf.errors.OpError):  # pfor fails even with its while loop
                return self._loop(xy)
        except (TypeError, tf.errors.OpError) as e:  # a converter that raises (e.g. grouped convolutions)
            self._warn("fails on an op: " + (str(e).strip().splitlines() or [type(e).__name__])[-1][:300])
            return self._loop(xy)
        finally:
            logger.removeHandler(catcher)
        if catcher.messages:  # a converter that itself loops (e.g. Conv2DBackpropFilter)
            self._warn("converts with a while loop: " + "; ".join(sorted(set(catcher.messages)))[:300])
        return out

    def _loop(self, xy: tuple[Nest, Nest]) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """Per-example gradients one example at a time (``tf.map_fn``), without pfor."""
        dtype = _stat_dtype(self.variables)

        def one(xy1: tuple[Nest, Nest]) -> tuple[tf.Tensor, list[tf.Tensor]]:
            loss, g = self._per_example(xy1)
            return tf.cast(loss, dtype), [tf.cast(t, v.dtype) for t, v in zip(g, self.variables)]

        sig = (tf.TensorSpec([], dtype), [tf.TensorSpec(v.shape, v.dtype) for v in self.variables])
        return tf.map_fn(one, xy, fn_output_signature=sig)

    def _warn(self, what: str) -> None:
        self.fallback_detected = True
        warnings.warn(
            PforFallbackWarning(
                "tf.vectorized_map (pfor) " + what + ". Per-example gradients then run as a "
                "sequential while loop and the generic CABS statistics will be MUCH slower. "
                "Prefer method='fast' (supported layers) or avoid that op."
            ),
            stacklevel=2,
        )

    def _generic(self, x: Nest, y: Nest, w: tf.Tensor) -> tuple:
        m = tf.nest.flatten(x)[0].shape[0]
        if m is None:
            raise ValueError("the generic path needs a static batch size (trace with padded buckets)")
        c = min(self.chunk_size, m)
        n = -(-m // c)
        idx = tf.concat([tf.range(m), tf.zeros([n * c - m], tf.int32)], axis=0)  # pad with example 0
        w = tf.concat([w, tf.zeros([n * c - m], w.dtype)], axis=0)
        xs, ys = tf.nest.map_structure(
            lambda t: tf.reshape(tf.gather(t, idx), [n, c, *t.shape[1:]]), (x, y)
        )
        ws = tf.reshape(w, [n, c])

        def chunk(k: tf.Tensor, acc: tuple) -> tuple:
            loss_sum, s, sums = acc
            wk = ws[k]
            losses, g = self._vmap(tf.nest.map_structure(lambda t: t[k], (xs, ys)))
            losses = tf.cast(losses, dtype)  # a float16 loss (mixed precision) is summed in float32
            g = [_wide(gi) for gi in g]  # squares and sums of low-precision gradients in float32
            sums = [a + tf.tensordot(tf.cast(wk, gi.dtype), gi, 1) for a, gi in zip(sums, g)]
            sq = tf.add_n([tf.cast(tf.reduce_sum(tf.reshape(gi * gi, [c, -1]), axis=1), dtype) for gi in g])
            wd = tf.cast(wk, dtype)
            return loss_sum + tf.reduce_sum(wd * losses), s + tf.reduce_sum(wd * sq), sums

        dtype = _stat_dtype(self.variables)
        acc = (tf.zeros([], dtype), tf.zeros([], dtype),
               [tf.zeros(v.shape, _wide_dtype(v.dtype)) for v in self.variables])  # grad_sum in >= float32
        if n == 1:
            loss_sum, s, sums = chunk(tf.constant(0), acc)
        else:
            _, (loss_sum, s, sums) = tf.while_loop(
                lambda k, _: k < n, lambda k, a: (k + 1, chunk(k, a)), (tf.constant(0), acc)
            )
        sums = [tf.cast(t, v.dtype) for t, v in zip(sums, self.variables)]  # grad_sum in the variables' dtypes
        return tf.reduce_sum(tf.cast(w, dtype)), loss_sum, sums, s
