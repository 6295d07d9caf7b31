"""The pipeline end to end on a tiny budget, per installed backend; methods,
configuration errors, reproducibility, the command line."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cabs_core import CABSController, SamplerState, discretise, next_batch
from cabs_experiments.backends import make_trainer
from cabs_experiments.data import load_digits_dataset
from cabs_experiments.report import read_jsonl
from cabs_experiments.run import ExperimentConfig, Method, main, run_experiment

BACKENDS = {"torch": "torch", "jax": "flax", "tensorflow": "tensorflow"}


def backend_param(name: str):
    missing = importlib.util.find_spec(BACKENDS[name]) is None
    return pytest.param(name, marks=pytest.mark.skipif(missing, reason=f"{BACKENDS[name]} is not installed"))


ALL = [backend_param(b) for b in BACKENDS]


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


def tiny(tmp_path: Path, backend: str, **kw) -> ExperimentConfig:
    args = dict(backend=backend, epochs=0.4, eval_every=0.1, batch_sizes=(16, 40), lrs=(0.1,), out=str(tmp_path),
                progress=False)
    args.update(kw)
    return ExperimentConfig(**args)


def test_methods_and_schedules():
    cfg = ExperimentConfig(batch_sizes=(16, 64), lrs=(0.1, 0.3), decay="step")
    ids = [m.run_id for m in cfg.method_list()]
    assert ids[0] == "cabs_lr0.1" and len(ids) == 1 + 4 + 4
    assert "sgd_bs64_lr0.3" in ids and "sgd-step_bs16_lr0.1" in ids
    step = Method("sgd-decay", 0.4, 16, "step")
    assert [step.lr_at(s, 100) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx([0.4, 0.4, 0.04, 0.04, 0.004, 0.004])
    exp = Method("sgd-decay", 0.4, 16, "exp")
    assert exp.lr_at(0, 100) == 0.4 and exp.lr_at(50, 100) == pytest.approx(0.04) and exp.lr_at(100, 100) == 0.004
    assert Method("sgd", 0.4, 16).lr_at(99, 100) == 0.4
    assert Method("cabs", 0.1).label == "CABS, lr 0.1" and step.label == "SGD bs 16, step decay, lr 0.4"


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(dataset="imagenet"), "dataset must be one of"),
        (dict(backend="mxnet"), "backend must be one of"),
        (dict(methods=("cabs", "adam")), "methods must be a non-empty subset"),
        (dict(batch_sizes=(16, 0)), r"--batch-sizes must be integers >= 1, got \[16, 0\]"),
        (dict(lrs=(0.1, -1.0)), "--lrs: learning rates must be finite and > 0"),
        (dict(epochs=0), "--epochs must be a finite number > 0"),
        (dict(decay="cosine"), "decay must be one of step, exp"),
        (dict(model="resnet"), "model must be one of mlp, cnn"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        ExperimentConfig(**kw)


@pytest.mark.parametrize("backend", ALL)
def test_a_cabs_run_steps_like_sgd_on_the_same_examples(backend, digits):
    """Both paths apply theta - lr * mean gradient to the same examples; the CABS run is the adapter's
    own trainer, drawing the seed's stream, and reports exact-looking statistics."""
    tr = make_trainer(backend, digits, "mlp", threads=1)
    assert tr.num_parameters == 64 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10
    idx, _ = next_batch(SamplerState(len(digits.y_train), 5), 20)  # 20 examples: padded in compiled backends
    tr.reset(5)
    loss0, acc0 = tr.evaluate("test")
    assert loss0 == pytest.approx(math.log(10), rel=0.15) and 0 <= acc0 <= 1
    sgd_loss = tr.sgd_step(idx, 0.5)
    after_sgd = tr.evaluate("test")
    tr.reset(5)
    assert tr.evaluate("test") == pytest.approx((loss0, acc0))  # reset restores the seed's parameters
    run = tr.cabs_run(CABSController(lr=0.5, bs_min=20, bs_max=40), 5)
    assert (run.batch_size, run.examples_seen) == (20, 0)
    info = run.step()
    assert run.examples_seen == 20 and info.loss == pytest.approx(sgd_loss, rel=1e-5)
    assert info.variance > 0 and 20 <= info.batch_size <= 40
    assert tr.evaluate("test") == pytest.approx(after_sgd, rel=1e-4)
    sub = tr.evaluate("train", np.arange(100))
    assert sub[0] > 0 and 0 <= sub[1] <= 1


@pytest.mark.parametrize("backend", ALL)
def test_pipeline_end_to_end(backend, tmp_path, digits):
    cfg = tiny(tmp_path, backend)
    s = run_experiment(cfg, digits)
    records = read_jsonl(tmp_path / "log.jsonl")
    assert records[0]["kind"] == "config" and records[0]["backend"] == backend
    budget = records[0]["budget_examples"]
    assert budget == round(0.4 * 1437)
    runs = [r["run"] for r in records if r["kind"] == "run"]
    assert runs == ["cabs_lr0.1", "sgd_bs16_lr0.1", "sgd_bs40_lr0.1", "sgd-step_bs16_lr0.1", "sgd-step_bs40_lr0.1"]
    for rid in runs:
        steps = [r for r in records if r["kind"] == "step" and r["run"] == rid]
        evals = [r for r in records if r["kind"] == "eval" and r["run"] == rid]
        end = next(r for r in records if r["kind"] == "end" and r["run"] == rid)
        # the same budget for every method, spent in whole batches: the next one would not have fit
        assert end["status"] == "ok" and end["examples"] == steps[-1]["examples"] == sum(r["batch_size"] for r in steps)
        assert end["examples_left"] == budget - end["examples"] < end["next_batch_size"]
        assert [r["step"] for r in steps] == list(range(1, len(steps) + 1)) and end["steps"] == len(steps)
        assert all(math.isfinite(r["loss"]) for r in steps)
        assert [e["point_epoch"] for e in evals] == pytest.approx([0, 0.1, 0.2, 0.3, 0.4])
        assert all(e["epoch"] >= e["point_epoch"] for e in evals[:-1])
        assert evals[-1]["step"] == len(steps) and evals[-1]["examples"] == end["examples"]  # after the last step
        assert all(0 <= e["test_accuracy"] <= 1 for e in evals)
        assert evals[-1]["train_loss"] < evals[0]["train_loss"]  # it learns
        walls = [r["wall_time"] for r in steps]
        assert walls == sorted(walls)
        if rid.startswith("cabs"):
            assert all(r["variance"] > 0 and r["raw"] > 0 for r in steps)
            # every step uses the controller's decision after the step before, the last one included
            decided = [16] + [discretise(r["raw"], 16, 1437) for r in steps]
            assert [r["batch_size"] for r in steps] == decided[:-1] and end["next_batch_size"] == decided[-1]
        else:
            assert all(r["variance"] is None for r in steps)
            bs = int(rid.split("_bs")[1].split("_")[0])
            assert {r["batch_size"] for r in steps} == {bs} and len(steps) == budget // bs
        if rid.startswith("sgd-step"):
            assert steps[0]["lr"] == 0.1 and steps[-1]["lr"] == pytest.approx(0.001)
    for name in ("training_loss.png", "test_accuracy.png", "batch_size.png", "cabs_statistics.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best_baseline"] == s.best_baseline.run and summary["best_baseline"] != "cabs_lr0.1"
    assert len(summary["runs"]) == 5
    md = (tmp_path / "summary.md").read_text()
    assert "**Best baseline:**" in md and "| CABS, lr 0.1 |" in md


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_divergence_stops_the_run(tmp_path, digits):
    cfg = tiny(tmp_path, "torch", methods=("sgd",), batch_sizes=(16,), lrs=(1e5, 0.1), epochs=0.3)
    s = run_experiment(cfg, digits)
    records = read_jsonl(tmp_path / "log.jsonl")
    end = {r["run"]: r for r in records if r["kind"] == "end"}
    bad = end["sgd_bs16_lr100000"]
    assert bad["status"] == "diverged" and "non-finite mini-batch loss" in bad["reason"]
    assert bad["examples"] < end["sgd_bs16_lr0.1"]["examples"] == records[0]["budget_examples"] // 16 * 16
    by = {r.run: r for r in s.runs}
    assert math.isnan(by["sgd_bs16_lr100000"].final_train_loss) and by["sgd_bs16_lr100000"].epochs_to_target is None
    assert s.best_baseline.run == "sgd_bs16_lr0.1"
    assert "| SGD bs 16, lr 100000 (diverged) | not reached | not reached | n/a | n/a |" in (
        tmp_path / "summary.md").read_text()


def _without_wall_time(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in read_jsonl(path)]


@pytest.mark.parametrize("backend", ALL)
def test_reproducible_from_seed(backend, tmp_path, digits):
    kw = dict(methods=("cabs", "sgd"), batch_sizes=(16,), epochs=0.3)
    run_experiment(tiny(tmp_path / "a", backend, seed=3, **kw), digits)
    run_experiment(tiny(tmp_path / "b", backend, seed=3, **kw), digits)
    run_experiment(tiny(tmp_path / "c", backend, seed=4, **kw), digits)
    a, b, c = (_without_wall_time(tmp_path / d / "log.jsonl") for d in "abc")
    assert a == b
    assert a != c


def test_cli(tmp_path, capsys):
    rc = main(["--epochs", "0.2", "--eval-every", "0.1", "--batch-sizes", "32", "--lrs", "0.3",
               "--methods", "cabs,sgd", "--out", str(tmp_path), "--no-progress", "--target-loss", "100"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| CABS, lr 0.1 | 0.10 |" in out  # a target of 100 is reached at the first evaluation point
    assert f"wrote {tmp_path / 'summary.md'}" in out
    assert (tmp_path / "log.jsonl").stat().st_size > 0
    before = (tmp_path / "log.jsonl").read_bytes()
    assert main(["--out", str(tmp_path), "--report-only", "--target-loss", "1e-9"]) == 0
    assert "| CABS, lr 0.1 | not reached |" in capsys.readouterr().out
    assert (tmp_path / "log.jsonl").read_bytes() == before
    assert "1e-09" in (tmp_path / "summary.md").read_text()


def test_cli_errors(tmp_path, capsys):
    assert main(["--dataset", "mnist", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "--data-dir is required for mnist" in capsys.readouterr().err
    assert main(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "none of data_batch_1 found" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "empty"), "--report-only"]) == 2
    assert "--report-only: no" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--batch-sizes", "16,x"])
    assert "expected comma-separated integers" in capsys.readouterr().err


def test_module_help():
    r = subprocess.run([sys.executable, "-m", "cabs_experiments", "--help"], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[2], timeout=60)
    assert r.returncode == 0 and "--backend {torch,jax,tensorflow}" in r.stdout and "--data-dir" in r.stdout
