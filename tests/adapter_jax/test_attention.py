"""Issue 15 (JAX): DenseGeneral, linen attention, learned positions and tied heads on the exact fast path.

Every model is compared with the float64 loop over single examples (``loop_oracle``); a model the
fast path supports must take it (``method="fast"`` returns, ``"auto"`` does not warn), one it
cannot establish must step aside (``"fast"`` raises naming the layer, ``"auto"`` warns once and is
exact), also where the sequence length equals the batch size.
"""

from __future__ import annotations

import warnings
from typing import Any

import cabs_jax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cabs_jax import FlaxLoss
from jax_test_models import assert_stats_close, cross_entropy, init_f64, loop_oracle

from cabs_core import FastPathFallbackWarning, UnsupportedModelError


def _exact_on_fast_path(floss: FlaxLoss, params: Any, batch: Any, mask: np.ndarray | None = None) -> None:
    """fast and auto (without a fallback warning) both equal the float64 loop."""
    want = loop_oracle(floss, params, batch, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathFallbackWarning)
        assert_stats_close(cabs_jax.batch_stats(floss, params, batch, mask, method="fast"), want)
        assert_stats_close(cabs_jax.batch_stats(floss, params, batch, mask), want)


def _steps_aside(floss: FlaxLoss, params: Any, batch: Any, match: str) -> None:
    """fast raises naming ``match``; auto warns once and equals the float64 loop."""
    with pytest.raises(UnsupportedModelError, match=match) as err:
        cabs_jax.batch_stats(floss, params, batch, method="fast")
    assert err.value.reason
    with pytest.warns(FastPathFallbackWarning, match=match):
        assert_stats_close(cabs_jax.batch_stats(floss, params, batch), loop_oracle(floss, params, batch))


# --------------------------------------------------------------------------------------- DenseGeneral


class DenseGeneralNet(nn.Module):
    """DenseGeneral layers of several axis / features shapes in a row (with and without bias), then a classifier."""

    @nn.compact
    def __call__(self, x):  # x: (m, 3, 4, 2)
        h = jnp.tanh(nn.DenseGeneral((2, 3), axis=(3, 1), name="unordered_axes")(x))  # (m, 4, 2, 3)
        h = jnp.tanh(nn.DenseGeneral(2, axis=(2,), use_bias=False, name="middle_axis")(h))  # (m, 4, 3, 2)
        h = jnp.tanh(nn.DenseGeneral(3, axis=(1, 2, 3), name="all_axes")(h))  # no positions left: (m, 3)
        return nn.Dense(3)(h)


def test_dense_general_shapes_exact() -> None:
    rng = np.random.default_rng(1)
    m = 7
    batch = (jnp.asarray(rng.normal(size=(m, 3, 4, 2))), jnp.asarray(rng.integers(0, 3, size=m)))
    floss = FlaxLoss(DenseGeneralNet(), cross_entropy)
    params = init_f64(DenseGeneralNet(), batch[0][:1])
    _exact_on_fast_path(floss, params, batch, np.array([1, 0, 1, 1, 0, 1, 1]))  # padding changes no sum


class HeadsNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral((6, 2), name="dg")(x)  # as many heads as examples
        return nn.Dense(3)(jnp.mean(jnp.tanh(h), axis=(1, 2)))


def test_dense_general_positions_equal_to_batch_size_exact() -> None:
    """T == m (and the heads' size == m): shapes alone cannot tell the axes apart, the probe can."""
    rng = np.random.default_rng(3)
    m = 6
    batch = (jnp.asarray(rng.normal(size=(m, m, 3))), jnp.asarray(rng.integers(0, 3, size=m)))
    module = HeadsNet()
    floss = FlaxLoss(module, cross_entropy)
    _exact_on_fast_path(floss, init_f64(module, batch[0][:1]), batch)


class TimeMajorDenseGeneral(nn.Module):
    """A DenseGeneral on the time-major layout (T, m, d)."""

    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral((2, 2), name="dg")(jnp.transpose(x, (1, 0, 2)))
        h = jnp.transpose(h, (1, 0, 2, 3)).reshape(x.shape[0], x.shape[1], 4)
        return nn.Dense(3)(jnp.mean(jnp.tanh(h), axis=1))


@pytest.mark.parametrize(("m", "t"), [(5, 3), (6, 6)])  # T == m too
def test_dense_general_time_major_steps_aside(m: int, t: int) -> None:
    rng = np.random.default_rng(m + t)
    batch = (jnp.asarray(rng.normal(size=(m, t, 2))), jnp.asarray(rng.integers(0, 3, size=m)))
    floss = FlaxLoss(TimeMajorDenseGeneral(), cross_entropy)
    _steps_aside(floss, init_f64(TimeMajorDenseGeneral(), batch[0][:1]), batch, "dg")


class ContractsExamples(nn.Module):
    """A DenseGeneral contracting the example axis (its kernel depends on m: no one-example loss exists)."""

    batch_dims: tuple = ()

    @nn.compact
    def __call__(self, x):
        axis = -1 if self.batch_dims else (0, -1)
        h = nn.DenseGeneral(3, axis=axis, batch_dims=self.batch_dims, name="dg")(x)
        return jnp.broadcast_to(jnp.sum(h), (x.shape[0], 3))


@pytest.mark.parametrize("batch_dims", [(), (0,)])
def test_dense_general_over_the_example_axis_refused_by_name(batch_dims: tuple) -> None:
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3, 2)))
    batch = (x, jnp.zeros(5, jnp.int32))
    module = ContractsExamples(batch_dims)
    params = module.init(jax.random.key(0), x)["params"]
    match = "batch_dims" if batch_dims else "contracts axis 0"
    with pytest.raises(UnsupportedModelError, match=match) as err:
        cabs_jax.batch_stats(FlaxLoss(module, cross_entropy), params, batch, method="fast")
    assert err.value.layer == "dg"


# --------------------------------------------------------------------------------------- a small GPT in linen


class LearnedPositions(nn.Module):
    """Learned positions as in Flax's lm1b example (``AddPositionEmbs``): a (1, max_len, d)
    parameter, sliced to the sequence and added with broadcasting over the batch."""

    max_len: int = 16

    @nn.compact
    def __call__(self, x):
        pe = self.param("pos_embedding", nn.initializers.normal(0.5), (1, self.max_len, x.shape[-1]), x.dtype)
        return x + pe[:, : x.shape[1]]


class GPTBlock(nn.Module):
    heads: int
    causal: bool = True

    @nn.compact
    def __call__(self, x, mask):
        d = x.shape[-1]
        x = x + nn.SelfAttention(num_heads=self.heads, qkv_features=d, deterministic=True)(nn.LayerNorm()(x), mask)
        return x + nn.Dense(d)(nn.gelu(nn.Dense(2 * d)(nn.LayerNorm()(x))))


class GPT(nn.Module):
    """Token embedding, learned positions, blocks of causal self-attention and MLP, final LayerNorm,
    output projection tied to the token embedding through ``Embed.attend``; mean logits over positions.
    ``positions``: "param" (a module's own parameter, exact on the fast path) or "embed"
    (``Embed(arange(T))`` broadcast over the batch, no example axis: the fast path steps aside)."""

    vocab: int = 11
    dim: int = 8
    heads: int = 2
    layers: int = 2
    positions: str = "param"

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(self.vocab, self.dim, name="wte")
        x = embed(tokens)
        if self.positions == "param":
            x = LearnedPositions(name="wpe")(x)
        else:
            x = x + nn.Embed(16, self.dim, name="wpe")(jnp.arange(tokens.shape[1]))[None]
        mask = nn.make_causal_mask(tokens)
        for _ in range(self.layers):
            x = GPTBlock(self.heads)(x, mask)
        logits = embed.attend(nn.LayerNorm()(x))  # (m, T, vocab)
        return logits


def next_token_loss(logits: jax.Array, example: Any) -> jax.Array:
    """Mean next-token cross-entropy of one sequence: logits (T, vocab), tokens (T,)."""
    tokens = example[0]
    logp = jax.nn.log_softmax(logits[:-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[1:, None], axis=1))


def _tokens(m: int, t: int, vocab: int = 11, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, 4, size=(m, t)))  # few ids: repeats within a sequence (lookup rows add up)
    return tokens, tokens


def test_gpt_exact_on_the_fast_path() -> None:
    from cabs_jax.verify import probes_run

    batch = _tokens(7, 5)
    floss = FlaxLoss(GPT(), next_token_loss)
    params = init_f64(GPT(), batch[0][:1])
    _exact_on_fast_path(floss, params, batch, np.array([1, 1, 0, 1, 1, 1, 0]))
    assert probes_run(floss) == 1  # one established verdict, no fallback
