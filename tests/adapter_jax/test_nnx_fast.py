"""Issue 15 (JAX): Flax NNX models on the exact fast path (cabs_jax.nnx_fast), against the float64 loop.

A model the fast path covers must take it (``method="fast"`` returns, ``"auto"`` does not warn, one
probe established it) and equal the float64 loop over single examples (``loop_oracle``) in S,
grad_sum and loss_sum, with padding weights; a model with a use the fast path cannot account for
must step aside (``"fast"`` raises naming the parameter or layer, ``"auto"`` warns once and is exact).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import cabs_jax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cabs_jax import CABSTrainer, NNXLoss
from cabs_jax.verify import probes_run
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax_test_models import assert_fast_exact, assert_stats_close, cross_entropy, loop_oracle

from cabs_core import CABSController, FastPathFallbackWarning, SamplerState, UnsupportedModelError, next_batch

F64 = jnp.float64


def build(ctor: Callable[[], nnx.Module], seed: int = 0) -> nnx.Module:
    """The module ``ctor()`` builds, its shapes traced abstractly (``nnx.eval_shape``) and its variables
    drawn with NumPy: parameters normal (scale 0.4), other floats (running statistics) in [1, 1.5).
    NNX's own initialisers would run their random number generation op by op, most of these tests'
    time on a loaded CPU; the statistics' exactness does not depend on the values."""
    graphdef, params, rest = nnx.split(nnx.eval_shape(ctor), nnx.Param, ...)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: np.asarray(0.4 * rng.standard_normal(a.shape), a.dtype), params)
    rest = jax.tree.map(lambda a: np.asarray(1.0 + 0.5 * rng.random(a.shape), a.dtype), rest)
    return nnx.merge(graphdef, params, rest)


def _exact_on_fast_path(loss: NNXLoss, batch: Any, mask: np.ndarray | None = None) -> None:
    """fast and auto (without a fallback warning) both equal the float64 loop, on the fast path."""
    assert_fast_exact(loss, batch, mask)


def _steps_aside(loss: NNXLoss, batch: Any, match: str, layer: str | None = None, exact: bool = True) -> None:
    """fast raises naming ``match``; auto warns once and (``exact``) equals the float64 loop (skipped where
    test_nnx.py already compares the generic path on the same model with the loop)."""
    with pytest.raises(UnsupportedModelError, match=match) as err:
        cabs_jax.batch_stats(loss, loss.params, batch, method="fast")
    assert err.value.reason
    if layer is not None:
        assert err.value.layer == layer
    with pytest.warns(FastPathFallbackWarning, match=match):
        got = cabs_jax.batch_stats(loss, loss.params, batch)
    if exact:
        assert_stats_close(got, loop_oracle(loss, loss.params, batch))


# --------------------------------------------------------------------------------------- a small GPT in NNX


class LearnedPositions(nnx.Module):
    """Learned positions: a (1, max_len, d) nnx.Param sliced to the sequence, added with broadcasting."""

    def __init__(self, max_len: int, d: int, rngs: nnx.Rngs) -> None:
        self.pe = nnx.Param(0.5 * jax.random.normal(rngs.params(), (1, max_len, d), F64))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.pe[:, : x.shape[1]]


class Block(nnx.Module):
    """Pre-LayerNorm block: causal nnx.MultiHeadAttention and a GELU MLP, both residual."""

    def __init__(self, d: int, heads: int, rngs: nnx.Rngs) -> None:
        self.ln1 = nnx.LayerNorm(d, param_dtype=F64, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d, param_dtype=F64, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, param_dtype=F64, rngs=rngs)
        self.up = nnx.Linear(d, 2 * d, param_dtype=F64, rngs=rngs)
        self.down = nnx.Linear(2 * d, d, param_dtype=F64, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class GPT(nnx.Module):
    """Token Embed, learned positions, blocks, final LayerNorm, head tied to the embedding (Embed.attend).
    ``root_positions``: the positions as an nnx.Param of the root module itself, which also has layers
    (its uses are not captured: the fast path steps aside)."""

    def __init__(self, rngs: nnx.Rngs, vocab: int = 11, d: int = 8, heads: int = 2, layers: int = 2,
                 max_len: int = 12, root_positions: bool = False) -> None:
        self.wte = nnx.Embed(vocab, d, param_dtype=F64, rngs=rngs)
        if root_positions:
            self.pos = nnx.Param(0.5 * jax.random.normal(rngs.params(), (max_len, d), F64))
        else:
            self.wpe = LearnedPositions(max_len, d, rngs)
        self.blocks = nnx.List([Block(d, heads, rngs) for _ in range(layers)])
        self.ln_f = nnx.LayerNorm(d, param_dtype=F64, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.wte(tokens)
        x = x + self.pos[: tokens.shape[1]] if hasattr(self, "pos") else self.wpe(x)
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.wte.attend(self.ln_f(x))


def next_token_loss(logits: jax.Array, example: Any) -> jax.Array:
    """Mean next-token cross-entropy of one sequence: logits (T, vocab), tokens (T,)."""
    tokens = example[0]
    logp = jax.nn.log_softmax(logits[:-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[1:, None], axis=1))


def _tokens(m: int, t: int, seed: int = 0) -> tuple:
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, 4, size=(m, t)))  # repeats: lookup rows add up
    return tokens, tokens


@lru_cache(maxsize=1)
def gpt() -> tuple[nnx.Module, NNXLoss]:
    """One GPT (2 blocks) and its loss for the statistics and the trainer test: sequences of 6 tokens in
    both, so the trainer reuses the probe's verdict and the loop's compilation (the signature has no
    example axis). Built on first use, inside a test (float64 is on there)."""
    model = build(lambda: GPT(nnx.Rngs(0)))
    return model, NNXLoss(model, next_token_loss)


def test_gpt_exact_on_the_fast_path_with_t_equal_to_m() -> None:
    """2 blocks of causal attention, learned positions, tied head, padding; 6 tokens and 6 examples;
    the user's module is neither switched nor changed."""
    model, loss = gpt()
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    _exact_on_fast_path(loss, _tokens(6, 6), np.array([1, 1, 0, 1, 1, 1]))
    after = nnx.state(model, nnx.Param)
    assert type(model.wte) is nnx.Embed and type(model.blocks[0].attn.query) is nnx.LinearGeneral
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_gpt_with_positions_on_the_root_module_steps_aside_naming_the_parameter() -> None:
    loss = NNXLoss(build(lambda: GPT(nnx.Rngs(2), layers=1, root_positions=True), 2), next_token_loss)
    _steps_aside(loss, _tokens(5, 6, seed=3), "parameter 'pos'", layer="pos", exact=False)  # test_nnx.py: exact


class UntiedUse(nnx.Module):
    """The embedding matrix used outside the Embed's calls: ``h @ embedding.T`` as the output projection."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.wte = nnx.Embed(7, 4, param_dtype=F64, rngs=rngs)
        self.ln = nnx.LayerNorm(4, param_dtype=F64, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.ln(self.wte(tokens)) @ self.wte.embedding[...].T


def test_an_embedding_used_outside_its_layer_steps_aside() -> None:
    _steps_aside(NNXLoss(build(lambda: UntiedUse(nnx.Rngs(0))), next_token_loss), _tokens(5, 4, seed=4), "wte")


def test_trainer_takes_one_fast_step_on_the_gpt_equal_to_sgd_on_the_loop_mean_gradient() -> None:
    tokens = np.asarray(_tokens(40, 6, seed=5)[0])
    data = (tokens, tokens)
    loss = gpt()[1]
    controller = CABSController(lr=0.2, bs_min=4, bs_max=20, bs_init=8, mode="reference")
    trainer = CABSTrainer(loss, controller, data, method="fast", seed=1)
    state = trainer.init(loss.params)
    idx, _ = next_batch(SamplerState(40, seed=1), 8)
    batch = (jnp.asarray(tokens[idx]), jnp.asarray(tokens[idx]))
    oracle = loop_oracle(loss, loss.params, batch)
    want = jax.tree.map(lambda p, g: p - 0.2 * g / len(idx), loss.params, cabs_jax.grad_tree(oracle, loss.params))
    _, decided = controller.update(controller.init(), oracle)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathFallbackWarning)
        state, info = trainer.step(state)
    assert info.batch_size == decided.batch_size and info.skipped is False
    np.testing.assert_allclose(info.variance, decided.variance, rtol=1e-9)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-13)
    assert probes_run(loss) >= 1


# --------------------------------------------------------------------------------------- MLP, CNN, refusals


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.l1 = nnx.Linear(4, 6, param_dtype=F64, rngs=rngs)
        self.l2 = nnx.Linear(6, 3, use_bias=False, param_dtype=F64, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.l2(jnp.tanh(self.l1(x)))


def _classification(m: int, shape: tuple[int, ...], classes: int, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(m,) + shape)), jnp.asarray(rng.integers(0, classes, size=m))


def test_mlp_exact_on_the_fast_path_and_from_the_module_itself() -> None:
    model = build(lambda: MLP(nnx.Rngs(0)))
    loss = NNXLoss(model, cross_entropy)
    batch, mask = _classification(9, (4,), 3), np.array([1, 1, 0, 1, 1, 1, 0, 1, 1])
    _exact_on_fast_path(loss, batch, mask)
    want = loop_oracle(loss, loss.params, batch, mask)
    assert_stats_close(cabs_jax.batch_stats(loss, model, batch, mask, method="fast"), want)  # the module as params
    # inside a caller's jit: the probe runs at trace time on synthetic values of the same shapes
    jitted = jax.jit(lambda p, b, w: cabs_jax.batch_stats(loss, p, b, w, method="fast"))
    assert_stats_close(jitted(loss.params, batch, jnp.asarray(mask, F64)), want)


class CNN(nnx.Module):
    """Strided and dilated convolutions (SAME, VALID, CIRCULAR), RMSNorm, a learned gate, pooling, dense."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.c1 = nnx.Conv(2, 4, (3, 3), strides=(2, 1), padding="SAME", param_dtype=F64, rngs=rngs)
        self.c2 = nnx.Conv(4, 4, (2, 2), kernel_dilation=(1, 2), padding="CIRCULAR", param_dtype=F64, rngs=rngs)
        self.norm = nnx.RMSNorm(4, param_dtype=F64, rngs=rngs)
        self.c3 = nnx.Conv(4, 3, (2, 2), padding="VALID", use_bias=False, param_dtype=F64, rngs=rngs)
        self.dense = nnx.Linear(3, 5, param_dtype=F64, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.tanh(self.c1(x))
        h = self.norm(jnp.tanh(self.c2(h)))
        h = jnp.tanh(self.c3(h))
        return self.dense(jnp.mean(h, axis=(1, 2)))


def test_cnn_exact_on_the_fast_path() -> None:
    batch = _classification(7, (6, 5, 2), 5, seed=1)
    loss = NNXLoss(build(lambda: CNN(nnx.Rngs(1)), 1), cross_entropy)
    _exact_on_fast_path(loss, batch, np.array([1, 0, 1, 1, 1, 1, 0]))


class Grouped(nnx.Module):
    """A grouped 1-D convolution (feature_group_count=2) or an eval-mode BatchNorm between two layers."""

    def __init__(self, rngs: nnx.Rngs, batchnorm: bool = False) -> None:
        self.c1 = nnx.Conv(2, 4, (2,), param_dtype=F64, rngs=rngs)
        self.mid = (nnx.BatchNorm(4, use_running_average=True, param_dtype=F64, rngs=rngs) if batchnorm
                    else nnx.Conv(4, 4, (3,), feature_group_count=2, param_dtype=F64, rngs=rngs))
        self.dense = nnx.Linear(4, 3, param_dtype=F64, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.dense(jnp.mean(jnp.tanh(self.mid(jnp.tanh(self.c1(x)))), axis=1))


def test_grouped_conv_and_eval_batchnorm_step_aside_by_name() -> None:
    """As in linen: no formula for grouped convolutions, BatchNorm kept off the own-parameters rule
    (test_nnx.py compares the generic path on an eval-mode BatchNorm CNN with the loop)."""
    batch = _classification(6, (5, 2), 3, seed=2)
    _steps_aside(NNXLoss(build(lambda: Grouped(nnx.Rngs(2)), 2), cross_entropy), batch, "feature_group_count",
                 layer="mid")
    _steps_aside(NNXLoss(build(lambda: Grouped(nnx.Rngs(2), batchnorm=True), 2), cross_entropy), batch,
                 "parameter 'mid/", exact=False)


class Shared(nnx.Module):
    """One Linear applied twice per forward pass."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.lin = nnx.Linear(3, 3, param_dtype=F64, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.lin(jnp.tanh(self.lin(x)))


class Remat(nnx.Module):
    """A layer called inside nnx.remat (a lifted transformation)."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.l1 = nnx.Linear(3, 4, param_dtype=F64, rngs=rngs)
        self.l2 = nnx.Linear(4, 3, param_dtype=F64, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.l2(nnx.remat(lambda layer, h: jnp.tanh(layer(h)))(self.l1, x))


class Custom(nnx.Module):
    """A custom dot_general on a Linear and a subclass of Linear (which takes the own-parameters rule)."""

    def __init__(self, rngs: nnx.Rngs, custom: bool) -> None:
        dot = (lambda *a, **k: jax.lax.dot_general(*a, **k)) if custom else jax.lax.dot_general
        self.l1 = nnx.Linear(3, 4, dot_general=dot, param_dtype=F64, rngs=rngs)
        self.l2 = Sub(4, 3, param_dtype=F64, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.l2(jnp.tanh(self.l1(x)))


class Sub(nnx.Linear):
    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(x) * 2.0


def test_unsupported_uses_step_aside_by_name() -> None:
    batch = _classification(6, (3,), 3, seed=3)
    # auto's generic result is compared with the loop once (custom); test_nnx.py does so for shared layers
    shared = NNXLoss(build(lambda: Shared(nnx.Rngs(0))), cross_entropy)
    _steps_aside(shared, batch, "more than once", layer="lin", exact=False)
    _steps_aside(NNXLoss(build(lambda: Remat(nnx.Rngs(0))), cross_entropy), batch, "l1", exact=False)
    custom = NNXLoss(build(lambda: Custom(nnx.Rngs(0), custom=True)), cross_entropy)
    _steps_aside(custom, batch, "custom dot_general", layer="l1")
    _exact_on_fast_path(NNXLoss(build(lambda: Custom(nnx.Rngs(0), custom=False)), cross_entropy), batch)
    masked = build(lambda: Grouped(nnx.Rngs(1)))
    masked.mid = nnx.Conv(4, 4, (3,), mask=jnp.tril(jnp.ones((3, 4, 4))), param_dtype=F64, rngs=nnx.Rngs(1))
    with pytest.raises(UnsupportedModelError, match="custom mask") as err:  # refused by its configuration
        masked_loss = NNXLoss(masked, cross_entropy)
        cabs_jax.batch_stats(masked_loss, masked_loss.params, _classification(6, (5, 2), 3), method="fast")
    assert err.value.layer == "mid"


def test_partly_trainable_layer_takes_the_own_parameters_rule() -> None:
    """wrt = the biases only: the kernels are constants, each Linear's trainable part is its bias."""
    model = build(lambda: MLP(nnx.Rngs(4)), 4)
    loss = NNXLoss(model, cross_entropy, wrt=nnx.All(nnx.Param, nnx.PathContains("bias")))
    assert len(jax.tree.leaves(loss.params)) == 1
    _exact_on_fast_path(loss, _classification(6, (4,), 3, seed=4), np.array([1, 1, 1, 0, 1, 1]))


# --------------------------------------------------------------------------------------- generated stacks


class Scale(nnx.Module):
    """A learned per-feature scale multiplied with broadcasting."""

    def __init__(self, d: int, rngs: nnx.Rngs) -> None:
        self.gain = nnx.Param(1.0 + 0.3 * jax.random.normal(rngs.params(), (d,), F64))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gain


class Heads(nnx.Module):
    """LinearGeneral d -> (2, d) then LinearGeneral over both axes back to d."""

    def __init__(self, d: int, rngs: nnx.Rngs) -> None:
        self.split = nnx.LinearGeneral(d, (2, d), param_dtype=F64, rngs=rngs)
        self.merge = nnx.LinearGeneral((2, d), d, axis=(-2, -1), use_bias=False, param_dtype=F64, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.merge(jnp.tanh(self.split(x)))


def _layer(kind: str, d: int, rngs: nnx.Rngs) -> nnx.Module:
    return {
        "linear": lambda: nnx.Linear(d, d, param_dtype=F64, rngs=rngs),
        "heads": lambda: Heads(d, rngs),
        "conv": lambda: nnx.Conv(d, d, (3,), padding="CAUSAL", param_dtype=F64, rngs=rngs),
        "conv_strided": lambda: nnx.Conv(d, d, (2,), strides=(2,), padding="SAME", use_bias=False,
                                         param_dtype=F64, rngs=rngs),
        "layernorm": lambda: nnx.LayerNorm(d, param_dtype=F64, rngs=rngs),
        "layernorm_scale_only": lambda: nnx.LayerNorm(d, use_bias=False, param_dtype=F64, rngs=rngs),
        "rmsnorm": lambda: nnx.RMSNorm(d, param_dtype=F64, rngs=rngs),
        "groupnorm": lambda: nnx.GroupNorm(d, num_groups=1, param_dtype=F64, rngs=rngs),
        "conv_reflect": lambda: nnx.Conv(d, d, (2,), padding="REFLECT", param_dtype=F64, rngs=rngs),
        "scale": lambda: Scale(d, rngs),
    }[kind]()


class Stack(nnx.Module):
    """Embed (m, T) -> (m, T, d), the generated layers with tanh between, mean over T, a head."""

    def __init__(self, kinds: list[str], d: int, seed: int) -> None:
        rngs = nnx.Rngs(seed)
        self.embed = nnx.Embed(5, d, param_dtype=F64, rngs=rngs)
        self.layers = nnx.List([_layer(k, d, rngs) for k in kinds])
        self.head = nnx.Linear(d, 3, param_dtype=F64, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = self.embed(tokens)
        for layer in self.layers:
            h = jnp.tanh(layer(h))
        return self.head(jnp.mean(h, axis=1))


KINDS = ["linear", "heads", "conv", "conv_strided", "conv_reflect", "layernorm", "layernorm_scale_only", "rmsnorm",
         "groupnorm", "scale"]


@settings(max_examples=3, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=3),
    d=st.integers(2, 4),
    t=st.integers(1, 4),
    m=st.integers(5, 7),
    seed=st.integers(0, 2**16),
)
def test_generated_stacks_of_supported_layers_equal_the_loop(kinds: list[str], d: int, t: int, m: int,
                                                            seed: int) -> None:
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, 5, size=(m, t)))
    batch = (tokens, jnp.asarray(rng.integers(0, 3, size=m)))
    mask = np.ones(m)
    mask[rng.integers(0, m)] = 0
    loss = NNXLoss(build(lambda: Stack(kinds, d, seed), seed), cross_entropy)
    want = loop_oracle(loss, loss.params, batch, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathFallbackWarning)
        got = cabs_jax.batch_stats(loss, loss.params, batch, mask, method="fast")
    assert_stats_close(got, want)
