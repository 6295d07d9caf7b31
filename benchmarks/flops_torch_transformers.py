"""Arithmetic of CABS's exact per-example statistics on the transformers of
``bench_torch_transformers.py``, counted, not timed (issue 20).

``torch.utils.flop_counter.FlopCounterMode`` counts the floating-point operations of
the matrix products (``mm``, ``addmm``, ``bmm``, convolutions, attention) that one step
executes: a plain step (forward, backward of the mean loss) and a step of the eager
fast path (``PerExampleStats(method="fast")``, after its probing call), and of the
generic path for reference. The ratio fast / plain is what the statistics add in
products; elementwise work is not counted. It does not depend on the machine, so it
bounds from below what any backend of the same algorithm (eager, compiled, GPU) can
reach when products dominate the step: the per-example squared norm of a weight used
at T positions costs min(T^2 (p + q), T p q) per example (Gram form or per-example
gradient, whichever is smaller), against about 3 T p q for the layer in a plain step.

    python benchmarks/flops_torch_transformers.py                       # gpt (seq 32, 128) and vit, batch 16
    python benchmarks/flops_torch_transformers.py --seqs 128 --batches 16,64
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_torch_transformers import build, make_step  # noqa: E402


def flops(step: object) -> int:
    with FlopCounterMode(display=False) as counter:
        step()  # type: ignore[operator]
    return int(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt,vit")
    ap.add_argument("--batches", default="16")
    ap.add_argument("--seqs", default="32,128", help="GPT sequence lengths (the ViT has 65 positions)")
    ap.add_argument("--methods", default="fast,generic")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*batching rule.*")
    print("| model | positions | batch | method | GFLOP / step | vs plain |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        for seq in [int(s) for s in args.seqs.split(",")] if name == "gpt" else [0]:
            for m in (int(b) for b in args.batches.split(",")):
                base = None
                for method in ["plain", *args.methods.split(",")]:
                    model, loss_fn, x, y = build(name, m, seq or 128, "cpu")
                    step, path = make_step(method, model, loss_fn, x, y)
                    if step is None:
                        print(f"| {name} | {seq or 65} | {m} | {method} | {path} | n/a |")
                        continue
                    total = flops(step)
                    base = base or total
                    print(f"| {name} | {seq or 65} | {m} | {method} ({path}) | {total / 1e9:.2f} | "
                          f"{total / base:.3f}x |", flush=True)


if __name__ == "__main__":
    main()
