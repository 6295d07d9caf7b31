"""Issue 17: no run ends with a step on the budget's remainder.

Every method takes only whole batches of the size it decided (CABS: the
controller's decision; SGD: its constant batch size) and stops when the next
one does not fit in the budget; the final evaluation is after the run's last
step, and the summary reports the examples each run used.

A fake trainer (no framework) whose statistics make the controller decide a
known batch size gives exact expectations; the real backends are checked on
digits in ``test_run.py``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import cabs_experiments.report as report_module
import cabs_experiments.run as run_module
from cabs_core import CABSController, ScalarStats
from cabs_experiments.data import Dataset
from cabs_experiments.report import read_jsonl
from cabs_experiments.run import ExperimentConfig, run_experiment

from .fakes import FakeCABS

N = 1000  # training examples of the fake data set; budget = epochs * N
XI, LOSS, LR = 400.0, 1.0, 0.1  # CABS decides lr * xi / L = 40 after every step


class FakeTrainer:
    """Records the batches it is given; its statistics make CABS decide 40.

    The evaluation's "training loss" is the number of examples trained on so
    far, so that a log shows which state each evaluation saw.
    """

    num_parameters = 1

    def __init__(self) -> None:
        self.batches: dict[str, list[int]] = {}
        self.current: list[int] = []
        self.trained = 0

    def reset(self, seed: int) -> None:
        self.current = []
        self.trained = 0

    def _take(self, indices: np.ndarray) -> int:
        m = len(indices)
        assert indices.min() >= 0 and indices.max() < N
        self.current.append(m)
        self.trained += m
        return m

    def sgd_step(self, indices: np.ndarray, lr: float) -> float:
        self._take(indices)
        return LOSS

    def cabs_run(self, controller: CABSController, seed: int) -> FakeCABS:
        # xi = (S - ||sum g||^2 / m) / (m - 1) = XI with sum g = 0; mean loss LOSS
        return FakeCABS(self._take, controller, seed, N, lambda m: ScalarStats(float(m), LOSS * m, XI * (m - 1), 0.0))

    def evaluate(self, split: str, indices: np.ndarray | None = None) -> tuple[float, float]:
        return float(self.trained), 0.5


def fake_dataset() -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.random((N, 2, 2, 1), dtype=np.float32)
    y = np.arange(N, dtype=np.int64) % 10
    return Dataset("fake", x, y, x[:50], y[:50])


@pytest.fixture
def fake(monkeypatch) -> FakeTrainer:
    trainer = FakeTrainer()

    def make(backend, dataset, model, threads=None):
        return trainer

    monkeypatch.setattr(run_module, "make_trainer", make)
    monkeypatch.setattr(report_module, "write_figures", lambda s, out_dir: {})  # figures: tested in test_report
    return trainer


def _runs(records: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in records:
        if r["kind"] == "run":
            out[r["run"]] = {"steps": [], "evals": [], "end": None}
        elif r["kind"] in ("step", "eval"):
            out[r["run"]][r["kind"] + "s"].append(r)
        elif r["kind"] == "end":
            out[r["run"]]["end"] = r
    return out


def test_cabs_run_does_not_end_with_a_step_on_the_remainder(tmp_path, fake):
    """Budget 1000, batches 16 then 40: 16 + 24 * 40 = 976; the remaining 24 < 40 are not trained on."""
    cfg = ExperimentConfig(epochs=1.0, eval_every=0.25, methods=("cabs",), cabs_lr=(LR,), out=str(tmp_path),
                           progress=False)
    s = run_experiment(cfg, fake_dataset())
    assert fake.current == [16] + [40] * 24  # whole decided batches only, none on the remainder
    run = _runs(read_jsonl(tmp_path / "log.jsonl"))["cabs_lr0.1"]
    steps, evals, end = run["steps"], run["evals"], run["end"]
    assert [p["batch_size"] for p in steps] == [16] + [40] * 24
    assert all(p["raw"] == pytest.approx(40.0) for p in steps)
    assert end["status"] == "ok" and end["examples"] == 976 == steps[-1]["examples"]
    assert end["next_batch_size"] == 40 and end["examples_left"] == 24
    # the final evaluation is the state after the last (whole) step, at the last evaluation point
    assert evals[-1]["step"] == len(steps) == end["steps"] and evals[-1]["train_loss"] == 976
    assert evals[-1]["point_epoch"] == 1.0 and evals[-1]["epoch"] == pytest.approx(0.976)
    r = s.runs[0]
    assert (r.examples, r.examples_left, r.final_train_loss) == (976, 24, 976.0)


def test_constant_batches_follow_the_same_rule(tmp_path, fake):
    """Batch 128 on a budget of 1000 (not a multiple of 128): 7 steps, 104 examples left; batch 16: 62 steps, 8 left;
    step decay too. The summary says how many examples each run used."""
    cfg = ExperimentConfig(epochs=1.0, eval_every=0.25, methods=("sgd", "sgd-decay"), batch_sizes=(128, 16),
                           lrs=(0.1,), target_loss=1.0, out=str(tmp_path), progress=False)
    s = run_experiment(cfg, fake_dataset())
    runs = _runs(read_jsonl(tmp_path / "log.jsonl"))
    want = {128: (7, 896, 104), 16: (62, 992, 8)}
    for rid, run in runs.items():
        bs = int(rid.split("_bs")[1].split("_")[0])
        n_steps, used, left = want[bs]
        assert [p["batch_size"] for p in run["steps"]] == [bs] * n_steps
        end = run["end"]
        assert (end["status"], end["steps"], end["examples"], end["examples_left"]) == ("ok", n_steps, used, left)
        assert end["next_batch_size"] == bs
        assert run["evals"][-1]["step"] == n_steps and run["evals"][-1]["train_loss"] == used
    assert sorted(fake.current) == [16] * 62  # the last run (sgd-step, batch 16)
    by = {r.run: r for r in s.runs}
    assert (by["sgd_bs128_lr0.1"].examples, by["sgd_bs128_lr0.1"].examples_left) == (896, 104)
    assert (by["sgd-step_bs16_lr0.1"].examples, by["sgd-step_bs16_lr0.1"].examples_left) == (992, 8)
    md = (tmp_path / "summary.md").read_text()
    # (the fake trainer's wall time rounds to 0.0 s)
    assert "| SGD bs 128, lr 0.1 | not reached | not reached | 896.0000 | 50.0 | 0.0 | 896 (104 left) |" in md
    assert "examples used" in md
    rows = {r["run"]: r for r in json.loads((tmp_path / "summary.json").read_text())["runs"]}
    assert rows["sgd_bs16_lr0.1"]["examples"] == 992 and rows["sgd_bs16_lr0.1"]["examples_left"] == 8


def test_a_budget_that_fits_exactly_is_used_exactly(tmp_path, fake):
    """Budget 1056 = 16 + 26 * 40: CABS uses all of it, and so does batch 16 (66 steps)."""
    cfg = ExperimentConfig(epochs=1.056, eval_every=0.264, methods=("cabs", "sgd"), batch_sizes=(16,), lrs=(0.1,),
                           out=str(tmp_path), progress=False)
    run_experiment(cfg, fake_dataset())
    runs = _runs(read_jsonl(tmp_path / "log.jsonl"))
    assert [p["batch_size"] for p in runs["cabs_lr0.1"]["steps"]] == [16] + [40] * 26
    assert runs["cabs_lr0.1"]["end"]["examples_left"] == 0 and runs["sgd_bs16_lr0.1"]["end"]["examples_left"] == 0
    for run in runs.values():
        evals = run["evals"]
        assert [e["point_epoch"] for e in evals] == pytest.approx([0, 0.264, 0.528, 0.792, 1.056])
        assert evals[-1]["train_loss"] == 1056 and evals[-1]["step"] == run["end"]["steps"]


def test_budget_smaller_than_a_first_batch_is_refused(tmp_path, fake):
    cfg = ExperimentConfig(epochs=0.1, methods=("cabs", "sgd"), batch_sizes=(128,), lrs=(0.1,), out=str(tmp_path),
                           progress=False)
    with pytest.raises(ValueError, match=r"budget of 100 examples .* smaller than the first batch \(128\) of "
                       r"SGD bs 128, lr 0.1"):
        run_experiment(cfg, fake_dataset())


def test_final_figures_only_from_a_run_that_ended_normally(tmp_path):
    """A diverged or unfinished run, or a log written before this rule, has no final figures."""
    from cabs_experiments.report import summarize

    base = [{"kind": "config", "epochs": 1, "budget_examples": 100, "last_batch": "whole"}]

    def run(rid, family, end):
        recs = [{"kind": "run", "run": rid, "family": family, "group": rid, "label": rid, "lr": 0.1},
                {"kind": "step", "run": rid, "step": 1, "examples": 40, "epoch": 0.4, "batch_size": 40, "loss": 1.0,
                 "variance": None, "raw": None, "lr": 0.1, "wall_time": 1.0},
                {"kind": "eval", "run": rid, "step": 1, "examples": 40, "epoch": 0.4, "point_epoch": 1.0,
                 "train_loss": 0.5, "test_loss": 0.5, "test_accuracy": 0.9, "wall_time": 1.0}]
        return recs + ([end] if end else [])

    ok_end = {"kind": "end", "run": "ok", "status": "ok", "reason": None, "steps": 1, "examples": 40,
              "examples_left": 60, "next_batch_size": 80, "wall_time": 1.0}
    late = dict(ok_end, run="late", steps=2, examples=80, examples_left=20)  # a step after the last evaluation
    # (these logs have no evaluation before the first step, so no automatic target: one is given)
    s = summarize(base + run("ok", "sgd", ok_end) + run("late", "sgd", late) + run("open", "sgd", None),
                  target_loss=0.1)
    by = {r.run: r for r in s.runs}
    assert (by["ok"].final_train_loss, by["ok"].final_test_accuracy, by["ok"].examples) == (0.5, 0.9, 40)
    for rid in ("late", "open"):
        assert math.isnan(by[rid].final_train_loss) and math.isnan(by[rid].final_test_accuracy)
    assert by["open"].status == "incomplete" and by["open"].examples is None
    with pytest.raises(ValueError, match="written before .* remainder"):
        summarize([{"kind": "config", "epochs": 1}] + run("ok", "sgd", ok_end), target_loss=0.1)


def test_the_last_step_is_logged_with_log_every(tmp_path, fake):
    cfg = ExperimentConfig(epochs=1.0, eval_every=0.25, methods=("cabs",), cabs_lr=(LR,), log_every=10,
                           out=str(tmp_path), progress=False)
    run_experiment(cfg, fake_dataset())
    steps = _runs(read_jsonl(tmp_path / "log.jsonl"))["cabs_lr0.1"]["steps"]
    assert [(p["step"], p["examples"]) for p in steps] == [(10, 376), (20, 776), (25, 976)]
