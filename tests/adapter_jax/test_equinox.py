"""Equinox modules (issue 15): EquinoxLoss statistics against float64 loops, the trainer, checkpoints,
write-back, and the refusals of training-mode BatchNorm and Dropout."""

from __future__ import annotations

import cabs_jax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cabs_jax import CABSTrainer, EquinoxLoss
from jax_test_models import assert_module_loss_exact, assert_stats_close, cross_entropy, loop_oracle

from cabs_core import BatchNormTrainingError, CABSController, UnsupportedModelError

F64 = jnp.float64


class CNN(eqx.Module):
    """conv3x3 (channels first, Equinox's layout), an integer buffer (not trained), pooling, linear."""

    conv: eqx.nn.Conv2d
    pool: eqx.nn.AvgPool2d
    head: eqx.nn.Linear
    shift: jax.Array

    def __init__(self, key: jax.Array) -> None:
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(2, 3, 3, padding=1, key=k1, dtype=F64)
        self.pool = eqx.nn.AvgPool2d(2, 2)
        self.head = eqx.nn.Linear(3 * 3 * 3, 4, key=k2, dtype=F64)
        self.shift = jnp.arange(3, dtype=jnp.int32)  # an int leaf: a constant of the loss

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.conv(x)) + self.shift[:, None, None].astype(F64)
        return self.head(jnp.ravel(self.pool(h)))


def data(n: int, shape: tuple[int, ...], classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(n,) + shape)), jnp.asarray(rng.integers(0, classes, size=n))


def mlp() -> eqx.nn.MLP:
    return eqx.nn.MLP(4, 3, 6, 2, activation=jnp.tanh, key=jax.random.PRNGKey(0), dtype=F64)


def mlp_by_hand(params, example):
    """The MLP's loss written without Equinox, on the arrays of the trainable part."""
    h = example[0]
    for k, layer in enumerate(params.layers):
        h = layer.weight @ h + layer.bias
        h = jnp.tanh(h) if k < len(params.layers) - 1 else h
    return cross_entropy(h, example)


def test_mlp_statistics_equal_a_float64_loop_and_an_equinox_free_loss() -> None:
    model = mlp()
    loss = EquinoxLoss(model, cross_entropy)
    batch = data(9, (4,), 3)
    mask = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1], np.float64)
    assert_module_loss_exact(loss, model, mlp_by_hand, batch, mask)  # no Equinox in the oracle's loss


def test_cnn_statistics_equal_a_float64_loop_and_int_leaves_are_constants() -> None:
    model = CNN(jax.random.PRNGKey(1))
    loss = EquinoxLoss(model, lambda out, ex: cross_entropy(out, ex))
    assert loss.params.shift is None and loss.static.shift is not None  # not trained
    batch = data(7, (2, 6, 6), 4, seed=1)
    want = loop_oracle(loss, loss.params, batch, None)
    assert_stats_close(cabs_jax.batch_stats(loss, loss.params, batch), want)
    assert_stats_close(cabs_jax.batch_stats(loss, loss.params, batch, method="fast"), want)  # eqx_fast
    with pytest.raises(UnsupportedModelError, match="EquinoxLoss"):  # a plain function has no fast path
        cabs_jax.batch_stats(lambda p, ex: loss(p, ex), loss.params, batch, method="fast")


def test_trainer_steps_checkpoints_and_writes_back(tmp_path) -> None:
    model = mlp()
    loss = EquinoxLoss(model, cross_entropy)
    x, y = data(64, (4,), 3, seed=2)
    ctl = CABSController(lr=0.2, c=20.0, bs_min=4, bs_max=32, bs_init=8)
    opt = optax.inject_hyperparams(optax.sgd)(learning_rate=0.2, momentum=0.9)
    trainer = CABSTrainer(loss, ctl, (x, y), optimizer=opt, seed=3)
    state = trainer.init(model)  # the module itself: its trainable part
    for _ in range(4):
        state, _ = trainer.step(state)
    trainer.save(tmp_path / "ck.npz", state)
    rest = []
    for _ in range(4):
        state, info = trainer.step(state)
        rest.append((info.batch_size, info.loss))
    again = CABSTrainer(loss, ctl, (x, y), optimizer=opt, seed=3)
    resumed = again.restore(tmp_path / "ck.npz", again.init(model))
    got = []
    for _ in range(4):
        resumed, info = again.step(resumed)
        got.append((info.batch_size, info.loss))
    assert got == rest
    trained = loss.combine(state.params)
    assert isinstance(trained, eqx.nn.MLP)
    x0 = x[:3]
    np.testing.assert_allclose(jax.vmap(trained)(x0), loss.apply(state.params, x0), rtol=1e-12)
    assert not np.allclose(jax.vmap(trained)(x0), jax.vmap(model)(x0))  # it trained
    with pytest.raises(ValueError, match="structure"):
        loss.combine({"w": x0})


def test_training_mode_batchnorm_and_dropout_are_refused() -> None:
    class WithNorm(eqx.Module):
        norm: eqx.nn.BatchNorm
        head: eqx.nn.Linear

        def __init__(self, inference: bool) -> None:
            self.norm = eqx.nn.BatchNorm(4, "batch", inference=inference, dtype=F64, mode="batch")
            self.head = eqx.nn.Linear(4, 2, key=jax.random.PRNGKey(0), dtype=F64)

    with pytest.raises(BatchNormTrainingError, match="inference"):
        EquinoxLoss(WithNorm(False), cross_entropy)
    EquinoxLoss(WithNorm(True), cross_entropy)  # inference mode: a constant normalisation
    with pytest.raises(UnsupportedModelError, match="Dropout"):
        EquinoxLoss(eqx.nn.Sequential([eqx.nn.Dropout(0.5), eqx.nn.Linear(4, 2, key=jax.random.PRNGKey(0))]),
                    cross_entropy)
    with pytest.raises(TypeError, match="equinox.Module"):
        EquinoxLoss(lambda x: x, cross_entropy)


class TinyGPT(eqx.Module):
    """Learned positions, one causal attention block, LayerNorm, an MLP, and a tied head (the
    embedding's table as the output projection)."""

    embed: eqx.nn.Embedding
    pos: jax.Array
    attn: eqx.nn.MultiheadAttention
    norm1: eqx.nn.LayerNorm
    norm2: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP

    def __init__(self, key: jax.Array, vocab: int = 11, d: int = 8, seq: int = 5) -> None:
        k = jax.random.split(key, 4)
        self.embed = eqx.nn.Embedding(vocab, d, key=k[0], dtype=F64)
        self.pos = 0.1 * jax.random.normal(k[1], (seq, d), F64)
        self.attn = eqx.nn.MultiheadAttention(2, d, use_query_bias=True, use_output_bias=True, key=k[2], dtype=F64)
        self.norm1, self.norm2 = eqx.nn.LayerNorm(d, dtype=F64), eqx.nn.LayerNorm(d, dtype=F64)
        self.mlp = eqx.nn.MLP(d, d, 16, 1, activation=jax.nn.gelu, key=k[3], dtype=F64)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = jax.vmap(self.embed)(tokens) + self.pos[: tokens.shape[0]]
        causal = jnp.tril(jnp.ones((tokens.shape[0], tokens.shape[0]), bool))
        a = jax.vmap(self.norm1)(h)
        h = h + self.attn(a, a, a, mask=causal)
        h = h + jax.vmap(self.mlp)(jax.vmap(self.norm2)(h))
        return h @ self.embed.weight.T  # tied head


def token_loss(logits: jax.Array, example: tuple) -> jax.Array:
    """Mean next-token cross-entropy of one sequence."""
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), example[1][:, None], axis=-1))


def test_small_gpt_statistics_equal_a_float64_loop() -> None:
    model = TinyGPT(jax.random.PRNGKey(4))
    loss = EquinoxLoss(model, token_loss)
    rng = np.random.default_rng(5)
    batch = (jnp.asarray(rng.integers(0, 11, (5, 5))), jnp.asarray(rng.integers(0, 11, (5, 5))))  # T == m
    mask = np.array([1, 0, 1, 1, 1], np.float64)
    want = loop_oracle(loss, loss.params, batch, mask)
    assert float(want.sq_norm_sum) > 0 and loss.params.pos is not None  # the positions are trained
    # the generic path (the fast path on this model: tests/adapter_jax/test_equinox_fast.py)
    assert_stats_close(cabs_jax.batch_stats(loss, loss.params, batch, mask, method="generic"), want)
