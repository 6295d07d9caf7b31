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

With ``--seeds N`` every method runs once per seed: run ids end in ``_s<seed>``, the ``run``
record names its ``method`` (the id without the seed), every ``run``/``step``/``eval``/``end``
record has ``seed``, and the ``config`` record lists the ``seeds``. The summary groups a method's
runs into a :class:`MethodSummary` (mean ± sample standard deviation across the seeds; the
figures draw the mean and a min-max band). A log without these fields is one seed, ``config["seed"]``.

The automatic target is :data:`TARGET_FRACTION` of the training loss before the first step
(:func:`automatic_target`), the same for every method, defined before any of them trains.

``wall_time`` is the run's training time in seconds so far, evaluations excluded.
The figures and the summary are computed from the log alone, so
``cabs-experiment --out OUT --report-only`` redraws them from ``OUT/log.jsonl``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
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
    "panels": "panels.png",
}
#: the automatic target: this fraction of the training loss before the first step
TARGET_FRACTION = 0.1
#: what "±" means in the tables and the band in the figures
SPREAD = "tables: mean ± sample standard deviation (ddof 1) across seeds; figures: mean line, min-max band"


class JsonlLog:
    """Append-only JSON-lines writer (one object per line, flushed per evaluation)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f: IO[str] = self.path.open("w", encoding="utf-8")
        #: fields added to every record of a run (``run``, ``step``, ``eval``, ``end``): the seed
        self.tags: dict[str, Any] = {}

    def write(self, record: dict[str, Any]) -> None:
        if self.tags and "run" in record:
            record = {**record, **self.tags}
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
    """What the summary says about one run (one method, one seed)."""

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
    seed: int = 0
    method: str = ""  # the method's id, shared by its seeds ("" : the run id)
    initial_train_loss: float = math.nan  # the evaluation before the first step
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


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def _sd(values: list[float]) -> float:
    """The sample standard deviation (ddof 1) of finite values; 0 for one value, nan for none."""
    if not values:
        return math.nan
    if len(values) == 1:
        return 0.0
    m = _mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


@dataclass
class MethodSummary:
    """One method over its seeds: means and sample standard deviations (ddof 1) across seeds.

    A mean is over every seed, or nan when some seed has no value (a diverged or unfinished run):
    never over a silent subset. ``epochs_to_target`` is the mean when every seed reached the
    target, else None; ``reached`` says in how many seeds it did.
    """

    run: str  # the method's id (with one seed, the run's id)
    family: str
    group: str
    label: str
    lr: float
    seeds: list[RunSummary] = field(repr=False)
    num_seeds: int = 1  # seeds of the experiment (a method of an interrupted log may have fewer runs)

    def _all(self, name: str, scale: float = 1.0) -> list[float]:
        """Every seed's value (scaled), or [] when some seed has none (or is missing from the log)."""
        vals = [getattr(r, name) for r in self.seeds]
        if len(vals) < self.num_seeds or not all(v is not None and math.isfinite(v) for v in vals):
            return []
        return [v * scale for v in vals]

    @property
    def status(self) -> str:
        bad = [r for r in self.seeds if r.status != "ok"]
        if not bad and len(self.seeds) == self.num_seeds:
            return "ok"
        if self.num_seeds == 1:
            return self.seeds[0].status
        parts = [f"seed {r.seed} {r.status}" + (f" at step {r.last_step}" if r.status == "incomplete" else "")
                 for r in bad]
        if len(self.seeds) < self.num_seeds:
            parts.append(f"{len(self.seeds)} of {self.num_seeds} seeds logged")
        return "; ".join(parts)

    @property
    def reached(self) -> int:
        return sum(r.epochs_to_target is not None for r in self.seeds)

    @property
    def epochs_to_target(self) -> float | None:
        return _mean([r.epochs_to_target for r in self.seeds]) if self.reached == self.num_seeds else None  # type: ignore[misc]

    @property
    def wall_to_target(self) -> float | None:
        return _mean([r.wall_to_target for r in self.seeds]) if self.reached == self.num_seeds else None  # type: ignore[misc]

    @property
    def final_train_loss(self) -> float:
        return _mean(self._all("final_train_loss"))

    @property
    def final_test_accuracy(self) -> float:
        return _mean(self._all("final_test_accuracy"))

    @property
    def wall_time(self) -> float:
        return _mean(self._all("wall_time"))

    def score(self) -> tuple[float, float, float]:
        """Ranking: reached the target in most seeds, then fewest epochs to it (mean over the seeds
        that reached it), then lowest mean final training loss. With one seed: the run's own ranking."""
        reached = [r.epochs_to_target for r in self.seeds if r.epochs_to_target is not None]
        f = self.final_train_loss
        return -len(reached), _mean(reached) if reached else math.inf, f if math.isfinite(f) else math.inf  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        def stat(name: str) -> dict[str, Any]:
            vals = [getattr(r, name) for r in self.seeds]
            ok = [v for v in vals if v is not None and math.isfinite(v)]
            return {"mean": _json_float(_mean(ok)) if len(ok) == len(vals) else None,
                    "sd": _json_float(_sd(ok)) if len(ok) == len(vals) else None,
                    "per_seed": [_json_float(v) if v is not None else None for v in vals]}

        return {"method": self.run, "family": self.family, "group": self.group, "label": self.label, "lr": self.lr,
                "status": self.status, "seeds": [r.seed for r in self.seeds], "runs": [r.run for r in self.seeds],
                "reached": self.reached, **{k: stat(k) for k in (
                    "epochs_to_target", "wall_to_target", "final_train_loss", "final_test_accuracy", "wall_time",
                    "examples")}}


@dataclass
class Summary:
    """The comparison: per-run and per-method numbers, the best method of each group, the target and the verdict."""

    config: dict[str, Any]
    target_loss: float
    target_rule: str
    runs: list[RunSummary]
    best_per_group: dict[str, MethodSummary]
    best_baseline: MethodSummary | None
    best_per_family: dict[str, MethodSummary]
    methods: list[MethodSummary] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)

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
            "seeds": self.seeds,
            "spread": SPREAD,
            "runs": [row(r) for r in self.runs],
            "methods": [m.to_dict() for m in self.methods],
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
            if rec["run"] in runs:
                raise ValueError(f"run id {rec['run']!r} appears twice in the log")
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


def log_seeds(config: dict[str, Any]) -> list[int]:
    """The seeds of an experiment: the config's ``seeds`` list, or (a log of one seed) ``[seed]``."""
    seeds = config.get("seeds")
    if isinstance(seeds, list) and seeds:
        return [int(x) for x in seeds]
    return [int(config.get("seed", 0))]


def automatic_target(runs: list[RunSummary], fraction: float = TARGET_FRACTION) -> tuple[float, str]:
    """``fraction`` times the training loss before the first step (mean over seeds): fixed before any
    method trains, the same for every method. Within one seed every method starts from the same
    parameters, so the seed's initial loss is the mean of its runs' (equal) first evaluations."""
    per_seed: dict[int, list[float]] = {}
    for r in runs:
        if math.isfinite(r.initial_train_loss):
            per_seed.setdefault(r.seed, []).append(r.initial_train_loss)
    if not per_seed:
        raise ValueError("no run has a finite training loss before its first step, so the automatic target "
                         f"({fraction:g} x the initial loss) is undefined: give one with --target-loss")
    initial = {s: _mean(v) for s, v in sorted(per_seed.items())}
    mean = _mean(list(initial.values()))
    where = ("seed " + str(next(iter(initial))) if len(initial) == 1 else
             f"the mean over seeds {', '.join(str(s) for s in initial)}: "
             + ", ".join(f"{v:.4g}" for v in initial.values()))
    rule = (f"automatic: {fraction * 100:g}% of the training loss before the first step ({mean:.4g}, {where}), "
            "the same for every method and fixed before any training; --target-loss overrides it")
    return fraction * mean, rule


def summarize(records: Iterable[dict[str, Any]], target_loss: float | None = None,
              target_fraction: float = TARGET_FRACTION) -> Summary:
    """Per-run and per-method numbers and the comparison, from log records.

    target_loss: the training loss to reach. None: the automatic target,
    ``target_fraction`` of the training loss before the first step (see
    :func:`automatic_target`); no method's own result defines it.
    The evaluation before the first step counts for no method.
    """
    if not (math.isfinite(target_fraction) and 0 < target_fraction < 1):
        raise ValueError(f"--target-fraction must lie in (0, 1), got {target_fraction}")
    config, grouped = _group_records(records)
    if not grouped:
        raise ValueError("the log holds no runs")
    if "last_batch" not in config:
        raise ValueError("the log was written before the whole-batch budget rule (no 'last_batch' in its config "
                         "record): its runs may end with a step on the budget's remainder, and their final figures "
                         "with it; run the experiment again")
    seeds = log_seeds(config)
    runs = []
    for rid, slot in grouped.items():
        info, evals, end = slot["info"], slot["evals"], slot["end"]
        losses = [_num(e["train_loss"]) for e in evals]
        finite = [_num(e["train_loss"]) for e in evals if e["step"] > 0 and math.isfinite(_num(e["train_loss"]))]
        first = [_num(e["train_loss"]) for e in evals if e["step"] == 0]
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
                seed=int(info.get("seed", seeds[0])),
                method=str(info.get("method", rid)),
                initial_train_loss=first[0] if first else math.nan,
                evals=evals,
                steps=slot["steps"],
            )
        )
    if target_loss is None:
        if not any(math.isfinite(r.best_train_loss) for r in runs):
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
        target, rule = automatic_target(runs, target_fraction)
    else:
        target, rule = float(target_loss), "given with --target-loss"
    for r in runs:
        r.epochs_to_target, r.wall_to_target = _first_reach(r.evals, target)

    by_method: dict[str, list[RunSummary]] = {}
    for r in runs:
        by_method.setdefault(r.method, []).append(r)
    methods = []
    for mid, rs in by_method.items():
        if len({r.seed for r in rs}) != len(rs):
            raise ValueError(f"method {mid!r} has two runs of one seed in the log")
        m0 = rs[0]
        methods.append(MethodSummary(mid, m0.family, m0.group, m0.label, m0.lr, sorted(rs, key=lambda r: r.seed),
                                     num_seeds=len(seeds)))

    best_per_group: dict[str, MethodSummary] = {}
    for m in methods:
        if m.group not in best_per_group or m.score() < best_per_group[m.group].score():
            best_per_group[m.group] = m
    best_per_family: dict[str, MethodSummary] = {}
    for m in methods:
        if m.family not in best_per_family or m.score() < best_per_family[m.family].score():
            best_per_family[m.family] = m
    baselines = [m for m in methods if m.family != "cabs"]
    best_baseline = min(baselines, key=MethodSummary.score) if baselines else None
    return Summary(config, target, rule, runs, best_per_group, best_baseline, best_per_family, methods, seeds)


def _fmt(v: float | None, spec: str = ".3g") -> str:
    if v is None:
        return "not reached"
    if isinstance(v, float) and not math.isfinite(v):
        return "n/a"
    return format(v, spec)


def _loss_spec(v: float) -> str:
    return ".4f" if not math.isfinite(v) or abs(v) < 1000 else ".3g"


def _stat(m: MethodSummary, name: str, spec: str | None = None, scale: float = 1.0) -> str:
    """One cell: the value (one seed) or mean ± sd over every seed; n/a when some seed has none."""
    vals = m._all(name, scale)
    if not vals or len(vals) < m.num_seeds:
        return "n/a"
    mean = _mean(vals)
    spec = spec or _loss_spec(mean)
    if m.num_seeds == 1:
        return format(mean, spec)
    return f"{mean:{spec}} ± {_sd(vals):{spec}}"


def _to_target(m: MethodSummary, name: str, spec: str) -> str:
    vals = [getattr(r, name) for r in m.seeds if r.epochs_to_target is not None]
    if not vals:
        return "not reached"
    if m.num_seeds == 1:
        return format(vals[0], spec)
    text = f"{_mean(vals):{spec}} ± {_sd(vals):{spec}}" if len(vals) > 1 else format(vals[0], spec)
    return text if len(vals) == m.num_seeds else f"{text} ({len(vals)} of {m.num_seeds} seeds; the others: not reached)"


def _examples(m: MethodSummary) -> str:
    used = [r.examples for r in m.seeds]
    if any(u is None for u in used):
        return "n/a"
    left = [r.examples_left for r in m.seeds]
    lo, hi = min(used), max(used)  # type: ignore[type-var]
    text = f"{lo}" if lo == hi else f"{lo}–{hi}"
    if any(x is None for x in left):
        return text
    llo, lhi = min(left), max(left)  # type: ignore[type-var]
    return text + (f" ({llo} left)" if llo == lhi else f" ({llo}–{lhi} left)")


def _status(m: MethodSummary) -> str:
    st = m.status
    if st == "ok":
        return ""
    if m.num_seeds == 1 and st == "incomplete":
        return f" (interrupted at step {m.seeds[0].last_step})"
    return f" ({st.replace('incomplete', 'interrupted')})"


def _row(m: MethodSummary) -> str:
    return (
        f"| {m.label}{_status(m)} | {_to_target(m, 'epochs_to_target', '.2f')} | "
        f"{_to_target(m, 'wall_to_target', '.1f')} | {_stat(m, 'final_train_loss')} | "
        f"{_stat(m, 'final_test_accuracy', '.1f', 100.0)} | {_stat(m, 'wall_time', '.1f')} | {_examples(m)} |"
    )


_HEAD = ("| {} | epochs to target | wall time to target (s) | final training loss | final test accuracy (%) "
         "| total wall time (s) | examples used |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |")


FAMILY_NAMES = {"cabs": "CABS", "sgd": "SGD, constant batch size and learning rate", "sgd-decay": "SGD with decay"}


def verdict(s: Summary) -> list[str]:
    """Plain sentences: does CABS (its best learning rate, named) reach the target in fewer epochs
    than the best run of each baseline family? With several seeds: means over the seeds, a method
    reaching the target only if it does in every seed, and a word when the means lie within one
    standard deviation of each other."""
    cabs = s.best_per_family.get("cabs")
    lines = []
    n = len(s.seeds) if s.seeds else 1

    def epochs(m: MethodSummary, spec: str) -> str:
        vals = [r.epochs_to_target for r in m.seeds]
        return f"{_mean(vals):{spec}}" + ("" if n == 1 else f" ± {_sd(vals):{spec}}")  # type: ignore[arg-type]

    def missing(m: MethodSummary) -> str:
        return "" if n == 1 or m.reached == 0 else f" in every seed (only in {m.reached} of {n})"

    for fam in ("sgd", "sgd-decay"):
        b = s.best_per_family.get(fam)
        if cabs is None or b is None:
            continue
        c_e, b_e = cabs.epochs_to_target, b.epochs_to_target
        name = FAMILY_NAMES[fam]
        if c_e is None and b_e is None:
            lines.append(f"Neither {cabs.label} nor the best run of {name} ({b.label}) reaches the target"
                         f"{'' if n == 1 else ' in every seed'}.")
        elif c_e is None:
            lines.append(f"No: {cabs.label} does not reach the target{missing(cabs)}; the best of {name} "
                         f"({b.label}) does in {epochs(b, '.2f')} epochs.")
        elif b_e is None:
            lines.append(f"Yes: {cabs.label} reaches the target in {epochs(cabs, '.2f')} epochs; no run of {name} "
                         f"reaches it{'' if n == 1 else ' in every seed'}.")
        else:
            word = "Yes" if c_e < b_e else ("Tie" if c_e == b_e else "No")
            spec = ".2f" if f"{c_e:.2f}" != f"{b_e:.2f}" else ".4f"
            mean = "" if n == 1 else "mean "
            line = (f"{word}: {cabs.label} reaches the target in {mean}{epochs(cabs, spec)} epochs "
                    f"({_fmt(cabs.wall_to_target, '.1f')} s), the best of {name} ({b.label}) in "
                    f"{mean}{epochs(b, spec)} epochs ({_fmt(b.wall_to_target, '.1f')} s).")
            if n > 1 and word != "Tie":
                sd = max(_sd([r.epochs_to_target for r in m.seeds]) for m in (cabs, b))  # type: ignore[misc]
                if abs(c_e - b_e) <= sd:
                    line += f" The difference is within one standard deviation across the {n} seeds."
            lines.append(line)
    return lines


def _grid_note(s: Summary) -> str:
    """How many learning rates CABS ran against the baselines' grid."""
    cabs_lrs = sorted({m.lr for m in s.methods if m.family == "cabs"})
    base = [m for m in s.methods if m.family != "cabs"]
    if not cabs_lrs or not base:
        return ""
    groups = {m.group for m in base}
    lrs = sorted({m.lr for m in base})
    def n(k: int, word: str) -> str:
        return f"{k} {word}{'' if k == 1 else 's'}"

    return (f"- tuning: CABS ran at {n(len(cabs_lrs), 'learning rate')} "
            f"({', '.join(f'{x:g}' for x in cabs_lrs)}); the SGD baselines ran {n(len(base), 'run')} per seed, "
            f"{n(len(lrs), 'learning rate')} ({', '.join(f'{x:g}' for x in lrs)}) for each of "
            f"{n(len(groups), 'combination')} of batch size and schedule, and the tables show each combination at "
            "its best learning rate: "
            "the baselines are tuned on this very budget, CABS "
            + ("is not" if len(cabs_lrs) == 1 else f"only over {len(cabs_lrs)} values"))


def summary_markdown(s: Summary, figures: dict[str, str] | None = None) -> str:
    """The markdown summary: best learning rate per group, the best baseline, the verdict, every method."""
    c = s.config
    n = len(s.seeds) if s.seeds else 1
    seeds = (f"seed {s.seeds[0] if s.seeds else c.get('seed', '?')}" if n == 1 else
             f"{n} seeds ({', '.join(str(x) for x in s.seeds)}: initial parameters and example order); every "
             f"number is the mean ± the sample standard deviation (ddof 1) across the seeds, and n/a when some "
             "seed has none (a diverged or unfinished run)")
    lines = [
        f"# CABS vs SGD: {c.get('dataset', '?')}, {c.get('model', '?')}, {c.get('backend', '?')}",
        "",
        f"- budget: {c.get('epochs', '?')} epochs = {c.get('budget_examples', '?')} examples per method; {seeds}",
        "- every step uses the batch size its method decided; a run stops when that batch does not fit in the "
        "rest of the budget, so it may use fewer examples (column \"examples used\", with what was left), "
        "never a smaller last batch",
        f"- {c.get('data', '')}",
        f"- target training loss: **{s.target_loss:.4g}** ({s.target_rule})",
    ]
    note = _grid_note(s)
    if note:
        lines.append(note)
    lines += [
        "- training loss: mean cross-entropy over the training set"
        + (f" (a fixed subset of {c['eval_train_examples']})" if c.get("eval_train_subset") else "")
        + f", evaluated every {c.get('eval_every', '?')} epochs (the same points for every method, each "
        "after the step that reaches it); epochs to target are read at those points"
        + ("" if n == 1 else "; with several seeds, the mean over the seeds when every seed reached the target"),
        "- wall time: training only (evaluations excluded), seconds; measured on whatever else the machine was "
        "doing, so it is noisy (on a shared machine, differences of tens of percent mean little): compare "
        "epochs first",
        "- final training loss and test accuracy: the evaluation after the run's last step; n/a for a run that "
        "did not end normally",
        "",
        "## Best learning rate per method",
        "",
        _HEAD.format("method"),
    ]
    lines += [_row(m) for m in s.best_per_group.values()]
    lines.append("")
    if s.best_baseline is not None:
        b = s.best_baseline
        lines.append(
            f"**Best baseline:** {b.label} (epochs to target {_to_target(b, 'epochs_to_target', '.2f')}, "
            f"final training loss {_stat(b, 'final_train_loss')})."
        )
        lines.append("")
    v = verdict(s)
    if v:
        lines += ["## Does CABS reach the target in fewer epochs?", ""] + [f"- {x}" for x in v] + [""]
    if figures:
        band = "" if n == 1 else f" Lines: the mean over the {n} seeds; shaded band: the lowest to the highest seed."
        lines += ["## Figures", "", f"The best learning rate of each method against epochs.{band}", ""]
        lines += [f"![{k}]({name})" for k, name in figures.items()] + [""]
    lines += [
        "## Every method (the learning-rate grid)",
        "",
        _HEAD.format("method"),
    ]
    lines += [_row(m) for m in s.methods]
    if n > 1:
        lines += ["", f"The {len(s.runs)} runs one by one (every seed) are in `{SUMMARY_JSON}`."]
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


@dataclass
class Series:
    """One method's curve in a figure: the mean over its seeds at ``x`` and the min-max band."""

    label: str
    family: str
    x: list[float]
    mean: list[float]
    lo: list[float]
    hi: list[float]
    seeds: int
    note: str = ""  # why the curve ends early (a seed diverged or was cut), if it does


def _eval_series(m: MethodSummary, key: str, scale: float = 1.0, positive: bool = False) -> Series:
    """``key`` of the evaluations at the points every seed evaluated, up to the first point where some
    seed has no finite value; x is the mean over the seeds of where each run actually was."""
    per_seed = []
    for r in m.seeds:
        pts = {}
        for e in r.evals:
            pts[e.get("point_epoch", e["epoch"])] = (float(e["epoch"]), _num(e[key]) * scale)
        per_seed.append(pts)
    common = sorted(set.intersection(*(set(p) for p in per_seed)))
    xs, mean, lo, hi, note = [], [], [], [], ""
    for point in common:
        ys = [p[point][1] for p in per_seed]
        if not all(math.isfinite(y) and (not positive or y > 0) for y in ys):
            note = "ends where a seed has no finite value"
            break
        xs.append(_mean([p[point][0] for p in per_seed]))
        mean.append(_mean(ys))
        lo.append(min(ys))
        hi.append(max(ys))
    if any(r.status != "ok" for r in m.seeds) and not note:
        note = "a seed did not end normally"
    return Series(m.label, m.family, xs, mean, lo, hi, len(m.seeds), note)


def _batch_steps(r: RunSummary, num_train: float | None) -> tuple[list[float], list[float]]:
    """The batch size of each logged step against the epoch at which the step starts, and one last
    point where the run stopped: a step function (drawn with ``where="post"``) of the batches
    actually taken. The examples left unused at the end (fewer than one batch) are not a batch and
    are not drawn."""
    xs, ys = [], []
    for p in r.steps:
        n = num_train if num_train else p["examples"] / p["epoch"] if p["epoch"] else None
        start = (p["examples"] - p["batch_size"]) / n if n else p["epoch"]
        xs.append(float(start))
        ys.append(float(p["batch_size"]))
    if r.steps:
        xs.append(float(r.steps[-1]["epoch"]))
        ys.append(ys[-1])
    return xs, ys


def _batch_series(m: MethodSummary, num_train: float | None) -> Series:
    """The batch size over epochs: per seed a step function; mean and min-max over the seeds on the
    union of their step starts, up to where the first seed stopped."""
    import numpy as np

    curves = [_batch_steps(r, num_train) for r in m.seeds]
    curves = [c for c in curves if c[0]]
    if not curves:
        return Series(m.label, m.family, [], [], [], [], len(m.seeds))
    if len(curves) == 1:
        xs, ys = _thin(*curves[0])
        return Series(m.label, m.family, xs, ys, ys, ys, 1)
    end = min(c[0][-1] for c in curves)
    grid = np.unique(np.concatenate([np.asarray(c[0]) for c in curves]))
    grid = grid[grid <= end]
    vals = np.stack([np.asarray(c[1])[np.searchsorted(np.asarray(c[0]), grid, side="right") - 1] for c in curves])
    xs, mean = _thin(grid.tolist(), vals.mean(axis=0).tolist())
    _, lo = _thin(grid.tolist(), vals.min(axis=0).tolist())
    _, hi = _thin(grid.tolist(), vals.max(axis=0).tolist())
    note = "" if len(curves) == len(m.seeds) else "some seed took no step"
    return Series(m.label, m.family, xs, mean, lo, hi, len(curves), note)


def figure_series(s: Summary) -> dict[str, list[Series]]:
    """What the figures draw, per panel ("loss", "accuracy" in %, "batch_size"): the best learning
    rate of each group, mean over seeds with the min-max band."""
    best = list(s.best_per_group.values())
    num_train = s.config.get("num_train")
    return {
        "loss": [_eval_series(m, "train_loss", positive=True) for m in best],
        "accuracy": [_eval_series(m, "test_accuracy", scale=100.0) for m in best],
        "batch_size": [_batch_series(m, float(num_train) if num_train else None) for m in best],
    }


_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
           "tab:cyan", "tab:grey")
_LINESTYLES = ("--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)))
_MARKERS = ("s", "^", "D", "v", "P", "X", "*", "<", ">", "d")  # the baselines'; CABS has its own
_CABS_MARKERS = ("o", "h", "p", "8", "H")


def line_styles(series: list[Series]) -> list[dict[str, Any]]:
    """A distinct (colour, line style, marker) per curve, so that curves lying on each other stay
    visible: CABS wide, solid and black-ish, drawn underneath; each baseline thinner, dashed in its own
    pattern, with its own marker at its own offset along the line."""
    cabs_colors = iter(["black", "dimgrey", "saddlebrown", "darkviolet", "darkgreen"] * 10)
    out, k, c = [], 0, 0
    n = max(1, len(series))
    for i, sr in enumerate(series):
        offset = i / n  # markers of different curves at different epochs (a fraction of their spacing)
        if sr.family == "cabs":
            out.append({"color": next(cabs_colors), "linewidth": 3.0, "linestyle": "-",
                        "marker": _CABS_MARKERS[c % len(_CABS_MARKERS)], "markersize": 6, "marker_offset": offset,
                        "zorder": 2})
            c += 1
        else:
            out.append({"color": _COLORS[k % len(_COLORS)], "linewidth": 1.4,
                        "linestyle": _LINESTYLES[k % len(_LINESTYLES)], "marker": _MARKERS[k % len(_MARKERS)],
                        "markersize": 5, "marker_offset": offset, "zorder": 3})
            k += 1
    return out


def _marks(xs: list[float], offset: float, count: int = 10) -> list[int]:
    """Indices of the points nearest to ``count`` evenly spaced epochs, shifted by ``offset`` (a fraction
    of the spacing): markers at the same epochs whatever the number of points, staggered per curve."""
    import numpy as np

    if not xs:
        return []
    x = np.asarray(xs)
    lo, hi = float(x[0]), float(x[-1])
    at = lo + (hi - lo) * (np.arange(count) + offset) / count
    return sorted({int(i) for i in np.clip(np.searchsorted(x, at), 0, len(xs) - 1)})


def _draw(ax: Any, sr: Series, style: dict[str, Any], step: bool = False) -> None:
    if not sr.x:
        return
    label = sr.label + (f" ({sr.note})" if sr.note else "")
    style = dict(style)
    style["markevery"] = _marks(sr.x, style.pop("marker_offset", 0.0))
    if step:  # many points (one per step): a thinner line, so that CABS's steps stay readable
        style["linewidth"] = min(style["linewidth"], 1.6)
        ax.plot(sr.x, sr.mean, drawstyle="steps-post", label=label, **style)
    else:
        ax.plot(sr.x, sr.mean, label=label, **style)
    if sr.seeds > 1:
        ax.fill_between(sr.x, sr.lo, sr.hi, step="post" if step else None, color=style["color"], alpha=0.15,
                        linewidth=0, zorder=1)


_PANELS = (("loss", "training loss", True), ("accuracy", "test accuracy (%)", False),
           ("batch_size", "batch size", True))


def write_figures(s: Summary, out_dir: str | Path) -> dict[str, str]:
    """PNG figures (matplotlib's Agg canvas, no display) of the best learning rate of each group:
    ``panels.png`` (the paper's three panels: training loss, test accuracy, batch size against
    epochs), the same three as separate figures, and CABS's own statistics. With several seeds every
    curve is the mean over the seeds with a min-max band. Returns {figure: file name}."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    out_dir = Path(out_dir)
    data = figure_series(s)
    styles = line_styles(data["loss"])
    n = len(s.seeds) if s.seeds else 1
    title = f"{s.config.get('dataset', '')}, {s.config.get('model', '')}, {s.config.get('backend', '')}"
    if n > 1:
        title += f": mean of {n} seeds, band min-max"
    written: dict[str, str] = {}

    def decorate(ax: Any, key: str, ylabel: str, log: bool) -> None:
        ax.set_xlabel("epochs")
        ax.set_ylabel(ylabel)
        if key == "batch_size":  # powers of two, written out
            ax.set_yscale("log", base=2)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        elif log:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        for sr, st in zip(data[key], styles):
            _draw(ax, sr, st, step=key == "batch_size")
        if key == "loss":
            ax.axhline(s.target_loss, color="grey", linewidth=0.8, linestyle=":", label="target")

    fig = Figure(figsize=(16, 5.2), dpi=100)
    axs = fig.subplots(1, 3)
    for ax, (key, ylabel, log) in zip(axs, _PANELS):
        decorate(ax, key, ylabel, log)
        ax.set_title(ylabel)
    handles, labels = axs[0].get_legend_handles_labels()
    fig.suptitle(title)
    fig.legend(handles, labels, loc="lower center", ncol=min(5, max(1, len(labels))), fontsize=8)
    rows = math.ceil(len(labels) / 5)
    fig.tight_layout(rect=(0, min(0.45, 0.045 * rows + 0.015), 1, 1))
    fig.savefig(out_dir / FIGURES["panels"])
    written["panels"] = FIGURES["panels"]

    for key, ylabel, log in _PANELS:
        fig = Figure(figsize=(7, 4.5), dpi=110)
        ax = fig.add_subplot()
        decorate(ax, key, ylabel, log)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / FIGURES[key])
        written[key] = FIGURES[key]

    cabs_runs = [m.seeds[0] for m in s.best_per_group.values() if m.family == "cabs" and m.seeds]
    if cabs_runs:
        fig = Figure(figsize=(7, 7), dpi=110)
        top, bottom = fig.subplots(2, 1, sharex=True)
        for r in cabs_runs:
            rows_ = [p for p in r.steps if p.get("variance") is not None and p.get("loss") is not None]
            xs = [p["epoch"] for p in rows_]
            for name, key, style in (("mini-batch loss L", "loss", "-"), ("variance estimate xi", "variance", "--")):
                xk, yk = _thin(xs, _ema([p[key] for p in rows_]))
                top.plot(xk, yk, style, label=f"{r.label}: {name} (EMA 0.95)")
            xk, yk = _thin(xs, [p["raw"] if p.get("raw") is not None else math.nan for p in rows_])
            line = bottom.plot(xk, yk, ":", label=f"{r.label}: rule lr xi_avg / L_avg (before clipping)")[0]
            xb, yb = _thin(*_batch_steps(r, s.config.get("num_train")))
            bottom.step(xb, yb, where="post", color=line.get_color(), label=f"{r.label}: batch size used")
        top.set_yscale("log")
        top.set_ylabel("loss, variance")
        top.set_title(f"CABS statistics: {title.split(':')[0]}" + ("" if n == 1 else f", seed {cabs_runs[0].seed}"))
        bottom.set_yscale("log", base=2)
        bottom.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        bottom.yaxis.set_minor_formatter(NullFormatter())
        bottom.set_ylabel("batch size")
        bottom.set_xlabel("epochs")
        for ax in (top, bottom):
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / FIGURES["cabs"])
        written["cabs"] = FIGURES["cabs"]
    return written


def write_report(out_dir: str | Path, target_loss: float | None = None,
                 target_fraction: float = TARGET_FRACTION) -> Summary:
    """Read ``out_dir/log.jsonl``; write the figures, ``summary.md`` and ``summary.json``."""
    out_dir = Path(out_dir)
    s = summarize(read_jsonl(out_dir / LOG_NAME), target_loss, target_fraction)
    figures = write_figures(s, out_dir)
    (out_dir / SUMMARY_MD).write_text(summary_markdown(s, figures), encoding="utf-8")
    (out_dir / SUMMARY_JSON).write_text(json.dumps(s.to_dict(), indent=2, allow_nan=False), encoding="utf-8")
    return s
