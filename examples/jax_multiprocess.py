"""Data-parallel CABS across processes with JAX: a first multi-host run to copy.

Start one process per host (here: per terminal, on one machine), same arguments
except ``--process-id``::

    python examples/jax_multiprocess.py --processes 2 --process-id 0 --coordinator 127.0.0.1:12345
    python examples/jax_multiprocess.py --processes 2 --process-id 1 --coordinator 127.0.0.1:12345

Each process drives ``--local-devices`` devices (CPU devices split from the host
here; GPUs or TPUs on a real cluster, where ``jax.distributed.initialize()`` may
read the cluster's environment by itself). Every process builds the same
trainer on the same data; the mesh spans the devices of all processes; the
statistics' ``psum`` crosses processes, so every process makes the same
decision. Process 0 writes the checkpoint (``--save``, every ``--save-every``
steps) and prints one JSON line per step; ``--restore`` resumes a checkpoint
(with any number of processes). With ``--processes 1`` it is the single-process
run on the same global batches.

If a process dies, the others stop when JAX's coordination service misses its
heartbeats (``--heartbeat-timeout`` seconds) with "The following tasks are
unhealthy (stopped sending heartbeats): <process ids>" (docs/distributed/jax.md).
The tests in tests/distributed_jax/test_multiprocess.py run this script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--coordinator", default="127.0.0.1:12345", help="host:port of process 0")
    p.add_argument("--local-devices", type=int, default=2, help="CPU devices per process")
    p.add_argument("--heartbeat-timeout", type=int, default=10, help="seconds before a silent process counts as lost")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, help="checkpoint file, '{step}' formatted (written by process 0)")
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--restore", default=None, help="checkpoint to resume")
    p.add_argument("--method", default="auto", choices=["auto", "fast", "generic"])
    p.add_argument("--float64", action="store_true", help="train in float64 (the tests compare runs to 1e-10)")
    return p.parse_args(argv)


def start_jax(args: argparse.Namespace) -> Any:
    """Split the host CPU into ``--local-devices`` devices and join the other processes."""
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} " \
        f"--xla_force_host_platform_device_count={args.local_devices}".strip()
    import jax

    jax.config.update("jax_enable_x64", args.float64)
    if args.processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.processes,
                                   process_id=args.process_id, heartbeat_timeout_seconds=args.heartbeat_timeout)
    return jax


def make_trainer(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model, data and trainer every process builds identically; returns (trainer, initial state)."""
    import cabs_jax
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cabs_core import CABSController

    dtype = np.float64 if args.float64 else np.float32

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            return nn.Dense(3, param_dtype=dtype)(nn.tanh(nn.Dense(16, param_dtype=dtype)(x)))

    def xent(logits: jax.Array, example: tuple) -> jax.Array:
        return -jax.nn.log_softmax(logits)[example[1]]

    rng = np.random.default_rng(args.seed)
    x = rng.normal(size=(500, 8)).astype(dtype)
    y = ((x[:, 0] + x[:, 1] ** 2 > 0.7).astype(np.int64) + (x[:, 2] > 1.0)).astype(np.int32)
    model = MLP()
    params = model.init(jax.random.PRNGKey(args.seed), jnp.asarray(x[:1]))["params"]
    controller = CABSController(lr=0.3, c=20.0, bs_min=4, bs_max=256, bs_init=8)
    trainer = cabs_jax.DataParallelCABSTrainer(cabs_jax.FlaxLoss(model, xent), controller, (x, y),
                                               seed=args.seed, method=args.method, check_every=5)
    return trainer, trainer.init(params)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    jax = start_jax(args)
    import numpy as np

    trainer, state = make_trainer(args)
    if args.restore:
        state = trainer.restore(args.restore, state)
    lead = jax.process_index() == 0
    for _ in range(args.steps):
        size = state.controller.batch_size
        state, info = trainer.step(state)
        if args.save and state.controller.step % args.save_every == 0:
            trainer.save(args.save.format(step=state.controller.step), state)
        if lead:
            print(json.dumps({"step": state.controller.step, "size": size, "decision": info.batch_size,
                              "loss": info.loss}), flush=True)
    if lead:
        leaves = [np.asarray(a.addressable_data(0), np.float64).ravel().tolist() for a in jax.tree.leaves(state.params)]
        print(json.dumps({"final": True, "processes": jax.process_count(), "devices": jax.device_count(),
                          "params": leaves, "examples_seen": state.sampler.examples_seen}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
