"""End-to-end conformance: the same model, data and parameters give the same
statistics and the same batch-size decisions in PyTorch, JAX and TensorFlow.

    python -m cabs_conformance.e2e [--backends torch jax tensorflow] [--steps 50] [--quick]

prints a table (check x backend: pass/FAIL and the largest deviation from the
other backends) and exits 1 if a check fails. Checks (``docs/porting.md``):

- ``stats f64 <model>``: count, loss_sum, sq_norm_sum, grad_sum (per
  parameter, portable layout) on identical parameters and data, with a 0/1 mask
  that pads the batch; relative deviation <= 1e-10.
- ``stats f32 <model>``: the same in float32; <= 1e-4. The fast paths are
  checked by default (``auto``), the generic per-example paths as well on two models.
- ``train <mode>``: 50 CABS steps from identical parameters, batches drawn by
  the core's sampler from one seed, through each adapter's own trainer:
  identical batch-size sequences, final parameters within 1e-8.
- ``vectors``: every conformance vector, through the core on that backend's arrays.
- ``refuses BatchNorm``: a model the adapter cannot handle exactly gets an
  error, not approximate statistics.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cabs_core import CABSController

from .backends import get_backend
from .runner import builtin_vectors, run
from .zoo import MODELS, init_params, make_data

FRAMEWORKS = ("torch", "jax", "tensorflow")
STATS_RTOL = {"float64": 1e-10, "float32": 1e-4}
PARAMS_RTOL = 1e-8


@dataclass
class Row:
    """One check: per backend, a verdict and the largest deviation (or a note)."""

    check: str
    cells: dict[str, tuple[bool, str]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(ok for ok, _ in self.cells.values())


def zoo_module(framework: str) -> Any:
    """``cabs_conformance.zoo_<framework>``, with float64 enabled where the framework needs it."""
    mod = importlib.import_module(f".zoo_{'tf' if framework == 'tensorflow' else framework}", __package__)
    if framework == "jax":
        mod.enable_x64()
    return mod


def rel_dev(a: Any, b: Any) -> float:
    """max |a - b| / max |b| (0 when both are 0)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    return diff / scale if scale > 0 else diff


def stats_dev(s: dict, t: dict) -> float:
    """The largest relative deviation between two backends' statistics."""
    devs = [rel_dev(s[k], t[k]) for k in ("count", "loss_sum", "sq_norm_sum")]
    devs += [rel_dev(s["grad_sum"][k], t["grad_sum"][k]) for k in t["grad_sum"]]
    if set(s["grad_sum"]) != set(t["grad_sum"]):
        return float("inf")
    return max(devs)


def _compare(check: str, results: dict[str, Any], dev: Callable[[Any, Any], float], tol: float) -> Row:
    """Each backend against every other: its largest deviation, pass if <= tol."""
    row = Row(check)
    for fw, res in results.items():
        if isinstance(res, Exception):
            row.cells[fw] = (False, f"error: {type(res).__name__}: {res}"[:90])
            continue
        others = [dev(res, r) for f, r in results.items() if f != fw and not isinstance(r, Exception)]
        worst = max(others) if others else float("nan")
        row.cells[fw] = (bool(others) and worst <= tol, f"{worst:.1e}")
    return row


def check_statistics(
    fws: dict[str, Any], model: str, dtype: str, method: str = "auto", m: int = 6, pad: int = 2
) -> Row:
    params = init_params(model, seed=1)
    x, y = make_data(model, m + pad, seed=2)
    mask = np.r_[np.ones(m), np.zeros(pad)]
    results: dict[str, Any] = {}
    methods = {}
    for fw, mod in fws.items():
        try:
            results[fw] = mod.statistics(model, params, x, y, mask, dtype, method)
            methods[fw] = results[fw]["method"]
        except Exception as e:  # reported in the table, not raised
            results[fw] = e
    label = f"stats {dtype.replace('float', 'f')} {model}" + ("" if method == "auto" else f" ({method})")
    row = _compare(label, results, stats_dev, STATS_RTOL[dtype])
    for fw, how in methods.items():
        ok, text = row.cells[fw]
        row.cells[fw] = (ok, f"{text} ({how})")
    return row


def check_training(fws: dict[str, Any], mode: str, steps: int, model: str = "mlp") -> Row:
    params = init_params(model, seed=3)
    x, y = make_data(model, 256, seed=4)
    ctl = CABSController(lr=0.2, bs_min=4, bs_max=96, mode=mode, bs_init=8)
    results: dict[str, Any] = {}
    for fw, mod in fws.items():
        try:
            results[fw] = mod.train(model, params, x, y, ctl, steps, seed=11)
        except Exception as e:
            results[fw] = e

    def dev(a: tuple, b: tuple) -> float:
        if a[0] != b[0]:
            return float("inf")  # different decisions
        return max(rel_dev(a[1][k], b[1][k]) for k in b[1])

    row = _compare(f"train {mode} ({steps} steps)", results, dev, PARAMS_RTOL)
    for fw, res in results.items():
        if not isinstance(res, Exception):
            ok, text = row.cells[fw]
            sizes = res[0]
            row.cells[fw] = (ok, f"{text}, bs {min(sizes)}..{max(sizes)}" if ok else f"{text}: sizes {sizes[:12]}...")
    return row


def check_vectors(fws: dict[str, Any]) -> Row:
    row = Row("conformance vectors")
    for fw in fws:
        results = list(run(builtin_vectors(), get_backend(fw)))
        failed = [r.name for r in results if not r.passed]
        row.cells[fw] = (
            not failed,
            f"{len(results) - len(failed)}/{len(results)}" + (f" {failed[:3]}" if failed else ""),
        )
    return row


def check_refusal(fws: dict[str, Any]) -> Row:
    row = Row("refuses BatchNorm (training)")
    for fw, mod in fws.items():
        try:
            message = mod.refusal()
            row.cells[fw] = ("batch" in message.lower() and "norm" in message.lower(), message.split(":")[0])
        except AssertionError as e:
            row.cells[fw] = (False, str(e))
    return row


def run_all(frameworks: list[str], steps: int = 50, models: list[str] | None = None) -> list[Row]:
    fws = {fw: zoo_module(fw) for fw in frameworks}
    rows = [check_vectors(fws), check_refusal(fws)]
    for model in models or list(MODELS):
        rows.append(check_statistics(fws, model, "float64"))
    for model in models or ["mlp", "embed_ln"]:
        rows.append(check_statistics(fws, model, "float32"))
        rows.append(check_statistics(fws, model, "float64", method="generic"))
    for mode in ("paper", "reference"):
        rows.append(check_training(fws, mode, steps))
    return rows


def format_table(rows: list[Row], frameworks: list[str]) -> str:
    width = max(len(r.check) for r in rows)
    cols = {
        fw: max([len(fw)] + [len(("pass " if r.cells[fw][0] else "FAIL ") + r.cells[fw][1]) for r in rows])
        for fw in frameworks
    }
    lines = [f"{'check':<{width}}  " + "  ".join(f"{fw:<{cols[fw]}}" for fw in frameworks)]
    for r in rows:
        cells = [("pass " if r.cells[fw][0] else "FAIL ") + r.cells[fw][1] for fw in frameworks]
        lines.append(f"{r.check:<{width}}  " + "  ".join(f"{c:<{cols[fw]}}" for c, fw in zip(cells, frameworks)))
    failed = sum(not r.passed for r in rows)
    lines.append(f"{len(rows) - failed} passed, {failed} failed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cabs_conformance.e2e", description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
    p.add_argument("--steps", type=int, default=50, help="training steps per run (default 50)")
    p.add_argument("--models", nargs="+", choices=list(MODELS), help="models for the statistics checks (default: all)")
    args = p.parse_args(argv)
    if len(args.backends) < 2:
        p.error("need at least two backends to compare")
    rows = run_all(args.backends, args.steps, args.models)
    print("deviation: the largest relative difference from the other backends; (fast|generic): the path taken")
    print(format_table(rows, args.backends))
    return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
