"""The experiment: CABS against SGD baselines on one data set and one backend,
the same budget of examples for every method; log, figures and summary.

Methods (``--methods``):

- ``cabs``: SGD with constant learning rate ``--cabs-lr`` (0.1; a comma-separated list
  gives one CABS run per value) and batch sizes
  decided by :class:`cabs_core.CABSController` (first batch 16, bounds 16..2048,
  the upper bound capped at the training set size);
- ``sgd``: constant batch size (each of ``--batch-sizes``) and constant learning
  rate (each of ``--lrs``);
- ``sgd-decay``: the same grid with a decaying learning rate (``--decay``:
  ``step`` divides it by 10 at 50% and 75% of the budget, ``exp`` decays it
  smoothly to 1% of its start value at the end).

With ``--seeds N`` every method runs once per seed (``--seed``, ``--seed`` + 1, ...), seed by
seed; the summary reports means ± standard deviations across the seeds.

The driver is framework-free: it owns the sampler (:func:`cabs_core.next_batch`,
the same example order for every method under one seed), the batch
sizes, the learning rate schedules, the budget and the log; the backend
(:mod:`cabs_experiments.backends`) owns parameters and arithmetic.

The budget (``--epochs`` times the training set size) is spent in whole
batches: every step of every method uses the batch size the method decided
(the controller's decision, or the constant one), and a run stops when that
batch no longer fits in what is left of the budget. No step is taken on a
smaller remainder; the examples left unused (fewer than one batch) are logged.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from cabs_core import CABSController, ConfigError, NonFiniteStatisticsError, SamplerState, next_batch

from .backends import BACKENDS, Trainer, make_trainer
from .backends.models import MODELS, default_model
from .data import DATASETS, Dataset, load_dataset
from .report import (
    LAST_BATCH,
    LOG_NAME,
    SUMMARY_MD,
    TARGET_FRACTION,
    JsonlLog,
    Summary,
    summary_markdown,
    verdict,
    write_report,
)

FAMILIES = ("cabs", "sgd", "sgd-decay")
DECAYS = ("step", "exp")
DEFAULT_EPOCHS = {"digits": 30.0, "mnist-5k": 10.0, "mnist1d": 20.0, "mnist": 10.0, "cifar10": 20.0, "svhn": 10.0}
DATA_CACHE = Path.home() / ".cache" / "cabs-experiments"  # mnist-5k, mnist1d arrays without --data-dir


@dataclass(frozen=True)
class Method:
    """One training run: a family, a learning rate and (for SGD) a batch size."""

    family: str
    lr: float
    batch_size: int | None = None
    decay: str | None = None

    @property
    def run_id(self) -> str:
        """The method's id (its runs' ids add ``_s<seed>`` when the experiment has several seeds)."""
        if self.family == "cabs":
            return f"cabs_lr{self.lr:g}"
        name = "sgd" if self.decay is None else f"sgd-{self.decay}"
        return f"{name}_bs{self.batch_size}_lr{self.lr:g}"

    @property
    def group(self) -> str:
        """Runs of one group differ only in the learning rate; figures show each group's best."""
        if self.family == "cabs":
            return f"CABS, lr {self.lr:g}"  # every CABS learning rate is shown, none is picked as "best"
        return f"SGD bs {self.batch_size}" + ("" if self.decay is None else f", {self.decay} decay")

    @property
    def label(self) -> str:
        return self.group if self.family == "cabs" else f"{self.group}, lr {self.lr:g}"

    def lr_at(self, examples_seen: int, budget: int) -> float:
        """The learning rate of the step that starts after ``examples_seen`` of ``budget`` examples."""
        if self.decay is None:
            return self.lr
        frac = examples_seen / budget
        if self.decay == "step":
            return self.lr * 0.1 ** ((frac >= 0.5) + (frac >= 0.75))
        return self.lr * 0.01**frac  # exp: 1% of the start value at the end of the budget


@dataclass
class ExperimentConfig:
    """Every setting of one experiment (the command-line options)."""

    dataset: str = "digits"
    data_dir: str | None = None
    mnist1d_size: int | None = None  # None: data.MNIST1D_SIZE
    backend: str = "torch"
    model: str | None = None  # None: mlp for digits/MNIST, cnn for CIFAR-10/SVHN
    epochs: float | None = None  # None: DEFAULT_EPOCHS[dataset]
    seed: int = 0
    seeds: int = 1  # seeds seed, seed + 1, ..., seed + seeds - 1: every method once per seed
    out: str | None = None  # None: runs/<dataset>-<model>-<backend>
    overwrite: bool = False  # replace what a previous run left in ``out``
    methods: tuple[str, ...] = FAMILIES
    batch_sizes: tuple[int, ...] = (16, 128)
    lrs: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)
    decay: str = "step"
    cabs_lr: tuple[float, ...] = (0.1,)
    cabs_bs_min: int = 16
    cabs_bs_max: int = 2048
    cabs_bs_init: int = 16
    cabs_mode: str = "paper"
    eval_every: float | None = None  # epochs; None: epochs / 20
    eval_train_examples: int = 10_000
    target_loss: float | None = None
    target_fraction: float = TARGET_FRACTION  # the automatic target: this fraction of the initial training loss
    progress: bool | None = None  # None: when stderr is a terminal
    log_every: int = 1
    threads: int | None = None  # None: 1 for the mlp (small matrices), the framework's default for the cnn

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.model is None:
            self.model = default_model(self.dataset)
        if self.model not in MODELS:
            raise ValueError(f"--model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if self.dataset == "mnist1d" and self.model == "cnn":
            raise ValueError("--model cnn pools 2-D images; mnist1d holds 1-D signals: use --model mlp")
        if self.mnist1d_size is not None and (self.dataset != "mnist1d" or self.mnist1d_size < 100):
            raise ValueError(f"--mnist1d-size applies to --dataset mnist1d and must be >= 100, got "
                             f"{self.mnist1d_size} with --dataset {self.dataset}")
        if self.epochs is None:
            self.epochs = DEFAULT_EPOCHS[self.dataset]
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"--epochs must be a finite number > 0, got {self.epochs}")
        if self.out is None:
            self.out = f"runs/{self.dataset}-{self.model}-{self.backend}"
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if self.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {self.seeds}")
        if not (math.isfinite(self.target_fraction) and 0 < self.target_fraction < 1):
            raise ValueError(f"--target-fraction must lie in (0, 1), got {self.target_fraction}")
        bad = [m for m in self.methods if m not in FAMILIES]
        if bad or not self.methods:
            raise ValueError(f"--methods must be a non-empty subset of {', '.join(FAMILIES)}, got {list(self.methods)}")
        if any(b < 1 for b in self.batch_sizes) or (not self.batch_sizes and set(self.methods) - {"cabs"}):
            raise ValueError(f"--batch-sizes must be integers >= 1, got {list(self.batch_sizes)}")
        if isinstance(self.cabs_lr, (int, float)):
            self.cabs_lr = (float(self.cabs_lr),)
        if not self.cabs_lr or any(not (math.isfinite(lr) and lr > 0) for lr in self.cabs_lr):
            raise ValueError(f"--cabs-lr: CABS learning rates must be finite and > 0, got {list(self.cabs_lr)}")
        bad_lr = any(not (math.isfinite(lr) and lr > 0) for lr in self.lrs)
        if bad_lr or (not self.lrs and set(self.methods) - {"cabs"}):
            raise ValueError(f"--lrs: learning rates must be finite and > 0, got {list(self.lrs)}")
        if self.decay not in DECAYS:
            raise ValueError(f"--decay must be one of {', '.join(DECAYS)}, got {self.decay!r}")
        if self.eval_every is None:
            self.eval_every = self.epochs / 20
        if not (math.isfinite(self.eval_every) and self.eval_every > 0):
            raise ValueError(f"--eval-every must be a finite number > 0, got {self.eval_every}")
        if self.threads is None and self.model == "mlp":
            self.threads = 1
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.eval_train_examples < 1 or self.log_every < 1:
            raise ValueError("--eval-train-examples and --log-every must be >= 1")
        if self.target_loss is not None and not math.isfinite(self.target_loss):
            raise ValueError(f"--target-loss must be finite, got {self.target_loss}")
        if "cabs" in self.methods:  # refuse a bad controller now, before any output is touched
            flags = {"lr": "--cabs-lr", "bs_min": "--cabs-bs-min", "bs_max": "--cabs-bs-max",
                     "bs_init": "--cabs-bs-init", "mode": "--cabs-mode"}
            for lr in self.cabs_lr:
                try:
                    self.controller(lr, None)
                except ConfigError as e:
                    raise ValueError(f"{flags.get(e.argument, e.argument)}: {e}") from e

    def controller(self, lr: float, num_examples: int | None) -> CABSController:
        """The CABS controller of a run at ``lr``; the bounds are capped at ``num_examples``."""
        cap = num_examples if num_examples is not None else max(self.cabs_bs_max, self.cabs_bs_init)
        return CABSController(
            lr=lr,
            bs_min=min(self.cabs_bs_min, cap),
            bs_max=min(self.cabs_bs_max, cap),
            bs_init=min(self.cabs_bs_init, cap),
            mode=self.cabs_mode,  # type: ignore[arg-type]
        )

    def seed_list(self) -> list[int]:
        """The seeds of the experiment: ``seed``, ``seed + 1``, ... (``seeds`` of them)."""
        return list(range(self.seed, self.seed + self.seeds))

    def run_id(self, method: Method, seed: int) -> str:
        """A run's id in the log: the method's id, with ``_s<seed>`` when there are several seeds
        (a log of one seed keeps the ids it always had)."""
        return method.run_id if self.seeds == 1 else f"{method.run_id}_s{seed}"

    def method_list(self) -> list[Method]:
        """The runs, CABS first, then every (batch size, lr) of each SGD family."""
        out = []
        if "cabs" in self.methods:
            out += [Method("cabs", lr) for lr in self.cabs_lr]
        for fam in ("sgd", "sgd-decay"):
            if fam in self.methods:
                decay = None if fam == "sgd" else self.decay
                out += [Method(fam, lr, b, decay) for b in self.batch_sizes for lr in self.lrs]
        return out


@dataclass
class RunOutcome:
    """How one run ended."""

    method: Method
    status: str  # "ok" or "diverged"
    reason: str | None
    steps: int
    wall_time: float
    evals: list[dict[str, Any]] = field(default_factory=list)


class _Progress:
    """A tqdm bar over all runs' examples (or nothing)."""

    def __init__(self, total: int, enabled: bool | None) -> None:
        self.bar = None
        if enabled is None:
            enabled = sys.stderr.isatty()
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="ex", unit_scale=True, dynamic_ncols=True, file=sys.stderr)

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _decided(method: Method, cabs: Any) -> int:
    """The batch size ``method`` takes next: the CABS trainer's decision or the constant one."""
    b = cabs.batch_size if cabs is not None else method.batch_size
    assert b is not None
    return int(b)


def run_method(
    trainer: Trainer,
    method: Method,
    cfg: ExperimentConfig,
    num_examples: int,
    log: JsonlLog,
    progress: _Progress,
    train_subset: np.ndarray | None,
) -> RunOutcome:
    """Train ``method`` from the seed's initial parameters for the budget; log every step and evaluation."""
    assert cfg.epochs is not None and cfg.eval_every is not None
    epochs = cfg.epochs
    budget = round(epochs * num_examples)
    # evaluations at the same points of every run: k / K of the budget, k = 1..K (and before the first step)
    n_evals = max(1, round(cfg.epochs / cfg.eval_every))
    eval_points = [max(1, round(k * budget / n_evals)) for k in range(1, n_evals + 1)]
    trainer.reset(cfg.seed)
    sampler = SamplerState(num_examples, cfg.seed)  # the SGD runs' stream; a CABS trainer draws the same one
    ctl = cabs = None
    if method.family == "cabs":
        ctl = cfg.controller(method.lr, num_examples)
        cabs = trainer.cabs_run(ctl, cfg.seed)  # the adapter's own CABSTrainer on these parameters
    rid = cfg.run_id(method, cfg.seed)
    log.write({"kind": "run", "run": rid, "method": method.run_id,
               "family": method.family, "group": method.group, "label": method.label,
               "lr": method.lr, "batch_size": method.batch_size, "decay": method.decay,
               "controller": None if ctl is None else {k: v for k, v in asdict(ctl).items() if v is not None}})
    progress.describe(method.label)
    wall, step, evals = 0.0, 0, []
    status, reason = "ok", None

    def evaluate(point: int) -> None:
        train_loss, _ = trainer.evaluate("train", train_subset)
        test_loss, test_acc = trainer.evaluate("test")
        rec = {"kind": "eval", "run": rid, "step": step, "examples": sampler.examples_seen,
               "epoch": sampler.epoch, "point_epoch": epochs * point / n_evals,
               "train_loss": train_loss, "test_loss": test_loss,
               "test_accuracy": test_acc, "wall_time": wall}
        evals.append(rec)
        log.write(rec)

    evaluate(0)
    next_eval = 0  # index into eval_points of the next point to evaluate at
    # Whole batches only (docs/experiments.md, "The budget"): every step uses the batch size the method
    # decided, and the run stops when that batch does not fit in what is left of the budget.
    b = _decided(method, cabs)
    while sampler.examples_seen + b <= budget:
        lr = method.lr_at(sampler.examples_seen, budget)
        t0 = time.perf_counter()
        loss: float | None
        variance = raw = None
        if cabs is not None:
            try:
                info = cabs.step()
            except NonFiniteStatisticsError as e:
                loss, status, reason = math.nan, "diverged", str(e)
            else:
                loss, variance, raw = info.loss, info.variance, info.raw
            sampler = SamplerState(num_examples, cfg.seed, cabs.examples_seen)
        else:
            idx, sampler = next_batch(sampler, b)
            loss = trainer.sgd_step(idx, lr)
        wall += time.perf_counter() - t0
        step += 1
        if status == "ok" and loss is not None and not math.isfinite(loss):
            status, reason = "diverged", f"non-finite mini-batch loss {loss} at step {step}"
        next_b = _decided(method, cabs)
        last = status != "ok" or sampler.examples_seen + next_b > budget
        if step % cfg.log_every == 0 or last:
            log.write({"kind": "step", "run": rid, "step": step, "examples": sampler.examples_seen,
                       "epoch": sampler.epoch, "batch_size": b, "loss": loss if _finite(loss) else None,
                       "variance": variance, "raw": raw if _finite(raw) else None, "lr": lr,
                       "wall_time": wall})
        progress.update(b)
        if status != "ok":
            break
        b = next_b
        if next_eval < n_evals and sampler.examples_seen >= eval_points[next_eval]:
            while next_eval < n_evals - 1 and eval_points[next_eval + 1] <= sampler.examples_seen:
                next_eval += 1  # a large batch crossed several points: evaluate once, at the last
            next_eval += 1
            evaluate(next_eval)
    if status == "ok" and next_eval < n_evals:
        evaluate(n_evals)  # the next batch did not fit before the last point: the final state, at that point
    progress.update(budget - sampler.examples_seen)
    log.write({"kind": "end", "run": rid, "status": status, "reason": reason, "steps": step,
               "examples": sampler.examples_seen, "examples_left": budget - sampler.examples_seen,
               "next_batch_size": b if status == "ok" else None, "wall_time": wall})
    return RunOutcome(method, status, reason, step, wall, evals)


def check_output_dir(out: str | Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that cannot be a folder, or that holds a previous run unless ``overwrite``:
    nothing of an earlier run is replaced before everything else has been validated, and never silently."""
    path = Path(out)
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {path}: {parent} is a file, not a folder")
            break
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"--out {path} already holds files (a previous run?): choose another --out, or pass "
                         "--overwrite to replace them")


def run_experiment(cfg: ExperimentConfig, dataset: Dataset | None = None) -> Summary:
    """Train every method, write ``log.jsonl``, the figures and the summary to ``cfg.out``."""
    assert cfg.out is not None
    check_output_dir(cfg.out, cfg.overwrite)
    if dataset is None:
        cache = cfg.data_dir if cfg.data_dir is not None else DATA_CACHE
        dataset = load_dataset(cfg.dataset, cache if cfg.dataset in ("mnist-5k", "mnist1d") else cfg.data_dir,
                               size=cfg.mnist1d_size)
    assert cfg.model is not None and cfg.epochs is not None
    n = len(dataset.y_train)
    if n < 2:
        raise ValueError(f"{dataset.name}: at least 2 training examples are needed, got {n}")
    methods = cfg.method_list()
    budget = round(cfg.epochs * n)
    for m in methods:
        first = min(cfg.cabs_bs_init, n) if m.family == "cabs" else m.batch_size
        assert first is not None
        if first > budget:
            raise ValueError(f"the budget of {budget} examples ({cfg.epochs:g} epochs of {n}) is smaller than the "
                             f"first batch ({first}) of {m.label}: it could take no step; raise --epochs or lower "
                             "the batch size")
    trainer = make_trainer(cfg.backend, dataset, cfg.model, cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    train_subset = None
    if n > cfg.eval_train_examples:
        rng = np.random.default_rng(cfg.seed)
        train_subset = np.sort(rng.choice(n, cfg.eval_train_examples, replace=False))
    header = {k: v for k, v in asdict(cfg).items() if k not in ("out", "overwrite", "progress", "data_dir")}
    seeds = cfg.seed_list()
    header.update(kind="config", data=dataset.describe(), num_train=n, num_test=len(dataset.y_test),
                  budget_examples=budget, last_batch=LAST_BATCH, num_parameters=trainer.num_parameters,
                  eval_train_subset=train_subset is not None, seeds=seeds,
                  runs=[cfg.run_id(m, s) for s in seeds for m in methods])
    progress = _Progress(budget * len(methods) * len(seeds), cfg.progress)
    try:
        with JsonlLog(out / LOG_NAME) as log:
            log.write(header)
            for s in seeds:  # seed by seed: an interrupted log holds whole comparisons of the first seeds
                seed_cfg = replace(cfg, seed=s)
                log.tags = {"seed": s}  # every run, step, eval and end record of this seed says so
                for m in methods:
                    run_method(trainer, m, seed_cfg, n, log, progress, train_subset)
    finally:
        progress.close()
    return write_report(out, cfg.target_loss, cfg.target_fraction)


# ----------------------------------------------------------------------------- command line


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


class _Parser(argparse.ArgumentParser):
    """An argument error is one line naming the flag, exit status 2 (``--help`` shows the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    d = ExperimentConfig()
    p = _Parser(
        prog="cabs-experiment",
        description="CABS (Balles, Romero, Hennig 2017) against SGD with constant and decaying learning "
        "rates, the same budget of examples for each; writes a JSONL log, PNG figures and a markdown summary.",
    )
    p.add_argument("--dataset", choices=DATASETS, default=d.dataset, help="default: %(default)s (no download)")
    p.add_argument("--data-dir", default=None, help="where the MNIST / CIFAR-10 / SVHN files are (and where the "
                   "mnist-5k and mnist1d arrays are kept; default for those ~/.cache/cabs-experiments)")
    p.add_argument("--mnist1d-size", type=int, default=None,
                   help="examples of MNIST-1D to generate, 80%% for training (default: 20000)")
    p.add_argument("--backend", choices=BACKENDS, default=d.backend, help="default: %(default)s")
    p.add_argument("--model", choices=MODELS, default=None, help="default: mlp for digits/mnist/mnist1d, cnn otherwise")
    p.add_argument("--epochs", type=float, default=None,
                   help="budget per method in epochs (default: " +
                   ", ".join(f"{k} {v:g}" for k, v in DEFAULT_EPOCHS.items()) + ")")
    p.add_argument("--seed", type=int, default=d.seed, help="initial parameters and example order (default 0)")
    p.add_argument("--seeds", type=int, default=d.seeds,
                   help="run every method with N seeds: --seed, --seed + 1, ... (default 1); figures show the "
                   "mean and the min-max band, tables mean ± standard deviation")
    p.add_argument("--out", default=None,
                   help="output folder (default: runs/DATASET-MODEL-BACKEND); refused if it holds files")
    p.add_argument("--overwrite", action="store_true", help="replace the files a previous run left in --out")
    p.add_argument("--methods", type=_names, default=d.methods, help="comma-separated subset of "
                   + ",".join(FAMILIES) + " (default: all)")
    p.add_argument("--batch-sizes", type=_ints, default=d.batch_sizes, help="SGD batch sizes (default: 16,128)")
    p.add_argument("--lrs", type=_floats, default=d.lrs, help="SGD learning-rate grid (default: 0.03,0.1,0.3,1)")
    p.add_argument("--decay", choices=DECAYS, default=d.decay, help="sgd-decay schedule (default: step)")
    p.add_argument("--cabs-lr", type=_floats, default=d.cabs_lr,
                   help="CABS learning rate(s), comma-separated: one run each (default: 0.1)")
    p.add_argument("--cabs-bs-min", type=int, default=d.cabs_bs_min, help="default: %(default)s")
    p.add_argument("--cabs-bs-max", type=int, default=d.cabs_bs_max,
                   help="default: %(default)s (capped at the training set size)")
    p.add_argument("--cabs-bs-init", type=int, default=d.cabs_bs_init, help="first batch (default: %(default)s)")
    p.add_argument("--cabs-mode", choices=("paper", "reference"), default=d.cabs_mode, help="default: %(default)s")
    p.add_argument("--eval-every", type=float, default=None, help="epochs between evaluations (default: epochs/20)")
    p.add_argument("--eval-train-examples", type=int, default=d.eval_train_examples,
                   help="training loss on a fixed subset of this many examples (default: %(default)s)")
    p.add_argument("--target-loss", type=float, default=None,
                   help="training loss to reach (default: --target-fraction of the loss before the first step)")
    p.add_argument("--target-fraction", type=float, default=d.target_fraction,
                   help="the automatic target: this fraction of the mean training loss before the first step "
                   "(default: %(default)s)")
    p.add_argument("--log-every", type=int, default=d.log_every, help="log every k-th step (default: 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of the framework (default: 1 for the mlp, the framework's default otherwise)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: redraw the figures and summary from OUT/log.jsonl (e.g. with --target-loss)")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None, help="show a progress bar")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


_EXTRA = {"torch": "torch", "jax": "jax", "tensorflow": "tf"}


def main(argv: Sequence[str] | None = None) -> int:
    """The console command: run the experiment and print where the results are."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    report_only = args.pop("report_only")
    try:
        cfg = ExperimentConfig(**args)
        assert cfg.out is not None
    except ValueError as e:
        parser.error(str(e))
    t0 = time.perf_counter()
    try:
        if report_only:
            if not (Path(cfg.out) / LOG_NAME).is_file():
                raise ValueError(f"--report-only: no {Path(cfg.out) / LOG_NAME} to read")
            s = write_report(cfg.out, cfg.target_loss, cfg.target_fraction)
        else:
            s = run_experiment(cfg)
    except ValueError as e:  # DataError is a ValueError
        print(f"cabs-experiment: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"cabs-experiment: error: {e.name or e} is not installed. From a checkout: pip install "
              f"'.[experiments]' for the experiment's own needs, plus '.[{_EXTRA.get(cfg.backend, cfg.backend)}]' "
              f"for --backend {cfg.backend}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"cabs-experiment: error: cannot write to --out {cfg.out}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cabs-experiment: interrupted; {Path(cfg.out) / LOG_NAME} holds complete records up to here, and "
              f"`cabs-experiment --out {cfg.out} --report-only` reports the runs that finished", file=sys.stderr)
        return 130
    md = summary_markdown(s)
    table = md.split("## Best learning rate per method\n\n", 1)[1].split("\n\n", 1)[0]
    print(table)
    for line in verdict(s):
        print("-", line)
    if s.best_baseline is not None:
        print(f"best baseline: {s.best_baseline.label}")
    print(f"target training loss {s.target_loss:.4g}; wrote {Path(cfg.out) / SUMMARY_MD} and the log, "
          f"figures next to it ({time.perf_counter() - t0:.0f} s)")
    return 0
