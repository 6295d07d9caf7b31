"""cabs_jax.CABSTrainer against the NumPy reference backend of the core loop, on the same problem.

Same data, initial weights 0, same controller and seed, float64: a linear model
``x @ w`` with per-example loss ``0.5 * (x @ w - y)**2`` in JAX must make the
same decisions (exact integers) and reach the same weights (rtol 1e-10) as
``CABSLoop(LinearBackend(), ...)``. optax's ``sgd(momentum=mu)`` keeps
v <- mu v + g and steps w <- w - lr v: the reference's convention.
(The data-parallel comparison runs in tests/distributed_jax, on 4 CPU devices.)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cabs_conformance.loop_reference import LinearBackend, problem
from cabs_jax import CABSTrainer, PerExampleStats

from cabs_core import CABSController, batch_stats_from_per_example, bucket_for
from cabs_core.loop import CABSLoop

CTL = dict(lr=0.05, c=40.0, bs_min=4, bs_max=64, mu=0.9)
STEPS = 15


def squared_error(w: jnp.ndarray, example: tuple) -> jnp.ndarray:
    x, y = example
    return 0.5 * (x @ w - y) ** 2


def reference(steps: int = STEPS, **backend) -> tuple[list[int], np.ndarray]:
    data, w0 = problem()
    loop = CABSLoop(LinearBackend(**backend), CABSController(**CTL), num_examples=len(data[1]))
    run, model, sizes = loop.init(), (w0, np.zeros_like(w0)), []
    for _ in range(steps):
        run, model, info = loop.step(run, model, data)
        sizes.append(info.batch_size)
    return sizes, model[0]


def jax_run(steps: int = STEPS, **kwargs) -> tuple[list[int], np.ndarray, CABSTrainer]:
    data, w0 = problem()
    trainer = CABSTrainer(squared_error, CABSController(**CTL), data, **kwargs)
    state, sizes = trainer.init(jnp.asarray(w0)), []
    for _ in range(steps):
        state, info = trainer.step(state)
        sizes.append(info.batch_size)
    return sizes, np.asarray(state.params), trainer


def test_plain_sgd_makes_the_reference_decisions() -> None:
    want_sizes, want_w = reference()
    sizes, w, trainer = jax_run()
    assert sizes == want_sizes and len(set(sizes)) > 3
    np.testing.assert_allclose(w, want_w, rtol=1e-10)
    used = [CABSController(**CTL).init().batch_size] + sizes[:-1]
    assert trainer.traces == len({bucket_for(b, trainer.buckets) for b in used})  # one program per bucket


def test_micro_batches_change_nothing() -> None:
    want_sizes, want_w = reference()
    sizes, w, trainer = jax_run(max_micro_batch=3)
    assert sizes == want_sizes
    np.testing.assert_allclose(w, want_w, rtol=1e-10)
    assert trainer.traces <= 3  # micro-batches of at most 3 rows: buckets 1, 2, 3 at most


def test_momentum_follows_the_reference_convention() -> None:
    want_sizes, want_w = reference(momentum=0.9)
    opt = optax.inject_hyperparams(optax.sgd)(learning_rate=CTL["lr"], momentum=0.9)
    sizes, w, _ = jax_run(optimizer=opt)
    assert sizes == want_sizes
    np.testing.assert_allclose(w, want_w, rtol=1e-10)
    assert sizes != reference()[0]  # momentum changes the path, hence the decisions


def test_a_schedule_moves_the_coupled_batch_size() -> None:
    def schedule(t):
        return CTL["lr"] * 0.8**t

    want_sizes, want_w = reference(lr_schedule=schedule)
    sizes, w, _ = jax_run(optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=schedule))
    assert sizes == want_sizes
    np.testing.assert_allclose(w, want_w, rtol=1e-10)
    assert sizes[-1] < reference()[0][-1]  # a decaying rate couples to smaller batches


def test_resume_after_k_steps_is_the_uninterrupted_run(tmp_path) -> None:
    k = 6
    opt = optax.inject_hyperparams(optax.sgd)(learning_rate=CTL["lr"], momentum=0.9)
    want_sizes, want_w, _ = jax_run(optimizer=opt)
    data, w0 = problem()
    first = CABSTrainer(squared_error, CABSController(**CTL), data, optimizer=opt)
    state = first.init(jnp.asarray(w0))
    for _ in range(k):
        state, _ = first.step(state)
    first.save(tmp_path / "run.npz", state)
    second = CABSTrainer(squared_error, CABSController(**CTL), data, optimizer=opt)
    state, sizes = second.restore(tmp_path / "run.npz", second.init(jnp.ones(len(w0)))), []
    for _ in range(STEPS - k):
        state, info = second.step(state)
        sizes.append(info.batch_size)
    assert sizes == want_sizes[k:]
    np.testing.assert_array_equal(np.asarray(state.params), want_w)


def test_per_example_stats_is_batch_stats_against_a_float64_loop() -> None:
    (x, y), _ = problem(20)
    w = np.linspace(-1.0, 1.0, x.shape[1])
    mask = np.arange(20) % 3 != 0
    stats = PerExampleStats(squared_error, chunk_size=4)(jnp.asarray(w), (x, y), jnp.asarray(mask))
    r = x @ w - y
    want = batch_stats_from_per_example(0.5 * r**2, [r[:, None] * x], mask.astype(np.float64))
    assert float(stats.count) == float(want.count) == 13
    np.testing.assert_allclose(float(stats.loss_sum), float(want.loss_sum), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(stats.grad_sum[0]), want.grad_sum[0], rtol=1e-12)
    np.testing.assert_allclose(float(stats.sq_norm_sum), float(want.sq_norm_sum), rtol=1e-12)
    with pytest.raises(ValueError, match="method must be"):
        PerExampleStats(squared_error, method="exact")
