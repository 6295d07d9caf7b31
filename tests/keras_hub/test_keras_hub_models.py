"""keras-hub's GPT2Backbone with its tied head (``token_embedding(h, reverse=True)``,
the layout of ``GPT2CausalLM``) on the exact fast path of ``cabs_tf``: a small
random-init backbone (no weights downloaded) in float64, its S, loss sum and summed
gradient against a loop over single examples. Skipped when keras_hub is not
installed (an optional extra: see docs/tensorflow.md for the pins)."""

import os

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

keras_hub = pytest.importorskip(
    "keras_hub", reason="keras_hub is not installed (pip install keras-hub==0.32.0 beside the pinned tensorflow-cpu "
    "and keras; see docs/tensorflow.md)")

import cabs_tf  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import cabs_core  # noqa: E402

VOCAB, T, LAYERS, HEADS, HIDDEN = 13, 6, 2, 2, 8


@pytest.fixture(autouse=True)
def _reset_keras():
    yield
    keras.backend.clear_session()


def gpt2_lm() -> keras.Model:
    """GPT2Backbone (2 layers, 2 heads, width 8, no dropout) and logits from the token
    table: ``backbone.token_embedding(h, reverse=True)``."""
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB, num_layers=LAYERS, num_heads=HEADS, hidden_dim=HIDDEN, intermediate_dim=2 * HIDDEN,
        dropout=0.0, max_sequence_length=2 * T, dtype="float64")
    inputs = {"token_ids": keras.Input((T,), dtype="int32", name="token_ids"),
              "padding_mask": keras.Input((T,), dtype="int32", name="padding_mask")}
    logits = backbone.token_embedding(backbone(inputs), reverse=True)
    return keras.Model(inputs, logits)


def lm_loss(y, logits):
    """Token cross-entropy summed over the positions: (m,)."""
    return keras.ops.sum(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True), axis=1)


def data(m: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 4, size=(m, T)).astype("int32")  # few ids: repeats within an example
    keep = (rng.random((m, T)) > 0.3).astype("int32")
    keep[:, 0] = 1
    return {"token_ids": ids, "padding_mask": keep}, rng.integers(0, VOCAB, size=(m, T)).astype("int32")


def oracle(model, x, y):
    """BatchStats from a float64 loop over single examples."""
    losses, grads = [], []
    for i in range(len(y)):
        xi = {k: v[i : i + 1] for k, v in x.items()}
        with tf.GradientTape() as tape:
            li = lm_loss(y[i : i + 1], model(xi, training=True))[0]
        g = tape.gradient(li, model.trainable_variables)
        losses.append(float(li))
        grads.append([np.asarray(tf.convert_to_tensor(t), dtype=np.float64) for t in g])
    per_param = [np.stack([gi[k] for gi in grads]) for k in range(len(grads[0]))]
    return cabs_core.batch_stats_from_per_example(np.asarray(losses), per_param)


@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_gpt2_backbone_with_tied_head_is_exact_on_the_fast_path(mode):
    model = gpt2_lm()
    tables = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.ReversibleEmbedding)]
    assert len(tables) == 1 and tables[0].tie_weights  # the head reads the token table
    x, y = data(5)
    step = cabs_tf.PerExampleStats(model, lm_loss, method="fast")
    call = tf.function(step) if mode == "graph" else step
    with warnings.catch_warnings():
        warnings.simplefilter("error", cabs_core.FastPathFallbackWarning)
        grads, vec = call(x, y)
    assert step.method == "fast" and list(step.verdicts.values()) == [None]
    want = oracle(model, x, y)
    vec = vec.numpy()
    np.testing.assert_allclose(vec[0], want.count)
    np.testing.assert_allclose(vec[1], want.loss_sum, rtol=1e-9)
    np.testing.assert_allclose(vec[2], want.sq_norm_sum, rtol=1e-9)
    np.testing.assert_allclose(vec[3], sum(float(np.sum(g**2)) for g in want.grad_sum), rtol=1e-9)
    for g, w in zip(grads, want.grad_sum):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-9, atol=1e-12)


def test_keras_hub_reversible_embedding_subclass_is_covered():
    """keras_hub.layers.ReversibleEmbedding (a subclass of keras's that overrides nothing) as a tied LM head."""
    keras.utils.set_random_seed(0)
    emb = keras_hub.layers.ReversibleEmbedding(VOCAB, HIDDEN, dtype="float64")
    ids = keras.Input((T,), dtype="int32")
    h = keras.layers.Dense(HIDDEN, activation="tanh", dtype="float64")(emb(ids))
    model = keras.Model(ids, emb(h, reverse=True))
    x, y = data(4, seed=1)
    x = x["token_ids"]
    step = cabs_tf.PerExampleStats(model, lm_loss, method="fast")
    _, vec = tf.function(step)(x, y)
    assert list(step.verdicts.values()) == [None]
    grads = []
    for i in range(len(y)):
        with tf.GradientTape() as tape:
            li = lm_loss(y[i : i + 1], model(x[i : i + 1], training=True))[0]
        grads.append(sum(float(tf.reduce_sum(g**2)) for g in tape.gradient(li, model.trainable_variables)))
    np.testing.assert_allclose(vec.numpy()[2], sum(grads), rtol=1e-9)
