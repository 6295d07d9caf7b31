"""Per-example statistics of SPEC section 4 for Keras 3 models (TensorFlow
backend) and for lists of ``tf.Variable`` s with a per-example loss.

:class:`StatsStep` returns, for a batch ``(x, y)`` with a 0/1 weight mask
``w``, the summed gradient ``sum_i w_i g_i`` (one tensor per variable, the
ordinary gradient times m) and ONE float64 tensor of the four scalars of
:class:`cabs_core.ScalarStats`: ``[m, sum_i l_i, S = sum_i ||g_i||^2,
||sum_i g_i||^2]``. The host reads it with ``ScalarStats.from_vector(v.numpy())``:
one device-to-host copy per step. Two exact paths:

- ``fast``: one forward and one backward pass. Each supported layer
  (Dense, Conv1D, Conv2D, Embedding, LayerNormalization) records its inputs
  ``a`` and its pre-activation output ``z``; the backward pass gives
  ``b = dL/dz``, and ||g_i||^2 of the layer follows from ``a`` and ``b``
  (:mod:`cabs_tf.per_example`). No whole-model per-example gradient exists.
- ``generic``: per-example gradients of all variables with
  ``tf.vectorized_map`` in chunks of ``chunk_size`` examples (memory
  ~ chunk_size x parameters). If pfor cannot vectorise an op it falls back
  to a while loop; we detect this and warn (:class:`PforFallbackWarning`).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers as kl  # noqa: E402
from keras import ops  # noqa: E402

from cabs_core.per_example import gram_is_cheaper  # noqa: E402

from .per_example import bias_sq_norms, embedding_sq_norms, linear_sq_norms, scale_shift_sq_norms  # noqa: E402

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        f"cabs_tf needs Keras 3 with the TensorFlow backend, but Keras runs on {keras.backend.backend()!r}: "
        f"set KERAS_BACKEND=tensorflow before importing keras"
    )

Method = Literal["auto", "fast", "generic"]
Nest = Any  # a tensor, or a nest (tuple/dict) of tensors with a leading example axis


class PforFallbackWarning(UserWarning):
    """tf.vectorized_map could not vectorise an op and runs a slow while loop."""


class UnsupportedLayerError(ValueError):
    """A layer the fast path cannot handle, or one that couples examples."""


_FAST_TYPES = (kl.Dense, kl.Conv1D, kl.Conv2D, kl.Embedding, kl.LayerNormalization)


def _fast_refusal(layer: keras.Layer) -> str | None:
    """Why the fast path cannot take this layer (None: it can)."""
    if type(layer) not in _FAST_TYPES:
        return f"{type(layer).__name__} is not one of Dense, Conv1D, Conv2D, Embedding, LayerNormalization"
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
        return "LoRA or quantised weights"
    if isinstance(layer, (kl.Conv1D, kl.Conv2D)):
        if layer.data_format != "channels_last":
            return "data_format='channels_first'"
        if layer.groups != 1:
            return f"groups={layer.groups}"
        if layer.padding not in ("valid", "same"):
            return f"padding={layer.padding!r}"
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
            raise UnsupportedLayerError(
                f"layer {layer.name!r} is a BatchNormalization in training mode: it normalises with "
                f"statistics of the whole batch, so an example's loss depends on the other examples and "
                f"per-example gradients (the variance tr(Sigma) CABS needs) are not defined. Options: "
                f"freeze it (layer.trainable = False runs it in inference mode with its moving "
                f"statistics), or replace it by LayerNormalization or GroupNormalization."
            )
        for attr in ("kernel_regularizer", "bias_regularizer", "activity_regularizer",
                     "embeddings_regularizer", "gamma_regularizer", "beta_regularizer"):
            if getattr(layer, attr, None) is not None:
                raise UnsupportedLayerError(
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

    def __init__(self, layers: Sequence[keras.Layer]):
        self.layers = list(layers)
        self.records: dict[int, list[tuple[tf.Tensor, tf.Tensor]]] = {id(layer): [] for layer in self.layers}

    def __enter__(self) -> _Recorder:
        for layer in self.layers:
            object.__setattr__(layer, "call", self._make_call(layer))
        return self

    def __exit__(self, *exc: object) -> None:
        for layer in self.layers:
            object.__delattr__(layer, "call")

    def _make_call(self, layer: keras.Layer) -> Callable[..., tf.Tensor]:
        rec = self.records[id(layer)]

        def call(inputs: tf.Tensor, *args: Any, **kwargs: Any) -> tf.Tensor:
            if isinstance(layer, kl.Embedding):
                ids = inputs if inputs.dtype in (tf.int32, tf.int64) else ops.cast(inputs, "int32")
                z = ops.cast(ops.take(layer.embeddings, ids, axis=0), layer.compute_dtype)
                rec.append((ids, z))
                return z
            if isinstance(layer, kl.LayerNormalization):
                if not _last_axis_only(layer, inputs.shape.rank):
                    raise UnsupportedLayerError(f"{layer.name!r}: axis={layer.axis} (only the last axis)")
                xhat = ops.layer_normalization(inputs, None, None, -1, layer.epsilon)
                z = xhat
                if layer.gamma is not None:
                    z = z * layer.gamma
                if layer.beta is not None:
                    z = z + layer.beta
                z = ops.cast(z, layer.compute_dtype)
                rec.append((xhat, z))
                return z
            if isinstance(layer, kl.Dense):
                z = ops.matmul(inputs, layer.kernel)
            else:  # Conv1D / Conv2D, channels_last
                z = layer.convolution_op(inputs, layer.kernel)
            if layer.bias is not None:
                z = ops.add(z, layer.bias)
            rec.append((inputs, z))
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


def _layer_sq_norms(
    layer: keras.Layer, calls: list[tuple[tf.Tensor, tf.Tensor, tf.Tensor]], trainable: set[int]
) -> tf.Tensor:
    """Per-example ||g_i||^2 over this layer's trainable variables, shape (m,).

    A layer called several times (shared weights) has g_i = sum over all
    calls and positions, so the calls are concatenated along T."""

    def flat(t: tf.Tensor) -> tf.Tensor:
        return tf.reshape(t, [-1, math.prod(t.shape[1:-1]), t.shape[-1]])

    b = tf.concat([flat(g) for _, _, g in calls], axis=1)
    if isinstance(layer, kl.Embedding):
        tokens = tf.concat([tf.reshape(a, [-1, math.prod(a.shape[1:])]) for a, _, _ in calls], axis=1)
        return embedding_sq_norms(tokens, b)
    if isinstance(layer, kl.LayerNormalization):
        xhat = tf.concat([flat(a) for a, _, _ in calls], axis=1)
        parts = {id(layer.gamma) if layer.gamma is not None else 0: lambda: scale_shift_sq_norms(xhat, b),
                 id(layer.beta) if layer.beta is not None else 1: lambda: bias_sq_norms(b)}
        out = [fn() for k, fn in parts.items() if k in trainable]
        return tf.add_n(out) if out else tf.zeros_like(b[:, 0, 0])
    if id(layer.kernel) not in trainable:
        out = tf.zeros_like(b[:, 0, 0])
    elif isinstance(layer, kl.Dense):
        out = linear_sq_norms(tf.concat([flat(a) for a, _, _ in calls], axis=1), b)
    else:
        per_call = [_conv_views(layer, a) for a, _, _ in calls]
        out = _conv_sq_norms([tf.concat(vs, axis=1) for vs in zip(*per_call)], b)
    if layer.bias is not None and id(layer.bias) in trainable:
        out = out + bias_sq_norms(b)
    return out


def _as_mask(w: tf.Tensor | None, m: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    if w is None:
        return tf.ones([m], dtype)
    w = tf.convert_to_tensor(w)
    if w.shape.rank != 1:
        raise ValueError(f"mask must have shape (m,), got {w.shape}")
    return tf.cast(w, dtype)


def _first_dim(x: Nest) -> tf.Tensor:
    return tf.shape(tf.nest.flatten(x)[0])[0]


def _check_losses(losses: tf.Tensor) -> tf.Tensor:
    if losses.shape.rank != 1:
        raise ValueError(
            f"the loss must return per-example losses of shape (m,), got shape {losses.shape}; "
            f"for a Keras loss pass reduction=None (e.g. keras.losses.SparseCategoricalCrossentropy("
            f"from_logits=True, reduction=None))"
        )
    return losses


class StatsStep:
    """CABS statistics of one batch (SPEC section 4), as graph code.

    ``target``: a built Keras 3 model (``loss(y_true, y_pred) -> (m,)``) or a
    list of ``tf.Variable`` s (``loss(x, y) -> (m,)`` computed from them).
    ``method``: ``"fast"`` (supported layers only, else
    :class:`UnsupportedLayerError`), ``"generic"``, or ``"auto"`` (fast when
    every trainable layer is supported). ``chunk_size`` bounds the examples
    whose per-example gradients the generic path holds at once.

    Call it (inside ``tf.function``) as ``grad_sum, vector = step(x, y, mask)``.
    """

    def __init__(
        self,
        target: keras.Layer | Sequence[tf.Variable],
        loss: Callable[..., tf.Tensor],
        *,
        method: Method = "auto",
        chunk_size: int = 32,
    ) -> None:
        if method not in ("auto", "fast", "generic"):
            raise ValueError(f"method must be 'auto', 'fast' or 'generic', got {method!r}")
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        self.loss = loss
        self.chunk_size = chunk_size
        self.fallback_detected = False
        if isinstance(target, keras.Layer):
            self.model: keras.Layer | None = target
            refusals = _check_model(target)
            self.variables = list(target.trainable_variables)
            if method == "fast" and refusals:
                raise UnsupportedLayerError(
                    "method='fast' cannot handle " + "; ".join(refusals) + ". Use method='generic' "
                    "(vectorised per-example gradients) or 'auto'."
                )
            self.method = "generic" if method == "generic" or refusals else "fast"
            self.refusals = refusals
        else:
            self.model = None
            self.variables = list(target)
            if not self.variables or not all(isinstance(v, (tf.Variable, keras.Variable)) for v in self.variables):
                raise ValueError("target must be a built Keras model or a non-empty list of tf.Variable")
            if method == "fast":
                raise UnsupportedLayerError(
                    "method='fast' needs a Keras model (it captures its layers); a list of variables "
                    "uses method='generic'"
                )
            self.method = "generic"
            self.refusals = []
        self._trainable = {id(v) for v in self.variables}

    # -- the per-example loss ------------------------------------------------
    def per_example_loss(self, x: Nest, y: Nest) -> tf.Tensor:
        """l_i for every example of the batch, shape (m,)."""
        if self.model is not None:
            return _check_losses(self.loss(y, self.model(x, training=True)))
        return _check_losses(self.loss(x, y))

    @tf.autograph.experimental.do_not_convert  # plain Python control flow on static shapes
    def __call__(
        self, x: Nest, y: Nest, mask: tf.Tensor | None = None
    ) -> tuple[list[tf.Tensor], tf.Tensor]:
        """``(grad_sum, vector)``: sum_i w_i g_i per variable, and float64
        ``[count, loss_sum, sq_norm_sum, grad_sum_sq_norm]``."""
        dtype = self.variables[0].dtype
        w = _as_mask(mask, _first_dim(x), dtype)
        if self.method == "fast":
            count, loss_sum, grads, s = self._fast(x, y, w)
        else:
            count, loss_sum, grads, s = self._generic(x, y, w)
        g2 = tf.add_n([tf.reduce_sum(tf.cast(g, tf.float64) ** 2) for g in grads])
        vector = tf.stack([tf.cast(count, tf.float64), tf.cast(loss_sum, tf.float64),
                           tf.cast(s, tf.float64), g2])
        return grads, vector

    # -- fast path: one forward, one backward --------------------------------
    def _fast(self, x: Nest, y: Nest, w: tf.Tensor) -> tuple:
        assert self.model is not None
        layers = [
            layer for layer in self.model._flatten_layers(include_self=True, recursive=True)
            if layer.trainable and any(id(v) in self._trainable for v in layer._trainable_variables)
        ]
        with tf.GradientTape() as tape:
            with _Recorder(layers) as rec:
                losses = self.per_example_loss(x, y)
            w = tf.cast(w, losses.dtype)
            total = tf.reduce_sum(w * losses)
        outs = [(layer, call) for layer in layers for call in rec.records[id(layer)]]
        grads = tape.gradient(
            total, self.variables + [z for _, (_, z) in outs],
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        var_grads, out_grads = grads[: len(self.variables)], grads[len(self.variables):]
        per_layer: dict[int, list] = {}
        for (layer, (a, z)), b in zip(outs, out_grads):
            per_layer.setdefault(id(layer), []).append((a, z, b))
        sq = [_layer_sq_norms(layer, per_layer[id(layer)], self._trainable)
              for layer in layers if id(layer) in per_layer]
        # b already carries the factor w_i, so sq_i = w_i^2 ||g_i||^2 = w_i ||g_i||^2 (0/1 mask)
        s = tf.reduce_sum(tf.add_n([tf.cast(t, losses.dtype) for t in sq]))
        return tf.reduce_sum(w), total, [tf.convert_to_tensor(g) for g in var_grads], s

    # -- generic path: vectorised per-example gradients in chunks -------------
    def _per_example(self, xy: tuple[Nest, Nest]) -> tuple[tf.Tensor, list[tf.Tensor]]:
        x1, y1 = tf.nest.map_structure(lambda t: t[None], xy)
        with tf.GradientTape() as tape:
            loss = self.per_example_loss(x1, y1)[0]
        g = tape.gradient(loss, self.variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return loss, [tf.convert_to_tensor(t) for t in g]

    def _vmap(self, xy: tuple[Nest, Nest]) -> tuple[tf.Tensor, list[tf.Tensor]]:
        catcher = _WhileLoopLog()
        logger = logging.getLogger("tensorflow")
        logger.addHandler(catcher)
        try:
            out = tf.vectorized_map(self._per_example, xy, fallback_to_while_loop=False)
        except ValueError as e:  # pfor has no converter for some op
            self._warn("has no vectoriser for an op: " + str(e).strip().splitlines()[-1][:300])
            return tf.vectorized_map(self._per_example, xy, fallback_to_while_loop=True)
        finally:
            logger.removeHandler(catcher)
        if catcher.messages:  # a converter that itself loops (e.g. Conv2DBackpropFilter)
            self._warn("converts with a while loop: " + "; ".join(sorted(set(catcher.messages)))[:300])
        return out

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
            wl = tf.cast(wk, losses.dtype)
            sums = [a + tf.tensordot(tf.cast(wk, gi.dtype), gi, 1) for a, gi in zip(sums, g)]
            sq = tf.add_n([tf.reduce_sum(tf.reshape(gi * gi, [c, -1]), axis=1) for gi in g])
            return loss_sum + tf.reduce_sum(wl * losses), s + tf.reduce_sum(tf.cast(wk, sq.dtype) * sq), sums

        dtype = self.variables[0].dtype
        acc = (tf.zeros([], dtype), tf.zeros([], dtype), [tf.zeros(v.shape, v.dtype) for v in self.variables])
        if n == 1:
            loss_sum, s, sums = chunk(tf.constant(0), acc)
        else:
            _, (loss_sum, s, sums) = tf.while_loop(
                lambda k, _: k < n, lambda k, a: (k + 1, chunk(k, a)), (tf.constant(0), acc)
            )
        return tf.reduce_sum(w), loss_sum, list(sums), s
