"""Cost of CABS's per-example statistics in PyTorch, relative to a plain step.

Measures, side by side in one run and each (model, batch, method) in its own
process, the time of one training step's gradient computation:

- ``plain``: ``loss.mean().backward()`` (forward + backward, gradients in ``.grad``)
- ``fast``: ``cabs_torch.PerExampleStats(method="fast")`` (hooks; exact S), a
  step that does not probe (each step compares its layer calls with the probed ones)
- ``verified``: the same amortised over a run with the default ``verify_every``
  (issue 12's checks): fast + (probe step - fast) / VERIFY_EVERY, where the probe
  step (a step that also runs the probe: the fast path and single-example
  backward passes on a few examples, the accounting check) is timed on an engine
  with ``verify_every=1``, alternating with fast steps in the same process; the
  probe step / fast step ratio and the amortised extra cost are printed below
  the tables
- ``compiled``: ``cabs_torch.PerExampleStats(method="fast", compile=True)`` (one
  ``torch.compile``d function; compiled during the warm-up; the CNN's graph
  compiles with ``aot_eager``, see docs/torch.md "Known compiler problem")
- ``generic``: ``cabs_torch.PerExampleStats(method="generic")`` (torch.func vmap(grad), chunked)
- ``backpack``: BackPACK ``BatchL2Grad`` (when ``backpack-for-pytorch`` is installed)
- ``opacus_ghost``: Opacus ghost-clipping per-sample norms (when ``opacus`` is installed)

on the MLP 784-512-512-10 and the paper's MNIST CNN (conv5x5x32, maxpool 2,
conv5x5x64, maxpool 2, dense 1024, dense 10), float32, random data.

    python benchmarks/bench_torch_stats.py                # batch 32, 128, 512
    python benchmarks/bench_torch_stats.py --quick        # batch 128 only
    python benchmarks/bench_torch_stats.py --threads 1    # one torch thread per process
    python benchmarks/bench_torch_stats.py --device cuda

Every (model, batch, method) runs in a fresh process, ``--reps`` timed steps
after ``--warmup`` steps (the slow generic path: ``--generic-reps`` after
``--generic-warmup``); the
methods take turns, and the whole rotation is repeated ``--rounds`` times.
The time reported is the minimum over all rounds and repetitions, which is
the figure least disturbed by other processes on a shared machine. Not a
test: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

METHODS = ["plain", "fast", "verified", "compiled", "generic", "backpack", "opacus_ghost"]
MODELS = ["mlp", "cnn"]


def build(name: str):
    from torch import nn

    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                             nn.Linear(512, 10))
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(7 * 7 * 64, 1024), nn.ReLU(), nn.Linear(1024, 10),
    )


def make_step(method: str, model, x, y):
    """A closure doing one step's gradient work with ``method``, or None if unavailable."""
    import torch
    import torch.nn.functional as F

    def per_example_loss(out, t):
        return F.cross_entropy(out, t, reduction="none")

    if method == "plain":
        def step():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
        return step
    if method == "compiled":
        from cabs_torch import PerExampleStats, UnsupportedModelError

        try:
            engine = PerExampleStats(model, per_example_loss, method="fast", compile=True)
            engine.plan()
        except UnsupportedModelError:
            return None
        return lambda: engine(x, y)
    if method in ("fast", "generic"):
        from cabs_torch import PerExampleStats

        engine = PerExampleStats(model, per_example_loss, method="generic" if method == "generic" else "fast")
        return lambda: engine(x, y)
    if method == "backpack":
        try:
            from backpack import backpack, extend
            from backpack.extensions import BatchL2Grad
        except ImportError:
            return None
        bmodel, loss = extend(model), extend(torch.nn.CrossEntropyLoss())

        def step():
            bmodel.zero_grad(set_to_none=True)
            with backpack(BatchL2Grad()):
                loss(bmodel(x), y).backward()
        return step
    if method == "opacus_ghost":
        try:
            from opacus.grad_sample import GradSampleModuleFastGradientClipping
        except ImportError:
            return None
        gmodel = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0, use_ghost_clipping=True)

        def step():
            gmodel.zero_grad(set_to_none=True)
            gmodel.enable_hooks()
            F.cross_entropy(gmodel(x), y, reduction="sum").backward()
            norms = gmodel.get_clipping_coef()  # computes the per-sample norms from the ghost norms
            gmodel.disable_hooks()
            return norms
        return step
    raise ValueError(method)


def worker(model_name: str, method: str, batch: int, reps: int, warmup: int, device: str, threads: int) -> dict:
    """Time ``reps`` steps of one method in this process; minimum and median in seconds."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build(model_name).to(device)
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed(step, warmup: int, reps: int) -> list[float]:
        for _ in range(warmup):
            step()
        sync()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t)
        return times

    if method == "verified":  # amortised: fast steps, plus one probe step per VERIFY_EVERY steps
        import torch.nn.functional as F
        from cabs_torch import PerExampleStats

        from cabs_core.exactness import VERIFY_EVERY

        def per_example_loss(out, t):
            return F.cross_entropy(out, t, reduction="none")

        fast = PerExampleStats(model, per_example_loss, method="fast")
        probing = PerExampleStats(model, per_example_loss, method="fast", verify_every=1)
        timed(lambda: fast(x, y), warmup, 0)
        timed(lambda: probing(x, y), 1, 0)
        fast_times, probe_times = [], []
        for _ in range(reps):  # alternating, so that both see the same load
            fast_times += timed(lambda: fast(x, y), 0, 1)
            probe_times += timed(lambda: probing(x, y), 0, 1)
        assert probing.probes == reps + 1 and fast.probes == 1
        fast_t, probe_t = min(fast_times), min(probe_times)
        return {"time": fast_t + (probe_t - fast_t) / VERIFY_EVERY, "probe_step": probe_t, "fast": fast_t}
    step = make_step(method, model, x, y)
    if step is None:
        return {"time": None}
    times = timed(step, warmup, reps)
    return {"time": min(times), "median": sorted(times)[len(times) // 2]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 128 only")
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128, 512])
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--reps", type=int, default=20, help="timed steps per process")
    ap.add_argument("--generic-reps", type=int, default=1, help="timed steps per process, generic path")
    ap.add_argument("--rounds", type=int, default=2, help="rotations over all methods")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first (caches, allocator)")
    ap.add_argument("--generic-warmup", type=int, default=1, help="untimed steps first, generic path")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    ap.add_argument("--worker", nargs=3, metavar=("MODEL", "METHOD", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        m, meth, b = args.worker
        print(json.dumps(worker(m, meth, int(b), args.reps, args.warmup, args.device, args.threads)))
        return
    if args.quick:
        args.batches = [128]

    import torch

    print(f"torch {torch.__version__}, device {args.device}, {os.cpu_count()} CPUs, "
          f"threads {args.threads or torch.get_num_threads()}, float32, "
          f"min over {args.rounds} rounds x {args.reps} steps ({args.generic_reps} for generic)")
    results: dict[tuple[str, str, int], float | None] = {}
    probe_steps: dict[tuple[str, int], tuple[float, float]] = {}  # (probe step, fast step), same process
    for _ in range(args.rounds):
        for model_name in args.models:
            for batch in args.batches:
                for method in ["plain"] + [m for m in args.methods if m != "plain"]:
                    key = (model_name, method, batch)
                    if key in results and results[key] is None:
                        continue  # unavailable or failed
                    reps = args.generic_reps if method == "generic" else args.reps
                    warmup = args.generic_warmup if method == "generic" else args.warmup
                    cmd = [sys.executable, os.path.abspath(__file__), "--worker", model_name, method, str(batch),
                           "--reps", str(reps), "--warmup", str(warmup), "--device", args.device,
                           "--threads", str(args.threads)]
                    out = subprocess.run(cmd, capture_output=True, text=True)
                    if out.returncode != 0:
                        print(f"  {model_name} {method} {batch}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                        results[key] = None
                        continue
                    res = json.loads(out.stdout.strip().splitlines()[-1])
                    t = res["time"]
                    if "probe_step" in res:
                        pair = (res["probe_step"], res["fast"])
                        old = probe_steps.get((model_name, batch))
                        probe_steps[(model_name, batch)] = pair if old is None else (min(old[0], pair[0]),
                                                                                    min(old[1], pair[1]))
                    results[key] = t if t is None or key not in results else min(t, results[key])  # type: ignore[type-var]

    col = 11
    header = f"{'method':<14}" + "".join(f"{f'{m} b{b}':>{col}}" for m in args.models for b in args.batches)
    print("\ntime per step, ms")
    print(header)
    for method in args.methods:
        row = [results.get((m, method, b)) for m in args.models for b in args.batches]
        print(f"{method:<14}" + "".join(f"{t * 1e3:>{col}.2f}" if t else f"{'n/a':>{col}}" for t in row))
    print("\nratio to plain loss.backward()")
    print(header)
    for method in args.methods:
        cells = []
        for m in args.models:
            for b in args.batches:
                t, p = results.get((m, method, b)), results.get((m, "plain", b))
                cells.append(f"{t / p:>{col}.2f}x" if t and p else f"{'n/a':>{col + 1}}")
        print(f"{method:<14}" + "".join(cells))
    if probe_steps:
        from cabs_core.exactness import VERIFY_EVERY

        print(f"\nverification (same process, alternating): probe step / fast step, and the amortised cost "
              f"over VERIFY_EVERY = {VERIFY_EVERY} steps")
        print(header)
        for label, f in (("probe/fast", lambda pr, fa: f"{pr / fa:>{col}.2f}x"),
                         ("amortised", lambda pr, fa: f"{100 * (pr - fa) / fa / VERIFY_EVERY:>+{col}.2f}%")):
            cells = []
            for m in args.models:
                for b in args.batches:
                    pair = probe_steps.get((m, b))
                    cells.append(f(*pair) if pair else f"{'n/a':>{col + 1}}")
            print(f"{label:<14}" + "".join(cells))


if __name__ == "__main__":
    main()
