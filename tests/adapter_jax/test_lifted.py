"""Issue 15 (JAX): linen's lifted transformations on the exact fast path.

``nn.remat`` (``nn.checkpoint``) blocks and ``nn.scan`` over a stack of identical blocks (each layer's
slice of the stacked parameters is its own parameter) are exact on the fast path: every model is
compared with the float64 loop over single examples (``loop_oracle``), and a model the fast path
covers must take it (``method="fast"`` returns, ``"auto"`` does not warn, one probe established it).
What it cannot establish steps aside: ``"fast"`` raises naming the transformation or the layer,
``"auto"`` warns and is exact on the generic path.
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
from cabs_jax.verify import probes_run
from jax_test_models import assert_stats_close, cross_entropy, loop_oracle

from cabs_core import FastPathFallbackWarning, UnsupportedModelError


def init_f64(module: nn.Module, x: Any, seed: int = 0) -> Any:
    """float64 parameters of ``module``'s shapes drawn with NumPy (Flax's initialisers compile op by op)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(0.4 * rng.standard_normal(a.shape), jnp.float64), shapes)


def _exact_on_fast_path(floss: FlaxLoss, params: Any, batch: Any, mask: np.ndarray | None = None) -> None:
    """fast and auto (without a fallback warning) both equal the float64 loop; one probe established it."""
    want = loop_oracle(floss, params, batch, mask)
    assert float(want.sq_norm_sum) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathFallbackWarning)
        assert_stats_close(cabs_jax.batch_stats(floss, params, batch, mask, method="fast"), want)
        assert_stats_close(cabs_jax.batch_stats(floss, params, batch, mask), want)
    assert probes_run(floss) == 1


def _steps_aside(floss: FlaxLoss, params: Any, batch: Any, match: str) -> None:
    """fast raises naming ``match``; auto warns and equals the float64 loop."""
    with pytest.raises(UnsupportedModelError, match=match) as err:
        cabs_jax.batch_stats(floss, params, batch, method="fast")
    assert err.value.reason
    with pytest.warns(FastPathFallbackWarning, match=match):
        assert_stats_close(cabs_jax.batch_stats(floss, params, batch), loop_oracle(floss, params, batch))


def _floats(m: int, shape: tuple[int, ...], seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(m, *shape))), jnp.asarray(rng.integers(0, 3, size=m))


# --------------------------------------------------------------------------------------- nn.remat


class MLPBlock(nn.Module):
    """LayerNorm, Dense, tanh, residual."""

    @nn.compact
    def __call__(self, x):
        return x + jnp.tanh(nn.Dense(x.shape[-1])(nn.LayerNorm()(x)))


class ScanBody(nn.Module):
    """An MLP block with nn.scan's signature ``(carry, x) -> (carry, y)``; ``gain``: the body also
    has a parameter of its own beside its layers."""

    gain: bool = False

    @nn.compact
    def __call__(self, c, _):
        if self.gain:
            c = c * self.param("gain", nn.initializers.ones, (c.shape[-1],), c.dtype)
        return MLPBlock()(c), None


class RematMLP(nn.Module):
    """A rematerialised block, a rematerialised Dense, then ``nn.scan`` over three blocks
    (parameters stacked along axis 0), between an input and an output Dense."""

    gain: bool = False

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4)(x)
        h = nn.remat(MLPBlock)()(h)
        h = nn.remat(nn.Dense)(4, name="remat_dense")(h)
        scan = nn.scan(ScanBody, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        h, _ = scan(self.gain, name="blocks")(h, None)
        return nn.Dense(3)(jnp.mean(jnp.tanh(h), axis=1))


def test_remat_and_scanned_mlp_exact_on_the_fast_path() -> None:
    """Recomputation neither counts a layer twice nor loses one; with 5 positions and 5 examples.
    (Inside the caller's ``jax.jit``: test_exactness.py's ``remat`` case.)"""
    batch = _floats(5, (5, 2))
    floss = FlaxLoss(RematMLP(), cross_entropy)
    params = init_f64(RematMLP(), batch[0][:1])
    assert params["blocks"]["MLPBlock_0"]["Dense_0"]["kernel"].shape == (3, 4, 4)
    _exact_on_fast_path(floss, params, batch, np.array([1, 1, 0, 1, 1]))


class SharedRemat(nn.Module):
    """One rematerialised block called twice (shared weights)."""

    @nn.compact
    def __call__(self, x):
        block = nn.remat(MLPBlock)(name="shared")
        return nn.Dense(3)(jnp.mean(block(block(nn.Dense(4)(x))), axis=1))


# --------------------------------------------------------------------------------------- GPT, stacked


class LearnedPositions(nn.Module):
    """Flax's lm1b ``AddPositionEmbs``: a (1, max_len, d) parameter sliced to the sequence and added."""

    max_len: int = 16

    @nn.compact
    def __call__(self, x):
        pe = self.param("pos_embedding", nn.initializers.normal(0.5), (1, self.max_len, x.shape[-1]), x.dtype)
        return x + pe[:, : x.shape[1]]


class Block(nn.Module):
    """Pre-LayerNorm GPT block (causal ``nn.MultiHeadDotProductAttention`` on one input and a GELU MLP,
    both residual) with nn.scan's signature ``(carry, mask) -> (carry, None)``."""

    heads: int = 2

    @nn.compact
    def __call__(self, x, mask):
        d = x.shape[-1]
        h = nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=d, deterministic=True)(
            nn.LayerNorm()(x), mask=mask
        )
        x = x + h
        return x + nn.Dense(d)(nn.gelu(nn.Dense(2 * d)(nn.LayerNorm()(x)))), None


class GPT(nn.Module):
    """Token embedding, learned positions, ``nn.scan`` over ``layers`` rematerialised blocks
    (``nn.scan(nn.remat(Block))``, parameters stacked along axis 0), final LayerNorm, head tied
    through ``Embed.attend``: logits (m, T, vocab)."""

    vocab: int = 11
    dim: int = 8
    layers: int = 2

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(self.vocab, self.dim, name="wte")
        x = LearnedPositions(name="wpe")(embed(tokens))
        blocks = nn.scan(
            nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=nn.broadcast,
            length=self.layers,
        )
        x, _ = blocks(name="blocks")(x, nn.make_causal_mask(tokens))
        return embed.attend(nn.LayerNorm()(x))


def next_token_loss(logits: jax.Array, example: Any) -> jax.Array:
    """Mean next-token cross-entropy of one sequence: logits (T, vocab), tokens (T,)."""
    logp = jax.nn.log_softmax(logits[:-1])
    return -jnp.mean(jnp.take_along_axis(logp, example[0][1:, None], axis=1))


def _tokens(m: int, t: int, seed: int = 0) -> tuple:
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, 4, size=(m, t)))  # repeats: lookup rows add up
    return tokens, tokens


def test_gpt_with_scanned_remat_blocks_exact_on_the_fast_path() -> None:
    """Learned positions, ``nn.scan`` over two ``nn.remat(Block)`` with ``MultiHeadDotProductAttention``,
    head tied through ``Embed.attend``; 6 tokens and 6 examples, one of them padding. Each block's
    slice of the stacked parameters is its own parameter."""
    module = GPT()
    batch = _tokens(6, 6)
    floss = FlaxLoss(module, next_token_loss)
    params = init_f64(module, batch[0][:1])
    assert params["blocks"]["Dense_0"]["kernel"].shape == (2, 16, 8)  # stacked along axis 0
    _exact_on_fast_path(floss, params, batch, np.array([1, 1, 0, 1, 1, 1]))


# --------------------------------------------------------------------------------------- stepping aside


def test_scan_body_with_a_parameter_outside_its_layers_steps_aside() -> None:
    """A scanned block with its own ``self.param`` beside its layers: the parameter's uses are not captured."""
    batch = _floats(5, (3, 2), seed=1)
    module = RematMLP(gain=True)
    with pytest.raises(UnsupportedModelError, match="blocks/gain.*self.param"):
        cabs_jax.batch_stats(FlaxLoss(module, cross_entropy), init_f64(module, batch[0][:1]), batch, method="fast")


class TableInsideScan(nn.Module):
    """The embedding table passed into the scanned blocks and used there as a projection: a use of
    the Embed's parameter that no intercepted layer call sees (the accounting check's case)."""

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(7, 4, name="embed")

        class Body(nn.Module):
            @nn.compact
            def __call__(self, c, table):
                return c + jnp.tanh(nn.Dense(4)(c) @ table.T) @ table, None

        scan = nn.scan(Body, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=nn.broadcast,
                       length=2)
        h, _ = scan(name="blocks")(embed(tokens), embed.embedding)
        return nn.Dense(3)(jnp.mean(h, axis=1))


def test_parameter_used_inside_the_scan_outside_its_layer_steps_aside() -> None:
    rng = np.random.default_rng(2)
    batch = (jnp.asarray(rng.integers(0, 7, size=(5, 3))), jnp.asarray(rng.integers(0, 3, size=5)))
    module = TableInsideScan()
    with pytest.raises(UnsupportedModelError, match="rebuilt from the layer's captured terms") as err:
        cabs_jax.batch_stats(FlaxLoss(module, cross_entropy), init_f64(module, batch[0][:1]), batch, method="fast")
    assert err.value.layer == "embed"


class VmapBlocks(nn.Module):
    """``nn.vmap`` over an axis of two inputs with a block per index (parameters stacked)."""

    @nn.compact
    def __call__(self, x):  # x: (m, 2, T, d)
        blocks = nn.vmap(MLPBlock, in_axes=1, out_axes=1, variable_axes={"params": 0}, split_rngs={"params": True})
        return nn.Dense(3)(jnp.mean(blocks(name="pair")(x), axis=(1, 2)))


def test_vmap_steps_aside_naming_it() -> None:
    batch = _floats(5, (2, 3, 4), seed=5)
    _steps_aside(FlaxLoss(VmapBlocks(), cross_entropy), init_f64(VmapBlocks(), batch[0][:1]), batch, "nn.vmap")


class BroadcastScan(nn.Module):
    """``nn.scan`` in function form over a module with the parameters broadcast (shared weights)."""

    @nn.compact
    def __call__(self, x):
        scan = nn.scan(lambda mdl, c, _: (mdl(c), None), variable_broadcast="params", split_rngs={"params": False},
                       length=2)
        h, _ = scan(MLPBlock(name="shared"), x, None)
        return nn.Dense(3)(jnp.mean(h, axis=1))


class BroadcastScanClass(nn.Module):
    """The class form of the same: ``nn.scan(Block, variable_broadcast="params")``."""

    @nn.compact
    def __call__(self, x):
        class Body(nn.Module):
            @nn.compact
            def __call__(self, c, _):
                return MLPBlock()(c), None

        h, _ = nn.scan(Body, variable_broadcast="params", split_rngs={"params": False}, length=2)(name="s")(x, None)
        return nn.Dense(3)(jnp.mean(h, axis=1))


class SharedScan(nn.Module):
    """One scanned stack called twice (shared weights); ``check``: nn.scan's constancy check, for which
    Flax traces the body twice per call (the recorder allows exactly that many traces)."""

    check: bool = True

    @nn.compact
    def __call__(self, x):
        scan = nn.scan(ScanBody, variable_axes={"params": 0}, split_rngs={"params": True}, length=2,
                       check_constancy_invariants=self.check)
        stack = scan(name="shared")
        return nn.Dense(3)(jnp.mean(stack(stack(x, None)[0], None)[0], axis=1))


@pytest.mark.parametrize(
    "module, match",
    [
        (SharedRemat(), "shared.*more than once"),
        (SharedScan(), "shared.*more than once"),
        (SharedScan(check=False), "shared.*more than once"),
        (BroadcastScanClass(), "variable_broadcast.*shared weights"),
        (BroadcastScan(), "lifted transformation"),
    ],
    ids=["remat_called_twice", "scan_called_twice", "scan_unchecked_called_twice", "scan_broadcast_params",
         "scan_function_form"],
)
def test_shared_weights_under_remat_or_scan_refused_by_name(module: nn.Module, match: str) -> None:
    """Refused while planning (no probe needed); ``"auto"`` is then exact on the generic path (the
    exactness of that fallback is the other tests' subject)."""
    batch = _floats(5, (3, 4), seed=6)
    with pytest.raises(UnsupportedModelError, match=match):
        cabs_jax.batch_stats(FlaxLoss(module, cross_entropy), init_f64(module, batch[0][:1]), batch, method="fast")
