"""Unsupported layers: fallback, refusal, BatchNormalization, pfor fallback warning."""

import warnings

import cabs_tf
import keras
import numpy as np
import pytest
import tensorflow as tf
from tf_adapter_helpers import brute_force, data_for, xent

import cabs_core


class Scale(keras.layers.Layer):
    """A layer the fast path does not know: y = x * s (elementwise)."""

    def build(self, shape):
        self.s = self.add_weight(shape=(shape[-1],), initializer="ones", dtype=self.dtype)

    def call(self, x):
        return x * self.s


class SortLayer(Scale):
    """Uses tf.sort, which pfor cannot vectorise."""

    def call(self, x):
        return tf.sort(x * self.s, axis=-1)


def model_with(layer):
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((6,), dtype="float64"),
        keras.layers.Dense(5, activation="tanh", dtype="float64"),
        layer,
        keras.layers.Dense(3, dtype="float64"),
    ])


def test_unknown_layer_falls_back_to_generic_and_is_exact():
    model = model_with(Scale(dtype="float64"))
    step = cabs_tf.PerExampleStats(model, xent)
    assert step.method == "generic" and "Scale" in step.refusals[0]
    x, y = data_for(model, 5)
    _, vec = tf.function(step)(x, y)
    np.testing.assert_allclose(vec.numpy()[2], brute_force(model, xent, x, y).sq_norm_sum, rtol=1e-10)


def test_unknown_layer_refused_under_fast():
    model = model_with(Scale(dtype="float64", name="my_scale"))
    with pytest.raises(cabs_tf.UnsupportedModelError, match="my_scale.*Scale is not one of Dense"):
        cabs_tf.PerExampleStats(model, xent, method="fast")


def test_frozen_unknown_layer_keeps_fast_path():
    layer = Scale(dtype="float64")
    model = model_with(layer)
    layer.trainable = False
    step = cabs_tf.PerExampleStats(model, xent)
    assert step.method == "fast"
    x, y = data_for(model, 5)
    _, vec = tf.function(step)(x, y)
    np.testing.assert_allclose(vec.numpy()[2], brute_force(model, xent, x, y).sq_norm_sum, rtol=1e-10)


def test_batchnorm_in_training_mode_is_refused_with_options():
    bn = keras.layers.BatchNormalization(dtype="float64", name="bn")
    model = model_with(bn)
    for method in ("auto", "fast", "generic"):
        with pytest.raises(cabs_tf.UnsupportedModelError, match=r"'bn'.*trainable = False.*LayerNormalization"):
            cabs_tf.PerExampleStats(model, xent, method=method)
    bn.trainable = False  # inference mode: examples are independent again
    x, y = data_for(model, 4)
    step = cabs_tf.PerExampleStats(model, xent)
    _, vec = tf.function(step)(x, y)
    np.testing.assert_allclose(vec.numpy()[2], brute_force(model, xent, x, y).sq_norm_sum, rtol=1e-10)


def test_regulariser_is_refused():
    model = model_with(keras.layers.Dense(4, kernel_regularizer="l2", dtype="float64", name="reg"))
    with pytest.raises(cabs_tf.UnsupportedModelError, match="'reg' has a kernel_regularizer"):
        cabs_tf.PerExampleStats(model, xent)


def test_pfor_fallback_is_detected_and_still_exact():
    model = model_with(SortLayer(dtype="float64"))
    step = cabs_tf.PerExampleStats(model, xent, chunk_size=2)
    x, y = data_for(model, 4)
    with pytest.warns(cabs_tf.PforFallbackWarning, match="MUCH slower"):
        _, vec = tf.function(step)(x, y)
    assert step.fallback_detected
    want = brute_force(model, xent, x, y)
    np.testing.assert_allclose(vec.numpy()[2], want.sq_norm_sum, rtol=1e-10)


def test_pfor_converter_loop_is_detected():
    """pfor converts Conv2DBackpropFilter with a while loop and only logs it: we warn."""
    from tf_adapter_helpers import mnist_cnn

    model = mnist_cnn()
    x, y = data_for(model, 3)
    step = cabs_tf.PerExampleStats(model, xent, method="generic")
    with pytest.warns(cabs_tf.PforFallbackWarning, match="Conv2DBackpropFilter"):
        tf.function(step)(x, y)
    fast = cabs_tf.PerExampleStats(model, xent)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cabs_tf.PforFallbackWarning)
        tf.function(fast)(x, y)
    assert not fast.fallback_detected


def test_bad_arguments():
    model = model_with(keras.layers.Dense(4, dtype="float64"))
    with pytest.raises(ValueError, match="method must be"):
        cabs_tf.PerExampleStats(model, xent, method="exact")
    with pytest.raises(ValueError, match="chunk_size"):
        cabs_tf.PerExampleStats(model, xent, chunk_size=0)
    unbuilt = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="build it"):
        cabs_tf.PerExampleStats(unbuilt, xent)
    with pytest.raises(ValueError, match="mask must have shape"):
        x, y = data_for(model, 4)
        tf.function(cabs_tf.PerExampleStats(model, xent))(x, y, np.ones((4, 1)))


def test_vector_feeds_the_controller():
    model = model_with(keras.layers.Dense(4, dtype="float64"))
    x, y = data_for(model, 8)
    _, vec = tf.function(cabs_tf.PerExampleStats(model, xent))(x, y)
    ctl = cabs_core.CABSController(lr=0.1, bs_min=2, bs_max=64)
    _, info = ctl.update(ctl.init(), cabs_core.ScalarStats.from_vector(vec.numpy()))
    _, want = ctl.update(ctl.init(), brute_force(model, xent, x, y))
    assert info.batch_size == want.batch_size and np.isclose(info.variance, want.variance, rtol=1e-9)
