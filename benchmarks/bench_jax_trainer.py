"""Steady-state time of one ``cabs_jax.CABSTrainer.step`` (fast path, fixed batch size), digits MLP, float32.

The whole CABS step as a user runs it: the loop's plan, the statistics (one compiled program per
bucket), the one host copy, the controller, the update. Compare trees side by side, e.g. before
and after a change of the loop::

    PYTHONPATH=.:adapters python benchmarks/bench_jax_trainer.py [--momentum] [--batch 128]
"""

from __future__ import annotations

import argparse
import time

import cabs_jax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from sklearn.datasets import load_digits

from cabs_core import CABSController


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(10)(nn.relu(nn.Dense(100)(nn.relu(nn.Dense(100)(x)))))


def xent(logits: jax.Array, example: tuple) -> jax.Array:
    return -jax.nn.log_softmax(logits)[example[1]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--momentum", action="store_true", help="optax.sgd(momentum=0.9) instead of plain SGD")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=40)
    a = p.parse_args()
    d = load_digits()
    x, y = jnp.asarray(d.data / 16.0, jnp.float32), jnp.asarray(d.target, jnp.int32)
    params = MLP().init(jax.random.key(0), x[:1])["params"]
    ctl = CABSController(lr=0.1, bs_min=a.batch, bs_max=a.batch)
    opt = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9) if a.momentum else None
    trainer = cabs_jax.CABSTrainer(cabs_jax.FlaxLoss(MLP(), xent), ctl, (x, y), optimizer=opt, verify_every=0)
    state = trainer.init(params)
    for _ in range(20):
        state, _ = trainer.step(state)
    jax.block_until_ready(state.params)
    times = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        for _ in range(a.steps):
            state, _ = trainer.step(state)
        jax.block_until_ready(state.params)
        times.append((time.perf_counter() - t0) / a.steps * 1e3)
    times.sort()
    print(f"{'momentum' if a.momentum else 'plain SGD'} batch {a.batch}: ms/step best {times[0]:.3f} "
          f"median {times[len(times) // 2]:.3f} ({a.reps} x {a.steps} steps)")


if __name__ == "__main__":
    main()
