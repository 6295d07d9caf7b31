"""Models and the brute-force oracle for the TensorFlow adapter's tests."""

import os

os.environ["KERAS_BACKEND"] = "tensorflow"

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import cabs_core  # noqa: E402

F64 = "float64"


def xent(y_true, y_pred):
    return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)


def mlp(seed=0, d_in=12, hidden=16, classes=5, dtype=F64):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((d_in,), dtype=dtype),
        keras.layers.Dense(hidden, activation="tanh", dtype=dtype),
        keras.layers.Dense(hidden, activation="relu", dtype=dtype),
        keras.layers.Dense(classes, dtype=dtype),
    ])


def mnist_cnn(seed=0, size=12, c1=4, c2=6, dense=16, classes=10, dtype=F64):
    """The paper's MNIST CNN (NHWC): conv5x5x32, pool, conv5x5x64, pool, dense
    1024, dense 10 -- with small widths and images for tests."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((size, size, 1), dtype=dtype),
        keras.layers.Conv2D(c1, 5, padding="same", activation="relu", dtype=dtype),
        keras.layers.MaxPooling2D(2, dtype=dtype),
        keras.layers.Conv2D(c2, 5, padding="same", activation="relu", dtype=dtype),
        keras.layers.MaxPooling2D(2, dtype=dtype),
        keras.layers.Flatten(dtype=dtype),
        keras.layers.Dense(dense, activation="relu", dtype=dtype),
        keras.layers.Dense(classes, dtype=dtype),
    ])


def embed_ln(seed=0, vocab=11, t=5, d=6, classes=3, dtype=F64):
    """Embedding + LayerNormalization + Dense over tokens + Conv1D, pooled."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((t,), dtype="int32"),
        keras.layers.Embedding(vocab, d, dtype=dtype),
        keras.layers.LayerNormalization(dtype=dtype),
        keras.layers.Dense(d, activation="gelu", dtype=dtype),
        keras.layers.Conv1D(4, 2, strides=1, dilation_rate=2, padding="same", dtype=dtype),
        keras.layers.GlobalAveragePooling1D(dtype=dtype),
        keras.layers.Dense(classes, dtype=dtype),
    ])


def data_for(model, m, seed=1, classes=None):
    rng = np.random.default_rng(seed)
    shape = model.inputs[0].shape[1:]
    if model.inputs[0].dtype.startswith("int"):
        vocab = model.layers[0].input_dim
        x = rng.integers(0, 4 if vocab > 4 else vocab, size=(m, *shape)).astype("int32")  # repeated ids
    else:
        x = rng.normal(size=(m, *shape))
    k = classes or model.outputs[0].shape[-1]
    y = rng.integers(0, k, size=(m,)).astype("int32")
    return x, y


def brute_force(model, loss, x, y, weights=None):
    """BatchStats from an explicit Python loop over single examples (float64)."""
    losses, grads = [], []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            li = loss(y[i : i + 1], model(x[i : i + 1], training=True))[0]
        g = tape.gradient(li, model.trainable_variables)
        losses.append(float(li))
        grads.append([np.asarray(tf.convert_to_tensor(t), dtype=np.float64) for t in g])
    per_param = [np.stack([gi[k] for gi in grads]) for k in range(len(grads[0]))]
    return cabs_core.batch_stats_from_per_example(np.asarray(losses), per_param, weights)
