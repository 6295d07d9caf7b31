"""The conformance zoo in Keras 3 (TensorFlow backend), from portable parameters.

Keras already uses the portable layout (dense kernels (in, out), conv kernels
HWIO, NHWC images), so parameters load as they are.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers as kl  # noqa: E402

from .zoo import LN_EPS, MODELS  # noqa: E402


def build(model: str, params: dict[str, np.ndarray], dtype: str = "float64") -> keras.Model:
    """The Keras model ``model`` holding a copy of ``params`` (portable layout)."""
    spec = MODELS[model]
    kw = {"dtype": dtype}
    if model == "mlp":
        body = [
            kl.Dense(512, "relu", name="dense1", **kw),
            kl.Dense(512, "relu", name="dense2", **kw),
            kl.Dense(10, name="dense3", **kw),
        ]
    elif model in ("mnist_cnn", "cifar_cnn"):
        pool = 2 if model == "mnist_cnn" else 3
        width = 32 if model == "mnist_cnn" else 64
        body = [
            kl.Conv2D(width, 5, padding="same", activation="relu", name="conv1", **kw),
            kl.MaxPooling2D(pool, strides=2, padding="same", **kw),
            kl.Conv2D(64, 5, padding="same", activation="relu", name="conv2", **kw),
            kl.MaxPooling2D(pool, strides=2, padding="same", **kw),
            kl.Flatten(**kw),
        ]
        hidden = (1024,) if model == "mnist_cnn" else (384, 192)
        body += [kl.Dense(h, "relu", name=f"dense{k}", **kw) for k, h in enumerate(hidden, 1)]
        body += [kl.Dense(10, name=f"dense{len(hidden) + 1}", **kw)]
    else:  # embed_ln
        body = [
            kl.Embedding(spec.vocab, 16, name="embed", **kw),
            kl.LayerNormalization(epsilon=LN_EPS, name="norm", **kw),
            kl.Dense(32, "relu", name="dense1", **kw),
            kl.GlobalAveragePooling1D(**kw),
            kl.Dense(10, name="dense2", **kw),
        ]
    inputs = keras.Input(spec.input_shape, dtype="int64" if spec.input_kind == "tokens" else dtype)
    x = inputs
    for layer in body:
        x = layer(x)
    net = keras.Model(inputs, x, name=model)
    for layer in net.layers:
        for v in layer.trainable_weights:
            v.assign(params[f"{layer.name}/{_portable_name(v)}"].astype(dtype))
    return net


def _portable_name(v: keras.Variable) -> str:
    name = v.path.split("/")[-1]
    return {"gamma": "scale", "beta": "bias", "embeddings": "embedding"}.get(name, name)


def export(net: keras.Model) -> dict[str, np.ndarray]:
    """The model's parameters in the portable layout (float64)."""
    return {
        f"{layer.name}/{_portable_name(v)}": np.asarray(v.numpy(), np.float64)
        for layer in net.layers
        for v in layer.trainable_weights
    }


def per_example_loss(y_true: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Softmax cross-entropy per example, shape (m,)."""
    return keras.losses.sparse_categorical_crossentropy(y_true, logits, from_logits=True)


def _data(x: np.ndarray, y: np.ndarray, dtype: str) -> tuple[tf.Tensor, tf.Tensor]:
    return (tf.constant(x) if x.dtype.kind == "i" else tf.constant(x, dtype=dtype)), tf.constant(y)


def statistics(
    model: str,
    params: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    mask: np.ndarray | None,
    dtype: str,
    method: str = "auto",
) -> dict:
    """The step's statistics through ``cabs_tf.PerExampleStats`` in ``tf.function``; one host copy of four scalars."""
    import cabs_tf

    net = build(model, params, dtype)
    step = cabs_tf.PerExampleStats(net, per_example_loss, method=method)
    w = None if mask is None else tf.constant(mask, dtype=dtype)
    grads, vector = tf.function(step)(*_data(x, y, dtype), w)
    count, loss_sum, sq_norm_sum, _ = vector.numpy()
    names = [f"{layer.name}/{_portable_name(v)}" for layer in net.layers for v in layer.trainable_weights]
    order = [id(v) for layer in net.layers for v in layer.trainable_weights]
    by_id = {id(v): g for v, g in zip(step.variables, grads)}
    return {
        "method": step.method,
        "count": float(count),
        "loss_sum": float(loss_sum),
        "sq_norm_sum": float(sq_norm_sum),
        "grad_sum": {n: np.asarray(by_id[i].numpy(), np.float64) for n, i in zip(names, order)},
    }


def train(
    model: str,
    params: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    controller,
    steps: int,
    seed: int,
    dtype: str = "float64",
) -> tuple[list[int], dict[str, np.ndarray]]:
    """``steps`` CABS steps with ``cabs_tf.CABSTrainer`` (bucketed tf.function, one host copy per step)."""
    import cabs_tf

    net = build(model, params, dtype)
    trainer = cabs_tf.CABSTrainer(net, per_example_loss, controller, _data(x, y, dtype), seed=seed)
    sizes = []
    for _ in range(steps):
        sizes.append(trainer.state.batch_size)
        trainer.step()
    return sizes, export(net)


def refusal() -> str:
    """The adapter's answer to BatchNorm in training mode: the error message."""
    import cabs_tf

    inputs = keras.Input((6,), dtype="float64")
    h = kl.BatchNormalization(dtype="float64")(kl.Dense(5, dtype="float64")(inputs))
    net = keras.Model(inputs, kl.Dense(3, dtype="float64")(h))
    try:
        step = cabs_tf.PerExampleStats(net, per_example_loss)
        step(tf.ones((8, 6), tf.float64), tf.zeros(8, tf.int64))
    except ValueError as e:
        return f"{type(e).__name__}: {e}"
    raise AssertionError("cabs_tf returned statistics for a model with BatchNormalization in training mode")
