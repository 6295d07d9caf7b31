"""Issue 12: the fast path returns S only where its per-layer decomposition is
established; otherwise auto falls back (one FastPathFallbackWarning, exact
generic S) and fast raises UnsupportedModelError naming the layer. Every
result is compared with a float64 loop over single examples."""

import dataclasses
import warnings

import cabs_tf
import keras
import numpy as np
import pytest
import tensorflow as tf
from exactness_models import (
    Pattern,
    TiedLM,
    build,
    float_data,
    lm_loss,
    oracle_s,
    run_stats,
    token_data,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from keras import layers as kl
from keras import ops
from tf_adapter_helpers import brute_force, mlp, xent

import cabs_core

pytestmark = pytest.mark.filterwarnings("ignore::cabs_tf.stats.PforFallbackWarning")

WRONG = ["fold", "time_major", "expand_dims", "halves", "buffer", "kernel_outside", "batch_mix"]


def test_the_errors_are_the_core_ones():
    assert cabs_tf.UnsupportedModelError is cabs_core.UnsupportedModelError
    assert not hasattr(cabs_tf, "UnsupportedLayerError")
    assert issubclass(cabs_tf.stats.BatchNormTrainingError, cabs_core.UnsupportedModelError)


@pytest.mark.parametrize(
    "kind,m,t,d,buffer_len,mode",
    [("plain", 5, 3, 4, 4, "graph"), ("plain", 5, 3, 4, 4, "eager"),
     ("fold", 5, 3, 4, 4, "graph"), ("fold", 4, 2, 4, 4, "eager"),
     ("time_major", 5, 3, 4, 4, "graph"), ("time_major", 5, 5, 4, 4, "graph"),  # T == m
     ("time_major", 4, 4, 3, 4, "eager"), ("expand_dims", 5, 3, 4, 4, "graph"),
     ("halves", 6, 3, 4, 4, "graph"), ("halves", 4, 3, 4, 4, "eager"), ("buffer", 5, 3, 4, 4, "graph"),
     ("buffer", 5, 3, 4, 5, "graph"), ("buffer", 4, 3, 2, 4, "eager"),  # a buffer of length m
     ("kernel_outside", 5, 3, 4, 4, "graph"), ("kernel_outside", 5, 3, 4, 4, "eager"),
     ("batch_mix", 5, 3, 4, 4, "graph"), ("batch_mix", 5, 3, 4, 4, "eager")],
)
def test_table_rows_auto_exact_or_fallback(kind, m, t, d, buffer_len, mode):
    model = build(Pattern(kind, t, d, buffer_len=buffer_len), float_data(2, t, d)[0])
    x, y = float_data(m, t, d)
    what, s = run_stats(model, xent, x, y, "auto", mode)
    assert what == ("fast" if kind == "plain" else "fallback")
    np.testing.assert_allclose(s, oracle_s(model, xent, x, y), rtol=1e-9)


@pytest.mark.parametrize("kind", WRONG)
def test_table_rows_fast_refuses_naming_the_layer(kind):
    t, d, m = 3, 4, 5
    model = build(Pattern(kind, t, d), float_data(2, t, d)[0])
    x, y = float_data(m, t, d)
    what, err = run_stats(model, xent, x, y, "fast", "graph")
    assert what == "refused"
    assert err.layer is not None and "inner" in err.layer and "inner" in str(err)
    assert err.reason


def test_grouped_conv1d_auto_fast_and_generic_are_exact():
    """Conv1D(groups=2): the fast path handles groups (auto stays fast); the
    generic path, where pfor fails at run time, loops over the examples."""
    t, d, m = 5, 4, 6
    model = build(Pattern("conv_groups", t, d), float_data(2, t, d)[0])
    x, y = float_data(m, t, d)
    want = brute_force(model, xent, x, y)
    for method in ("auto", "generic"):
        step = cabs_tf.PerExampleStats(model, xent, method=method, chunk_size=4)
        with warnings.catch_warnings():
            warnings.simplefilter("error", cabs_core.FastPathFallbackWarning)
            grads, vec = tf.function(step)(x, y)
        assert list(step.verdicts.values()) == ([None] if method == "auto" else [])
        np.testing.assert_allclose(vec.numpy()[2], want.sq_norm_sum, rtol=1e-9)
        for g, w in zip(grads, want.grad_sum):
            np.testing.assert_allclose(g.numpy(), w, rtol=1e-9, atol=1e-12)


# since issue 15 the bare tie ops.matmul(h, E.T) and a positional Embedding(arange(T)) added to the
# tokens are exact on the fast path (tests/adapter_tf/test_attention.py); a positional embedding whose
# lookup is used in any other way still falls back
class MeanPositions(TiedLM):
    """Positions used without broadcasting over the examples: pooled over T first."""

    def call(self, ids):
        return super().call(ids) + ops.mean(self.pos(ops.arange(self.t)))


@pytest.mark.parametrize("tied", [True, False])
def test_positional_embedding_used_otherwise_falls_back(tied):
    vocab, t, d, m = 7, 4, 3, 5
    model = build(MeanPositions(vocab, t, d, tied=tied, positional=True), token_data(2, t, vocab)[0])
    x, y = token_data(m, t, vocab)
    want = oracle_s(model, lm_loss, x, y)
    what, s = run_stats(model, lm_loss, x, y, "auto", "graph")
    assert what == "fallback"
    np.testing.assert_allclose(s, want, rtol=1e-9)
    what, err = run_stats(model, lm_loss, x, y, "fast", "eager")
    assert what == "refused" and "pos" in err.layer


@pytest.mark.parametrize("t,m", [(4, 5), (5, 5)])  # T == m included
def test_visible_tie_is_exact_on_the_fast_path(t, m):
    """An Embedding whose table is also the output projection through
    cabs_tf.TiedProjection: both uses and their cross terms, exact."""
    vocab, d = 7, 3
    model = build(TiedLM(vocab, t, d, tied="layer"), token_data(2, t, vocab)[0])
    x, y = token_data(m, t, vocab)
    want = brute_force(model, lm_loss, x, y)
    for mode in ("graph", "eager"):
        what, s = run_stats(model, lm_loss, x, y, "fast", mode)
        assert what == "fast"
        np.testing.assert_allclose(s, want.sq_norm_sum, rtol=1e-9)
    grads, _ = tf.function(cabs_tf.PerExampleStats(model, lm_loss, method="fast"))(x, y)
    for g, w in zip(grads, want.grad_sum):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-9, atol=1e-12)


def test_visible_tie_with_positional_embedding_is_fast():
    vocab, t, d, m = 7, 4, 3, 5
    model = build(TiedLM(vocab, t, d, tied="layer", positional=True), token_data(2, t, vocab)[0])
    x, y = token_data(m, t, vocab)
    for mode in ("eager", "graph"):
        what, s = run_stats(model, lm_loss, x, y, "auto", mode)
        assert what == "fast"
        np.testing.assert_allclose(s, oracle_s(model, lm_loss, x, y), rtol=1e-9)


def test_untied_language_model_stays_fast():
    vocab, t, d, m = 7, 4, 3, 5
    model = build(TiedLM(vocab, t, d, tied=False), token_data(2, t, vocab)[0])
    x, y = token_data(m, t, vocab)
    what, s = run_stats(model, lm_loss, x, y, "fast", "graph")
    assert what == "fast"
    np.testing.assert_allclose(s, oracle_s(model, lm_loss, x, y), rtol=1e-9)


def test_one_warning_per_signature_and_verdict_cached():
    model = build(Pattern("fold", 3, 4), float_data(2, 3, 4)[0])
    step = cabs_tf.PerExampleStats(model, xent)
    x, y = float_data(6, 3, 4)
    with pytest.warns(cabs_core.FastPathFallbackWarning, match="inner"):
        step(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cabs_core.FastPathFallbackWarning)
        _, vec = step(x[:5], y[:5])  # same signature, another batch size: generic, silently
    np.testing.assert_allclose(vec.numpy()[2], oracle_s(model, xent, x[:5], y[:5]), rtol=1e-9)
    assert list(step.verdicts.values()) and all(v is not None for v in step.verdicts.values())


class Switch(keras.Model):
    """Plain until ``switch`` is set: then the Dense kernel is also used outside the layer."""

    def __init__(self):
        super().__init__(dtype="float64")
        self.inner = kl.Dense(4, activation="tanh", dtype="float64", name="inner")
        self.head = kl.Dense(3, dtype="float64", name="head")
        self.switch = tf.Variable(0.0, dtype=tf.float64, trainable=False)

    def call(self, x):
        return self.head(self.inner(x) + self.switch * ops.matmul(x, self.inner.kernel))


def test_trainer_reprobes_every_verify_every_steps():
    """A model whose behaviour changes after the first probe is caught at the
    next scheduled probe; from then on the step is generic and exact."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 4)), rng.integers(0, 3, size=40).astype("int32")
    model = build(Switch(), x)
    ctl = cabs_core.CABSController(lr=0.05, bs_min=4, bs_max=8, bs_init=8)
    tr = cabs_tf.CABSTrainer(model, xent, ctl, (x, y), verify_every=3, buckets=(8,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", cabs_core.FastPathFallbackWarning)
        for _ in range(3):
            tr.step()
    assert tr.stats.probe_count == 1 and tr.trace_count == 1
    model.switch.assign(1.0)
    with pytest.warns(cabs_core.FastPathFallbackWarning, match="inner"):
        tr.step()  # the 4th step (index 3) is re-probed and falls back
    batches = cabs_tf.DecisionBatches(x, y, buckets=tr.buckets, mask_dtype="float64")
    for _ in range(2):
        xb, yb, mask = batches.next(tr.state.batch_size)
        want = brute_force(model, xent, xb[mask == 1], yb[mask == 1])
        vec = tr.backend._stats_fn(xb, yb, mask)[1].numpy()
        np.testing.assert_allclose(vec[2], want.sq_norm_sum, rtol=1e-9)


def test_trainer_probe_runs_once_with_default_verify_every_and_keeps_traces():
    model = mlp()
    x, y = np.random.default_rng(0).normal(size=(50, 12)), np.random.default_rng(1).integers(0, 5, 50)
    ctl = cabs_core.CABSController(lr=0.1, bs_min=2, bs_max=64)
    tr = cabs_tf.CABSTrainer(model, xent, ctl, (x, y.astype("int32")))
    for b in (2, 3, 5, 9, 17, 33, 2, 40):
        tr.state = dataclasses.replace(tr.state, batch_size=b)
        tr.step()
    assert tr.stats.probe_count == 1 and list(tr.stats.verdicts.values()) == [None]
    assert tr.trace_count == 6


def test_verify_every_is_validated():
    with pytest.raises(ValueError, match="verify_every"):
        cabs_tf.PerExampleStats(mlp(), xent, verify_every=-1)


@pytest.mark.parametrize(
    "shape,dtype",
    [((784, 512), "float32"), ((5, 5, 32, 64), "float32"), ((7, 600), "float32"), ((9, 300), "float32"),
     ((10,), "float32"), ((1, 1), "float32"), ((784, 512), "float64"), ((3, 2), "float16")],
)
def test_probe_square_sums_match_float64(shape, dtype):
    """The probe's weight-sized sums of squares (float32 rows, float64 row sums) agree
    with a float64 sum well within the checks' tolerance, for every layout they take."""
    rng = np.random.default_rng(len(shape) + shape[-1])
    t = (rng.standard_normal(shape) * rng.uniform(0.1, 10.0, size=shape[-1])).astype(dtype)
    got = cabs_tf.stats._sq_sum64(tf.constant(t)).numpy()
    want = np.sum(t.astype(np.float64) ** 2)
    assert got.dtype == np.float64
    rtol = {"float64": 1e-12, "float32": 3e-5, "float16": 1e-12}[dtype]
    np.testing.assert_allclose(got, want, rtol=rtol)


def test_signature_of_plain_and_nested_batches():
    """The per-step signature: the (tensor, tensor) shortcut gives the general key,
    and batches differing in nesting, shapes without the example axis or dtypes differ."""
    step = cabs_tf.PerExampleStats(mlp(), xent)
    x, y = tf.zeros((5, 4)), tf.zeros((5,), tf.int32)
    general = str(tf.nest.map_structure(lambda _: 0, (x, y)))
    assert step.signature(x, y)[2] == general
    assert step.signature(x, y) == step.signature(tf.ones((7, 4)), np.zeros(7, np.int32))
    others = [((x,), y), ({"a": x}, y), (tf.zeros((5, 3)), y), (x, tf.zeros((5,), tf.int64)), (tf.zeros((5, 4, 1)), y)]
    keys = {step.signature(x, y)} | {step.signature(a, b) for a, b in others}
    assert len(keys) == 1 + len(others)


# -- the property test ---------------------------------------------------------------

STEPS = ["dense", "dense_shared", "ln", "conv", "fold", "time_major", "expand_dims", "halves", "buffer",
         "kernel_outside", "swap"]


class Random(keras.Model):
    """h (m, T, d) through a random program of supported layers and reshapes,
    transposes, broadcasts, weight uses outside a layer and repeated calls."""

    def __init__(self, program, t, d, buffer_len):
        super().__init__(dtype="float64")
        self.program, self.t, self.d = program, t, d
        self.dense = [kl.Dense(d, activation="tanh", dtype="float64", name=f"dense{i}") for i in range(2)]
        self.ln = kl.LayerNormalization(dtype="float64", name="ln")
        self.conv = kl.Conv1D(d, 2, padding="same", dtype="float64", name="conv")
        self.head = kl.Dense(3, dtype="float64", name="head")
        self.buffer = tf.constant(np.cos(np.arange(buffer_len * d)).reshape(buffer_len, d))

    def call(self, h):
        t, d = self.t, self.d
        for k, op in enumerate(self.program):
            f = self.dense[k % 2]
            if op == "dense":
                h = f(h)
            elif op == "dense_shared":
                h = self.dense[0](h) + self.dense[0](h * 0.5)
            elif op == "ln":
                h = self.ln(h)
            elif op == "conv":
                h = self.conv(h)
            elif op == "fold":
                h = ops.reshape(f(ops.reshape(h, (-1, d))), (-1, t, d))
            elif op == "time_major":
                h = ops.transpose(f(ops.transpose(h, (1, 0, 2))), (1, 0, 2))
            elif op == "expand_dims":
                h = ops.squeeze(f(ops.expand_dims(h, 0)), 0)
            elif op == "halves":
                n = ops.shape(h)[0] // 2
                h = ops.concatenate([f(h[:n]), f(h[n:])], axis=0)
            elif op == "buffer":
                h = h + ops.mean(f(self.buffer), axis=0)
            elif op == "kernel_outside":
                h = f(h) + ops.matmul(h, f.kernel)
            elif op == "swap" and t == d:  # a per-example transpose keeps the example axis
                h = ops.transpose(f(ops.transpose(h, (0, 2, 1))), (0, 2, 1))
        return self.head(ops.mean(h, axis=1))


@st.composite
def cases(draw):
    t = draw(st.integers(2, 4))
    d = draw(st.sampled_from([t, 3]))
    buffer_len = draw(st.integers(2, 5))
    m = draw(st.sampled_from(sorted({2, 3, 4, 5, 6, t, d, buffer_len})))
    program = draw(st.lists(st.sampled_from(STEPS), min_size=1, max_size=3))
    method = draw(st.sampled_from(["auto", "fast"]))
    mode = draw(st.sampled_from(["graph", "eager"]))
    if draw(st.integers(0, 3)) == 0:  # a token model: ties (visible or not), positional embedding
        program = ("lm", draw(st.sampled_from([True, "layer", False])), draw(st.booleans()))
    return t, d, buffer_len, m, tuple(program), method, mode


@settings(max_examples=25, deadline=None)
@given(cases())
def test_property_random_models_exact_or_stepped_aside(case):
    t, d, buffer_len, m, program, method, mode = case
    rng = np.random.default_rng(len(program) + m)
    keras.utils.set_random_seed(0)
    if program[0] == "lm":
        loss = lm_loss
        x, y = token_data(m, t, 5, seed=m)
        model = TiedLM(5, t, d, tied=program[1], positional=program[2])
    else:
        loss = xent
        x, y = rng.normal(size=(m, t, d)), rng.integers(0, 3, size=m).astype("int32")
        model = Random(program, t, d, buffer_len)
    model(x[:1])
    what, s = run_stats(model, loss, x, y, method, mode)
    if what == "refused":
        assert method == "fast"
        return
    assert not (method == "fast" and what == "fallback")
    want = oracle_s(model, loss, x, y)
    assert abs(s - want) <= 1e-9 * abs(want), (what, s, want)
    keras.backend.clear_session()
