"""Per-example statistics against a brute-force loop over single examples."""

import cabs_tf
import numpy as np
import pytest
import tensorflow as tf
from tf_adapter_helpers import brute_force, data_for, embed_ln, mlp, mnist_cnn, xent

import cabs_core

# the generic path on conv nets warns (pfor loops over Conv2DBackpropFilter); tested in test_layers
pytestmark = pytest.mark.filterwarnings("ignore::cabs_tf.stats.PforFallbackWarning")

MODELS = {"mlp": mlp, "cnn": mnist_cnn, "embed_ln": embed_ln}


def run(step, x, y, mask=None):
    args = (x, y) if mask is None else (x, y, mask)
    grads, vec = tf.function(step)(*args)
    return [g.numpy() for g in grads], vec.numpy()


def check(grads, vec, want):
    assert vec.dtype == np.float64 and vec.shape == (4,)
    s = cabs_core.ScalarStats.from_vector(vec)
    np.testing.assert_allclose(s.count, want.count)
    np.testing.assert_allclose(s.loss_sum, want.loss_sum, rtol=1e-10)
    np.testing.assert_allclose(s.sq_norm_sum, want.sq_norm_sum, rtol=1e-9)
    for g, w in zip(grads, want.grad_sum):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s.grad_sum_sq_norm, sum(float(np.sum(w * w)) for w in want.grad_sum), rtol=1e-9)


@pytest.mark.parametrize("method", ["fast", "generic"])
@pytest.mark.parametrize("name", list(MODELS))
def test_exact_against_brute_force(name, method):
    model = MODELS[name]()
    x, y = data_for(model, 7)
    step = cabs_tf.PerExampleStats(model, xent, method=method, chunk_size=3)
    assert step.method == method
    grads, vec = run(step, x, y)
    check(grads, vec, brute_force(model, xent, x, y))


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_masked_equals_unmasked_subset(name):
    model = MODELS[name]()
    x, y = data_for(model, 8)
    keep = np.array([1, 0, 1, 1, 0, 0, 1, 1], dtype=np.float64)
    want = brute_force(model, xent, x[keep == 1], y[keep == 1])
    for method in ("fast", "generic"):
        grads, vec = run(cabs_tf.PerExampleStats(model, xent, method=method, chunk_size=3), x, y, keep)
        check(grads, vec, want)
        assert vec[0] == 5.0


def test_chunked_equals_unchunked_and_fast():
    model = mnist_cnn()
    x, y = data_for(model, 10)
    _, fast = run(cabs_tf.PerExampleStats(model, xent, method="fast"), x, y)
    for c in (1, 3, 4, 10, 64):
        _, gen = run(cabs_tf.PerExampleStats(model, xent, method="generic", chunk_size=c), x, y)
        np.testing.assert_allclose(gen, fast, rtol=1e-10)


def test_shared_layer_and_strided_dilated_conv():
    """A Dense called twice (cross terms between calls) and Conv2D with stride/dilation/valid."""
    import keras

    keras.utils.set_random_seed(3)
    inp = keras.Input((9, 9, 2), dtype="float64")
    h = keras.layers.Conv2D(3, 3, strides=2, padding="valid", dtype="float64")(inp)
    h2 = keras.layers.Conv2D(3, (2, 3), dilation_rate=2, padding="same", dtype="float64")(inp)
    shared = keras.layers.Dense(4, activation="tanh", dtype="float64")
    a = shared(keras.layers.Flatten(dtype="float64")(h)[:, :5])
    b = shared(keras.layers.Flatten(dtype="float64")(h2)[:, 3:8])
    out = keras.layers.Dense(3, dtype="float64")(keras.layers.Concatenate(dtype="float64")([a, b]))
    model = keras.Model(inp, out)
    x, y = data_for(model, 5)
    grads, vec = run(cabs_tf.PerExampleStats(model, xent, method="fast"), x, y)
    check(grads, vec, brute_force(model, xent, x, y))


def test_variables_and_loss():
    rng = np.random.default_rng(0)
    w = tf.Variable(rng.normal(size=(4, 3)))
    b = tf.Variable(rng.normal(size=(3,)))

    def loss(x, y):
        return tf.reduce_sum((tf.tanh(x @ w + b) - y) ** 2, axis=1)

    x, y = rng.normal(size=(6, 4)), rng.normal(size=(6, 3))
    grads, vec = run(cabs_tf.PerExampleStats([w, b], loss, chunk_size=4), x, y)
    losses, per = [], [[], []]
    for i in range(6):
        with tf.GradientTape() as t:
            li = loss(x[i : i + 1], y[i : i + 1])[0]
        for k, g in enumerate(t.gradient(li, [w, b])):
            per[k].append(g.numpy())
        losses.append(li.numpy())
    check(grads, vec, cabs_core.batch_stats_from_per_example(np.array(losses), [np.stack(p) for p in per]))
    with pytest.raises(cabs_tf.UnsupportedModelError, match="needs a Keras model"):
        cabs_tf.PerExampleStats([w, b], loss, method="fast")


def test_float32_model_gives_float64_vector():
    model = mlp(dtype="float32")
    x, y = data_for(model, 6)
    x = x.astype("float32")
    _, vec = run(cabs_tf.PerExampleStats(model, xent), x, y)
    want = brute_force(model, xent, x, y)
    assert vec.dtype == np.float64
    np.testing.assert_allclose(vec[2], want.sq_norm_sum, rtol=1e-4)


def test_per_example_loss_shape_is_checked():
    model = mlp()
    x, y = data_for(model, 4)
    step = cabs_tf.PerExampleStats(model, lambda yt, yp: tf.reduce_mean(xent(yt, yp)))
    with pytest.raises(ValueError, match=r"per-example losses of shape \(m,\).*reduction=None"):
        run(step, x, y)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_conv_with_many_input_channels(padding):
    """C_in >= 16: the per-example conv gradient is materialised offset by offset."""
    import keras

    keras.utils.set_random_seed(4)
    inp = keras.Input((7, 8, 16), dtype="float64")
    h = keras.layers.Conv2D(3, (3, 2), strides=(2, 1), padding=padding, activation="tanh", dtype="float64")(inp)
    h2 = keras.layers.Conv2D(2, (2, 3), dilation_rate=(1, 2), padding=padding, dtype="float64")(inp)
    seq = keras.layers.Reshape((56, 16), dtype="float64")(inp)
    h1 = keras.layers.Conv1D(2, 3, strides=3, padding=padding, dtype="float64")(seq)
    flat = keras.layers.Concatenate(dtype="float64")(
        [keras.layers.Flatten(dtype="float64")(t) for t in (h, h2, h1)]
    )
    model = keras.Model(inp, keras.layers.Dense(3, dtype="float64")(flat))
    x, y = data_for(model, 4)
    grads, vec = run(cabs_tf.PerExampleStats(model, xent, method="fast"), x, y)
    check(grads, vec, brute_force(model, xent, x, y))


@pytest.mark.parametrize("method", ["fast", "generic"])
def test_numpy_batches_are_accepted(method):
    """Issue 14, item 5: NumPy batches and masks, eagerly and through tf.function."""
    model = mlp()
    x, y = data_for(model, 7)
    x, y = np.asarray(x), np.asarray(y)
    step = cabs_tf.PerExampleStats(model, xent, method=method)
    want = brute_force(model, xent, x, y)
    grads, vec = step(x, y, np.ones(7))
    check([g.numpy() for g in grads], vec.numpy(), want)
    check(*run(step, x, y, np.ones(7)), want)


@pytest.mark.parametrize("method", ["fast", "generic"])
def test_empty_batch_is_a_skipped_step(method):
    """Issue 14, item 4: an empty batch gives count 0 on every path, and the controller skips it."""
    model = mlp()
    x, y = data_for(model, 3)
    grads, vec = cabs_tf.PerExampleStats(model, xent, method=method)(x[:0], y[:0])
    assert vec.numpy().tolist() == [0.0, 0.0, 0.0, 0.0]
    assert [tuple(g.shape) for g in grads] == [tuple(v.shape) for v in model.trainable_variables]
    ctl = cabs_core.CABSController(lr=0.1)
    _, info = ctl.update(ctl.init(), cabs_core.ScalarStats.from_vector(vec.numpy()))
    assert info.skipped and info.reason == "count"


@pytest.mark.parametrize("method", ["fast", "generic"])
def test_nan_and_inf_in_padding_rows_change_nothing(method):
    """Issue 14, item 3: masked (weight 0) rows are selected away, not multiplied by 0 (0 * inf = nan)."""
    model = mlp()
    x, y = data_for(model, 7)
    x = np.array(x)
    w = np.array([1, 0, 1, 1, 0, 1, 1], np.float64)
    x[1].flat[0], x[4].flat[2] = np.nan, np.inf
    keep = w.astype(bool)
    want = brute_force(model, xent, x[keep], np.asarray(y)[keep])
    check(*run(cabs_tf.PerExampleStats(model, xent, method=method), x, y, w), want)
