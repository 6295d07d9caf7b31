"""The experiment's log, figures and markdown summary.

Everything is written to one JSON-lines log (``log.jsonl``), one object per
line with a ``kind``:

- ``config``: the command's settings (first line);
- ``run``: a method about to be trained (``run`` id, ``family``, ``group``, ``label``, ``lr``, ...);
- ``step``: one SGD step (``step``, ``examples`` seen, ``epoch``, ``batch_size``, mini-batch mean
  ``loss``, ``variance`` estimate xi and ``raw`` rule value before clipping (CABS only, else null),
  ``lr``, ``wall_time``);
- ``eval``: an evaluation (``train_loss`` on the training set, ``test_loss``, ``test_accuracy``)
  after the step that reaches the evaluation point ``point_epoch`` (k/K of the budget, the same
  points for every run; ``epoch`` is where the run actually is, up to one batch later, or, at the
  last point of a run that stopped short of the budget, where it stopped);
- ``end``: the run finished (``status`` "ok" or "diverged", with a ``reason``; ``steps``, the
  ``examples`` it trained on, the ``examples_left`` of the budget and the ``next_batch_size`` that did
  not fit in them).

Every step uses the batch size its method decided; a run stops when that
batch does not fit in what is left of the budget (:data:`LAST_BATCH`), so it
may use fewer examples than the budget, never a smaller last batch. The
"final" figures are those of the evaluation after a run's last step, and
only of a run that ended normally.

``wall_time`` is the run's training time in seconds so far, evaluations excluded.
The figures and the summary are computed from the log alone, so
``cabs-experiment --out OUT --report-only`` redraws them from ``OUT/log.jsonl``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

LOG_NAME = "log.jsonl"
SUMMARY_MD = "summary.md"
SUMMARY_JSON = "summary.json"
#: the budget rule, written into the log's config record (a log without it predates the rule)
LAST_BATCH = "whole batches: a run stops when its next decided batch does not fit in the rest of the budget"
FIGURES = {
    "loss": "training_loss.png",
    "accuracy": "test_accuracy.png",
    "batch_size": "batch_size.png",
    "cabs": "cabs_statistics.png",
}


class JsonlLog:
    """Append-only JSON-lines writer (one object per line, flushed per evaluation)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f: IO[str] = self.path.open("w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, allow_nan=True) + "\n")
        if record.get("kind") != "step":
            self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a malformed line raises ValueError naming file and line,
    except an unterminated last line (a run interrupted mid-write), which is left out."""
    path = Path(path)
    out = []
    with path.open(encoding="utf-8") as f:
        lines = f.readlines()
    for k, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if k == len(lines) and not line.endswith("\n"):
                break  # the last line of an interrupted run, cut mid-write: the records before it stand
            raise ValueError(f"{path}:{k}: not JSON ({e})") from e
        if not isinstance(rec, dict) or "kind" not in rec:
            raise ValueError(f"{path}:{k}: expected an object with a 'kind'")
        out.append(rec)
    return out


# ----------------------------------------------------------------------------- summary


@dataclass
class RunSummary:
    """What the summary says about one run."""

    run: str
    family: str
    group: str
    label: str
    lr: float
    status: str
    final_epoch: float
    final_train_loss: float
    best_train_loss: float
    final_test_accuracy: float
    wall_time: float
    examples: int | None = None  # examples trained on (None: the run has no end record)
    examples_left: int | None = None  # of the budget, fewer than the batch that did not fit
    epochs_to_target: float | None = None
    wall_to_target: float | None = None
    evals: list[dict[str, Any]] = field(default_factory=list, repr=False)
    steps: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def last_step(self) -> int:
        """The last logged step (0 before the first): where an interrupted run stopped."""
        return int(self.steps[-1]["step"]) if self.steps else 0

    def score(self) -> tuple[float, float]:
        """Ranking within a group: fewest epochs to the target, then lowest final training loss."""
        e = math.inf if self.epochs_to_target is None else self.epochs_to_target
        f = self.final_train_loss if math.isfinite(self.final_train_loss) else math.inf
        return e, f


@dataclass
class Summary:
    """The comparison: per-run numbers, the best run of each group, the target and the verdict."""

    config: dict[str, Any]
    target_loss: float
    target_rule: str
    runs: list[RunSummary]
    best_per_group: dict[str, RunSummary]
    best_baseline: RunSummary | None
    best_per_family: dict[str, RunSummary]

    def to_dict(self) -> dict[str, Any]:
        def row(r: RunSummary) -> dict[str, Any]:
            return {
                k: _json_float(v) if isinstance(v, float) else v
                for k, v in r.__dict__.items()
                if k not in ("evals", "steps")
            }

        return {
            "target_loss": self.target_loss,
            "target_rule": self.target_rule,
            "runs": [row(r) for r in self.runs],
            "best_per_group": {g: r.run for g, r in self.best_per_group.items()},
            "best_per_family": {f: r.run for f, r in self.best_per_family.items()},
            "best_baseline": self.best_baseline.run if self.best_baseline else None,
        }


def _json_float(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _group_records(records: Iterable[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    config: dict[str, Any] = {}
    runs: dict[str, dict[str, Any]] = {}
    for rec in records:
        kind = rec["kind"]
        if kind == "config":
            config = rec
        elif kind == "run":
            runs[rec["run"]] = {"info": rec, "steps": [], "evals": [], "end": None}
        elif kind in ("step", "eval", "end"):
            if rec["run"] not in runs:
                raise ValueError(f"{kind} record for run {rec['run']!r} before its 'run' record")
            slot = runs[rec["run"]]
            if kind == "end":
                slot["end"] = rec
            else:
                slot[kind + "s"].append(rec)
    return config, runs


def _first_reach(evals: list[dict[str, Any]], target: float) -> tuple[float | None, float | None]:
    """(epochs, wall time) at the first evaluation after training started with training loss <= target."""
    for e in evals:
        if e["step"] == 0:
            continue
        if e["train_loss"] is not None and math.isfinite(e["train_loss"]) and e["train_loss"] <= target:
            return e.get("point_epoch", e["epoch"]), e["wall_time"]
    return None, None


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def summarize(records: Iterable[dict[str, Any]], target_loss: float | None = None) -> Summary:
    """Per-run numbers and the comparison, from log records.

    target_loss: the training loss to reach. None: the automatic target, the
    highest of the families' lowest training losses (CABS, constant SGD,
    decayed SGD): so the best run of every family reaches it, and the question
    is how fast. The evaluation before the first step counts for neither.
    """
    config, grouped = _group_records(records)
    if not grouped:
        raise ValueError("the log holds no runs")
    if "last_batch" not in config:
        raise ValueError("the log was written before the whole-batch budget rule (no 'last_batch' in its config "
                         "record): its runs may end with a step on the budget's remainder, and their final figures "
                         "with it; run the experiment again")
    runs = []
    for rid, slot in grouped.items():
        info, evals, end = slot["info"], slot["evals"], slot["end"]
        losses = [_num(e["train_loss"]) for e in evals]
        finite = [_num(e["train_loss"]) for e in evals if e["step"] > 0 and math.isfinite(_num(e["train_loss"]))]
        last = evals[-1] if evals else {}
        status = end["status"] if end else "incomplete"
        # final figures: the evaluation after the last step of a run that ended normally, else none
        final = status == "ok" and bool(evals) and last["step"] == end["steps"]
        if not final:  # diverged, unfinished, or steps after the last evaluation
            losses.append(math.nan)
        runs.append(
            RunSummary(
                run=rid,
                family=info["family"],
                group=info["group"],
                label=info["label"],
                lr=float(info["lr"]),
                status=status,
                final_epoch=float(last.get("epoch", 0.0)),
                final_train_loss=losses[-1] if losses else math.nan,
                best_train_loss=min(finite) if finite else math.nan,
                final_test_accuracy=_num(last.get("test_accuracy")) if final else math.nan,
                wall_time=float(end["wall_time"]) if end else float(last.get("wall_time", 0.0)),
                examples=int(end["examples"]) if end else None,
                examples_left=int(end["examples_left"]) if end and end.get("examples_left") is not None else None,
                evals=evals,
                steps=slot["steps"],
            )
        )
    if target_loss is None:
        family_best: dict[str, float] = {}
        for r in runs:
            if math.isfinite(r.best_train_loss):
                family_best[r.family] = min(family_best.get(r.family, math.inf), r.best_train_loss)
        if not family_best:
            cut = [r for r in runs if r.status == "incomplete"]
            if cut:
                r = cut[-1]
                raise ValueError(f"the log was interrupted at step {r.last_step} of {r.label}, before any run "
                                 "had an evaluation after its first step: nothing to report yet")
            if all(r.status == "diverged" for r in runs):
                raise ValueError("no run has a finite training loss: every run diverged")
            if not any(r.steps for r in runs):
                raise ValueError("no run took a step (a zero budget?): nothing to report")
            raise ValueError("no run has a finite training loss in an evaluation after its first step")
        target = max(family_best.values())
        rule = "automatic: the highest of the families' lowest training losses (" + ", ".join(
            f"{f} {v:.4g}" for f, v in sorted(family_best.items())
        ) + ")"
    else:
        target, rule = float(target_loss), "given with --target-loss"
    for r in runs:
        r.epochs_to_target, r.wall_to_target = _first_reach(r.evals, target)

    best_per_group: dict[str, RunSummary] = {}
    for r in runs:
        if r.group not in best_per_group or r.score() < best_per_group[r.group].score():
            best_per_group[r.group] = r
    best_per_family: dict[str, RunSummary] = {}
    for r in runs:
        if r.family not in best_per_family or r.score() < best_per_family[r.family].score():
            best_per_family[r.family] = r
    baselines = [r for r in runs if r.family != "cabs"]
    best_baseline = min(baselines, key=RunSummary.score) if baselines else None
    return Summary(config, target, rule, runs, best_per_group, best_baseline, best_per_family)


def _fmt(v: float | None, spec: str = ".3g") -> str:
    if v is None:
        return "not reached"
    if isinstance(v, float) and not math.isfinite(v):
        return "n/a"
    return format(v, spec)


def _loss(v: float) -> str:
    return _fmt(v, ".4f" if not math.isfinite(v) or abs(v) < 1000 else ".3g")


def _examples(r: RunSummary) -> str:
    if r.examples is None:
        return "n/a"
    return f"{r.examples}" + ("" if r.examples_left is None else f" ({r.examples_left} left)")


def _row(r: RunSummary) -> str:
    if r.status == "incomplete":
        status = f" (interrupted at step {r.last_step})"
    else:
        status = "" if r.status == "ok" else f" ({r.status})"
    return (
        f"| {r.label}{status} | {_fmt(r.epochs_to_target, '.2f')} | {_fmt(r.wall_to_target, '.1f')} | "
        f"{_loss(r.final_train_loss)} | {_fmt(r.final_test_accuracy * 100, '.1f')} | {r.wall_time:.1f} | "
        f"{_examples(r)} |"
    )


_HEAD = ("| {} | epochs to target | wall time to target (s) | final training loss | final test accuracy (%) "
         "| total wall time (s) | examples used |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |")


FAMILY_NAMES = {"cabs": "CABS", "sgd": "SGD, constant batch size and learning rate", "sgd-decay": "SGD with decay"}


def verdict(s: Summary) -> list[str]:
    """Plain sentences: does CABS (its best run, named) reach the target in fewer epochs than
    the best run of each baseline family?"""
    cabs = s.best_per_family.get("cabs")
    lines = []
    for fam in ("sgd", "sgd-decay"):
        b = s.best_per_family.get(fam)
        if cabs is None or b is None:
            continue
        c_e, b_e = cabs.epochs_to_target, b.epochs_to_target
        name = FAMILY_NAMES[fam]
        if c_e is None and b_e is None:
            lines.append(f"Neither {cabs.label} nor the best run of {name} ({b.label}) reaches the target.")
        elif c_e is None:
            lines.append(f"No: {cabs.label} does not reach the target; the best of {name} ({b.label}) "
                         f"does in {b_e:.2f} epochs.")
        elif b_e is None:
            lines.append(f"Yes: {cabs.label} reaches the target in {c_e:.2f} epochs; no run of {name} reaches it.")
        else:
            word = "Yes" if c_e < b_e else ("Tie" if c_e == b_e else "No")
            spec = ".2f" if f"{c_e:.2f}" != f"{b_e:.2f}" else ".4f"
            lines.append(
                f"{word}: {cabs.label} reaches the target in {c_e:{spec}} epochs "
                f"({_fmt(cabs.wall_to_target, '.1f')} s), the best of {name} ({b.label}) in {b_e:{spec}} epochs "
                f"({_fmt(b.wall_to_target, '.1f')} s)."
            )
    return lines


def summary_markdown(s: Summary, figures: dict[str, str] | None = None) -> str:
    """The markdown summary: best run per group, the best baseline, the verdict, every run."""
    c = s.config
    lines = [
        f"# CABS vs SGD: {c.get('dataset', '?')}, {c.get('model', '?')}, {c.get('backend', '?')}",
        "",
        f"- budget: {c.get('epochs', '?')} epochs = {c.get('budget_examples', '?')} examples per method; "
        f"seed {c.get('seed', '?')}",
        "- every step uses the batch size its method decided; a run stops when that batch does not fit in the "
        "rest of the budget, so it may use fewer examples (column \"examples used\", with what was left), "
        "never a smaller last batch",
        f"- {c.get('data', '')}",
        f"- target training loss: **{s.target_loss:.4g}** ({s.target_rule})",
        "- training loss: mean cross-entropy over the training set"
        + (f" (a fixed subset of {c['eval_train_examples']})" if c.get("eval_train_subset") else "")
        + f", evaluated every {c.get('eval_every', '?')} epochs (the same points for every method, each "
        "after the step that reaches it); epochs to target are read at those points",
        "- wall time: training only (evaluations excluded), seconds",
        "- final training loss and test accuracy: the evaluation after the run's last step; n/a for a run that "
        "did not end normally",
        "",
        "## Best learning rate per method",
        "",
        _HEAD.format("method"),
    ]
    lines += [_row(r) for r in s.best_per_group.values()]
    lines.append("")
    if s.best_baseline is not None:
        b = s.best_baseline
        lines.append(
            f"**Best baseline:** {b.label} (epochs to target {_fmt(b.epochs_to_target, '.2f')}, "
            f"final training loss {_loss(b.final_train_loss)})."
        )
        lines.append("")
    v = verdict(s)
    if v:
        lines += ["## Does CABS reach the target in fewer epochs?", ""] + [f"- {x}" for x in v] + [""]
    if figures:
        lines += ["## Figures", ""] + [f"![{k}]({name})" for k, name in figures.items()] + [""]
    lines += [
        "## Every run (the learning-rate grid)",
        "",
        _HEAD.format("run"),
    ]
    lines += [_row(r) for r in s.runs]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- figures


def _thin(xs: list[float], ys: list[float], max_points: int = 4000) -> tuple[list[float], list[float]]:
    if len(xs) <= max_points:
        return xs, ys
    k = math.ceil(len(xs) / max_points)
    return xs[::k] + xs[-1:], ys[::k] + ys[-1:]


def _ema(values: list[float], mu: float = 0.95) -> list[float]:
    """Bias-corrected exponential moving averages, as the controller smooths its inputs."""
    out, avg = [], 0.0
    for k, v in enumerate(values, 1):
        avg = mu * avg + (1 - mu) * v
        out.append(avg / (1 - mu**k))
    return out


def _styles(groups: list[str]) -> Iterator[dict[str, Any]]:
    cabs_colors = iter(["black", "dimgrey", "saddlebrown", "darkviolet", "darkgreen"] * 10)
    for g in groups:
        if g.startswith("CABS"):
            yield {"color": next(cabs_colors), "linewidth": 2.2, "linestyle": "-"}
        else:
            yield {"linewidth": 1.3, "linestyle": "--" if "decay" in g else "-"}


def write_figures(s: Summary, out_dir: str | Path) -> dict[str, str]:
    """PNG figures (matplotlib's Agg canvas, no display) of the best run of each group:
    training loss, test accuracy and batch size against epochs, and CABS's own statistics.
    Returns {figure: file name}."""
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    best = list(s.best_per_group.values())
    styles = list(_styles([r.group for r in best]))
    title = f"{s.config.get('dataset', '')}, {s.config.get('model', '')}, {s.config.get('backend', '')}"
    written: dict[str, str] = {}

    def axes(ylabel: str, log: bool) -> tuple[Figure, Any]:
        fig = Figure(figsize=(7, 4.5), dpi=110)
        ax = fig.add_subplot()
        ax.set_xlabel("epochs")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        return fig, ax

    for key, ylabel, field_name, log in (
        ("loss", "training loss", "train_loss", True),
        ("accuracy", "test accuracy", "test_accuracy", False),
    ):
        fig, ax = axes(ylabel, log)
        for r, st in zip(best, styles):
            pts = [(e["epoch"], _num(e[field_name])) for e in r.evals]
            pts = [(x, y) for x, y in pts if math.isfinite(y) and (not log or y > 0)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=r.label, **st)
        if key == "loss":
            ax.axhline(s.target_loss, color="grey", linewidth=0.8, linestyle=":", label="target")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / FIGURES[key])
        written[key] = FIGURES[key]

    fig, ax = axes("batch size", True)
    for r, st in zip(best, styles):
        xs, ys = _thin([p["epoch"] for p in r.steps], [float(p["batch_size"]) for p in r.steps])
        ax.step(xs, ys, where="post", label=r.label, **st)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / FIGURES["batch_size"])
    written["batch_size"] = FIGURES["batch_size"]

    cabs_runs = [r for r in best if r.family == "cabs"]
    if cabs_runs:
        fig = Figure(figsize=(7, 7), dpi=110)
        top, bottom = fig.subplots(2, 1, sharex=True)
        for r in cabs_runs:
            rows = [p for p in r.steps if p.get("variance") is not None and p.get("loss") is not None]
            xs = [p["epoch"] for p in rows]
            for name, key, style in (("mini-batch loss L", "loss", "-"), ("variance estimate xi", "variance", "--")):
                xk, yk = _thin(xs, _ema([p[key] for p in rows]))
                top.plot(xk, yk, style, label=f"{r.label}: {name} (EMA 0.95)")
            xk, yk = _thin(xs, [p["raw"] if p.get("raw") is not None else math.nan for p in rows])
            line = bottom.plot(xk, yk, ":", label=f"{r.label}: rule lr xi_avg / L_avg (before clipping)")[0]
            xb, yb = _thin([p["epoch"] for p in r.steps], [float(p["batch_size"]) for p in r.steps])
            bottom.step(xb, yb, where="post", color=line.get_color(), label=f"{r.label}: batch size used")
        top.set_yscale("log")
        top.set_ylabel("loss, variance")
        top.set_title(f"CABS statistics: {title}")
        bottom.set_yscale("log")
        bottom.set_ylabel("batch size")
        bottom.set_xlabel("epochs")
        for ax in (top, bottom):
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / FIGURES["cabs"])
        written["cabs"] = FIGURES["cabs"]
    return written


def write_report(out_dir: str | Path, target_loss: float | None = None) -> Summary:
    """Read ``out_dir/log.jsonl``; write the figures, ``summary.md`` and ``summary.json``."""
    out_dir = Path(out_dir)
    s = summarize(read_jsonl(out_dir / LOG_NAME), target_loss)
    figures = write_figures(s, out_dir)
    (out_dir / SUMMARY_MD).write_text(summary_markdown(s, figures), encoding="utf-8")
    (out_dir / SUMMARY_JSON).write_text(json.dumps(s.to_dict(), indent=2, allow_nan=False), encoding="utf-8")
    return s
