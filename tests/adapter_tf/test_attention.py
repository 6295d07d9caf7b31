"""Issue 15, the Keras slice: EinsumDense (and so MultiHeadAttention), tied
embeddings, learned positions and grouped convolutions on the exact fast path.
Every S is compared with a float64 loop over single examples, and the tests
assert that the fast path (not the generic fallback) produced it."""

import warnings

import cabs_tf
import keras
import numpy as np
import pytest
import tensorflow as tf
from exactness_models import F64, TinyGPT, build, gpt_data, lm_loss, run_stats
from keras import layers as kl
from keras import ops
from tf_adapter_helpers import xent

import cabs_core

pytestmark = pytest.mark.filterwarnings("ignore::cabs_tf.stats.PforFallbackWarning")


def oracle(model, loss, x, y, keep=None):
    """BatchStats from a Python loop over single examples (x may be a tuple of arrays)."""
    rows = range(len(y)) if keep is None else np.flatnonzero(keep)
    losses, grads = [], []
    for i in rows:
        xi = tf.nest.map_structure(lambda t, i=i: t[i : i + 1], x)
        with tf.GradientTape() as tape:
            li = loss(y[i : i + 1], model(xi, training=True))[0]
        g = tape.gradient(li, model.trainable_variables)
        losses.append(float(li))
        grads.append([np.asarray(tf.convert_to_tensor(t), dtype=np.float64) for t in g])
    per_param = [np.stack([gi[k] for gi in grads]) for k in range(len(grads[0]))]
    return cabs_core.batch_stats_from_per_example(np.asarray(losses), per_param)


def fast_stats(model, loss, x, y, mask=None, mode="graph"):
    """(grad_sum, vector) from method='fast', asserting that the fast path was established."""
    step = cabs_tf.PerExampleStats(model, loss, method="fast")
    call = tf.function(step) if mode == "graph" else step
    with warnings.catch_warnings():
        warnings.simplefilter("error", cabs_core.FastPathFallbackWarning)
        grads, vec = call(x, y) if mask is None else call(x, y, mask)
    assert step.method == "fast" and list(step.verdicts.values()) == [None]
    return [g.numpy() for g in grads], vec.numpy()


def assert_matches(grads, vec, want):
    np.testing.assert_allclose(vec[0], want.count)
    np.testing.assert_allclose(vec[1], want.loss_sum, rtol=1e-9)
    np.testing.assert_allclose(vec[2], want.sq_norm_sum, rtol=1e-9)
    np.testing.assert_allclose(vec[3], sum(float(np.sum(g**2)) for g in want.grad_sum), rtol=1e-9)
    for g, w in zip(grads, want.grad_sum):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12)


T, D = 3, 4


def einsum_model(kind):
    """x (m, T, D) -> 3 classes through EinsumDense layers of one kind of equation."""
    keras.utils.set_random_seed(0)
    x = keras.Input((T, D), dtype=F64)

    def ein(eq, shape, bias, act="tanh"):
        return kl.EinsumDense(eq, output_shape=shape, bias_axes=bias, activation=act, dtype=F64)

    if kind == "attention":  # MultiHeadAttention's projections, and a Dense as an equation
        h = ein("abc,cde->abde", (T, 2, 3), "de")(x)
        h = ein("abcd,cde->abe", (T, 5), "e")(h)
        h = ein("ab,bc->ac", (3,), "c", None)(ops.mean(h, axis=1))
    elif kind == "ellipsis":  # '...' expanded; positions ahead of the input units
        h = ein("...b,bc->...c", (5,), "c")(x)
        h = ein("ab...,bc->ac...", (2,), None)(h)  # the trailing axis passes through
        h = ein("abc,bcd->ad", (3,), "d", None)(h)
    elif kind == "blocks":  # a kernel letter in input and output (a weight block per value), bias over b, d
        h = ein("abc,cd->abcd", (T, D, 2), "bd")(x)
        h = ein("abcd,cd->ab", (T,), None)(h)
        h = kl.Dense(3, dtype=F64)(h)
    elif kind == "reduce":  # input letters summed out (in neither kernel nor output)
        h = ein("abc,cd->ad", (5,), "d")(x)
        h2 = ein("abc,bd->ad", (5,), "d")(x)
        h = ein("ab,bc->ac", (3,), "c", None)(h + h2)
    elif kind == "shared":  # one EinsumDense called twice: the calls' terms are summed before the norm
        layer = ein("abc,cd->abd", (T, D), "d")
        h = layer(layer(x))
        h = ein("abc,bcd->ad", (3,), "d", None)(h)
    else:
        raise ValueError(kind)
    return keras.Model(x, h)


@pytest.mark.parametrize("kind", ["attention", "ellipsis", "blocks", "reduce", "shared"])
def test_einsum_dense_exact_on_the_fast_path(kind):
    model = einsum_model(kind)
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, T, D)), rng.integers(0, 3, size=6).astype("int32")
    assert_matches(*fast_stats(model, xent, x, y), oracle(model, xent, x, y))


def test_einsum_dense_eager_and_masked_batch():
    model = einsum_model("attention")
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(7, T, D)), rng.integers(0, 3, size=7).astype("int32")
    keep = np.array([1, 1, 0, 1, 0, 1, 1], "float64")
    assert_matches(*fast_stats(model, xent, x, y, keep, mode="eager"), oracle(model, xent, x, y, keep))


def test_einsum_equation_the_fast_path_cannot_establish_is_refused_by_name():
    """A diagonal ('abb'): method='fast' refuses naming the layer and the equation; auto is exact (generic)."""
    keras.utils.set_random_seed(0)
    x_in = keras.Input((T, T), dtype=F64)
    model = keras.Model(x_in, kl.EinsumDense("abb,bc->ac", output_shape=(3,), bias_axes="c", dtype=F64,
                                             name="diag")(x_in))
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(5, T, T)), rng.integers(0, 3, size=5).astype("int32")
    with pytest.raises(cabs_core.UnsupportedModelError, match="abb,bc->ac") as e:
        cabs_tf.PerExampleStats(model, xent, method="fast")
    assert e.value.layer == "diag" and "diagonal" in str(e.value)
    step = cabs_tf.PerExampleStats(model, xent, method="auto", chunk_size=2)
    assert step.method == "generic" and "diag" in step.refusals[0]
    _, vec = tf.function(step)(x, y)
    np.testing.assert_allclose(vec.numpy()[2], oracle(model, xent, x, y).sq_norm_sum, rtol=1e-9)


def test_einsum_bias_that_keras_adds_along_another_axis_is_caught():
    """Keras's ops.add treats a bias of shape (3, 1) on an output (m, 3, 3, 2) as
    a channels-first bias_add (axis 1), not as NumPy broadcasting (axis 2): the
    accounting check sees that the bias gradient does not match the equation's
    and auto falls back (exact), fast refuses naming the bias."""
    keras.utils.set_random_seed(0)
    x_in = keras.Input((3, 3), dtype=F64)
    h = kl.EinsumDense("abc,cd->abcd", output_shape=(3, 3, 2), bias_axes="c", dtype=F64, name="quirk")(x_in)
    model = keras.Model(x_in, kl.Dense(3, dtype=F64)(kl.Flatten(dtype=F64)(h)))
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(5, 3, 3)), rng.integers(0, 3, size=5).astype("int32")
    what, s = run_stats(model, xent, x, y, "auto")
    assert what == "fallback"
    np.testing.assert_allclose(s, oracle(model, xent, x, y).sq_norm_sum, rtol=1e-9)
    what, err = run_stats(model, xent, x, y, "fast")
    assert what == "refused" and "quirk/bias" in err.layer


def mha_classifier(t=4, d=6, heads=2):
    """(features (m, T, d), key mask (m, T)) -> 3 classes through MultiHeadAttention with an attention mask."""
    keras.utils.set_random_seed(0)
    feats, keep = keras.Input((t, d), dtype=F64), keras.Input((t,), dtype="int32")
    mask = ops.cast(keep[:, None, :], "bool") & ops.ones((1, t, 1), "bool")
    h = kl.MultiHeadAttention(heads, 3, value_dim=2, dtype=F64)(feats, feats, attention_mask=mask)
    h = kl.LayerNormalization(dtype=F64)(h + feats)
    return keras.Model([feats, keep], kl.Dense(3, dtype=F64)(ops.mean(h, axis=1)))


@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_multi_head_attention_with_attention_mask_is_fast_and_exact(mode):
    model = mha_classifier()
    rng = np.random.default_rng(5)
    m = 6
    keep = (rng.random((m, 4)) > 0.4).astype("int32")
    keep[:, 0] = 1
    x, y = (rng.normal(size=(m, 4, 6)), keep), rng.integers(0, 3, size=m).astype("int32")
    assert_matches(*fast_stats(model, xent, x, y, mode=mode), oracle(model, xent, x, y))


@pytest.mark.parametrize("t,m,n_layers,mode", [(5, 4, 2, "graph"), (4, 4, 1, "graph")])
def test_small_gpt_is_exact_on_the_fast_path(t, m, n_layers, mode):
    """Learned positions, causal MultiHeadAttention, a bare tied head: fast, exact
    (grad_sum too); T == m included."""
    vocab = 11
    keras.utils.set_random_seed(0)
    model = build(TinyGPT(vocab, t, 4, n_layers=n_layers), gpt_data(2, t, vocab)[0])
    x, y = gpt_data(m, t, vocab, seed=m)
    assert_matches(*fast_stats(model, lm_loss, x, y, mode=mode), oracle(model, lm_loss, x, y))


def test_small_gpt_with_key_padding_and_a_masked_batch():
    vocab, t, m = 11, 5, 6
    keras.utils.set_random_seed(1)
    model = TinyGPT(vocab, t, 4, n_layers=1, pad=True)
    x, y = gpt_data(m, t, vocab, pad=True, seed=3)
    model(tf.nest.map_structure(lambda a: a[:2], x))
    w = np.array([1, 0, 1, 1, 0, 1], "float32")
    assert_matches(*fast_stats(model, lm_loss, x, y, mask=w), oracle(model, lm_loss, x, y, keep=w))


class TiedHead(keras.Model):
    """Tokens (m, T) -> Dense -> logits over the vocabulary through the token
    table in one of the forms ``tie`` (see :class:`TinyGPT`), per position
    (m, T, V) or, ``pooled``, on the mean over positions (m, V): h (m, d) E^T."""

    def __init__(self, vocab, d, tie, pooled=False):
        super().__init__(dtype=F64)
        self.tie, self.pooled = tie, pooled
        self.tok = kl.Embedding(vocab, d, dtype=F64, name="tok")
        self.mid = kl.Dense(d, activation="tanh", dtype=F64)

    def call(self, ids):
        h = self.tok(ids)
        h = self.mid(ops.mean(h, axis=1) if self.pooled else h)
        table = self.tok.embeddings
        if self.tie == "transpose_b":
            return tf.matmul(h, tf.convert_to_tensor(table), transpose_b=True)
        if self.tie == "einsum":
            return ops.einsum("btd,vd->btv", h, table)
        if self.tie == "scaled":
            return ops.matmul(h, ops.transpose(table * 0.5))
        return ops.matmul(h, ops.transpose(table))


@pytest.mark.parametrize("tie,pooled,expected", [("matmul", True, "fast"), ("transpose_b", False, "fast"),
                                                 ("einsum", False, "fast"), ("scaled", False, "fallback")])
def test_forms_of_the_tied_head(tie, pooled, expected):
    """ops.matmul(h, E.T) on (m, T, d) (in the GPT tests) and on (m, d),
    tf.matmul(..., transpose_b=True) and ops.einsum("btd,vd->btv", h, E)
    (TensorFlow lowers it to a matmul; "...d,vd->...v" it lowers otherwise, and
    that falls back) are recognised; a head on the scaled table is a use the fast path
    does not see: auto falls back (exact), fast refuses naming the table."""
    vocab, t, m = 9, 4, 5
    model = build(TiedHead(vocab, 3, tie, pooled), gpt_data(2, t, vocab)[0])
    x, y = gpt_data(m, t, vocab, seed=1)
    loss = lm_loss
    if pooled:
        y, loss = np.random.default_rng(0).integers(0, vocab, size=m).astype("int32"), xent
    want = oracle(model, loss, x, y)
    if expected == "fast":
        assert_matches(*fast_stats(model, loss, x, y), want)
        return
    what, s = run_stats(model, loss, x, y, "auto")
    assert what == "fallback"
    np.testing.assert_allclose(s, want.sq_norm_sum, rtol=1e-9)
    what, err = run_stats(model, loss, x, y, "fast")
    assert what == "refused" and "tok/embeddings" in err.layer


def test_grouped_conv2d_fast_and_exact():
    """Conv2D(groups=2) on the fast path (Conv1D(groups=2): test_exactness.py; the
    generic path loops over the examples because pfor still fails on grouped
    convolutions in TensorFlow 2.21)."""
    keras.utils.set_random_seed(0)
    shape, layer = (5, 5, 4), kl.Conv2D(6, 2, groups=2, strides=2, activation="tanh", dtype=F64)
    model = keras.Sequential([keras.Input(shape, dtype=F64), layer, kl.Flatten(dtype=F64), kl.Dense(3, dtype=F64)])
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(5, *shape)), rng.integers(0, 3, size=5).astype("int32")
    assert_matches(*fast_stats(model, xent, x, y), oracle(model, xent, x, y))
