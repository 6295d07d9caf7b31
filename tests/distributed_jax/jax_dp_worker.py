"""Runs in a subprocess with 4 host CPU devices (XLA_FLAGS set by the caller before jax starts).

Usage: python jax_dp_worker.py OUT.json TMPDIR. Trains a tiny float64 MLP with
cabs_jax.CABSTrainer (one device) and cabs_jax.DataParallelCABSTrainer (4 and 2
devices) on the same global batches, checkpoints and resumes, compares with the
core's NumPy reference loop on its linear problem, and writes every decision and
parameter to OUT.json for the tests.
"""

from __future__ import annotations

import json
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import cabs_jax  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from cabs_conformance.loop_reference import LinearBackend, problem  # noqa: E402

from cabs_core import CABSController  # noqa: E402
from cabs_core.loop import CABSLoop  # noqa: E402


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(3)(nn.tanh(nn.Dense(6)(x)))


def xent(logits: jax.Array, example: tuple) -> jax.Array:
    return -jax.nn.log_softmax(logits)[example[1]]


def flat(params) -> list[float]:
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(params)]).tolist()


def run(trainer, state, steps: int):
    decisions, sizes = [], []
    for _ in range(steps):
        sizes.append(state.controller.batch_size)
        state, info = trainer.step(state)
        decisions.append(info.batch_size)
    return state, decisions, sizes


def main(out_path: str, tmp: str) -> None:
    t0 = time.time()
    out: dict = {"device_count": jax.device_count(), "x64": bool(jax.config.jax_enable_x64)}
    rng = np.random.default_rng(0)
    x = rng.normal(size=(101, 4))
    y = (x[:, 0] + x[:, 1] ** 2 > 0.7).astype(np.int64) + (x[:, 2] > 1.0)
    data = (x, y)
    loss = cabs_jax.FlaxLoss(MLP(), xent)
    params = MLP().init(jax.random.key(0), jnp.zeros((1, 4)))["params"]
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
    devs = jax.devices()
    steps = 9

    # 1. fast path (Flax), plain SGD, uneven shards (no multiple_of): 1 device vs 4 devices.
    ctrl = CABSController(lr=0.8, bs_min=3, bs_max=40, mu=0.5, bs_init=5, c=6.0)
    single = cabs_jax.CABSTrainer(loss, ctrl, data, seed=3)
    s1, dec1, sizes1 = run(single, single.init(params), steps)
    dp4 = cabs_jax.DataParallelCABSTrainer(loss, ctrl, data, seed=3, mesh=cabs_jax.data_mesh(devs[:4]))
    s4, dec4, sizes4 = run(dp4, dp4.init(params), steps)
    per_device = [dp4.device_buckets[[b >= -(-n // 4) for b in dp4.device_buckets].index(True)] for n in sizes4]
    out["sgd"] = {
        "single": {"decisions": dec1, "sizes": sizes1, "params": flat(s1.params), "seen": s1.sampler.examples_seen,
                   "digest": s1.controller.digest()},
        "dp4": {"decisions": dec4, "sizes": sizes4, "params": flat(s4.params), "seen": s4.sampler.examples_seen,
                "digest": s4.controller.digest(), "traces": dp4.traces, "per_device_sizes": per_device,
                "device_buckets": list(dp4.device_buckets),
                "param_shardings_replicated": all(p.sharding.is_fully_replicated for p in jax.tree.leaves(s4.params)),
                "param_devices": len(jax.tree.leaves(s4.params)[0].sharding.device_set)},
        "init_params": flat(params),
    }

    # 2. generic path (vmap of grad under lax.scan), optax momentum, multiple_of=4 (even shards).
    ctrl_m = CABSController(lr=0.5, bs_min=4, bs_max=40, mu=0.5, bs_init=8, multiple_of=4, c=6.0)
    opt = optax.inject_hyperparams(optax.sgd)(learning_rate=0.5, momentum=0.9)
    g1 = cabs_jax.CABSTrainer(loss, ctrl_m, data, optimizer=opt, method="generic", chunk_size=3, seed=1)
    r1, gdec1, _ = run(g1, g1.init(params), 6)
    g4 = cabs_jax.DataParallelCABSTrainer(loss, ctrl_m, data, optimizer=opt, method="generic", chunk_size=3, seed=1,
                                          mesh=cabs_jax.data_mesh(devs[:4]))
    r4, gdec4, gsizes4 = run(g4, g4.init(params), 6)
    out["momentum"] = {"single": {"decisions": gdec1, "params": flat(r1.params), "opt": flat(r1.opt_state)},
                       "dp4": {"decisions": gdec4, "sizes": gsizes4, "params": flat(r4.params),
                               "opt": flat(r4.opt_state), "traces": g4.traces}}

    # 2b. global batches smaller than the device count: some shards are empty (all padding, mask 0).
    ctrl_t = CABSController(lr=0.5, bs_min=2, bs_max=3, bs_init=2, c=6.0)
    e1 = cabs_jax.CABSTrainer(loss, ctrl_t, data, seed=2)
    q1, tdec1, _ = run(e1, e1.init(params), 4)
    e4 = cabs_jax.DataParallelCABSTrainer(loss, ctrl_t, data, seed=2, mesh=cabs_jax.data_mesh(devs[:4]))
    q4, tdec4, tsizes4 = run(e4, e4.init(params), 4)
    out["tiny"] = {"single": {"decisions": tdec1, "params": flat(q1.params)},
                   "dp4": {"decisions": tdec4, "sizes": tsizes4, "params": flat(q4.params)}}

    # 3. checkpoint after 4 steps of the 4-device run; resume on 4, on 2 devices, and on one (CABSTrainer).
    a = cabs_jax.DataParallelCABSTrainer(loss, ctrl, data, seed=3, mesh=cabs_jax.data_mesh(devs[:4]))
    mid, _, _ = run(a, a.init(params), 4)
    path = f"{tmp}/dp4.npz"
    a.save(path, mid)
    resumed = {}
    for name, ndev in (("dp4", 4), ("dp2", 2)):
        t = cabs_jax.DataParallelCABSTrainer(loss, ctrl, data, seed=3, mesh=cabs_jax.data_mesh(devs[:ndev]))
        st = t.restore(path, t.init(params))
        st, dec, _ = run(t, st, steps - 4)
        resumed[name] = {"decisions": dec, "params": flat(st.params), "digest": st.controller.digest(),
                         "seen": st.sampler.examples_seen, "world_size": t.world_size}
    one = cabs_jax.CABSTrainer(loss, ctrl, data, seed=3)
    st = one.restore(path, one.init(params))
    st, dec, _ = run(one, st, steps - 4)
    resumed["single"] = {"decisions": dec, "params": flat(st.params), "digest": st.controller.digest(),
                         "seen": st.sampler.examples_seen}
    out["resume"] = resumed

    # 4. the linear problem of the core's NumPy reference loop: 4 devices, whole and in micro-batches of 3 per device.
    (lx, ly), w0 = problem()
    lctl = CABSController(lr=0.05, c=40.0, bs_min=4, bs_max=64, mu=0.9)
    loop = CABSLoop(LinearBackend(), lctl, num_examples=len(ly))
    run_, model, ref = loop.init(), (w0, np.zeros_like(w0)), []
    for _ in range(15):
        run_, model, info = loop.step(run_, model, (lx, ly))
        ref.append(info.batch_size)
    out["linear"] = {"reference": {"decisions": ref, "params": model[0].tolist()}}
    for name, micro in (("dp4", None), ("dp4_micro3", 3)):
        t = cabs_jax.DataParallelCABSTrainer(lambda w, e: 0.5 * (e[0] @ w - e[1]) ** 2, lctl, (lx, ly),
                                             mesh=cabs_jax.data_mesh(devs[:4]), max_micro_batch=micro)
        st, dec, _ = run(t, t.init(jnp.asarray(w0)), 15)
        out["linear"][name] = {"decisions": dec, "params": flat(st.params), "traces": t.traces}
    out["seconds"] = time.time() - t0
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
