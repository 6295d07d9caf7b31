"""TensorFlow trainer: the models of :mod:`.models` in Keras 3 (TensorFlow
backend), plain SGD in ``tf.function``, and CABS through :class:`cabs_tf.CABSTrainer`.

Batches are padded to a few sizes (:func:`cabs_core.geometric_buckets`, ratio 1.5)
with a 0/1 mask, so that the varying batch sizes trace a handful of graphs, not
one per size.
"""

from __future__ import annotations

import cabs_tf  # sets KERAS_BACKEND=tensorflow before keras is imported
import keras
import numpy as np
import tensorflow as tf

from cabs_core import CABSController, bucket_for, geometric_buckets, pad_indices

from ..data import Dataset
from .models import Conv, architecture

EVAL_CHUNK = 2048


def build_model(model: str, image_shape: tuple[int, int, int], num_classes: int, seed: int) -> keras.Sequential:
    """The layers of :func:`.models.architecture` on NHWC images, initialised from ``seed``."""
    arch = architecture(model, image_shape, num_classes)
    init = keras.initializers.GlorotUniform
    layers: list[keras.Layer] = [keras.Input(image_shape)]
    flat = False
    for k, layer in enumerate(arch):
        if isinstance(layer, Conv):
            layers += [keras.layers.Conv2D(layer.filters, layer.kernel, padding="same", activation="relu",
                                           kernel_initializer=init(seed=seed + k)),
                       keras.layers.MaxPooling2D(2)]
        else:
            if not flat:
                layers.append(keras.layers.Flatten())
                flat = True
            act = "relu" if k < len(arch) - 1 else None
            layers.append(keras.layers.Dense(layer.units, activation=act, kernel_initializer=init(seed=seed + k)))
    return keras.Sequential(layers)


def _per_example_loss(y_true: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    return keras.losses.sparse_categorical_crossentropy(y_true, logits, from_logits=True)


class TensorFlowTrainer:
    """:class:`cabs_experiments.backends.Trainer` for TensorFlow (float32)."""

    def __init__(self, dataset: Dataset, model: str) -> None:
        self.model_name, self.image_shape, self.num_classes = model, dataset.image_shape, dataset.num_classes
        self.train = (dataset.x_train, dataset.y_train.astype(np.int32))
        self.x = {"train": tf.constant(dataset.x_train), "test": tf.constant(dataset.x_test)}
        self.y = {"train": tf.constant(dataset.y_train, tf.int32), "test": tf.constant(dataset.y_test, tf.int32)}
        self.sizes = geometric_buckets(1, max(len(dataset.y_train), 2048), ratio=1.5)
        self.reset(0)

    def reset(self, seed: int) -> None:
        keras.utils.set_random_seed(seed)
        self.model = build_model(self.model_name, self.image_shape, self.num_classes, seed)
        self.variables = list(self.model.trainable_variables)
        self.num_parameters = int(sum(np.prod(v.shape) for v in self.variables))
        # fresh graphs per model: the variables are captured by the traced functions
        self._sgd = tf.function(self._sgd_step)
        self._eval = tf.function(self._eval_chunk)

    def _padded(self, indices: np.ndarray) -> tuple[tf.Tensor, tf.Tensor]:
        idx, real = pad_indices(indices, bucket_for(len(indices), self.sizes))
        return tf.constant(idx.astype(np.int32)), tf.constant(real, tf.float32)

    def _sgd_step(self, idx: tf.Tensor, mask: tf.Tensor, lr: tf.Tensor) -> tf.Tensor:
        x, y = tf.gather(self.x["train"], idx), tf.gather(self.y["train"], idx)
        with tf.GradientTape() as tape:
            losses = _per_example_loss(y, self.model(x, training=True))
            loss = tf.reduce_sum(mask * losses) / tf.reduce_sum(mask)
        grads = tape.gradient(loss, self.variables)
        for v, g in zip(self.variables, grads):
            v.assign_sub(lr * g)
        return loss

    def sgd_step(self, indices: np.ndarray, lr: float) -> float:
        idx, mask = self._padded(indices)
        return float(self._sgd(idx, mask, tf.constant(lr, tf.float32)))

    def cabs_run(self, controller: CABSController, seed: int) -> cabs_tf.CABSTrainer:
        """CABS on the train split with this trainer's model (``batch_size``, ``examples_seen``,
        ``step()``): plain SGD at ``controller.lr``, the sampler seeded with ``seed``."""
        return cabs_tf.CABSTrainer(self.model, _per_example_loss, controller, self.train, seed=seed,
                                   buckets=self.sizes)

    def _eval_chunk(self, x: tf.Tensor, y: tf.Tensor, idx: tf.Tensor, mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        xb, yb = tf.gather(x, idx), tf.gather(y, idx)
        out = self.model(xb, training=False)
        correct = tf.cast(tf.equal(tf.argmax(out, axis=1, output_type=tf.int32), yb), tf.float32)
        return tf.reduce_sum(mask * _per_example_loss(yb, out)), tf.reduce_sum(mask * correct)

    def evaluate(self, split: str, indices: np.ndarray | None = None) -> tuple[float, float]:
        x, y = self.x[split], self.y[split]
        idx_all = np.arange(int(y.shape[0])) if indices is None else np.asarray(indices)
        loss_sum = correct = 0.0
        for s in range(0, len(idx_all), EVAL_CHUNK):
            part = idx_all[s : s + EVAL_CHUNK]
            size = EVAL_CHUNK if len(idx_all) > EVAL_CHUNK else bucket_for(len(part), self.sizes)
            idx = np.concatenate([part, np.full(size - len(part), part[0])]).astype(np.int32)
            ls, c = self._eval(x, y, tf.constant(idx), tf.constant(np.arange(size) < len(part), tf.float32))
            loss_sum += float(ls)
            correct += float(c)
        return loss_sum / len(idx_all), correct / len(idx_all)


def make_trainer(dataset: Dataset, model: str, threads: int | None = None) -> TensorFlowTrainer:
    if threads is not None:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:  # TensorFlow already started: its thread pools are fixed
            pass
    return TensorFlowTrainer(dataset, model)
