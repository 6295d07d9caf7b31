"""Issue 15: conv kernels' per-example gradients from one ``Conv2DBackpropFilter``
per example (``cabs_tf.stats._conv_loop``) and their batch gradient summed from
them. Which conv takes that path (dilation 1, the Gram form not cheaper) and
which the Gram form on the patches or the offset views (dilated); every value,
the summed gradient included, against a float64 loop over single examples, with
padding rows masked out."""

import cabs_tf
import keras
import numpy as np
import tensorflow as tf
from keras import layers as kl
from test_attention import assert_matches, oracle
from tf_adapter_helpers import xent

F64 = "float64"


def conv_zoo():
    """Conv1D (strided, valid) and Conv2D (strided, same) each called twice (shared
    weights), a grouped Conv2D, a dilated Conv2D (offset views) and a Conv2D whose
    Gram form is cheaper (2 positions, 27 x 8 weights)."""
    keras.utils.set_random_seed(0)
    seq, img = keras.Input((9, 3), dtype=F64), keras.Input((6, 6, 4), dtype=F64)
    c1 = kl.Conv1D(5, 3, strides=2, padding="valid", activation="tanh", dtype=F64, name="c1d")
    c2 = kl.Conv2D(4, 3, strides=2, padding="same", activation="tanh", dtype=F64, name="c2d")
    grouped = kl.Conv2D(4, 2, groups=2, dtype=F64, name="grouped")
    dilated = kl.Conv2D(3, 2, dilation_rate=2, padding="same", dtype=F64, name="dilated")
    gram = kl.Conv2D(8, 3, strides=(3, 1), padding="valid", dtype=F64, name="gram")
    s = c1(seq) + c1(seq[:, ::-1])
    h = c2(img) + c2(img * 0.5)
    parts = [kl.Flatten(dtype=F64)(t) for t in (s, grouped(h), dilated(img), gram(img[:, :, :3, :3]))]
    out = kl.Dense(3, dtype=F64)(kl.Concatenate(dtype=F64)(parts))
    return keras.Model([seq, img], out)


def test_conv_kernels_by_example_are_exact_with_a_mask():
    model = conv_zoo()
    rng = np.random.default_rng(2)
    m = 7
    x = (rng.normal(size=(m, 9, 3)), rng.normal(size=(m, 6, 6, 4)))
    y = rng.integers(0, 3, size=(m,)).astype("int32")
    keep = np.array([1, 1, 0, 1, 0, 1, 1], "float64")
    step = cabs_tf.PerExampleStats(model, xent, method="fast")
    grads, vec = tf.function(step)(x, y, keep)
    assert list(step.verdicts.values()) == [None]
    by_example = set().union(*step._by_example.values())
    names = {id(layer.kernel): layer.name for layer in model.layers if hasattr(layer, "kernel")}
    assert {names[k] for k in by_example} == {"c1d", "c2d", "grouped"}  # not dilated, not gram
    assert_matches([g.numpy() for g in grads], vec.numpy(), oracle(model, xent, x, y, keep))
