"""The summary's numbers from hand-made logs; figures; log parsing."""

from __future__ import annotations

import json
import math

import pytest

from cabs_experiments.report import JsonlLog, read_jsonl, summarize, summary_markdown, verdict, write_report


def fake_log(path, curves):
    """curves: {run_id: (family, group, [(epoch, train_loss, acc), ...])}: point k is the evaluation after step k
    (k = 0: before the first step); every run ends normally after its last point, 10 examples short of the budget."""
    with JsonlLog(path) as log:
        log.write({"kind": "config", "dataset": "digits", "model": "mlp", "backend": "numpy", "epochs": 3,
                   "budget_examples": 40, "last_batch": "whole batches"})
        for rid, (family, group, points) in curves.items():
            log.write({"kind": "run", "run": rid, "family": family, "group": group, "label": f"{group}, lr 0.1",
                       "lr": 0.1})
            for k, (ep, loss, acc) in enumerate(points):
                if k:
                    log.write({"kind": "step", "run": rid, "step": k, "examples": 10 * k, "epoch": ep,
                               "batch_size": 16 * k, "loss": loss, "variance": 2.0 * loss if family == "cabs"
                               else None, "raw": 16.0 * k if family == "cabs" else None, "lr": 0.1,
                               "wall_time": ep * 2})
                log.write({"kind": "eval", "run": rid, "step": k, "examples": 10 * k, "epoch": ep,
                           "train_loss": loss, "test_loss": loss, "test_accuracy": acc, "wall_time": ep * 2})
            n = len(points) - 1
            log.write({"kind": "end", "run": rid, "status": "ok", "reason": None, "steps": n, "examples": 10 * n,
                       "examples_left": 40 - 10 * n, "next_batch_size": 16 * (n + 1), "wall_time": points[-1][0] * 2})


CURVES = {
    "cabs": ("cabs", "CABS", [(0, 2.0, 0.1), (1, 0.5, 0.8), (2, 0.14, 0.9), (3, 0.1, 0.95)]),
    "sgd_a": ("sgd", "SGD bs 16", [(0, 2.0, 0.1), (1, 1.0, 0.6), (2, 0.4, 0.8), (3, 0.3, 0.85)]),
    "sgd_b": ("sgd", "SGD bs 16", [(0, 2.0, 0.1), (1, 0.9, 0.6), (2, 0.25, 0.8), (3, 0.15, 0.9)]),
    "dec": ("sgd-decay", "SGD bs 16, step decay", [(0, 2.0, 0.1), (1, 0.4, 0.7), (2, 0.12, 0.9), (3, 0.05, 0.97)]),
}


def test_summary_numbers(tmp_path):
    fake_log(tmp_path / "log.jsonl", CURVES)
    s = summarize(read_jsonl(tmp_path / "log.jsonl"))
    # automatic target: 10% of the training loss before the first step (2.0), whatever the methods reach
    assert s.target_loss == pytest.approx(0.2)
    assert s.target_rule.startswith("automatic: 10% of the training loss before the first step (2, seed 0)")
    by = {r.run: r for r in s.runs}
    assert by["cabs"].epochs_to_target == 2 and by["cabs"].wall_to_target == 4
    assert by["sgd_a"].epochs_to_target is None
    assert by["sgd_b"].epochs_to_target == 3
    assert by["dec"].epochs_to_target == 2
    assert by["dec"].final_train_loss == 0.05 and by["dec"].final_test_accuracy == 0.97
    assert s.best_per_group["SGD bs 16"].run == "sgd_b"
    # tie in epochs between cabs and dec; the best baseline is the decayed run (sgd_b needs 3 epochs)
    assert s.best_baseline.run == "dec"
    v = verdict(s)
    assert v[0].startswith("Yes: CABS, lr 0.1 reaches the target in 2.00 epochs (4.0 s)")
    assert v[1].startswith("Tie: CABS, lr 0.1 reaches the target in 2.0000 epochs")
    md = summary_markdown(s)
    assert "**Best baseline:** SGD bs 16, step decay, lr 0.1" in md
    assert "| SGD bs 16, lr 0.1 | not reached | not reached | 0.3000 | 85.0 | 6.0 | 30 (10 left) |" in md
    assert by["sgd_a"].examples == 30 and by["sgd_a"].examples_left == 10


def test_given_target(tmp_path):
    fake_log(tmp_path / "log.jsonl", CURVES)
    s = summarize(read_jsonl(tmp_path / "log.jsonl"), target_loss=0.5)
    by = {r.run: r for r in s.runs}
    assert (by["cabs"].epochs_to_target, by["sgd_a"].epochs_to_target, by["dec"].epochs_to_target) == (1, 2, 1)
    assert s.target_rule == "given with --target-loss"
    none = summarize(read_jsonl(tmp_path / "log.jsonl"), target_loss=0.01)
    assert all(r.epochs_to_target is None for r in none.runs)
    assert "Neither CABS, lr 0.1 nor" in verdict(none)[0]


def test_write_report_files(tmp_path):
    fake_log(tmp_path / "log.jsonl", CURVES)
    s = write_report(tmp_path)
    for name in ("training_loss.png", "test_accuracy.png", "batch_size.png", "cabs_statistics.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    d = json.loads((tmp_path / "summary.json").read_text())
    assert d["target_loss"] == s.target_loss and d["best_baseline"] == "dec"
    assert len(d["runs"]) == 4
    assert "![loss](training_loss.png)" in (tmp_path / "summary.md").read_text()


def test_read_jsonl_errors(tmp_path):
    p = tmp_path / "log.jsonl"
    p.write_text('{"kind": "config"}\n{not json\n')
    with pytest.raises(ValueError, match=r"log.jsonl:2: not JSON"):
        read_jsonl(p)
    p.write_text('{"kind": "config"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"log.jsonl:2: expected an object with a 'kind'"):
        read_jsonl(p)
    p.write_text('{"kind": "step", "run": "x"}\n')
    with pytest.raises(ValueError, match="step record for run 'x' before its 'run' record"):
        summarize(read_jsonl(p))


def test_all_diverged(tmp_path):
    fake_log(tmp_path / "log.jsonl", {"a": ("sgd", "SGD bs 16", [(0, 2.0, 0.1), (1, math.nan, 0.1)])})
    text = (tmp_path / "log.jsonl").read_text().replace('"status": "ok"', '"status": "diverged"')
    (tmp_path / "log.jsonl").write_text(text)
    with pytest.raises(ValueError, match="every run diverged"):
        summarize(read_jsonl(tmp_path / "log.jsonl"))


def test_a_log_without_steps_is_not_called_diverged(tmp_path):
    """Issue 14: a zero-budget log used to be reported as "every run diverged"."""
    fake_log(tmp_path / "log.jsonl", {"a": ("sgd", "SGD bs 16", [(0, math.nan, 0.1)])})
    with pytest.raises(ValueError, match="no run took a step"):
        summarize(read_jsonl(tmp_path / "log.jsonl"))
