"""The results page's runs, in one command: CABS against tuned SGD on digits, mnist-5k and
mnist1d, several seeds, CABS over a small learning-rate grid like the baselines.

    python -m cabs_experiments.results                 # runs/results/, under 30 minutes on 2 CPU cores
    python3 dev.py results                             # the same in its own venv, plus --figures docs/results

Each data set is one ``cabs-experiment`` run (:func:`cabs_experiments.run.run_experiment`) with
the settings of :data:`PLANS`, written to ``OUT/<dataset>/`` (log, figures, ``summary.md``).
``OUT/results.md`` then gathers the tables ``docs/results.md`` shows: per data set the best
learning rate of each method (mean ± sd over the seeds) at the automatic target (10% of the
initial training loss) and at a tighter one (1%), the final training loss at every learning
rate (how sensitive each method is to it), and where CABS's batch size went (mean batch per
quarter of the budget, the largest batch, the cost of a step).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .report import (
    _HEAD,
    FIGURES,
    LOG_NAME,
    SUMMARY_MD,
    TARGET_FRACTION,
    MethodSummary,
    RunSummary,
    Summary,
    _mean,
    _row,
    _sd,
    _stat,
    read_jsonl,
    summarize,
    verdict,
)
from .run import ExperimentConfig, check_output_dir, run_experiment

RESULTS_MD = "results.md"
TIMES_JSON = "times.json"


@dataclass(frozen=True)
class Plan:
    """One data set's experiment: its budget and grids (every other option is the command's default)."""

    dataset: str
    epochs: float
    lrs: tuple[float, ...]
    batch_sizes: tuple[int, ...]
    cabs_lrs: tuple[float, ...]
    mnist1d_size: int | None = None  # None: the command's default (20,000)
    model: str | None = None  # None: the data set's default
    second_target: float = 0.01  # a second target, this fraction of the initial training loss

    @property
    def target_fractions(self) -> tuple[float, float]:
        """The automatic target (the command's default fraction) and the plan's second one."""
        return TARGET_FRACTION, self.second_target

    def config(self, out: Path, seeds: int, overwrite: bool, progress: bool | None) -> ExperimentConfig:
        return ExperimentConfig(dataset=self.dataset, epochs=self.epochs, lrs=self.lrs, batch_sizes=self.batch_sizes,
                                cabs_lr=self.cabs_lrs, mnist1d_size=self.mnist1d_size, model=self.model, seeds=seeds,
                                out=str(out / self.dataset), overwrite=overwrite, progress=progress)

    def command(self, out: Path, seeds: int) -> str:
        """The equivalent ``cabs-experiment`` command line."""
        return command(self.config(out, seeds, False, None).__dict__, out / self.dataset)


def command(config: dict[str, Any], out: Path) -> str:
    """The ``cabs-experiment`` command line of an experiment's settings (a log's config record, or a config's
    fields): data set, budget, seeds and grids (every other option at its default)."""
    def csv(xs: Sequence[float]) -> str:
        return ",".join(f"{x:g}" for x in xs)

    seeds = config["seeds"]
    n = len(seeds) if isinstance(seeds, list) else int(seeds)
    size = "" if config.get("mnist1d_size") is None else f" --mnist1d-size {config['mnist1d_size']}"
    model = f" --model {config['model']}" if config.get("model") else ""
    return (f"cabs-experiment --dataset {config['dataset']}{model}{size} --epochs {config['epochs']:g} --seeds {n} "
            f"--cabs-lr {csv(config['cabs_lr'])} --lrs {csv(config['lrs'])} --batch-sizes "
            f"{csv(config['batch_sizes'])} --out {out}")


# Sized so that the whole command, 3 seeds, takes under 30 minutes on this project's 2-core machine
# (timed there: docs/results.md). mnist-5k trains the MLP, not the paper's CNN (the command's default there):
# a step of the CNN at batch 16 took 0.4 to 0.7 s on that machine (CABS and SGD alike), so the grid would take
# hours. Every plan's first target is the command's automatic one (10% of the initial training loss);
# the second is one more reading of the same runs, chosen per data set so that it separates the methods.
PLANS: dict[str, Plan] = {
    "digits": Plan("digits", 30, (0.03, 0.1, 0.3, 1.0), (16, 128), (0.1, 0.3, 1.0), second_target=0.01),
    "mnist-5k": Plan("mnist-5k", 5, (0.03, 0.1, 0.3, 1.0), (16, 128), (0.1, 0.3, 1.0), model="mlp",
                     second_target=0.05),
    "mnist1d": Plan("mnist1d", 8, (0.03, 0.1, 0.3, 1.0), (16, 128), (0.1, 0.3, 1.0), second_target=0.25),
}


# ----------------------------------------------------------------------------- CABS's batch sizes


@dataclass(frozen=True)
class BatchProfile:
    """Where one CABS run's batch size went: the mean batch of the steps that start in each quarter of
    the budget (examples / steps), the largest batch, the steps and the training time per step."""

    quarters: tuple[float, ...]
    largest: int
    steps: int
    ms_per_step: float


def batch_profile(run: RunSummary, budget: int, parts: int = 4) -> BatchProfile:
    """The profile of ``run`` from its step records; refused when the log lacks a step (``--log-every`` > 1)
    or the run did not end normally, since the numbers would not be the run's."""
    if run.status != "ok":
        raise ValueError(f"{run.run}: the run {run.status}, its batch sizes are not a whole run's")
    if len(run.steps) != run.last_step or [s["step"] for s in run.steps] != list(range(1, run.last_step + 1)):
        raise ValueError(f"{run.run}: the log does not hold every step (logged with --log-every > 1?)")
    examples = [0] * parts
    steps = [0] * parts
    for s in run.steps:
        b = int(s["batch_size"])
        start = int(s["examples"]) - b  # the examples seen before this step
        q = min(parts - 1, start * parts // budget)
        examples[q] += b
        steps[q] += 1
    wall = float(run.steps[-1]["wall_time"]) if run.steps else math.nan
    return BatchProfile(tuple(e / n if n else math.nan for e, n in zip(examples, steps)),
                        max(int(s["batch_size"]) for s in run.steps), len(run.steps),
                        1000 * wall / len(run.steps) if run.steps else math.nan)


def _cell(values: Sequence[float], spec: str) -> str:
    """mean ± sd (ddof 1) over the seeds; n/a when some seed has none."""
    if not values or not all(math.isfinite(v) for v in values):
        return "n/a"
    if len(values) == 1:
        return format(values[0], spec)
    return f"{_mean(list(values)):{spec}} ± {_sd(list(values)):{spec}}"


def batch_table(s: Summary) -> list[str]:
    """CABS's batch sizes (every learning rate), with SGD at batch 16 for the cost of a step."""
    budget = int(s.config["budget_examples"])
    lines = ["| method | mean batch, 1st quarter | 2nd quarter | 3rd quarter | 4th quarter | largest batch | steps "
             "| ms per step |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    sizes = s.config.get("batch_sizes") or []
    small = s.best_per_group.get(f"SGD bs {min(sizes)}") if sizes else None  # its best learning rate
    rows = [m for m in s.methods if m.family == "cabs"] + ([small] if small is not None else [])
    for m in rows:
        try:
            profiles = [batch_profile(r, budget) for r in m.seeds]
        except ValueError as e:
            lines.append(f"| {m.label} | n/a ({e}) | | | | | | |")
            continue
        if len(profiles) < m.num_seeds:
            lines.append(f"| {m.label} | n/a ({len(profiles)} of {m.num_seeds} seeds logged) | | | | | | |")
            continue
        quarters = [_cell([p.quarters[q] for p in profiles], ".0f") for q in range(4)]
        largest = [p.largest for p in profiles]
        big = f"{min(largest)}" if min(largest) == max(largest) else f"{min(largest)}–{max(largest)}"
        lines.append(f"| {m.label} | {' | '.join(quarters)} | {big} | {_cell([p.steps for p in profiles], '.0f')} "
                     f"| {_cell([p.ms_per_step for p in profiles], '.2f')} |")
    return lines


# ----------------------------------------------------------------------------- the learning-rate grid


def lr_table(s: Summary) -> list[str]:
    """Final training loss (mean ± sd over the seeds) of every group at every learning rate it ran."""
    lrs = sorted({m.lr for m in s.methods})
    groups: dict[str, dict[float, MethodSummary]] = {}
    for m in s.methods:
        groups.setdefault("CABS" if m.family == "cabs" else m.group, {})[m.lr] = m
    lines = ["| method | " + " | ".join(f"lr {x:g}" for x in lrs) + " |",
             "| --- |" + " ---: |" * len(lrs)]
    for g, by_lr in groups.items():
        cells = [_stat(by_lr[x], "final_train_loss", ".4f") if x in by_lr else "-" for x in lrs]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return lines


# ----------------------------------------------------------------------------- the page


def dataset_section(plan: Plan, out: Path, wall: float | None) -> str:
    """The markdown of one data set: what ran, its tables at both targets, the lr grid, CABS's batches."""
    records = read_jsonl(out / plan.dataset / LOG_NAME)
    summaries = [summarize(records, target_fraction=f) for f in plan.target_fractions]
    s = summaries[0]
    c = s.config
    took = "" if wall is None else f"; {wall:.0f} s for this data set (training, evaluations, report)"
    lines = [f"## {plan.dataset} ({c.get('model')}, {c.get('backend')})", "",
             f"    {command(c, out / plan.dataset)}", "",
             f"- {c.get('data')}; {c.get('num_parameters')} parameters; budget {c.get('epochs'):g} epochs = "
             f"{c.get('budget_examples')} examples per run; seeds {', '.join(str(x) for x in s.seeds)}{took}",
             f"- figures and every run: `{plan.dataset}/{SUMMARY_MD}`", ""]
    for frac, sm in zip(plan.target_fractions, summaries):
        lines += [f"### Best learning rate per method, target {frac * 100:g}% of the initial training loss "
                  f"({sm.target_loss:.4g})", "", _HEAD.format("method")]
        lines += [_row(m) for m in sm.best_per_group.values()]
        lines += [""] + [f"- {v}" for v in verdict(sm)] + [""]
    lines += ["### Final training loss at every learning rate", ""] + lr_table(s) + [""]
    lines += ["### CABS's batch size (steps, time per step: SGD at its smallest batch for comparison)", ""]
    lines += batch_table(s) + [""]
    return "\n".join(lines)


def results_markdown(plans: Sequence[Plan], out: Path, walls: dict[str, float]) -> str:
    total = sum(walls.values()) if len(walls) == len(plans) else None
    head = ["# Results: CABS against tuned SGD", "",
            "Written by `python -m cabs_experiments.results` (`python3 dev.py results`). Every number is the mean ± "
            "the sample standard deviation (ddof 1) over the seeds; a method reaches a target only when every seed "
            "does; wall times are training only (evaluations excluded) on whatever else the machine was doing. "
            "Epochs to a target are read at the evaluation points (every 1/20 of the budget).", ""]
    if total is not None:
        head += [f"Wall time of the {len(plans)} data sets (training, evaluations, reports): {total:.0f} s; the "
                 "command adds its start-up and this page.", ""]
    return "\n".join(head) + "\n" + "\n".join(dataset_section(p, out, walls.get(p.dataset)) for p in plans)


def run_results(plans: Sequence[Plan], out: str | Path, seeds: int = 3, overwrite: bool = False,
                progress: bool | None = None) -> Path:
    """Run every plan into ``out/<dataset>`` and write ``out/results.md``; returns its path."""
    out = Path(out)
    check_output_dir(out, overwrite)
    configs = [p.config(out, seeds, True, progress) for p in plans]  # every option checked before any run
    walls: dict[str, float] = {}
    out.mkdir(parents=True, exist_ok=True)
    for plan, cfg in zip(plans, configs):
        print(f"results: {plan.command(out, seeds)}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        run_experiment(cfg)
        walls[plan.dataset] = time.perf_counter() - t0
        print(f"results: {plan.dataset} took {walls[plan.dataset]:.0f} s", file=sys.stderr, flush=True)
        (out / TIMES_JSON).write_text(json.dumps(walls, indent=2), encoding="utf-8")
    path = out / RESULTS_MD
    path.write_text(results_markdown(plans, out, walls), encoding="utf-8")
    return path


PAGE_FIGURES = ("panels", "cabs")  # per data set: the three panels, and why CABS's batch went where it went


def copy_figures(plans: Sequence[Plan], out: str | Path, dest: str | Path, colors: int = 64) -> list[Path]:
    """Copy each data set's page figures from ``out/<dataset>/`` to ``dest/<dataset>_<name>.png`` with a palette
    of ``colors`` colours (the same drawing, about a third of the bytes: for a docs folder); returns the copies."""
    from PIL import Image  # matplotlib's own dependency

    srcs = [(plan.dataset, Path(out) / plan.dataset / FIGURES[k]) for plan in plans for k in PAGE_FIGURES]
    missing = [str(s) for _, s in srcs if not s.is_file()]
    if missing:
        raise ValueError(f"--figures: {', '.join(missing)} missing: run the data set first")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name, src in srcs:
        with Image.open(src) as im:
            small = im.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT,
                                               dither=Image.Dither.NONE)
        path = dest / f"{name}_{src.name}"
        small.save(path, optimize=True)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cabs_experiments.results", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/results", help="output folder (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per method (default: %(default)s)")
    p.add_argument("--datasets", default=",".join(PLANS),
                   help="comma-separated subset of " + ", ".join(PLANS) + " (default: all)")
    p.add_argument("--overwrite", action="store_true", help="replace what a previous run left in --out")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rewrite OUT/results.md from the logs under OUT")
    p.add_argument("--figures", default=None, metavar="DIR",
                   help="also copy each data set's panels and CABS statistics figures to DIR as small PNGs "
                   "(docs/results for docs/results.md)")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None)
    bar.add_argument("--no-progress", dest="progress", action="store_false")
    a = p.parse_args(argv)
    names = [x.strip() for x in a.datasets.split(",") if x.strip()]
    bad = [x for x in names if x not in PLANS]
    if bad or not names:
        p.error(f"--datasets must be a non-empty subset of {', '.join(PLANS)}, got {a.datasets!r}")
    if a.seeds < 1:
        p.error(f"--seeds must be >= 1, got {a.seeds}")
    plans = [PLANS[x] for x in names]
    t0 = time.perf_counter()
    try:
        if a.report_only:
            out = Path(a.out)
            walls = json.loads((out / TIMES_JSON).read_text()) if (out / TIMES_JSON).is_file() else {}
            path = out / RESULTS_MD
            path.write_text(results_markdown(plans, out, walls), encoding="utf-8")
        else:
            path = run_results(plans, a.out, a.seeds, a.overwrite, a.progress)
        if a.figures is not None:
            for f in copy_figures(plans, a.out, a.figures):
                print(f"results: wrote {f}")
    except (ValueError, OSError) as e:
        print(f"results: error: {e}", file=sys.stderr)
        return 2
    print(f"results: wrote {path} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
