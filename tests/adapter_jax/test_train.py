"""The training step: buckets and compilations, SGD/optax equivalence, decisions, checkpoints, digits."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cabs_jax import CABSTrainer, FlaxLoss
from jax_test_models import MLP, cross_entropy, init_f64, loop_oracle, steps_saving_at

import cabs_core
from cabs_core import CABSController, SamplerState, bucket_for, next_batch


def random_data(n: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1)
    return x, y


def test_batches_follow_the_core_sampler_padded_to_a_bucket() -> None:
    """The loop plans (sampler, bucket, mask); the backend gathers rows of numpy and jax arrays alike."""
    x, y = random_data(30)
    trainer = CABSTrainer(lambda p, e: jnp.sum(p * e[0]), CABSController(0.1, 4, 32), (x, jnp.asarray(y)),
                          buckets=(4, 8, 16, 32), seed=2)
    state, sampler = trainer.init(jnp.zeros(4)), SamplerState(30, seed=2)
    run = cabs_core.loop.RunState(state.controller, state.sampler)
    for b in (7, 12, 3, 20):
        run = run._replace(controller=dataclasses.replace(run.controller, batch_size=b))
        (micro,), new_sampler = trainer.loop.plan(run)
        idx, sampler = next_batch(sampler, b)
        bx, by = trainer.backend.take(trainer.data, micro.rows)
        assert len(micro.rows) == bucket_for(b, (4, 8, 16, 32)) and micro.mask.tolist()[:b] == [True] * b
        assert micro.count == b and isinstance(by, jax.Array)  # jax arrays are gathered on the device
        np.testing.assert_array_equal(bx[:b], x[idx])
        np.testing.assert_array_equal(np.asarray(by)[:b], y[idx])
        run = run._replace(sampler=new_sampler)
    assert run.sampler == sampler


def test_one_compilation_per_bucket() -> None:
    x, y = random_data(300)
    controller = CABSController(lr=0.05, bs_min=8, bs_max=64)
    trainer = CABSTrainer(FlaxLoss(MLP(), cross_entropy), controller, (x, y), method="fast")
    state = trainer.init(init_f64(MLP(), x[:1]))
    sizes = list(range(8, 65, 5)) + [64, 9, 50, 27]  # forced decisions across the whole range
    for b in sizes:
        state = state._replace(controller=dataclasses.replace(state.controller, batch_size=b))
        state, info = trainer.step(state)
    visited = {bucket_for(b, trainer.buckets) for b in sizes}
    assert len(set(sizes)) > len(visited) == 4  # 8, 16, 32, 64
    assert trainer.traces == len(visited)
    for _ in range(10):  # the controller's own decisions compile no more than their buckets
        before = state.controller.batch_size
        state, info = trainer.step(state)
        visited.add(bucket_for(before, trainer.buckets))
    assert trainer.traces == len(visited)


def test_step_is_sgd_on_the_mean_gradient_and_the_controller_decides() -> None:
    x, y = random_data(120)
    floss = FlaxLoss(MLP(), cross_entropy)
    controller = CABSController(lr=0.3, bs_min=4, bs_max=64, bs_init=10, mode="reference")
    params = init_f64(MLP(), x[:1])
    trainer = CABSTrainer(floss, controller, (x, y), seed=5)
    state = trainer.init(params)
    opt = optax.sgd(0.3)
    opt_state, cstate, sampler = opt.init(params), controller.init(), SamplerState(120, seed=5)
    for _ in range(3):
        idx, sampler = next_batch(sampler, cstate.batch_size)
        batch = (jnp.asarray(x[idx]), jnp.asarray(y[idx]))
        oracle = loop_oracle(floss, params, batch)
        mean_grad = jax.grad(lambda p, batch=batch: jnp.mean(jax.vmap(floss, (None, 0))(p, batch)))(params)
        updates, opt_state = opt.update(mean_grad, opt_state, params)
        params = optax.apply_updates(params, updates)
        cstate, want = controller.update(cstate, oracle)
        state, info = trainer.step(state)
        assert info.batch_size == want.batch_size and info.skipped is False
        np.testing.assert_allclose(info.variance, want.variance, rtol=1e-9)
        np.testing.assert_allclose(info.loss, want.loss, rtol=1e-12)
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    assert state.sampler == sampler and state.controller.updates == 3


def test_optax_optimizer_gets_the_mean_gradient() -> None:
    x, y = random_data(64)
    floss = FlaxLoss(MLP(), cross_entropy)
    controller = CABSController(lr=0.1, bs_min=8, bs_max=32)
    params = init_f64(MLP(), x[:1])
    opt = optax.adam(0.1)
    trainer = CABSTrainer(floss, controller, (x, y), optimizer=optax.inject_hyperparams(optax.adam)(learning_rate=0.1),
                          method="generic", chunk_size=3)
    state, _ = trainer.step(trainer.init(params))
    idx, _ = next_batch(SamplerState(64), 8)
    batch = (jnp.asarray(x[idx]), jnp.asarray(y[idx]))
    g = jax.grad(lambda p: jnp.mean(jax.vmap(floss, (None, 0))(p, batch)))(params)
    updates, _ = opt.update(g, opt.init(params), params)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(optax.apply_updates(params, updates))):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def test_one_host_copy_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The step's host transfer is one stacked vector: the four scalars (and an optimizer's rate)."""
    import cabs_jax.train as train_module

    x, y = random_data(50)
    copies = []
    real = train_module._host_vector

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        copies.append(out)
        return out

    monkeypatch.setattr(train_module, "_host_vector", counting)
    for optimizer, width in ((None, 4), (optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), 5)):
        copies.clear()
        trainer = CABSTrainer(FlaxLoss(MLP(), cross_entropy), CABSController(0.1, 4, 16),
                              (jnp.asarray(x), jnp.asarray(y)), optimizer=optimizer)
        state = trainer.init(init_f64(MLP(), x[:1]))
        for _ in range(3):
            state, _ = trainer.step(state)
        assert len(copies) == 3 and all(isinstance(v, jax.Array) and v.shape == (width,) for v in copies)
        assert all(isinstance(p, jax.Array) for p in jax.tree.leaves(state.params))


def test_checkpoint_resume_makes_the_same_decisions(tmp_path) -> None:
    x, y = random_data(150)
    floss = FlaxLoss(MLP(), cross_entropy)
    controller = CABSController(lr=0.2, bs_min=3, bs_max=60, c=20.0)

    momentum = optax.inject_hyperparams(optax.sgd)(learning_rate=0.2, momentum=0.9)

    def trainer(controller: CABSController = controller, seed: int = 11) -> CABSTrainer:
        return CABSTrainer(floss, controller, (x, y), optimizer=momentum, seed=seed)

    t1 = trainer()
    state, saved, sizes = steps_saving_at(t1, t1.init(init_f64(MLP(), x[:1])), 8, 4, tmp_path / "ckpt.npz")
    assert len(set(sizes)) > 1
    t2 = trainer()
    like = t2.init(init_f64(MLP(), x[:1], seed=9))
    resumed = t2.restore(tmp_path / "ckpt.npz", like)
    assert resumed.controller == saved.controller and resumed.sampler == saved.sampler
    for k in range(4, 8):
        resumed, info = t2.step(resumed)
        assert info.batch_size == sizes[k]
    assert resumed.controller == state.controller and resumed.sampler == state.sampler
    resumed_arrays = jax.tree.leaves((resumed.params, resumed.opt_state))
    for a, b in zip(resumed_arrays, jax.tree.leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="shape"):
        t2.restore(tmp_path / "ckpt.npz", t2.init(init_f64(MLP(hidden=(6, 5)), x[:1])))
    with np.load(tmp_path / "ckpt.npz") as f:
        assert '"cabs-checkpoint/1"' in str(f["envelope"])


@pytest.mark.parametrize(("key", "changed"), [("lr", {"lr": 0.3}), ("bs_max", {"bs_max": 50}), ("seed", {})])
def test_checkpoint_of_another_configuration_is_refused_unless_allowed(tmp_path, key: str, changed: dict) -> None:
    x, y = random_data(40)

    def loss(w, example):  # a linear model: cheap to compile
        return 0.5 * (example[0] @ w - example[1]) ** 2

    t = CABSTrainer(loss, CABSController(lr=0.2, bs_min=3, bs_max=40), (x, y), seed=1)
    state, _ = t.step(t.init(jnp.zeros(4)))
    t.save(tmp_path / "c.npz", state)
    other = CABSTrainer(loss, CABSController(**{"lr": 0.2, "bs_min": 3, "bs_max": 40, **changed}), (x, y),
                        seed=2 if key == "seed" else 1)
    with pytest.raises(cabs_core.CheckpointMismatchError, match=f"{key}: checkpoint") as e:
        other.restore(tmp_path / "c.npz", other.init(jnp.zeros(4)))
    assert len(e.value.differences) == 1
    resumed = other.restore(tmp_path / "c.npz", other.init(jnp.zeros(4)), allow=[key])
    assert resumed.controller.step == 1 and resumed.sampler.examples_seen == 3
    np.testing.assert_array_equal(resumed.params, state.params)


def test_torn_or_garbage_checkpoint_files_are_refused(tmp_path) -> None:
    x, y = random_data(40)
    t = CABSTrainer(lambda w, e: jnp.sum(w * e[0]), CABSController(lr=0.2, bs_min=3, bs_max=40), (x, y))
    state = t.init(jnp.zeros(4))
    t.save(tmp_path / "c.npz", state)
    whole = (tmp_path / "c.npz").read_bytes()
    (tmp_path / "torn.npz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "junk.npz").write_bytes(b"not a checkpoint at all")
    for name in ("torn.npz", "junk.npz"):
        with pytest.raises(ValueError, match=f"{name}: not a CABS checkpoint file"):
            t.restore(tmp_path / name, state)


def test_nonfinite_statistics_raise_or_skip_without_touching_params() -> None:
    x, y = random_data(40)
    x[np.arange(40) % 2 == 0] = np.nan  # every batch of >= 2 holds a NaN example (sampler permutes)
    floss = FlaxLoss(MLP(), cross_entropy)
    params = init_f64(MLP(), x[:1])
    t = CABSTrainer(floss, CABSController(0.1, 8, 16), (x, y))
    with pytest.raises(cabs_core.NonFiniteStatisticsError, match="loss_sum"):
        t.step(t.init(params))
    t = CABSTrainer(floss, CABSController(0.1, 8, 16, nonfinite="skip"), (x, y))
    state, info = t.step(t.init(params))
    assert info.skipped and info.reason == "nonfinite" and state.controller.nonfinite == 1
    assert state.sampler.examples_seen == 8
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_trainer_configuration_errors() -> None:
    x, y = random_data(20)
    floss = FlaxLoss(MLP(), cross_entropy)
    with pytest.raises(ValueError, match="bs_max"):
        CABSTrainer(floss, CABSController(0.1, 4, 64), (x, y), buckets=(4, 8, 32))
    with pytest.raises(ValueError, match="method"):
        CABSTrainer(floss, CABSController(0.1, 4, 64), (x, y), method="exact")
    with pytest.raises(TypeError, match="CABSController"):
        CABSTrainer(floss, {"lr": 0.1}, (x, y))
    with pytest.raises(cabs_core.ConfigError, match="inject_hyperparams"):
        CABSTrainer(floss, CABSController(0.1, 4, 64), (x, y), optimizer=optax.sgd(0.1))
    with pytest.raises(cabs_core.ConfigError, match="differs from controller.lr"):
        CABSTrainer(floss, CABSController(0.1, 4, 64), (x, y), optimizer=optax.inject_hyperparams(optax.sgd)(0.3))


def test_training_on_digits_lowers_the_loss() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.data.astype(np.float32) / 16.0, digits.target.astype(np.int32)
    module = MLP(hidden=(32,), classes=10)
    floss = FlaxLoss(module, cross_entropy)
    params = module.init(jax.random.key(0), x[:1])["params"]  # float32 training
    controller = CABSController(lr=0.5, bs_min=4, bs_max=256, c=10.0)  # c scales the rule (beyond the paper)
    trainer = CABSTrainer(floss, controller, (x, y))
    full_loss = jax.jit(lambda p: jnp.mean(floss.batch_losses(p, (x, y))))
    state = trainer.init(params)
    before = float(full_loss(state.params))
    sizes = []
    for _ in range(40):
        state, info = trainer.step(state)
        sizes.append(info.batch_size)
    after = float(full_loss(state.params))
    assert after < 0.3 * before, (before, after)
    assert sizes[-1] > sizes[0] >= 4  # CABS: the batch grows as the loss falls
    assert trainer.traces <= len(trainer.buckets)


def test_a_batch_of_one_updates_params_but_the_controller_skips() -> None:
    """docs/spec.md section 5: m < 2 in paper mode leaves the controller as it was; SGD still takes the step."""
    x, y = random_data(20)
    floss = FlaxLoss(MLP(), cross_entropy)
    params = init_f64(MLP(), x[:1])
    trainer = CABSTrainer(floss, CABSController(0.1, bs_min=1, bs_max=8), (x, y), buckets=(2, 8))
    state, info = trainer.step(trainer.init(params))
    assert info.skipped and info.reason == "count" and state.controller.batch_size == 1
    assert state.controller.updates == 0 and state.controller.skipped == 1
    idx, _ = next_batch(SamplerState(20), 1)
    g = jax.grad(floss)(params, (jnp.asarray(x[idx[0]]), jnp.asarray(y[idx[0]])))
    for a, p, gi in zip(jax.tree.leaves(state.params), jax.tree.leaves(params), jax.tree.leaves(g)):
        np.testing.assert_allclose(a, p - 0.1 * gi, rtol=1e-12, atol=1e-14)  # padded to 2, masked
