"""Cost of CABS statistics in TensorFlow/Keras 3, side by side in one run.

For the MLP 784-512-512-10, the paper's MNIST CNN (NHWC: conv5x5x32, pool,
conv5x5x64, pool, dense 1024, dense 10) and (``--models gpt``, issue 15) a GPT-style
language model (learned positions, pre-norm blocks of causal MultiHeadAttention and
a 4x MLP, the output projection tied to the token table as ``ops.matmul(h, E.T)``;
``--gpt-layers 4 --gpt-d 256 --gpt-heads 4 --gpt-seq 128 --gpt-vocab 8192`` is the
size of the PyTorch benchmark's), at several batch sizes:

- plain:   a tf.function gradient step (mean loss, tape.gradient, ||g||^2 read)
- fast:    cabs_tf.PerExampleStats(method="fast")   (one forward, one backward)
- generic: cabs_tf.PerExampleStats(method="generic") (tf.vectorized_map, chunked)

Prints milliseconds per step (median of --reps after a warm-up; the steps of one
batch size alternate, so that load on a shared machine hits them alike) and the
ratios to plain; the last lines give the batch-128 ratios.

``--baseline DIR`` adds a column: the fast step of another copy of the adapter
(a ``cabs_tf`` package directory, e.g. the main branch's exported with
``git archive main adapters/cabs_tf | tar -x -C /tmp/base``), loaded as a
separate package and timed in the same run, alternating with the others: a
before/after comparison side by side.

``--verify`` adds the cost of the checks that establish the fast path
(issue 12): the probe ``PerExampleStats.verify`` runs on the host before a step on
the first step and every ``--verify-every`` steps (the trainer's schedule).
It prints the first probe (which traces the probe function), a later probe
(median of ``--reps``, alternating with fast steps), the trainer's per-step
look-up of the verdict, and the fast step with the checks amortised, both in
steady state (the look-up, a probe every verify_every steps) and over a run of
``--run-steps`` steps that includes the first probe.

    python benchmarks/bench_tf_stats.py                 # short default run
    python benchmarks/bench_tf_stats.py --batches 32 128 512 --reps 10
    python benchmarks/bench_tf_stats.py --verify --batches 128 --reps 10
    python benchmarks/bench_tf_stats.py --models gpt --batches 16 64   # the GPT, its default size
    python benchmarks/bench_tf_stats.py --models cnn --no-generic --baseline /tmp/base/adapters/cabs_tf
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cabs_tf  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from cabs_core.exactness import VERIFY_EVERY  # noqa: E402


def mlp() -> keras.Model:
    return keras.Sequential([
        keras.Input((784,)),
        keras.layers.Dense(512, activation="relu"),
        keras.layers.Dense(512, activation="relu"),
        keras.layers.Dense(10),
    ])


def mnist_cnn() -> keras.Model:
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(32, 5, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(64, 5, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(1024, activation="relu"),
        keras.layers.Dense(10),
    ])


class GPT(keras.Model):
    """Token and learned position embeddings, ``n_layers`` pre-norm blocks (causal
    MultiHeadAttention, Dense 4d-gelu-d), a final LayerNormalization and logits
    ``ops.matmul(h, ops.transpose(E))`` with the token table E (the tied head)."""

    def __init__(self, vocab: int, seq: int, d: int, heads: int, n_layers: int) -> None:
        super().__init__()
        self.seq = seq
        self.tok = keras.layers.Embedding(vocab, d)
        self.pos = keras.layers.Embedding(seq, d)
        self.blocks = [(keras.layers.LayerNormalization(), keras.layers.MultiHeadAttention(heads, d // heads),
                        keras.layers.LayerNormalization(), keras.layers.Dense(4 * d, activation="gelu"),
                        keras.layers.Dense(d)) for _ in range(n_layers)]
        self.norm = keras.layers.LayerNormalization()

    def call(self, ids: tf.Tensor) -> tf.Tensor:
        h = self.tok(ids) + self.pos(keras.ops.arange(self.seq))
        for ln1, att, ln2, up, down in self.blocks:
            a = ln1(h)
            h = h + att(a, a, use_causal_mask=True)
            h = h + down(up(ln2(h)))
        return keras.ops.matmul(self.norm(h), keras.ops.transpose(self.tok.embeddings))


def xent(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    """Per-example cross-entropy; for token targets (m, T) summed over the positions."""
    losses = keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
    return tf.reduce_sum(losses, axis=1) if losses.shape.rank == 2 else losses


def plain_step(model: keras.Model):
    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(xent(y, model(x, training=True)))
        grads = tape.gradient(loss, model.trainable_variables)
        return tf.add_n([tf.reduce_sum(tf.square(tf.convert_to_tensor(g))) for g in grads]) + loss

    return step


def load_baseline(path: str):
    """The ``cabs_tf`` package in directory ``path`` as a separate package ``cabs_tf_baseline``."""
    init = os.path.join(path, "__init__.py")
    spec = importlib.util.spec_from_file_location("cabs_tf_baseline", init, submodule_search_locations=[path])
    if spec is None or spec.loader is None:
        raise SystemExit(f"--baseline: no package at {path!r} (expected {init})")
    module = importlib.util.module_from_spec(spec)
    sys.modules["cabs_tf_baseline"] = module
    spec.loader.exec_module(module)
    return module


def stats_step(model: keras.Model, method: str, chunk_size: int, adapter=cabs_tf):
    step = adapter.PerExampleStats(model, xent, method=method, chunk_size=chunk_size)
    fn = tf.function(step)
    return lambda x, y: fn(x, y)[1]


def verify_cost(model: keras.Model, x, y, reps: int, fast) -> tuple[float, float, float, float]:
    """(first probe ms, median later probe ms, median fast step ms, look-up ms) of
    ``PerExampleStats.verify`` on (x, y) as the trainer runs it: the later probes alternate
    with fast steps (``fast``, already traced) so that load on a shared machine hits
    both alike; the look-up is the trainer's per-step check of the signature's verdict."""
    step = cabs_tf.PerExampleStats(model, xent, method="fast")
    t0 = time.perf_counter()
    assert step.verify(x, y)
    first = (time.perf_counter() - t0) * 1e3
    probes, steps = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        fast(x, y).numpy()
        steps.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        assert step.verify(x, y)
        probes.append((time.perf_counter() - t0) * 1e3)
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        assert step.signature(x, y) in step.verdicts
    lookup = (time.perf_counter() - t0) * 1e3 / n
    return first, statistics.median(probes), statistics.median(steps), lookup


def cold_probe(name: str, b: int) -> None:
    """The first probe of a run as the trainer's first step meets it: nothing traced yet for the
    model; CPU (all threads) and wall seconds, and the same for the fast step's first call (its
    trace), which every run pays anyway."""
    model = mlp() if name == "mlp" else mnist_cnn()
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(b, *model.inputs[0].shape[1:])).astype("float32"))
    y = tf.constant(rng.integers(0, 10, size=(b,)).astype("int32"))
    step = cabs_tf.PerExampleStats(model, xent, method="fast")
    t0, c0 = time.perf_counter(), time.process_time()
    assert step.verify(x, y)
    probe = (time.perf_counter() - t0, time.process_time() - c0)
    fn = tf.function(step)
    t0, c0 = time.perf_counter(), time.process_time()
    fn(x, y)[1].numpy()
    first_step = (time.perf_counter() - t0, time.process_time() - c0)
    print(f"{name} batch {b}: first probe {probe[1]:.2f} s CPU ({probe[0]:.2f} s wall); "
          f"the fast step's first call {first_step[1]:.2f} s CPU ({first_step[0]:.2f} s wall)", flush=True)


def time_ms(fns: dict, x, y, reps: int) -> dict[str, float]:
    """Median ms per call of each function, the functions alternating within each repetition."""
    for fn in fns.values():
        fn(x, y).numpy()  # trace and warm up
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn(x, y).numpy()  # the one host copy a training step makes
            out[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128, 512])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunk-size", type=int, default=128, help="generic path: examples per vectorized_map")
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn", "gpt"])
    ap.add_argument("--gpt-layers", type=int, default=4)
    ap.add_argument("--gpt-d", type=int, default=256)
    ap.add_argument("--gpt-heads", type=int, default=4)
    ap.add_argument("--gpt-seq", type=int, default=128)
    ap.add_argument("--gpt-vocab", type=int, default=8192)
    ap.add_argument("--no-generic-above", type=int, default=None,
                    help="skip the (slow) generic path above this batch size")
    ap.add_argument("--verify", action="store_true", help="also measure the fast path's probes (issue 12)")
    ap.add_argument("--verify-every", type=int, default=VERIFY_EVERY, help="steps between two probes")
    ap.add_argument("--run-steps", type=int, default=1000, help="run length the first probe is amortised over")
    ap.add_argument("--no-generic", action="store_true", help="skip the generic path")
    ap.add_argument("--baseline", default=None, metavar="DIR",
                    help="also time the fast step of the cabs_tf package in DIR (before/after, same run)")
    ap.add_argument("--cold-probe", action="store_true",
                    help="only the first probe in this fresh process, before any step is traced (as the "
                    "trainer's first step meets it), for the first of --models and --batches; then the fast "
                    "step's own first call (its trace) for comparison")
    args = ap.parse_args()
    if args.cold_probe:
        cold_probe(args.models[0], args.batches[0])
        return
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, devices: "
          f"{[d.device_type for d in tf.config.list_physical_devices()]}, reps {args.reps}")
    base = load_baseline(args.baseline) if args.baseline else None
    if base is not None:
        print(f"baseline: {args.baseline}")
    print(f"{'model':5} {'batch':>5} {'plain ms':>9} {'fast ms':>9} {'generic ms':>11} {'fast/plain':>10} "
          f"{'generic/plain':>13}" + (f" {'base fast ms':>12} {'base/plain':>10}" if base else ""))
    at128 = {}
    verified: list[tuple] = []
    rng = np.random.default_rng(0)
    for name in args.models:
        keras.utils.set_random_seed(0)
        if name == "gpt":
            model = GPT(args.gpt_vocab, args.gpt_seq, args.gpt_d, args.gpt_heads, args.gpt_layers)
            model(tf.zeros((1, args.gpt_seq), tf.int32))
            print(f"gpt: {args.gpt_layers} layers, d_model {args.gpt_d}, {args.gpt_heads} heads, sequence "
                  f"{args.gpt_seq}, vocabulary {args.gpt_vocab}, tied head, "
                  f"{sum(int(np.prod(v.shape)) for v in model.trainable_variables)} parameters", flush=True)
        else:
            model = mlp() if name == "mlp" else mnist_cnn()
        steps = {"plain": plain_step(model), "fast": stats_step(model, "fast", args.chunk_size),
                 "generic": stats_step(model, "generic", args.chunk_size)}
        if base is not None:
            steps["base"] = stats_step(model, "fast", args.chunk_size, adapter=base)
        for b in args.batches:
            if name == "gpt":
                x = tf.constant(rng.integers(0, args.gpt_vocab, size=(b, args.gpt_seq)).astype("int32"))
                y = tf.constant(rng.integers(0, args.gpt_vocab, size=(b, args.gpt_seq)).astype("int32"))
            else:
                x = tf.constant(rng.normal(size=(b, *model.inputs[0].shape[1:])).astype("float32"))
                y = tf.constant(rng.integers(0, 10, size=(b,)).astype("int32"))
            skip = args.no_generic or (args.no_generic_above is not None and b > args.no_generic_above)
            ms = {"generic": float("nan")} | time_ms(
                {k: fn for k, fn in steps.items() if not (k == "generic" and skip)}, x, y, args.reps)
            r_fast, r_gen = ms["fast"] / ms["plain"], ms["generic"] / ms["plain"]
            extra = f" {ms['base']:>12.2f} {ms['base'] / ms['plain']:>9.2f}x" if base else ""
            print(f"{name:5} {b:>5} {ms['plain']:>9.2f} {ms['fast']:>9.2f} {ms['generic']:>11.2f} "
                  f"{r_fast:>9.2f}x {r_gen:>12.2f}x" + extra, flush=True)
            if b == 128:
                at128[name] = (r_fast, r_gen)
            if args.verify:
                first, probe, fast_ms, lookup = verify_cost(model, x, y, args.reps, steps["fast"])
                n, every = args.run_steps, args.verify_every
                later = (n - 1) // every if every else 0  # probes after the first in a run of n steps
                steady = (lookup + (probe / every if every else 0.0)) / fast_ms
                run = (n * lookup + first + later * probe) / n / fast_ms
                verified.append((name, b, fast_ms, lookup, first, probe, steady, run))
    for name, (rf, rg) in at128.items():
        print(f"batch 128, {name}: fast {rf:.2f}x plain, generic {rg:.2f}x plain")
    if args.verify:
        print(f"\nprobes: first (traces), later (median, alternating with fast steps, whose median is the fast "
              f"column), fast step with probes every {args.verify_every} steps (steady; over a run of "
              f"{args.run_steps} steps with the first probe; 2% after: the run length at which the checks cost 2%)")
        print(f"{'model':5} {'batch':>5} {'fast ms':>8} {'look-up us':>10} {'first ms':>9} {'probe ms':>9} "
              f"{'steady':>8} {'run':>8} {'2% after':>9}")
        for name, b, fast, lookup, first, probe, steady, run in verified:
            # run length N at which (first - probe) / N / fast + steady = 2%: the first probe amortised
            after = f"{(first - probe) / fast / (0.02 - steady):9.0f}" if steady < 0.02 else f"{'never':>9}"
            print(f"{name:5} {b:>5} {fast:>8.2f} {1e3 * lookup:>10.1f} {first:>9.1f} {probe:>9.2f} {steady:>+7.2%} "
                  f"{run:>+7.2%} {after}")


if __name__ == "__main__":
    main()
