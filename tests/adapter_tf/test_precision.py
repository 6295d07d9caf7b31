"""Mixed precision (issue 14, item 2): under ``keras.mixed_precision`` policy
``mixed_float16`` (float32 variables, float16 computation) the statistics are exact:
count, loss sum and S summed in float32 (float64 in the host vector), squares of the
float16 activations and output gradients formed in float32, on the fast, generic and
auto paths, eagerly and inside ``tf.function``.

The oracle is a loop over single examples of the same architecture in float64 with
the same weights. float16 computation carries ~3 significant digits, so the
documented tolerance (docs/tensorflow.md, "Mixed precision") is ``RTOL_MIXED``
relative on the loss sum, S and ||sum g||; the count is exact.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import keras
import numpy as np
import pytest
import tensorflow as tf
from cabs_tf import PerExampleStats
from keras import ops

from cabs_core import FastPathFallbackWarning

#: documented tolerance (docs/tensorflow.md): mixed_float16 statistics vs the float64 model
RTOL_MIXED = 1e-2


@pytest.fixture
def mixed_float16() -> Iterator[None]:
    """The global policy mixed_float16 for the test, float32 again afterwards (even on failure)."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def xent(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)


def half_mse(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    """A loss computed in the predictions' dtype: float16 per-example losses under mixed_float16."""
    target = ops.one_hot(ops.cast(y_true, "int32"), 3, dtype=y_pred.dtype)
    return 0.5 * ops.sum(ops.square(y_pred - target), axis=-1)


def dense_model(dtype: str | None = None) -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((6,), dtype=dtype or "float32"),
                             keras.layers.Dense(8, activation="relu", dtype=dtype),
                             keras.layers.Dense(3, dtype=dtype)])


def conv_model(dtype: str | None = None) -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((6, 6, 1), dtype=dtype or "float32"),
                             keras.layers.Conv2D(3, 3, activation="relu", dtype=dtype),
                             keras.layers.Flatten(dtype=dtype), keras.layers.Dense(3, dtype=dtype)])


CASES: dict[str, tuple[Callable[..., keras.Model], Callable[..., tf.Tensor], int]] = {
    "dense_xent": (dense_model, xent, 67),
    "conv_half_mse": (conv_model, half_mse, 67),
}


def oracle(make: Callable[..., keras.Model], loss: Callable[..., tf.Tensor], model: keras.Model,
           x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """[count, loss sum, S, ||sum g||^2] and sum g from single examples of the float64 twin."""
    twin = make("float64")
    twin.set_weights([np.asarray(w, np.float64) for w in model.get_weights()])
    loss_sum, s, grad_sum = 0.0, 0.0, [np.zeros(v.shape) for v in twin.trainable_variables]
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            li = loss(y[i : i + 1], twin(x[i : i + 1].astype(np.float64), training=True))[0]
        gs = [np.asarray(g) for g in tape.gradient(li, twin.trainable_variables)]
        loss_sum += float(li)
        s += sum(float(np.sum(g * g)) for g in gs)
        grad_sum = [a + g for a, g in zip(grad_sum, gs)]
    g2 = sum(float(np.sum(g * g)) for g in grad_sum)
    return np.array([len(x), loss_sum, s, g2]), grad_sum


@pytest.mark.usefixtures("mixed_float16")
@pytest.mark.parametrize("case", CASES)
def test_mixed_float16_matches_float64_oracle(case: str) -> None:
    make, loss, m = CASES[case]
    model = make()
    assert model.layers[0].compute_dtype == "float16" and model.trainable_variables[0].dtype == "float32"
    rng = np.random.default_rng(1)
    x = rng.normal(size=(m, *model.inputs[0].shape[1:])).astype(np.float32)
    y = rng.integers(0, 3, size=m).astype(np.int32)
    want, want_grads = oracle(make, loss, model, x, y)
    # every path eagerly; fast and generic also traced (the probe then runs at trace time on synthetic inputs)
    for method, graph in (("fast", False), ("generic", False), ("auto", False), ("fast", True), ("generic", True)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FastPathFallbackWarning)  # auto must not fall back
            step = PerExampleStats(model, loss, method=method)
            if graph:  # traced: the probe runs at trace time on synthetic inputs
                step = tf.function(step, autograph=False)
            grads, vector = step(tf.constant(x), tf.constant(y))
        got = vector.numpy()
        where = f"{method}, {'tf.function' if graph else 'eager'}"
        assert vector.dtype == tf.float64
        assert got[0] == m, where  # exact
        np.testing.assert_allclose(got[1:], want[1:], rtol=RTOL_MIXED, err_msg=where)
        assert all(g.dtype == v.dtype for g, v in zip(grads, model.trainable_variables)), where
        diff = np.sqrt(sum(np.sum((np.asarray(g, np.float64) - w) ** 2) for g, w in zip(grads, want_grads)))
        assert diff <= RTOL_MIXED * np.sqrt(want[3]), where
