"""The conformance zoo in JAX (Flax linen), from portable parameters, through ``cabs_jax``.

Flax uses the portable layout (dense kernels (in, out), conv kernels HWIO,
NHWC images, SAME pooling as TensorFlow): parameters load as they are.
Float64 needs ``jax_enable_x64``, which :func:`enable_x64` switches on.
"""

from __future__ import annotations

from typing import Any

import cabs_jax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cabs_core import CABSController

from .zoo import LN_EPS, MODELS


def enable_x64() -> None:
    jax.config.update("jax_enable_x64", True)


class _Net(nn.Module):
    model: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.model == "mlp":
            x = nn.relu(nn.Dense(512, name="dense1")(x))
            x = nn.relu(nn.Dense(512, name="dense2")(x))
            return nn.Dense(10, name="dense3")(x)
        if self.model == "embed_ln":
            h = nn.LayerNorm(epsilon=LN_EPS, name="norm")(nn.Embed(MODELS[self.model].vocab, 16, name="embed")(x))
            h = nn.relu(nn.Dense(32, name="dense1")(h))
            return nn.Dense(10, name="dense2")(h.mean(axis=1))
        k, width = (2, 32) if self.model == "mnist_cnn" else (3, 64)
        x = nn.max_pool(nn.relu(nn.Conv(width, (5, 5), padding="SAME", name="conv1")(x)), (k, k), (2, 2), "SAME")
        x = nn.max_pool(nn.relu(nn.Conv(64, (5, 5), padding="SAME", name="conv2")(x)), (k, k), (2, 2), "SAME")
        x = nn.relu(nn.Dense(1024 if self.model == "mnist_cnn" else 384, name="dense1")(x.reshape(x.shape[0], -1)))
        if self.model == "mnist_cnn":
            return nn.Dense(10, name="dense2")(x)
        return nn.Dense(10, name="dense3")(nn.relu(nn.Dense(192, name="dense2")(x)))


def _cross_entropy(logits: jax.Array, example: Any) -> jax.Array:
    return -jax.nn.log_softmax(logits)[example[1]]


def loss(model: str) -> cabs_jax.FlaxLoss:
    """The per-example softmax cross-entropy of ``model``, for ``cabs_jax``."""
    return cabs_jax.FlaxLoss(_Net(model), _cross_entropy)


def to_tree(params: dict[str, np.ndarray], dtype: str) -> dict:
    tree: dict[str, dict[str, jax.Array]] = {}
    for name, a in params.items():
        layer, leaf = name.split("/")
        tree.setdefault(layer, {})[leaf] = jnp.asarray(a, dtype=dtype)
    return tree


def export(tree: dict) -> dict[str, np.ndarray]:
    return {
        f"{layer}/{leaf}": np.asarray(a, np.float64) for layer, leaves in tree.items() for leaf, a in leaves.items()
    }


def _data(x: np.ndarray, y: np.ndarray, dtype: str) -> tuple[jax.Array, jax.Array]:
    return (jnp.asarray(x) if x.dtype.kind == "i" else jnp.asarray(x, dtype=dtype)), jnp.asarray(y)


def statistics(
    model: str,
    params: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    mask: np.ndarray | None,
    dtype: str,
    method: str = "auto",
) -> dict:
    """The step's statistics through ``cabs_jax.batch_stats`` under jit; grad_sum in the portable layout."""
    tree = to_tree(params, dtype)
    w = None if mask is None else jnp.asarray(mask, dtype=dtype)
    path = cabs_jax.PerExampleStats(loss(model), method=method).path(tree, _data(x, y, dtype), w, reprobe=False)
    s = jax.jit(lambda p, b, w: cabs_jax.batch_stats(loss(model), p, b, w, method=path))(tree, _data(x, y, dtype), w)
    return {
        "method": path,  # the path the statistics took (auto: fast where the probe established it)
        "count": float(s.count),
        "loss_sum": float(s.loss_sum),
        "sq_norm_sum": float(s.sq_norm_sum),
        "grad_sum": export(cabs_jax.grad_tree(s, tree)),
    }


def train(
    model: str,
    params: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    controller: CABSController,
    steps: int,
    seed: int,
    dtype: str = "float64",
) -> tuple[list[int], dict[str, np.ndarray]]:
    """``steps`` CABS steps with ``cabs_jax.CABSTrainer`` (padded buckets, one host copy per step)."""
    trainer = cabs_jax.CABSTrainer(loss(model), controller, _data(x, y, dtype), seed=seed)
    state = trainer.init(to_tree(params, dtype))
    sizes = []
    for _ in range(steps):
        sizes.append(state.controller.batch_size)
        state, _ = trainer.step(state)
    return sizes, export(state.params)


class _BatchNormNet(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.BatchNorm(use_running_average=False)(nn.Dense(5)(x))
        return nn.Dense(3)(nn.relu(x))


def refusal() -> str:
    """The adapter's answer to BatchNorm in training mode: the error message."""
    net = _BatchNormNet()
    x, y = jnp.ones((8, 6)), jnp.zeros(8, jnp.int32)
    variables = net.init(jax.random.key(0), x)
    floss = cabs_jax.FlaxLoss(net, _cross_entropy, collections={"batch_stats": variables["batch_stats"]})
    try:
        cabs_jax.batch_stats(floss, variables["params"], (x, y))
    except ValueError as e:
        return f"{type(e).__name__}: {e}"
    raise AssertionError("cabs_jax returned statistics for a model with BatchNorm in training mode")
