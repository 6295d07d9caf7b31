"""Flax NNX modules (issue 15): NNXLoss statistics against float64 loops, the trainer, checkpoints, write-back."""

from __future__ import annotations

import dataclasses

import cabs_jax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cabs_jax import CABSTrainer, DataParallelCABSTrainer, NNXLoss, data_mesh
from flax import nnx
from jax_test_models import assert_module_loss_exact, assert_stats_close, cross_entropy, loop_oracle, steps_saving_at

from cabs_core import (
    BatchNormTrainingError,
    CABSController,
    ConfigError,
    SamplerState,
    UnsupportedModelError,
    next_batch,
)

F64 = jnp.float64


class NNXMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, din: int = 4, hidden: int = 6, classes: int = 3) -> None:
        self.l1 = nnx.Linear(din, hidden, param_dtype=F64, rngs=rngs)
        self.l2 = nnx.Linear(hidden, classes, param_dtype=F64, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.l2(jnp.tanh(self.l1(x)))


class NNXCNN(nnx.Module):
    """conv3x3, eval-mode BatchNorm with non-trivial running statistics, pooling, dense (all float64)."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv = nnx.Conv(2, 3, (3, 3), padding="SAME", param_dtype=F64, rngs=rngs)
        self.bn = nnx.BatchNorm(3, use_running_average=True, param_dtype=F64, rngs=rngs)
        stat = self.bn.mean[...].dtype  # running statistics: constants of the loss, not trained
        self.bn.mean[...] = jnp.asarray([0.3, -0.2, 0.1], stat)
        self.bn.var[...] = jnp.asarray([2.0, 0.5, 1.5], stat)
        self.drop = nnx.Dropout(0.5, deterministic=True, rngs=rngs)
        self.dense = nnx.Linear(3 * 3 * 3, 4, param_dtype=F64, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = nnx.relu(self.bn(self.conv(x)))
        h = nnx.avg_pool(h, (2, 2), strides=(2, 2), padding="SAME")
        return self.dense(self.drop(h.reshape(h.shape[0], -1)))


def mlp_by_hand(params, example):
    """The MLP's loss written independently of NNX, on the arrays of the Param state."""
    k1, b1 = params["l1"]["kernel"][...], params["l1"]["bias"][...]
    k2, b2 = params["l2"]["kernel"][...], params["l2"]["bias"][...]
    return cross_entropy(jnp.tanh(example[0] @ k1 + b1) @ k2 + b2, example)


def data(n: int, shape: tuple[int, ...], classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n,) + shape), rng.integers(0, classes, size=n)


def test_mlp_statistics_equal_a_float64_loop_and_an_nnx_free_loss() -> None:
    model = NNXMLP(nnx.Rngs(0))
    loss = NNXLoss(model, cross_entropy)
    x, y = data(9, (4,), 3)
    batch = (jnp.asarray(x), jnp.asarray(y))
    mask = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1], np.float64)
    assert_module_loss_exact(loss, model, mlp_by_hand, batch, mask)  # no NNX in the oracle's loss
    want = loop_oracle(mlp_by_hand, loss.params, batch, mask)
    assert_stats_close(cabs_jax.PerExampleStats(loss, method="generic")(loss.params, batch, mask), want)
    grads = cabs_jax.grad_tree(cabs_jax.batch_stats(loss, loss.params, batch, mask), loss.params)
    assert jax.tree.structure(grads) == jax.tree.structure(loss.params)
    np.testing.assert_allclose(loss.batch_losses(loss.params, batch),
                               [float(mlp_by_hand(loss.params, (x[i], y[i]))) for i in range(9)], rtol=1e-12)


class Tied(nnx.Module):
    """One Linear applied twice (shared weights) and a bare nnx.Param scale: uses NNX keeps in one state entry."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.lin = nnx.Linear(3, 3, param_dtype=F64, rngs=rngs)
        self.scale = nnx.Param(jnp.asarray([1.5, -0.5, 2.0], F64))
        self.alias = self.lin  # the same layer under two names

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.alias(jnp.tanh(self.lin(x))) * self.scale


def test_shared_layers_and_bare_params_equal_an_nnx_free_loop() -> None:
    loss = NNXLoss(Tied(nnx.Rngs(4)), cross_entropy)
    assert len(jax.tree.leaves(loss.params)) == 3  # kernel, bias (once), scale

    def by_hand(p, example):
        lin = p["alias"] if "alias" in p else p["lin"]  # the shared layer is stored once, under one of its names
        k, b, s = lin["kernel"][...], lin["bias"][...], p["scale"][...]
        return cross_entropy((jnp.tanh(example[0] @ k + b) @ k + b) * s, example)

    x, y = data(6, (3,), 3, seed=3)
    batch, mask = (jnp.asarray(x), jnp.asarray(y)), np.array([1, 1, 1, 0, 1, 1], np.float64)
    want = loop_oracle(by_hand, loss.params, batch, mask)
    assert_stats_close(cabs_jax.batch_stats(loss, loss.params, batch, mask), want)


def test_cnn_with_eval_batchnorm_equals_a_float64_loop() -> None:
    model = NNXCNN(nnx.Rngs(1))
    loss = NNXLoss(model, cross_entropy)
    assert {p[-1] for p, _ in nnx.to_flat_state(loss.rest)} >= {"mean", "var"}  # constants, not parameters
    x, y = data(7, (5, 5, 2), 4, seed=1)
    batch = (jnp.asarray(x), jnp.asarray(y))
    mask = np.array([1, 0, 1, 1, 1, 1, 0], np.float64)
    want = loop_oracle(loss, loss.params, batch, mask)
    got = cabs_jax.batch_stats(loss, loss.params, batch, mask)
    assert_stats_close(got, want)
    shifted = NNXCNN(nnx.Rngs(1))  # the running statistics enter the loss: other constants, other numbers
    shifted.bn.mean[...] = jnp.zeros_like(shifted.bn.mean[...])
    other = cabs_jax.batch_stats(NNXLoss(shifted, cross_entropy), loss.params, batch, mask)
    assert abs(float(other.sq_norm_sum) - float(got.sq_norm_sum)) > 1e-6 * float(got.sq_norm_sum)


def test_refusals_name_the_problem() -> None:
    model = NNXMLP(nnx.Rngs(0))
    loss = NNXLoss(model, cross_entropy)
    x, y = data(6, (4,), 3)
    with pytest.raises(TypeError, match="must be a cabs_jax.NNXLoss"):
        cabs_jax.batch_stats(mlp_by_hand, model, (x, y))
    with pytest.raises(TypeError, match="flax.nnx.Module"):
        NNXLoss(object(), cross_entropy)  # type: ignore[arg-type]
    cnn = NNXCNN(nnx.Rngs(0))
    cnn.train()  # BatchNorm on batch statistics, dropout active
    with pytest.raises(BatchNormTrainingError, match="'bn'"):
        NNXLoss(cnn, cross_entropy)
    cnn.bn.use_running_average = True
    with pytest.raises(UnsupportedModelError, match="'drop'.*deterministic"):
        NNXLoss(cnn, cross_entropy)
    cnn.eval()
    NNXLoss(cnn, cross_entropy)
    with pytest.raises(ValueError, match="structure"):
        loss.update({"l1": jnp.zeros(3)})


def test_trainer_is_sgd_on_the_mean_gradient_and_writes_back() -> None:
    x, y = data(80, (4,), 3, seed=2)
    model = NNXMLP(nnx.Rngs(3))
    loss = NNXLoss(model, cross_entropy)
    controller = CABSController(lr=0.3, bs_min=4, bs_max=40, bs_init=10, mode="reference")
    trainer = CABSTrainer(loss, controller, (x, y), seed=5)
    state = trainer.init(model)  # the module itself
    params, cstate, sampler = loss.params, controller.init(), SamplerState(80, seed=5)
    for _ in range(3):
        idx, sampler = next_batch(sampler, cstate.batch_size)
        batch = (jnp.asarray(x[idx]), jnp.asarray(y[idx]))
        oracle = loop_oracle(mlp_by_hand, params, batch)
        m = len(idx)
        params = jax.tree.map(lambda p, g, m=m: p - 0.3 * g / m, params, cabs_jax.grad_tree(oracle, params))
        cstate, want = controller.update(cstate, oracle)
        state, info = trainer.step(state)
        assert info.batch_size == want.batch_size and info.skipped is False
        np.testing.assert_allclose(info.variance, want.variance, rtol=1e-9)
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-13)
    assert type(state.params) is type(loss.params)
    before = np.asarray(model.l1.kernel[...]).copy()
    assert loss.update(state.params) is model
    np.testing.assert_array_equal(np.asarray(model.l1.kernel[...]), np.asarray(state.params["l1"]["kernel"][...]))
    assert not np.allclose(before, np.asarray(model.l1.kernel[...]))
    np.testing.assert_allclose(model(jnp.asarray(x[:5])), loss.apply(state.params, jnp.asarray(x[:5])), rtol=1e-12)


def test_checkpoint_round_trip_with_momentum_resumes_the_same_run(tmp_path) -> None:
    x, y = data(90, (4,), 3, seed=4)
    loss = NNXLoss(NNXMLP(nnx.Rngs(0)), cross_entropy)
    momentum = optax.inject_hyperparams(optax.sgd)(learning_rate=0.2, momentum=0.9)
    controller = CABSController(lr=0.2, bs_min=3, bs_max=40, c=20.0)

    def trainer(optimizer=momentum) -> CABSTrainer:
        return CABSTrainer(loss, controller, (x, y), optimizer=optimizer, seed=11)

    t1 = trainer()
    state, saved, sizes = steps_saving_at(t1, t1.init(loss.params), 6, 3, tmp_path / "nnx.npz")
    other = NNXMLP(nnx.Rngs(9))  # other values, same structure; a fresh nnx.Optimizer stands for its tx
    t2 = trainer(nnx.Optimizer(other, momentum, wrt=nnx.Param))
    like = t2.init(NNXLoss(other, cross_entropy).params)
    resumed = t2.restore(tmp_path / "nnx.npz", like)
    assert resumed.controller == saved.controller and resumed.sampler == saved.sampler
    got, want = (resumed.params, resumed.opt_state), (saved.params, saved.opt_state)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for k in range(3, 6):
        resumed, info = t2.step(resumed)
        assert info.batch_size == sizes[k]
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12)


def test_data_parallel_trainer_on_a_one_device_mesh_matches_the_single_device_trainer() -> None:
    x, y = data(60, (4,), 3, seed=6)
    loss = NNXLoss(NNXMLP(nnx.Rngs(2)), cross_entropy)
    controller = CABSController(lr=0.25, bs_min=4, bs_max=32, bs_init=7)
    one = CABSTrainer(loss, controller, (x, y), seed=3)
    dp = DataParallelCABSTrainer(loss, controller, (x, y), seed=3, mesh=data_mesh(jax.devices()[:1]))
    s1, s2 = one.init(loss.params), dp.init(loss.module)
    for _ in range(3):
        s1, i1 = one.step(s1)
        s2, i2 = dp.step(s2)
        assert i1.batch_size == i2.batch_size
    for a, b in zip(jax.tree.leaves(s2.params), jax.tree.leaves(s1.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-13)
    assert dataclasses.asdict(s1.controller) == dataclasses.asdict(s2.controller)


def test_an_nnx_optimizer_that_has_stepped_is_refused() -> None:
    model = NNXMLP(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), wrt=nnx.Param)
    x, y = data(20, (4,), 3)
    loss = NNXLoss(model, cross_entropy)
    assert CABSTrainer(loss, CABSController(0.1, 4, 16), (x, y), optimizer=opt).optimizer is opt.tx
    opt.update(model, jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param)))
    with pytest.raises(ConfigError, match="already taken 1 steps"):
        CABSTrainer(loss, CABSController(0.1, 4, 16), (x, y), optimizer=opt)


class NNXGPT(nnx.Module):
    """Learned positions, one causal attention block, LayerNorm, an MLP and a tied head (Embed.attend)."""

    def __init__(self, rngs: nnx.Rngs, vocab: int = 11, d: int = 8, seq: int = 5) -> None:
        self.embed = nnx.Embed(vocab, d, param_dtype=F64, rngs=rngs)
        self.pos = nnx.Param(0.1 * jax.random.normal(rngs.params(), (seq, d), F64))
        self.attn = nnx.MultiHeadAttention(2, d, param_dtype=F64, decode=False, rngs=rngs)
        self.norm1 = nnx.LayerNorm(d, param_dtype=F64, rngs=rngs)
        self.norm2 = nnx.LayerNorm(d, param_dtype=F64, rngs=rngs)
        self.up = nnx.Linear(d, 16, param_dtype=F64, rngs=rngs)
        self.down = nnx.Linear(16, d, param_dtype=F64, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        t = tokens.shape[-1]
        h = self.embed(tokens) + self.pos[...][:t]
        h = h + self.attn(self.norm1(h), mask=nnx.make_causal_mask(tokens))
        h = h + self.down(nnx.gelu(self.up(self.norm2(h))))
        return self.embed.attend(h)


def test_small_gpt_statistics_equal_a_float64_loop() -> None:
    def token_loss(logits: jax.Array, example: tuple) -> jax.Array:
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), example[1][:, None], axis=-1))

    loss = NNXLoss(NNXGPT(nnx.Rngs(3)), token_loss)
    rng = np.random.default_rng(6)
    batch = (jnp.asarray(rng.integers(0, 11, (5, 5))), jnp.asarray(rng.integers(0, 11, (5, 5))))  # T == m
    mask = np.array([1, 1, 0, 1, 1], np.float64)
    want = loop_oracle(loss, loss.params, batch, mask)
    assert float(want.sq_norm_sum) > 0
    assert_stats_close(cabs_jax.batch_stats(loss, loss.params, batch, mask), want)
