"""JAX trainer: the models of :mod:`.models` in Flax linen, plain SGD under
``jax.jit`` for the baselines, and CABS runs through :class:`cabs_jax.CABSTrainer`.

Batches are gathered on the device from padded index vectors with a 0/1 mask,
padded to a few sizes (:func:`cabs_core.geometric_buckets` with ratio 1.5),
so that the varying CABS batch sizes compile a
handful of programs, not one per size.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from cabs_jax import CABSTrainer, FlaxLoss

from cabs_core import CABSController, StepInfo, bucket_for, geometric_buckets, pad_indices

from ..data import Dataset
from .models import Conv, Layer, architecture

EVAL_CHUNK = 2048


class Net(nn.Module):
    """The layers of :func:`.models.architecture` on NHWC images."""

    layers: tuple[Layer, ...]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        flat = False
        for k, layer in enumerate(self.layers):
            if isinstance(layer, Conv):
                x = nn.Conv(layer.filters, (layer.kernel, layer.kernel), padding="SAME")(x)
                x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
            else:
                if not flat:
                    x, flat = x.reshape(x.shape[0], -1), True
                x = nn.Dense(layer.units)(x)
                if k < len(self.layers) - 1:
                    x = nn.relu(x)
        return x


def _cross_entropy(logits: jax.Array, example: Any) -> jax.Array:
    """The loss of ONE example (logits (10,), example = (x, label))."""
    return -jax.nn.log_softmax(logits)[example[1]]


class JaxTrainer:
    """:class:`cabs_experiments.backends.Trainer` for JAX (float32, default device)."""

    def __init__(self, dataset: Dataset, model: str) -> None:
        self.module = Net(tuple(architecture(model, dataset.image_shape, dataset.num_classes)))
        self.floss = FlaxLoss(self.module, _cross_entropy)
        self.x = {"train": jnp.asarray(dataset.x_train), "test": jnp.asarray(dataset.x_test)}
        self.y = {"train": jnp.asarray(dataset.y_train, jnp.int32), "test": jnp.asarray(dataset.y_test, jnp.int32)}
        self.sizes = geometric_buckets(1, max(len(dataset.y_train), 2048), ratio=1.5)
        self._sgd = jax.jit(self._sgd_step)
        self._eval = jax.jit(self._eval_chunk)
        self.reset(0)

    def reset(self, seed: int) -> None:
        self.params = self.module.init(jax.random.PRNGKey(seed), self.x["train"][:1])["params"]
        self.num_parameters = int(sum(np.prod(p.shape) for p in jax.tree.leaves(self.params)))

    def _padded(self, indices: np.ndarray) -> tuple[jax.Array, jax.Array]:
        idx, real = pad_indices(indices, bucket_for(len(indices), self.sizes))
        return jnp.asarray(idx.astype(np.int32)), jnp.asarray(real, jnp.float32)

    def _sgd_step(self, params: Any, x: jax.Array, y: jax.Array, idx: jax.Array, mask: jax.Array,
                  lr: jax.Array) -> tuple[Any, jax.Array]:
        batch = (x[idx], y[idx])

        def mean_loss(p: Any) -> jax.Array:
            return jnp.sum(mask * self.floss.batch_losses(p, batch)) / jnp.sum(mask)

        loss, g = jax.value_and_grad(mean_loss)(params)
        return jax.tree.map(lambda p, gi: p - lr * gi, params, g), loss

    def sgd_step(self, indices: np.ndarray, lr: float) -> float:
        idx, mask = self._padded(indices)
        self.params, loss = self._sgd(self.params, self.x["train"], self.y["train"], idx, mask, jnp.float32(lr))
        return float(loss)

    def cabs_run(self, controller: CABSController, seed: int) -> CABSRun:
        """A CABS run on the train split (sampler ``seed``) training this trainer's parameters."""
        return CABSRun(self, controller, seed)

    def _eval_chunk(self, params: Any, x: jax.Array, y: jax.Array, idx: jax.Array,
                    mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        out: jax.Array = self.module.apply({"params": params}, x[idx])  # type: ignore[assignment]
        losses = -jnp.take_along_axis(jax.nn.log_softmax(out), y[idx][:, None], axis=1)[:, 0]
        correct = (jnp.argmax(out, axis=1) == y[idx]).astype(jnp.float32)
        return jnp.sum(mask * losses), jnp.sum(mask * correct)

    def evaluate(self, split: str, indices: np.ndarray | None = None) -> tuple[float, float]:
        x, y = self.x[split], self.y[split]
        idx_all = np.arange(len(y)) if indices is None else np.asarray(indices)
        loss_sum = correct = 0.0
        for s in range(0, len(idx_all), EVAL_CHUNK):
            part = idx_all[s : s + EVAL_CHUNK]
            size = EVAL_CHUNK if len(idx_all) > EVAL_CHUNK else bucket_for(len(part), self.sizes)
            idx = np.concatenate([part, np.full(size - len(part), part[0])]).astype(np.int32)
            mask = jnp.asarray(np.arange(size) < len(part), jnp.float32)
            ls, c = self._eval(self.params, x, y, jnp.asarray(idx), mask)
            loss_sum += float(ls)
            correct += float(c)
        return loss_sum / len(idx_all), correct / len(idx_all)


class CABSRun:
    """CABS steps of :class:`cabs_jax.CABSTrainer` (plain SGD at ``controller.lr``) on the
    owner's train split; after each step the owner's parameters are the trained ones."""

    def __init__(self, owner: JaxTrainer, controller: CABSController, seed: int) -> None:
        self.owner = owner
        self.trainer = CABSTrainer(owner.floss, controller, (owner.x["train"], owner.y["train"]), seed=seed)
        self.state = self.trainer.init(owner.params)

    @property
    def batch_size(self) -> int:
        """The decided size of the next step."""
        return self.state.controller.batch_size

    @property
    def examples_seen(self) -> int:
        """Examples drawn so far (the sampler's count)."""
        return self.state.sampler.examples_seen

    def step(self) -> StepInfo:
        """One CABS step; raises :class:`cabs_core.NonFiniteStatisticsError` under the default policy."""
        self.state, info = self.trainer.step(self.state)
        self.owner.params = self.state.params
        return info


def make_trainer(dataset: Dataset, model: str, threads: int | None = None) -> JaxTrainer:
    # threads: XLA reads its thread settings when it starts; see backends.make_trainer
    return JaxTrainer(dataset, model)
