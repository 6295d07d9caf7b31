"""Small models and a brute-force oracle shared by the JAX adapter tests."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import cabs_jax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cabs_core import BatchStats, batch_stats_from_per_example


class MLP(nn.Module):
    hidden: tuple[int, ...] = (7, 5)
    classes: int = 3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for h in self.hidden:
            x = nn.tanh(nn.Dense(h)(x))
        return nn.Dense(self.classes)(x)


class PaperCNN(nn.Module):
    """The paper's MNIST CNN: conv5x5x32, pool, conv5x5x64, pool, dense 1024, dense 10 (widths scalable)."""

    c1: int = 32
    c2: int = 64
    hidden: int = 1024
    classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(self.c1, (5, 5), padding="SAME")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(self.c2, (5, 5), padding="SAME")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.classes)(x)


class EmbedLN(nn.Module):
    """Token embedding, LayerNorm, a position-wise Dense, mean pooling, a classifier."""

    vocab: int = 11
    dim: int = 6
    classes: int = 3

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = nn.Embed(self.vocab, self.dim)(tokens)
        h = nn.LayerNorm()(h)
        h = nn.gelu(nn.Dense(self.dim)(h))
        return nn.Dense(self.classes)(jnp.mean(h, axis=1))


def cross_entropy(logits: jax.Array, example: Any) -> jax.Array:
    """Per-example softmax cross-entropy; ``example = (x, label)``."""
    return -jax.nn.log_softmax(logits)[example[1]]


def init_f64(module: nn.Module, x: Any, seed: int = 0) -> Any:
    params = module.init(jax.random.key(seed), x)["params"]
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)


@lru_cache(maxsize=32)
def _jit_value_and_grad(loss: Any) -> Any:
    return jax.jit(jax.value_and_grad(loss))


def loop_oracle(loss: Any, params: Any, batch: Any, weights: np.ndarray | None = None) -> BatchStats:
    """BatchStats from a Python loop over single examples: one jax.grad call per example."""
    m = jax.tree.leaves(batch)[0].shape[0]
    grad_fn = _jit_value_and_grad(loss)  # compiled once, called on each example alone
    losses, grads = [], []
    for i in range(m):
        example = jax.tree.map(lambda a, i=i: a[i], batch)
        li, gi = grad_fn(params, example)
        losses.append(np.asarray(li, np.float64))
        grads.append([np.asarray(g, np.float64) for g in jax.tree.leaves(gi)])
    per_param = [np.stack([g[k] for g in grads]) for k in range(len(grads[0]))]
    return batch_stats_from_per_example(np.asarray(losses), per_param, weights)


def assert_stats_close(got: BatchStats, want: BatchStats, rtol: float = 1e-10) -> None:
    np.testing.assert_allclose(float(got.count), float(want.count), rtol=0)
    np.testing.assert_allclose(float(got.loss_sum), float(want.loss_sum), rtol=rtol)
    np.testing.assert_allclose(float(got.sq_norm_sum), float(want.sq_norm_sum), rtol=rtol)
    assert len(got.grad_sum) == len(want.grad_sum)
    for g, w in zip(got.grad_sum, want.grad_sum):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=1e-12)


def assert_fast_exact(loss: Any, batch: Any, mask: np.ndarray | None = None, *, probes: int | None = None) -> None:
    """method="fast" (no fallback warning) and "auto" both equal the float64 loop over single examples;
    the verdict came from the probe (``probes``: how many ran, when the test knows)."""
    import warnings

    from cabs_jax.verify import probes_run

    from cabs_core import FastPathFallbackWarning

    want = loop_oracle(loss, loss.params, batch, mask)
    assert float(want.sq_norm_sum) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathFallbackWarning)
        assert_stats_close(cabs_jax.batch_stats(loss, loss.params, batch, mask, method="fast"), want)
        assert_stats_close(cabs_jax.batch_stats(loss, loss.params, batch, mask), want)
    assert probes_run(loss) >= 1 if probes is None else probes_run(loss) == probes


def assert_module_loss_exact(loss: Any, module: Any, by_hand: Any, batch: Any, mask: np.ndarray) -> None:
    """A module loss (NNXLoss, EquinoxLoss) against the float64 loop over ``by_hand``, a loss written
    without the module library: from its params, from the module itself, and under jit in chunks."""
    want = loop_oracle(by_hand, loss.params, batch, mask)
    assert float(want.sq_norm_sum) > 0
    assert_stats_close(cabs_jax.batch_stats(loss, loss.params, batch, mask), want)
    assert_stats_close(cabs_jax.batch_stats(loss, module, batch, mask), want)  # the module itself as params
    jitted = jax.jit(lambda p, b, w: cabs_jax.batch_stats(loss, p, b, w, chunk_size=4))
    assert_stats_close(jitted(loss.params, batch, jnp.asarray(mask)), want)


def steps_saving_at(trainer: Any, state: Any, steps: int, save_at: int, path: Any) -> tuple[Any, Any, list[int]]:
    """``steps`` steps of a ``cabs_jax`` trainer from ``state``, saving to ``path`` before step
    ``save_at``: (the final state, the saved state, every step's decided batch size)."""
    sizes, saved = [], None
    for k in range(steps):
        if k == save_at:
            trainer.save(path, state)
            saved = state
        state, info = trainer.step(state)
        sizes.append(info.batch_size)
    return state, saved, sizes
