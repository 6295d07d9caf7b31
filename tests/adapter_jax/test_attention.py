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
from jax_test_models import assert_stats_close, cross_entropy, loop_oracle

from cabs_core import FastPathFallbackWarning, UnsupportedModelError


def init_f64(module: nn.Module, x: Any, seed: int = 0) -> Any:
    """float64 parameters of ``module``'s shapes, drawn with NumPy (normal, scale 0.4): Flax's own
    initialisers would compile their random number generation op by op, most of these tests' time
    on a loaded CPU; the statistics' exactness does not depend on the initial values."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(0.4 * rng.standard_normal(a.shape), jnp.float64), shapes)


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
    def __call__(self, x):  # x: (m, 3, 6, 2)
        h = jnp.tanh(nn.DenseGeneral((2, 3), axis=(3, 1), name="unordered_axes")(x))  # (m, 6, 2, 3)
        h = jnp.tanh(nn.DenseGeneral(2, axis=(2,), use_bias=False, name="middle_axis")(h))  # (m, 6, 3, 2)
        h = jnp.tanh(nn.DenseGeneral(3, axis=(1, 2, 3), name="all_axes")(h))  # no positions left: (m, 3)
        return nn.Dense(3)(h)


def test_dense_general_shapes_exact() -> None:
    """Contracted axes not adjacent, not sorted, before a free axis, all axes; 6 positions and
    6 examples (shapes alone cannot tell the axes apart, the probe at another size can)."""
    rng = np.random.default_rng(1)
    m = 6
    batch = (jnp.asarray(rng.normal(size=(m, 3, 6, 2))), jnp.asarray(rng.integers(0, 3, size=m)))
    floss = FlaxLoss(DenseGeneralNet(), cross_entropy)
    params = init_f64(DenseGeneralNet(), batch[0][:1])
    _exact_on_fast_path(floss, params, batch, np.array([1, 0, 1, 1, 0, 1]))  # padding changes no sum


class TimeMajorDenseGeneral(nn.Module):
    """A DenseGeneral on the time-major layout (T, m, d)."""

    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral((2, 2), name="dg")(jnp.transpose(x, (1, 0, 2)))
        h = jnp.transpose(h, (1, 0, 2, 3)).reshape(x.shape[0], x.shape[1], 4)
        return nn.Dense(3)(jnp.mean(jnp.tanh(h), axis=1))


def test_dense_general_time_major_steps_aside_also_when_t_equals_m() -> None:
    rng = np.random.default_rng(0)
    batch = (jnp.asarray(rng.normal(size=(6, 6, 2))), jnp.asarray(rng.integers(0, 3, size=6)))
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
    params = init_f64(module, x)
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
    """Pre-LayerNorm block: causal self-attention (``nn.SelfAttention``, or the same layer as
    ``MultiHeadDotProductAttention`` called on one input) and a GELU MLP, both residual."""

    heads: int
    self_attention_class: bool = True

    @nn.compact
    def __call__(self, x, mask):
        d = x.shape[-1]
        h = nn.LayerNorm()(x)
        if self.self_attention_class:
            with warnings.catch_warnings():  # Flax announces SelfAttention's deprecation; it is still what users run
                warnings.simplefilter("ignore", DeprecationWarning)
                x = x + nn.SelfAttention(num_heads=self.heads, qkv_features=d, deterministic=True)(h, mask)
        else:
            x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=d, deterministic=True)(
                h, mask=mask
            )
        return x + nn.Dense(d)(nn.gelu(nn.Dense(2 * d)(nn.LayerNorm()(x))))


class GPT(nn.Module):
    """Token embedding, learned positions, blocks of causal self-attention and MLP, final LayerNorm,
    output projection tied to the token embedding through ``Embed.attend``: logits (m, T, vocab).
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
        for i in range(self.layers):
            x = GPTBlock(self.heads, self_attention_class=i % 2 == 0)(x, mask)
        return embed.attend(nn.LayerNorm()(x))


def next_token_loss(logits: jax.Array, example: Any) -> jax.Array:
    """Mean next-token cross-entropy of one sequence: logits (T, vocab), tokens (T,)."""
    tokens = example[0]
    logp = jax.nn.log_softmax(logits[:-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[1:, None], axis=1))


def _tokens(m: int, t: int, seed: int = 0) -> tuple:
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, 4, size=(m, t)))  # repeats: lookup rows add up
    return tokens, tokens


def test_gpt_exact_on_the_fast_path_with_t_equal_to_m() -> None:
    """2 blocks, learned positions, tied head, padding mask; 6 tokens and 6 examples."""
    from cabs_jax.verify import probes_run

    batch = _tokens(6, 6)
    floss = FlaxLoss(GPT(), next_token_loss)
    params = init_f64(GPT(), batch[0][:1])
    _exact_on_fast_path(floss, params, batch, np.array([1, 1, 0, 1, 1, 1]))
    assert probes_run(floss) == 1  # one established verdict: the fast path, not a fallback


def test_gpt_positions_from_embed_of_arange_step_aside_when_t_equals_m() -> None:
    """Embed(arange(T)) carries no example axis; with T == m only the probe at another size tells.
    (That auto is then exact on the generic path is test_exactness.py's ``positional_T_eq_m``.)"""
    module = GPT(layers=1, positions="embed")
    batch = _tokens(6, 6, seed=1)
    with pytest.raises(UnsupportedModelError, match="no leading example axis") as err:
        cabs_jax.batch_stats(FlaxLoss(module, next_token_loss), init_f64(module, batch[0][:1]), batch, method="fast")
    assert err.value.layer == "wpe"


class Gate(nn.Module):
    """A learned per-feature scale multiplied with broadcasting over the examples and positions."""

    @nn.compact
    def __call__(self, x):
        return x * self.param("gate", nn.initializers.ones, (x.shape[-1],))


class NormsAndScales(nn.Module):
    """Flax layers whose parameters are all their own (RMSNorm, GroupNorm) and a custom gate."""

    @nn.compact
    def __call__(self, x):  # (m, T, 2)
        h = nn.RMSNorm(name="rms")(nn.Dense(4)(x))
        h = nn.GroupNorm(num_groups=2, name="gn")(jnp.tanh(h))
        return nn.Dense(3)(jnp.mean(Gate(name="gate")(h), axis=1))


def test_norm_layers_and_learned_scales_exact_on_the_fast_path(monkeypatch) -> None:
    """Also in chunks: 20 gradient entries at once are 5, 2 and 5 of the 6 examples (remainders too)."""
    from cabs_jax import flax_fast

    monkeypatch.setattr(flax_fast, "OWN_CHUNK_ENTRIES", 20)
    rng = np.random.default_rng(5)
    batch = (jnp.asarray(rng.normal(size=(6, 5, 2))), jnp.asarray(rng.integers(0, 3, size=6)))
    floss = FlaxLoss(NormsAndScales(), cross_entropy)
    _exact_on_fast_path(floss, init_f64(NormsAndScales(), batch[0][:1]), batch)


class RootParam(nn.Module):
    """A parameter of the model's root module, which also has layers: its uses are not captured."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(x * self.param("gain", nn.initializers.ones, (x.shape[-1],)))


class CouplingScale(nn.Module):
    """A module with its own parameter that mixes the examples (adds the batch mean)."""

    @nn.compact
    def __call__(self, x):
        return x * self.param("gain", nn.initializers.normal(1.0), (x.shape[-1],)) + jnp.mean(x, axis=0)


class CouplingNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(CouplingScale(name="scale")(x)))


def test_own_parameters_outside_a_leaf_module_or_coupling_examples_step_aside() -> None:
    rng = np.random.default_rng(2)
    batch = (jnp.asarray(rng.normal(size=(6, 4))), jnp.asarray(rng.integers(0, 3, size=6)))
    params = init_f64(RootParam(), batch[0][:1])
    with pytest.raises(UnsupportedModelError, match="gain.*self.param"):
        cabs_jax.batch_stats(FlaxLoss(RootParam(), cross_entropy), params, batch, method="fast")
    # the per-example VJP of a coupling module is not its per-example gradient: the probe's values catch it
    floss = FlaxLoss(CouplingNet(), cross_entropy)
    params = init_f64(CouplingNet(), batch[0][:1])
    with pytest.raises(UnsupportedModelError, match="fast S"):
        cabs_jax.batch_stats(floss, params, batch, method="fast")


# Layers inside nn.remat and nn.scan (exact on the fast path) and nn.vmap (steps aside): test_lifted.py.
