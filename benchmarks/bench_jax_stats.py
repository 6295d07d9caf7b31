"""Cost of CABS's exact statistics in JAX: plain jit(grad) step vs the fast and the generic statistics step.

Models: the MLP 784-512-512-10 and the paper's MNIST CNN (conv5x5x32, pool,
conv5x5x64, pool, dense 1024, dense 10), float32, random 28x28 inputs; a GPT-style
decoder (``--models gpt``) on random tokens. Each
step returns the summed gradient; the statistics steps also return the four
scalars CABS needs (m, sum l_i, S, ||sum g_i||^2). Prints best-of-n times
(plain and fast interleaved, so that other load on the machine hits both
alike) and the ratios to the plain step side by side. Not a test: nothing is
asserted.

With ``--verify`` a second table gives the cost of the checks that establish
the fast path (issue 12, ``cabs_jax.verify``) as the trainer runs them: the
host-side look-up of the verdict before every step, the first probe of a
signature (its compilation included) and each later probe every
``--verify-every`` steps, amortised over a run of ``--run-steps`` steps, and
the amortised fast step with the checks on against the fast step without them.

    python benchmarks/bench_jax_stats.py                      # batches 32 128 512
    python benchmarks/bench_jax_stats.py --batches 128 --models cnn --chunk 32
    python benchmarks/bench_jax_stats.py --batches 128 --verify --generic-reps 0
    python benchmarks/bench_jax_stats.py --models gpt                     # GPT-style, batches 16 64
    python benchmarks/bench_jax_stats.py --models gpt --gpt-size 2 128 4 64 2048   # a reduced GPT
    python benchmarks/bench_jax_stats.py --models nnx_gpt --gpt-size 2 128 4 64 2048   # the same GPT in Flax NNX
    python benchmarks/bench_jax_stats.py --models eqx_mlp eqx_cnn --batches 128  # the same models in Equinox

The GPT-style model (issue 15; ``--gpt-size``, default 4 layers, d_model 256, 4 heads, sequence
128, vocabulary 8192) has learned positions and a head tied to the token embedding through
``Embed.attend``; its loss is the mean next-token cross-entropy of each sequence. ``--models nnx_gpt``
is the same model written in Flax NNX (``cabs_jax.NNXLoss``; ``--verify`` skips it).

``eqx_mlp`` and ``eqx_cnn`` are the MLP and the paper's CNN written in Equinox (channels first),
through ``cabs_jax.EquinoxLoss`` (its fast path: ``cabs_jax.eqx_fast``, issue 15).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import cabs_jax
import cabs_jax.verify
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cabs_core import reduce_stats
from cabs_core.exactness import VERIFY_EVERY


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(512)(x))
        x = nn.relu(nn.Dense(512)(x))
        return nn.Dense(10)(x)


class PaperCNN(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(32, (5, 5), padding="SAME")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(64, (5, 5), padding="SAME")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Dense(1024)(x.reshape((x.shape[0], -1))))
        return nn.Dense(10)(x)


class LearnedPositions(nn.Module):
    """Learned positions as in Flax's lm1b example: a (1, max_len, d) parameter added to the tokens' embeddings."""

    max_len: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pe = self.param("pos_embedding", nn.initializers.normal(0.02), (1, self.max_len, x.shape[-1]))
        return x + pe[:, : x.shape[1]]


class GPT(nn.Module):
    """GPT-style decoder (issue 15): token embedding, learned positions, pre-LayerNorm blocks of causal
    multi-head self-attention and a 4x GELU MLP, final LayerNorm, head tied to the embedding (Embed.attend)."""

    vocab: int = 8192
    dim: int = 256
    heads: int = 4
    layers: int = 4
    max_len: int = 128

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        embed = nn.Embed(self.vocab, self.dim)
        x = LearnedPositions(self.max_len)(embed(tokens))
        mask = nn.make_causal_mask(tokens)
        for _ in range(self.layers):
            h = nn.LayerNorm()(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, deterministic=True)(h, mask=mask)
            x = x + nn.Dense(self.dim)(nn.gelu(nn.Dense(4 * self.dim)(nn.LayerNorm()(x))))
        return embed.attend(nn.LayerNorm()(x))


class NNXPositions(nnx.Module):
    """Learned positions in NNX: a (1, max_len, d) nnx.Param added to the tokens' embeddings."""

    def __init__(self, max_len: int, dim: int, rngs: nnx.Rngs) -> None:
        self.pos_embedding = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (1, max_len, dim)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.pos_embedding[:, : x.shape[1]]


class NNXBlock(nnx.Module):
    """Pre-LayerNorm block: causal nnx.MultiHeadAttention and a 4x GELU MLP."""

    def __init__(self, dim: int, heads: int, rngs: nnx.Rngs) -> None:
        self.ln1, self.ln2 = nnx.LayerNorm(dim, rngs=rngs), nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        self.up, self.down = nnx.Linear(dim, 4 * dim, rngs=rngs), nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class NNXGPT(nnx.Module):
    """:class:`GPT` in Flax NNX (the same layers, positions and tied head)."""

    def __init__(self, vocab: int, dim: int, heads: int, layers: int, max_len: int, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.positions = NNXPositions(max_len, dim, rngs)
        self.blocks = nnx.List([NNXBlock(dim, heads, rngs) for _ in range(layers)])
        self.ln_f = nnx.LayerNorm(dim, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.positions(self.embed(tokens))
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.embed.attend(self.ln_f(x))


def equinox_model(name: str) -> tuple:
    """(EquinoxLoss, its params, an input's shape) of the MLP or the paper's CNN written in Equinox."""
    import equinox as eqx

    class Net(eqx.Module):
        layers: tuple  # eqx_mlp: three Linear; eqx_cnn: two Conv2d, two Linear

        def __call__(self, x: jax.Array) -> jax.Array:
            for layer in self.layers[:-1]:
                x = jax.nn.relu(layer(jnp.ravel(x) if isinstance(layer, eqx.nn.Linear) else x))
                x = eqx.nn.MaxPool2d(2, 2)(x) if isinstance(layer, eqx.nn.Conv2d) else x
            return self.layers[-1](x)

    k = jax.random.split(jax.random.key(0), 4)
    if name == "eqx_mlp":
        layers = (eqx.nn.Linear(784, 512, key=k[0]), eqx.nn.Linear(512, 512, key=k[1]),
                  eqx.nn.Linear(512, 10, key=k[2]))
        shape = (784,)
    else:
        layers = (eqx.nn.Conv2d(1, 32, 5, padding="SAME", key=k[0]), eqx.nn.Conv2d(32, 64, 5, padding="SAME", key=k[1]),
                  eqx.nn.Linear(7 * 7 * 64, 1024, key=k[2]), eqx.nn.Linear(1024, 10, key=k[3]))
        shape = (1, 28, 28)
    module = Net(layers)
    loss = cabs_jax.EquinoxLoss(module, cross_entropy)
    return loss, loss.params, shape


def next_token_loss(logits: jax.Array, example: tuple) -> jax.Array:
    """Mean next-token cross-entropy of one sequence: logits (T, vocab), example (tokens, tokens)."""
    tokens = example[0]
    logp = jax.nn.log_softmax(logits[:-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[1:, None], axis=1))


def cross_entropy(logits: jax.Array, example: tuple) -> jax.Array:
    return -jax.nn.log_softmax(logits)[example[1]]


def once(fn: Callable, *args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def best_times(calls: dict[str, tuple], reps: int, min_time: float) -> dict[str, float]:
    """Best-of-n seconds per step, the steps interleaved so that load on a shared
    machine hits them alike; the first (compiling) call is not timed."""
    for fn, *args in calls.values():
        once(fn, *args)
    times: dict[str, list[float]] = {k: [] for k in calls}
    while min(len(t) for t in times.values()) < reps or sum(times[next(iter(calls))]) < min_time:
        for k, (fn, *args) in calls.items():
            times[k].append(once(fn, *args))
    return {k: min(t) for k, t in times.items()}


def steps(floss: cabs_jax.FlaxLoss | cabs_jax.NNXLoss | cabs_jax.EquinoxLoss,
          chunk: int) -> tuple[Callable, Callable, Callable]:
    """The plain gradient step and the two statistics steps, jitted."""

    @jax.jit
    def plain(p, batch):
        return jax.grad(lambda q: jnp.sum(floss.batch_losses(q, batch)))(p)

    def stats_step(method: str) -> Callable:
        @jax.jit
        def step(p, batch, mask):
            s = cabs_jax.batch_stats(floss, p, batch, mask, method=method, chunk_size=chunk)
            return s.grad_sum, reduce_stats(s)

        return step

    return plain, stats_step("fast"), stats_step("generic")


def verify_costs(
    module: nn.Module, params, batch, mask, reps: int, fast: Callable, fast_args: tuple
) -> tuple[float, float, float, float, float]:
    """(first probe incl. compilation, a later probe, the per-step verdict look-up, the
    fast step, the first probe's CPU time), seconds, as ``CABSTrainer.step`` runs them (a fresh
    FlaxLoss, so the first probe compiles); later probes and fast steps alternate, best of
    ``reps`` each, so that load on a shared machine hits both alike. The first probe's CPU
    time (all threads of the process) is less sensitive to other load than its wall time."""
    floss = cabs_jax.FlaxLoss(module, next_token_loss if isinstance(module, GPT) else cross_entropy)

    def resolve(reprobe: bool) -> str:
        return cabs_jax.verify.resolve(floss, params, batch, mask, "fast", reprobe=reprobe)

    t0, c0 = time.perf_counter(), time.process_time()
    assert resolve(True) == "fast"
    first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
    again, step = [], []
    for _ in range(max(reps, 1)):
        step.append(once(fast, *fast_args))
        again.append(_timed(lambda: resolve(True)))
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        resolve(False)
    return first, min(again), (time.perf_counter() - t0) / n, min(step), first_cpu


def cold_probe(name: str, m: int) -> None:
    """The first probe of a run as ``CABSTrainer``'s first step meets it: in a process that
    has compiled nothing for the model yet; CPU (all threads) and wall seconds, and the same
    for the first call of the fast step (its compilation), which every run pays anyway."""
    module = MLP() if name == "mlp" else PaperCNN()
    floss = cabs_jax.FlaxLoss(module, cross_entropy)
    params = module.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    rng = np.random.default_rng(0)
    batch = (jnp.asarray(rng.normal(size=(m, 28, 28, 1)), jnp.float32), jnp.asarray(rng.integers(0, 10, size=m)))
    jax.block_until_ready((params, batch))
    t0, c0 = time.perf_counter(), time.process_time()
    assert cabs_jax.verify.resolve(floss, params, batch, np.ones(m, bool), "fast") == "fast"
    probe = (time.perf_counter() - t0, time.process_time() - c0)
    fast = jax.jit(lambda p, b: cabs_jax.batch_stats(floss, p, b, method="fast"))
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fast(params, batch))
    step = (time.perf_counter() - t0, time.process_time() - c0)
    print(f"{name} batch {m}: first probe {probe[1]:.2f} s CPU ({probe[0]:.2f} s wall); "
          f"the fast step's first call {step[1]:.2f} s CPU ({step[0]:.2f} s wall)", flush=True)


def _timed(fn: Callable) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128, 512])
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn"],
                    choices=["mlp", "cnn", "gpt", "nnx_gpt", "eqx_mlp", "eqx_cnn"])
    ap.add_argument("--gpt-batches", type=int, nargs="+", default=[16, 64], help="gpt: batch sizes")
    ap.add_argument("--gpt-size", type=int, nargs=5, default=[4, 256, 4, 128, 8192],
                    metavar=("LAYERS", "D_MODEL", "HEADS", "SEQ", "VOCAB"), help="gpt: its size")
    ap.add_argument("--chunk", type=int, default=64, help="generic path: examples per chunk")
    ap.add_argument("--reps", type=int, default=5, help="plain and fast: at least this many timed calls")
    ap.add_argument("--min-time", type=float, default=0.5, help="plain: and at least this many seconds of them")
    ap.add_argument("--generic-reps", type=int, default=1, help="generic (slow): timed calls (0: skip)")
    ap.add_argument("--verify", action="store_true", help="also time the fast path's checks (issue 12)")
    ap.add_argument("--verify-every", type=int, default=VERIFY_EVERY, help="steps between probes")
    ap.add_argument("--run-steps", type=int, default=1000, help="run length the checks are amortised over")
    ap.add_argument("--cold-probe", action="store_true",
                    help="only the first probe in this fresh process, before any step is compiled (as the "
                    "trainer's first step meets it), for the first of --models and --batches; then the "
                    "fast step's own first call (its compilation) for comparison")
    args = ap.parse_args()
    if args.cold_probe:
        cold_probe(args.models[0], args.batches[0])
        return

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}: {jax.devices()[0].device_kind}")
    layers, dim, heads, seq, vocab = args.gpt_size
    if "gpt" in args.models or "nnx_gpt" in args.models:
        print(f"gpt: {layers} layers, d_model {dim}, {heads} heads, sequence {seq}, vocabulary {vocab}, tied head")
    header = (
        f"{'model':5} {'batch':>5} {'plain ms':>9} {'fast ms':>9} {'generic ms':>11} "
        f"{'fast/plain':>11} {'generic/plain':>14}"
    )
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(0)
    verify_rows = []
    for name in args.models:
        shape = (28, 28, 1)
        if name == "gpt":
            module: nn.Module = GPT(vocab, dim, heads, layers, seq)
            floss = cabs_jax.FlaxLoss(module, next_token_loss)
            params = module.init(jax.random.key(0), jnp.zeros((1, seq), jnp.int32))["params"]
        elif name == "nnx_gpt":
            floss = cabs_jax.NNXLoss(NNXGPT(vocab, dim, heads, layers, seq, nnx.Rngs(0)), next_token_loss)
            params = floss.params
        elif name.startswith("eqx_"):
            floss, params, shape = equinox_model(name)
            module = floss.module
        else:
            module = MLP() if name == "mlp" else PaperCNN()
            floss = cabs_jax.FlaxLoss(module, cross_entropy)
            params = module.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]

        plain, fast, generic = steps(floss, args.chunk)
        for m in args.gpt_batches if name.endswith("gpt") else args.batches:
            if name.endswith("gpt"):
                tokens = jnp.asarray(rng.integers(0, vocab, size=(m, seq)), jnp.int32)
                batch = (tokens, tokens)
            else:
                batch = (
                    jnp.asarray(rng.normal(size=(m, *shape)), jnp.float32),
                    jnp.asarray(rng.integers(0, 10, size=m)),
                )
            mask = jnp.ones((m,), bool)
            t = best_times(
                {"plain": (plain, params, batch), "fast": (fast, params, batch, mask)}, args.reps, args.min_time
            )
            tp, tf = t["plain"], t["fast"]
            if args.generic_reps > 0:
                tg = best_times({"generic": (generic, params, batch, mask)}, args.generic_reps, 0.0)["generic"]
                g_cols = f"{1e3 * tg:11.2f} {tf / tp:10.2f}x {tg / tp:13.2f}x"
            else:
                g_cols = f"{'-':>11} {tf / tp:10.2f}x {'-':>14}"
            print(f"{name:5} {m:5d} {1e3 * tp:9.2f} {1e3 * tf:9.2f} {g_cols}", flush=True)
            if args.verify and name != "nnx_gpt" and not name.startswith("eqx_"):
                first, again, lookup, tf_alt, first_cpu = verify_costs(
                    module, params, batch, np.ones(m, bool), args.reps, fast, (params, batch, mask)
                )
                verify_rows.append((name, m, tf_alt, first, again, lookup, first_cpu))

    if verify_rows:
        n, every = args.run_steps, args.verify_every
        probes = 1 + (n - 1) // every if every else 1
        print(f"\nchecks (issue 12) with verify_every={every}: steady = the per-step look-up and a re-probe every "
              f"{every} steps; run = also the first probe (its compilation) amortised over {n} steps; fast = "
              f"best fast step alternating with the re-probes; 2% after = run length at which the checks cost 2%")
        header = (
            f"{'model':5} {'batch':>5} {'fast ms':>9} {'look-up us':>11} {'probe ms':>9} {'steady':>8} "
            f"{'1st probe s':>12} {'(cpu s)':>8} {'run':>8} {'2% after':>9}"
        )
        print(header)
        print("-" * len(header))
        for name, m, tf, first, again, lookup, first_cpu in verify_rows:
            steady = (lookup + again / every if every else lookup) / tf
            run = (n * lookup + first + (probes - 1) * again) / (n * tf)
            # steps N with (first - again) / N + steady <= 2%: the first probe's extra cost amortised
            after = f"{(first - again) / tf / (0.02 - steady):9.0f}" if steady < 0.02 else f"{'never':>9}"
            print(
                f"{name:5} {m:5d} {1e3 * tf:9.2f} {1e6 * lookup:11.1f} {1e3 * again:9.1f} {100 * steady:7.2f}% "
                f"{first:12.2f} {first_cpu:8.2f} {100 * run:7.2f}% {after}",
                flush=True,
            )


if __name__ == "__main__":
    main()
