"""Issue 16 items 4 and 5: several seeds (``--seeds``), a target no method defines, honest figures.

A fake trainer (no framework) whose evaluations depend on the seed and on the
examples trained on gives exact expectations for the means, the standard
deviations, the target and the figures' curves; its ``cabs_run`` steps a real
:class:`cabs_core.CABSController` on synthetic statistics (xi = 400 (1 + seed),
mean loss 1, so lr 0.1 decides 40, 80, 120 in seeds 0, 1, 2). A real backend
checks that the seeds of one command are the single-seed runs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics

import numpy as np
import pytest

import cabs_experiments.report as report_module
import cabs_experiments.run as run_module
from cabs_core import CABSController, SamplerState, ScalarStats, next_batch
from cabs_experiments.data import Dataset, load_digits_dataset
from cabs_experiments.report import figure_series, line_styles, read_jsonl, summarize, summary_markdown, write_report
from cabs_experiments.run import ExperimentConfig, main, run_experiment

from .fakes import FakeCABS

N = 1000


def initial_loss(seed: int) -> float:
    return 2.0 + seed


def train_loss(seed: int, trained: int) -> float:
    return initial_loss(seed) * 0.5 ** (trained / 250)


def accuracy(seed: int, trained: int) -> float:
    return (0.9 + 0.01 * seed) * trained / N


class SeedTrainer:
    """Records resets and first batches; evaluations are functions of (seed, examples trained on)."""

    num_parameters = 1

    def __init__(self) -> None:
        self.seed = -1
        self.trained = 0
        self.resets: list[int] = []
        self.first_batches: list[tuple[int, np.ndarray]] = []

    def reset(self, seed: int) -> None:
        self.seed, self.trained = seed, 0
        self.resets.append(seed)

    def take(self, indices: np.ndarray) -> int:
        if self.trained == 0:
            self.first_batches.append((self.seed, indices.copy()))
        self.trained += len(indices)
        return len(indices)

    def sgd_step(self, indices: np.ndarray, lr: float) -> float:
        self.take(indices)
        return 1.0

    def cabs_run(self, controller: CABSController, seed: int) -> FakeCABS:
        assert seed == self.seed  # the run draws the stream of the seed its parameters come from
        return FakeCABS(self.take, controller, seed, N,
                        lambda m: ScalarStats(float(m), 1.0 * m, 400.0 * (1 + seed) * (m - 1), 0.0))

    def evaluate(self, split: str, indices: np.ndarray | None = None) -> tuple[float, float]:
        return train_loss(self.seed, self.trained), accuracy(self.seed, self.trained)


def fake_dataset() -> Dataset:
    x = np.zeros((N, 2, 2, 1), dtype=np.float32)
    y = np.arange(N, dtype=np.int64) % 10
    return Dataset("fake", x, y, x[:50], y[:50])


@pytest.fixture
def trainer(monkeypatch) -> SeedTrainer:
    tr = SeedTrainer()
    monkeypatch.setattr(run_module, "make_trainer", lambda backend, dataset, model, threads=None: tr)
    return tr


@pytest.fixture
def no_figures(monkeypatch) -> None:
    """Skip drawing (seconds on a busy machine) where a test reads only the log and the summary."""
    monkeypatch.setattr(report_module, "write_figures", lambda s, out_dir: {})


def three_seeds(tmp_path, **kw) -> ExperimentConfig:
    args = dict(epochs=1.0, eval_every=0.25, methods=("cabs", "sgd"), batch_sizes=(50,), lrs=(0.1,), seeds=3,
                out=str(tmp_path), progress=False)
    args.update(kw)
    return ExperimentConfig(**args)


def test_every_method_runs_once_per_seed_and_every_record_says_which(tmp_path, trainer, no_figures):
    s = run_experiment(three_seeds(tmp_path), fake_dataset())
    records = read_jsonl(tmp_path / "log.jsonl")
    config = records[0]
    assert config["seeds"] == [0, 1, 2] and config["seed"] == 0 and config["seeds"] == s.seeds
    ids = ["cabs_lr0.1_s0", "sgd_bs50_lr0.1_s0", "cabs_lr0.1_s1", "sgd_bs50_lr0.1_s1", "cabs_lr0.1_s2",
           "sgd_bs50_lr0.1_s2"]
    assert config["runs"] == ids and [r["run"] for r in records if r["kind"] == "run"] == ids
    assert trainer.resets == [0, 0, 1, 1, 2, 2]
    for r in records[1:]:
        assert r["seed"] == int(r["run"][-1]), r  # run, step, eval and end records alike
    assert {r["method"] for r in records if r["kind"] == "run"} == {"cabs_lr0.1", "sgd_bs50_lr0.1"}
    # the example order is the seed's: each run's first batch is the seed's sampler's first batch
    for seed, idx in trainer.first_batches:
        assert np.array_equal(idx, next_batch(SamplerState(N, seed), len(idx))[0])
    assert len({tuple(idx[:16]) for _, idx in trainer.first_batches}) == 3
    # CABS decided lr * xi / L = 40 (1 + seed) in each seed
    for seed in range(3):
        sizes = [r["batch_size"] for r in records if r["kind"] == "step" and r["run"] == f"cabs_lr0.1_s{seed}"]
        assert sizes[0] == 16 and set(sizes[1:]) == {40 * (1 + seed)}
    assert [m.run for m in s.methods] == ["cabs_lr0.1", "sgd_bs50_lr0.1"]
    assert [len(m.seeds) for m in s.methods] == [3, 3]


def test_means_and_spreads_across_seeds(tmp_path, trainer, no_figures):
    s = run_experiment(three_seeds(tmp_path), fake_dataset())
    # the target: 10% of the mean initial loss (2, 3, 4), whatever any method did
    assert s.target_loss == pytest.approx(0.3)
    assert "10% of the training loss before the first step (3" in s.target_rule
    sgd = next(m for m in s.methods if m.family == "sgd")
    # SGD bs 50 reaches each evaluation point exactly: loss (2 + s) / 2^k; 0.25 <= 0.3 at k=3 in seed 0, k=4 else
    assert [r.epochs_to_target for r in sgd.seeds] == [0.75, 1.0, 1.0]
    assert sgd.epochs_to_target == pytest.approx(statistics.mean([0.75, 1.0, 1.0]))
    finals = [train_loss(seed, 1000) for seed in range(3)]
    assert sgd.final_train_loss == pytest.approx(statistics.mean(finals))
    accs = [100 * accuracy(seed, 1000) for seed in range(3)]
    md = summary_markdown(s)
    want = (f"| SGD bs 50, lr 0.1 | {statistics.mean([0.75, 1, 1]):.2f} ± {statistics.stdev([0.75, 1, 1]):.2f} | ")
    assert want in md
    assert f"| {statistics.mean(finals):.4f} ± {statistics.stdev(finals):.4f} | " in md
    assert f"| {statistics.mean(accs):.1f} ± {statistics.stdev(accs):.1f} | " in md
    assert "| 1000 (0 left) |" in md
    # CABS: 976 examples in every seed (16 + 24 x 40, 16 + 12 x 80, 16 + 8 x 120), 24 left
    cabs = next(m for m in s.methods if m.family == "cabs")
    assert [r.examples for r in cabs.seeds] == [976] * 3 and "| 976 (24 left) |" in md
    cabs_final = [train_loss(seed, 976) for seed in range(3)]
    assert cabs.final_train_loss == pytest.approx(statistics.mean(cabs_final))
    assert "3 seeds (0, 1, 2" in md and "sample standard deviation (ddof 1)" in md
    assert ("CABS ran at 1 learning rate (0.1); the SGD baselines ran 1 run per seed, 1 learning rate (0.1) for "
            "each of 1 combination of batch size and schedule") in md
    assert "noisy" in md
    j = json.loads((tmp_path / "summary.json").read_text())
    assert len(j["runs"]) == 6 and j["seeds"] == [0, 1, 2]
    row = next(m for m in j["methods"] if m["method"] == "sgd_bs50_lr0.1")
    assert row["epochs_to_target"]["per_seed"] == [0.75, 1.0, 1.0]
    assert row["final_train_loss"]["sd"] == pytest.approx(statistics.stdev(finals))


def test_a_method_that_misses_in_one_seed_is_not_said_to_reach(tmp_path, trainer, no_figures):
    """Target 0.15: SGD bs 50 reaches it only in seed 0 (0.125); the table says so, the mean is not claimed."""
    s = run_experiment(three_seeds(tmp_path, methods=("sgd",), target_loss=0.15), fake_dataset())
    m = s.methods[0]
    assert m.reached == 1 and m.epochs_to_target is None and m.wall_to_target is None
    assert "| SGD bs 50, lr 0.1 | 1.00 (1 of 3 seeds; the others: not reached) |" in summary_markdown(s)


def test_the_automatic_target_is_not_one_methods_result(tmp_path):
    """The old rule (the highest of the families' lowest losses) made CABS reach the target by construction
    when its lowest loss was the highest; the new target only depends on the loss before the first step."""
    from .test_report import fake_log

    def summary(name, cabs_best, **kw):
        curves = {"cabs": ("cabs", "CABS", [(0, 2.0, 0.1), (1, 0.9, 0.8), (2, cabs_best, 0.9)]),
                  "sgd": ("sgd", "SGD bs 16", [(0, 2.0, 0.1), (1, 0.5, 0.6), (2, 0.1, 0.8)])}
        fake_log(tmp_path / name, curves)
        return summarize(read_jsonl(tmp_path / name), **kw)

    a, b = summary("a.jsonl", 0.8), summary("b.jsonl", 0.15)
    assert a.target_loss == b.target_loss == pytest.approx(0.2)  # 10% of 2.0, both times
    assert a.best_per_family["cabs"].epochs_to_target is None  # CABS at 0.8 does not reach 0.2
    assert b.best_per_family["cabs"].epochs_to_target == 2
    assert summary("c.jsonl", 0.8, target_fraction=0.5).target_loss == pytest.approx(1.0)
    assert a.seeds == [0] and "seed 0" in a.target_rule  # a log of one seed, without seed fields, still reports


def test_figures_mean_band_percent_and_no_partial_batch(tmp_path, trainer):
    s = run_experiment(three_seeds(tmp_path), fake_dataset())
    data = figure_series(s)
    labels = [sr.label for sr in data["loss"]]
    assert labels == ["CABS, lr 0.1", "SGD bs 50, lr 0.1"]
    sgd_loss = data["loss"][1]
    assert sgd_loss.x == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    for k, x in enumerate(sgd_loss.x):
        ys = [train_loss(seed, round(x * N)) for seed in range(3)]
        assert (sgd_loss.mean[k], sgd_loss.lo[k], sgd_loss.hi[k]) == pytest.approx((statistics.mean(ys), min(ys),
                                                                                      max(ys)))
    acc = data["accuracy"][1]
    assert acc.hi[-1] == pytest.approx(100 * accuracy(2, 1000)) and acc.lo[-1] == pytest.approx(90.0)  # in %
    # batch size: the batches taken, each from the epoch its step starts, to where the run stopped (0.976);
    # the 24 examples left are never a batch, so no drop at the end
    bs = data["batch_size"][0]
    assert bs.x[0] == 0 and bs.mean[0] == 16 and bs.x[-1] == pytest.approx(0.976)
    assert set(bs.lo[1:]) == {40.0} and set(bs.hi[1:]) == {120.0} and set(bs.mean[1:]) == {80.0}
    assert set(data["batch_size"][1].mean) == {50.0} and data["batch_size"][1].x[-1] == pytest.approx(1.0)
    # every curve has its own colour, line style and marker
    styles = line_styles(data["loss"] * 3)
    assert len({(st["color"], str(st["linestyle"]), st["marker"]) for st in styles}) == len(styles)
    for name in ("panels.png", "training_loss.png", "test_accuracy.png", "batch_size.png", "cabs_statistics.png"):
        blob = (tmp_path / name).read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 5000
    assert "![panels](panels.png)" in (tmp_path / "summary.md").read_text()


def test_one_seed_draws_no_final_partial_batch(tmp_path, trainer, no_figures):
    """With one seed the batch-size curve is the run's own steps: 16, then 40 up to 0.976 epochs."""
    s = run_experiment(three_seeds(tmp_path, seeds=1, methods=("cabs",)), fake_dataset())
    bs = figure_series(s)["batch_size"][0]
    assert bs.mean == [16.0] + [40.0] * 25 and bs.x[-1] == pytest.approx(0.976) and bs.seeds == 1
    assert bs.x[:3] == pytest.approx([0, 0.016, 0.056])


def test_cli_seeds_report_only_and_errors(tmp_path, trainer, capsys, monkeypatch, no_figures):
    monkeypatch.setattr(run_module, "load_dataset", lambda *a, **k: fake_dataset())
    out = str(tmp_path / "o")
    argv = ["--epochs", "1", "--eval-every", "0.25", "--methods", "sgd", "--batch-sizes", "50", "--lrs", "0.1",
            "--seeds", "2", "--seed", "5", "--out", out, "--no-progress"]
    assert main(argv) == 0
    assert "| SGD bs 50, lr 0.1 | " in capsys.readouterr().out
    assert read_jsonl(tmp_path / "o" / "log.jsonl")[0]["seeds"] == [5, 6]
    assert main(["--out", out, "--report-only", "--target-fraction", "0.5"]) == 0
    # 50% of mean(7, 8) = 3.75: seed 5 (7, 3.5) and seed 6 (8, 4, 2) reach it after 1 and 2 points
    assert "| SGD bs 50, lr 0.1 | 0.38 ± 0.18 |" in capsys.readouterr().out
    for bad, flag in ((["--seeds", "0"], "--seeds"), (["--target-fraction", "1"], "--target-fraction")):
        with pytest.raises(SystemExit):
            main(["--out", str(tmp_path / "x"), *bad])
        assert flag in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_each_seed_of_a_command_is_that_seeds_single_run(tmp_path, no_figures):
    """torch, digits: the seed-4 runs of --seed 3 --seeds 2 are the runs of --seed 4 alone (but for ids, the
    seed tag and wall times), and the two seeds differ."""
    digits = load_digits_dataset()
    kw = dict(backend="torch", epochs=0.1, eval_every=0.05, methods=("sgd", "sgd-decay"), batch_sizes=(32,),
              lrs=(0.3,), progress=False)
    run_experiment(ExperimentConfig(seed=3, seeds=2, out=str(tmp_path / "two"), **kw), digits)
    run_experiment(ExperimentConfig(seed=4, out=str(tmp_path / "one"), **kw), digits)

    def runs(path, seed=None):
        keep = []
        for r in read_jsonl(path)[1:]:
            if seed is not None and r["seed"] != seed:
                continue
            r = {k: v for k, v in r.items() if k not in ("wall_time", "seed")}
            r["run"] = r["run"].removesuffix(f"_s{seed}")
            keep.append(r)
        return keep

    two = tmp_path / "two" / "log.jsonl"
    assert runs(two, 4) == runs(tmp_path / "one" / "log.jsonl")
    s3, s4 = runs(two, 3), runs(two, 4)
    assert len(s3) == len(s4) and s3 != s4
    s = write_report(tmp_path / "two")
    assert all(len(m.seeds) == 2 and m.status == "ok" for m in s.methods)
    assert all(math.isfinite(m.final_train_loss) for m in s.methods)


def test_an_interrupted_log_of_several_seeds_gives_no_mean_over_the_seeds_that_remain(tmp_path, trainer,
                                                                                       no_figures):
    """Cut during seed 1: the methods have 2 and 1 of 3 seeds; their cells are n/a, and the status says why."""
    run_experiment(three_seeds(tmp_path), fake_dataset())
    lines = (tmp_path / "log.jsonl").read_text().splitlines(keepends=True)
    k = next(i for i, line in enumerate(lines) if json.loads(line).get("run") == "sgd_bs50_lr0.1_s1")
    (tmp_path / "log.jsonl").write_text("".join(lines[: k + 3]))  # its run record, the eval at step 0, a step
    s = summarize(read_jsonl(tmp_path / "log.jsonl"))
    assert s.target_loss == pytest.approx(0.1 * statistics.mean([2.0, 3.0]))  # the seeds that started
    by = {m.run: m for m in s.methods}
    assert [r.seed for r in by["cabs_lr0.1"].seeds] == [0, 1] and [r.seed for r in by["sgd_bs50_lr0.1"].seeds] == [0, 1]
    md = summary_markdown(s)
    assert "| CABS, lr 0.1 (2 of 3 seeds logged) | " in md and "| n/a | n/a |" in md
    assert "| SGD bs 50, lr 0.1 (seed 1 interrupted at step 1; 2 of 3 seeds logged) | " in md
    assert by["cabs_lr0.1"].epochs_to_target is None and math.isnan(by["cabs_lr0.1"].final_train_loss)
