"""A first multi-worker CABS run with TensorFlow (``MultiWorkerMirroredStrategy``): copy it.

Every worker runs this same script; each learns its place from ``TF_CONFIG`` (several
hosts), or from ``--workers N --index i --port P`` (N workers on this machine, worker i
listening on 127.0.0.1:P+i). Two workers on one machine::

    python examples/tf_multiworker.py --workers 2 --index 0 --port 12345 --steps 12 --save ckpt.npz &
    python examples/tf_multiworker.py --workers 2 --index 1 --port 12345 --steps 12 --save ckpt.npz

A tiny float64 Keras MLP trains on generated data with
:class:`cabs_tf.DataParallelCABSTrainer`. Each worker prints one JSON line per step (the
decision) and a last line with the final parameters. ``--save PATH --save-every k``: the
chief (worker 0) writes a checkpoint every k steps; ``--restore PATH``: every worker resumes
from it, with any number of workers. ``--steps`` is the step to reach: a resumed run
continues from its checkpoint's step. A lost worker makes the others fail with a
:class:`cabs_tf.WorkerLostError` naming it: a dead one at once, a stopped one after
TensorFlow's heartbeat timeout (about 10 s), one stuck in its own code after ``--timeout``
seconds (the collectives' timeout); then restart all from the last checkpoint
(docs/distributed/tensorflow.md, "A lost worker").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import cabs_tf  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import cabs_core  # noqa: E402

N_EXAMPLES, N_FEATURES, N_CLASSES = 96, 6, 3


def tf_config(workers: int, index: int, port: int) -> dict[str, Any]:
    """The ``TF_CONFIG`` of worker ``index`` of ``workers`` on 127.0.0.1, worker i at port ``port + i``."""
    if not 0 <= index < workers:
        raise ValueError(f"--index must lie in [0, --workers) = [0, {workers}), got {index}")
    return {"cluster": {"worker": [f"127.0.0.1:{port + i}" for i in range(workers)]},
            "task": {"type": "worker", "index": index}}


def make_strategy(timeout_s: float) -> tf.distribute.MultiWorkerMirroredStrategy:
    """The strategy of ``TF_CONFIG`` (read now), its collectives bounded by ``timeout_s`` seconds."""
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout_s)
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def make_data(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Generated float64 features and integer labels, the same on every worker."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N_EXAMPLES, N_FEATURES))
    return x, (x @ rng.normal(size=(N_FEATURES, N_CLASSES))).argmax(axis=1).astype("int32")


def make_model(seed: int = 0) -> keras.Model:
    """A tiny float64 MLP, the same initial weights on every worker (call in ``strategy.scope()``)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((N_FEATURES,), dtype="float64"),
                             keras.layers.Dense(8, activation="tanh", dtype="float64"),
                             keras.layers.Dense(N_CLASSES, dtype="float64")])


def loss_fn(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    """Per-example cross-entropy, shape (m,)."""
    return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)


def make_controller() -> cabs_core.CABSController:
    return cabs_core.CABSController(lr=0.5, c=6.0, bs_min=3, bs_max=40, bs_init=5)


def make_trainer(strategy: tf.distribute.Strategy | None, *, check_every: int = 2,
                 seed: int = 7) -> cabs_tf.CABSTrainer:
    """The data-parallel trainer over ``strategy`` (None: the single-process :class:`cabs_tf.CABSTrainer`)."""
    if strategy is None:
        return cabs_tf.CABSTrainer(make_model(), loss_fn, make_controller(), make_data(), seed=seed)
    with strategy.scope():
        model = make_model()
    return cabs_tf.DataParallelCABSTrainer(model, loss_fn, make_controller(), make_data(), strategy=strategy,
                                           seed=seed, check_every=check_every)


def record(step: int, used: int, info: cabs_core.StepInfo) -> dict[str, Any]:
    """One step as JSON: the batch it used and what the controller decided."""
    return {"step": step, "used": used, "batch_size": info.batch_size, "skipped": info.skipped,
            "variance": info.variance, "loss": info.loss}


def parameters(trainer: cabs_tf.CABSTrainer) -> list[list[Any]]:
    """The model's weights as nested lists (float64, exact through JSON)."""
    return [np.asarray(v.numpy()).tolist() for v in trainer.stats.variables]


def train(trainer: cabs_tf.CABSTrainer, steps: int, *, chief: bool = True, save: str | None = None,
          save_every: int = 0, emit: Any = None) -> list[dict[str, Any]]:
    """Step until the controller's step counter reaches ``steps``; the chief saves every
    ``save_every`` steps to ``save``; ``emit(record)`` after each step."""
    out = []
    while trainer.state.step < steps:
        used = trainer.batch_size
        info = trainer.step()
        out.append(record(trainer.state.step, used, info))
        if emit is not None:
            emit(out[-1])
        if save and save_every and chief and trainer.state.step % save_every == 0:
            trainer.save(save)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, help="workers on 127.0.0.1 (default: TF_CONFIG as set)")
    p.add_argument("--index", type=int, default=0, help="this worker's index (with --workers)")
    p.add_argument("--port", type=int, default=12345, help="worker i listens on PORT + i (with --workers)")
    p.add_argument("--steps", type=int, default=12, help="train until the controller's step counter reaches this")
    p.add_argument("--save", help="checkpoint file the chief writes (.npz)")
    p.add_argument("--save-every", type=int, default=2, help="save every this many steps (with --save)")
    p.add_argument("--restore", help="checkpoint every worker resumes from")
    p.add_argument("--timeout", type=float, default=30.0, help="collective timeout in seconds (a lost worker)")
    p.add_argument("--check-every", type=int, default=2, help="compare the workers' controllers every k steps")
    p.add_argument("--every-step", action="store_true", help="print a JSON line per step (default: at the end)")
    a = p.parse_args(argv)
    if a.workers is None and "TF_CONFIG" not in os.environ:
        p.error("set TF_CONFIG or pass --workers N --index i --port P")
    if a.save_every < 1:
        p.error(f"--save-every must be >= 1, got {a.save_every}")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workers is not None:
        os.environ["TF_CONFIG"] = json.dumps(tf_config(args.workers, args.index, args.port))
    config = json.loads(os.environ["TF_CONFIG"])
    worker = int(config["task"]["index"])
    strategy = make_strategy(args.timeout)
    trainer = make_trainer(strategy, check_every=args.check_every)
    if args.restore:
        trainer.restore(args.restore)

    def emit(rec: dict[str, Any]) -> None:
        print(json.dumps({"worker": worker, **rec}), flush=True)

    start = trainer.state.step
    steps = train(trainer, args.steps, chief=worker == 0, save=args.save, save_every=args.save_every,
                  emit=emit if args.every_step else None)
    final = {"worker": worker, "workers": len(config["cluster"]["worker"]), "start": start, "final": True,
             "state": trainer.state.to_dict(), "params": parameters(trainer)}
    print(json.dumps(final if args.every_step else {**final, "steps": steps}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
