"""Models of issue 12's table (patterns on which a per-layer fast path can go
wrong) and a runner that says what the adapter did: exact fast result,
fallback, or refusal."""

import os
import warnings

os.environ["KERAS_BACKEND"] = "tensorflow"

import cabs_tf  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers as kl  # noqa: E402
from keras import ops  # noqa: E402
from tf_adapter_helpers import brute_force  # noqa: E402

import cabs_core  # noqa: E402

F64 = "float64"


class Pattern(keras.Model):
    """A float input (m, T, d) -> (m, classes) through one of issue 12's patterns."""

    def __init__(self, kind: str, t: int, d: int, classes: int = 3, buffer_len: int = 4, **kw):
        super().__init__(dtype=F64, **kw)
        self.kind, self.t, self.d = kind, t, d
        self.inner = kl.Dense(d, activation="tanh", dtype=F64, name="inner")
        self.head = kl.Dense(classes, dtype=F64, name="head")
        self.buffer = tf.constant(np.linspace(-1.0, 1.0, buffer_len * d).reshape(buffer_len, d))
        if kind == "conv_groups":
            self.conv = kl.Conv1D(4, 2, groups=2, padding="same", dtype=F64, name="grouped")

    def call(self, x):
        k = self.kind
        if k == "plain":
            h = self.inner(x)
        elif k == "fold":  # examples folded into the leading axis
            h = ops.reshape(self.inner(ops.reshape(x, (-1, self.d))), (-1, self.t, self.d))
        elif k == "time_major":  # (T, m, d) through the layer
            h = ops.transpose(self.inner(ops.transpose(x, (1, 0, 2))), (1, 0, 2))
        elif k == "expand_dims":
            h = ops.squeeze(self.inner(ops.expand_dims(x, 0)), 0)
        elif k == "halves":  # one layer called on two halves of the batch
            n = ops.shape(x)[0] // 2
            h = ops.concatenate([self.inner(x[:n]), self.inner(x[n:])], axis=0)
        elif k == "buffer":  # a layer applied to a constant without the example axis, broadcast
            h = self.inner(x) + ops.mean(self.inner(self.buffer), axis=0)
        elif k == "kernel_outside":  # the layer's weight also used directly
            h = self.inner(x) + ops.matmul(x, self.inner.kernel)
        elif k == "batch_mix":  # couples the examples (centring over the batch)
            h = self.inner(x - ops.mean(x, axis=0, keepdims=True))
        elif k == "conv_groups":
            h = self.inner(self.conv(x))
        else:
            raise ValueError(k)
        return self.head(ops.mean(h, axis=1))


class TiedLM(keras.Model):
    """Token ids (m, T) -> logits (m, T, V) with the output projection tied to
    the embedding (``ops.matmul(h, E.T)``), optionally a positional embedding of
    ``arange(T)`` broadcast over the batch."""

    def __init__(self, vocab: int, t: int, d: int, tied: bool | str = True, positional: bool = False, **kw):
        super().__init__(dtype=F64, **kw)
        self.tied, self.positional, self.t = tied, positional, t
        self.emb = kl.Embedding(vocab, d, dtype=F64, name="tok")
        self.pos = kl.Embedding(t, d, dtype=F64, name="pos") if positional else None
        self.mid = kl.Dense(d, activation="tanh", dtype=F64, name="mid")
        self.out = None if tied else kl.Dense(vocab, dtype=F64, name="out")
        # tied="layer": the visible tie, cabs_tf.TiedProjection (exact on the fast path)
        self.proj = cabs_tf.TiedProjection(self.emb, dtype=F64, name="proj") if tied == "layer" else None

    def call(self, ids):
        h = self.emb(ids)
        if self.positional:
            h = h + self.pos(ops.arange(self.t))[None]
        h = self.mid(h)
        if self.proj is not None:
            return self.proj(h)
        return ops.matmul(h, ops.transpose(self.emb.embeddings)) if self.tied else self.out(h)


def lm_loss(y, logits):
    """Per-example token cross-entropy summed over positions: (m,)."""
    return ops.sum(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True), axis=1)


def build(model, x):
    model(x[:2])
    return model


def float_data(m, t, d, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(m, t, d)), rng.integers(0, classes, size=(m,)).astype("int32")


def token_data(m, t, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, vocab, size=(m, t)).astype("int32"),
            rng.integers(0, vocab, size=(m, t)).astype("int32"))


def run_stats(model, loss, x, y, method="auto", mode="graph", mask=None):
    """``(what, S)``: what is 'fast' (no warning), 'fallback' (auto warned) or
    'refused' (UnsupportedModelError; S None)."""
    step = cabs_tf.PerExampleStats(model, loss, method=method, chunk_size=4)
    call = tf.function(step) if mode == "graph" else step
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            args = (x, y) if mask is None else (x, y, mask)
            _, vec = call(*args)
        except cabs_core.UnsupportedModelError as e:
            return "refused", e
    fell = [w for w in rec if issubclass(w.category, cabs_core.FastPathFallbackWarning)]
    assert len(fell) <= 1, [str(w.message) for w in fell]
    return ("fallback" if fell else "fast"), float(vec.numpy()[2])


def oracle_s(model, loss, x, y):
    return brute_force(model, loss, x, y).sq_norm_sum


class TinyGPT(keras.Model):
    """A small GPT (issue 15): token and learned position embeddings
    (``pos(arange(T))`` added to the tokens), pre-norm blocks of causal
    ``MultiHeadAttention`` and a Dense MLP, and the output projection tied to
    the token table as a bare ``ops.matmul(h, ops.transpose(E))``
    (``tie="layer"``: :class:`cabs_tf.TiedProjection`; ``tie="transpose_b"``:
    ``tf.matmul(h, E, transpose_b=True)``).
    ``pad``: the input is ``(ids, keep)`` and keys with keep 0 are masked out."""

    def __init__(self, vocab: int, t: int, d: int, heads: int = 2, n_layers: int = 2, tie: str = "matmul",
                 pad: bool = False, dtype: str = F64, **kw):
        super().__init__(dtype=dtype, **kw)
        self.t, self.tie, self.pad = t, tie, pad
        self.tok = kl.Embedding(vocab, d, dtype=dtype, name="tok")
        self.pos = kl.Embedding(t, d, dtype=dtype, name="pos")
        self.blocks = [(kl.LayerNormalization(dtype=dtype), kl.MultiHeadAttention(heads, d // heads, dtype=dtype),
                        kl.LayerNormalization(dtype=dtype), kl.Dense(2 * d, activation="gelu", dtype=dtype),
                        kl.Dense(d, dtype=dtype)) for _ in range(n_layers)]
        self.norm = kl.LayerNormalization(dtype=dtype, name="final_norm")
        self.proj = cabs_tf.TiedProjection(self.tok, dtype=dtype) if tie == "layer" else None

    def call(self, inputs):
        ids, keep = inputs if self.pad else (inputs, None)
        h = self.tok(ids) + self.pos(ops.arange(self.t))
        mask = None if keep is None else ops.cast(keep[:, None, :], "bool") & ops.ones((1, self.t, 1), "bool")
        for ln1, att, ln2, up, down in self.blocks:
            a = ln1(h)
            h = h + att(a, a, attention_mask=mask, use_causal_mask=True)
            h = h + down(up(ln2(h)))
        h = self.norm(h)
        table = self.tok.embeddings
        if self.tie == "layer":
            return self.proj(h)
        if self.tie == "transpose_b":
            return tf.matmul(h, tf.convert_to_tensor(table), transpose_b=True)
        return ops.matmul(h, ops.transpose(table))


def gpt_data(m, t, vocab, pad=False, seed=0):
    """Ids (m, T) (with a 0/1 key mask whose first position is always kept if
    ``pad``) and next-token targets (m, T)."""
    x, y = token_data(m, t, vocab, seed)
    if not pad:
        return x, y
    keep = (np.random.default_rng(seed + 1).random((m, t)) > 0.3).astype("int32")
    keep[:, 0] = 1
    return (x, keep), y
