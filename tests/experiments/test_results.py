"""Issue 16 item 6: the results command (``python -m cabs_experiments.results``) on a tiny plan.

Digits (shipped with scikit-learn), PyTorch, one epoch, two seeds, two CABS learning rates and
one SGD batch size: the page's tables are checked against the per-data-set summaries and, for
CABS's batch sizes, against a float64 loop over the log's step records.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from cabs_experiments.report import LOG_NAME, read_jsonl, summarize  # noqa: E402
from cabs_experiments.results import (  # noqa: E402
    PLANS,
    RESULTS_MD,
    Plan,
    batch_profile,
    command,
    copy_figures,
    main,
    run_results,
)

TINY = Plan("digits", 1.0, (0.3,), (16,), (0.1, 0.3))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("results")
    path = run_results([TINY], out, seeds=2, progress=False)
    return out, path.read_text(encoding="utf-8")


def _mean_sd(values: list[float], spec: str) -> str:
    return f"{statistics.mean(values):{spec}} ± {statistics.stdev(values):{spec}}"


def test_page_has_the_summary_rows_and_the_command(tiny_run) -> None:
    out, page = tiny_run
    assert (out / RESULTS_MD).is_file()
    summary = (out / "digits" / "summary.md").read_text(encoding="utf-8")
    rows = summary.split("## Best learning rate per method\n\n", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    assert len(rows) == 4  # CABS lr 0.1, CABS lr 0.3, SGD bs 16, SGD bs 16 step decay
    section = page.split("target 10% of the initial training loss", 1)[1].split("### ", 1)[0]
    for row in rows:  # the automatic target is the summary's: the same rows, value for value
        assert row in section
    assert (f"cabs-experiment --dataset digits --model mlp --epochs 1 --seeds 2 --cabs-lr 0.1,0.3 --lrs 0.3 "
            f"--batch-sizes 16 --out {out / 'digits'}") in page
    assert "target 1% of the initial training loss" in page  # TINY's second target: the default 0.01


def test_lr_table_is_the_mean_and_sd_of_every_seed(tiny_run) -> None:
    out, page = tiny_run
    methods = {m["method"]: m for m in json.loads((out / "digits" / "summary.json").read_text())["methods"]}
    table = page.split("### Final training loss at every learning rate\n\n", 1)[1].split("\n\n", 1)[0]
    rows = {r.split(" | ")[0].strip("| "): [c.strip(" |") for c in r.split(" | ")[1:]] for r in table.splitlines()[2:]}
    assert table.splitlines()[0] == "| method | lr 0.1 | lr 0.3 |"
    cabs01, cabs03 = (methods[f"cabs_lr{x}"]["final_train_loss"]["per_seed"] for x in ("0.1", "0.3"))
    assert rows["CABS"] == [_mean_sd(cabs01, ".4f"), _mean_sd(cabs03, ".4f")]
    sgd = methods["sgd_bs16_lr0.3"]["final_train_loss"]["per_seed"]
    assert rows["SGD bs 16"] == ["-", _mean_sd(sgd, ".4f")]
    assert len(sgd) == 2 and all(math.isfinite(v) for v in sgd)


def test_batch_table_matches_a_loop_over_the_steps(tiny_run) -> None:
    out, page = tiny_run
    records = read_jsonl(out / "digits" / LOG_NAME)
    budget = records[0]["budget_examples"]
    assert budget == 1437
    table = page.split("### CABS's batch size", 1)[1].split("\n\n", 2)[1]
    rows = {r.split(" | ")[0].strip("| "): [c.strip(" |") for c in r.split(" | ")[1:]] for r in table.splitlines()[2:]}
    assert set(rows) == {"CABS, lr 0.1", "CABS, lr 0.3", "SGD bs 16, lr 0.3"}
    for lr in ("0.1", "0.3"):
        quarters: list[list[float]] = [[], [], [], []]
        largest, steps, ms = [], [], []
        for seed in (0, 1):
            run = f"cabs_lr{lr}_s{seed}"
            batches = [(float(r["examples"]) - r["batch_size"], float(r["batch_size"]), float(r["wall_time"]))
                       for r in records if r["kind"] == "step" and r["run"] == run]
            end = next(r for r in records if r["kind"] == "end" and r["run"] == run)
            assert len(batches) == end["steps"] > 0
            for q in range(4):
                inq = [b for start, b, _ in batches if q * budget <= 4 * start < (q + 1) * budget]
                quarters[q].append(sum(inq) / len(inq))
            largest.append(max(b for _, b, _ in batches))
            steps.append(float(len(batches)))
            ms.append(1000.0 * batches[-1][2] / len(batches))
        row = rows[f"CABS, lr {lr}"]
        assert row[:4] == [_mean_sd(q, ".0f") for q in quarters]
        lo, hi = int(min(largest)), int(max(largest))
        assert row[4] == (str(lo) if lo == hi else f"{lo}–{hi}")
        assert row[5] == _mean_sd(steps, ".0f")
        assert row[6] == _mean_sd(ms, ".2f")
    assert rows["SGD bs 16, lr 0.3"][:6] == ["16 ± 0"] * 4 + ["16", "89 ± 0"]  # 1437 // 16 steps


def test_batch_profile_refuses_a_log_without_every_step(tiny_run) -> None:
    out, _ = tiny_run
    records = read_jsonl(out / "digits" / LOG_NAME)
    gone = next(i for i, r in enumerate(records) if r["kind"] == "step" and r["run"] == "cabs_lr0.1_s0"
                and r["step"] == 5)
    s = summarize(records[:gone] + records[gone + 1:])
    run = next(r for r in s.runs if r.run == "cabs_lr0.1_s0")
    with pytest.raises(ValueError, match="does not hold every step"):
        batch_profile(run, 1437)
    other = next(r for r in s.runs if r.run == "cabs_lr0.1_s1")
    assert batch_profile(other, 1437).steps == other.last_step


def test_report_only_rewrites_the_same_page_and_a_used_folder_is_refused(tiny_run, capsys) -> None:
    out, page = tiny_run
    (out / RESULTS_MD).unlink()
    assert main(["--out", str(out), "--datasets", "digits", "--report-only"]) == 0
    assert (out / RESULTS_MD).read_text(encoding="utf-8") == page
    assert main(["--out", str(out), "--datasets", "digits"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--datasets", "digits,cifar10"])
    assert e.value.code == 2


def test_the_plans_are_the_three_data_sets_with_a_cabs_grid() -> None:
    assert list(PLANS) == ["digits", "mnist-5k", "mnist1d"]
    for p in PLANS.values():
        assert len(p.cabs_lrs) >= 3 and len(p.lrs) >= 3 and p.target_fractions[0] == 0.1
        cfg = p.config(Path("runs/results"), 3, False, False)  # the options are valid
        assert cfg.seeds == 3 and cfg.out == str(Path("runs/results") / p.dataset)
        assert re.search(rf"--dataset {p.dataset} .*--seeds 3 ", command(cfg.__dict__, Path(cfg.out)))


def test_figures_are_copied_small_with_the_same_size(tiny_run, tmp_path) -> None:
    from PIL import Image

    out, _ = tiny_run
    copies = copy_figures([TINY], out, tmp_path / "docs")
    assert [p.name for p in copies] == ["digits_panels.png", "digits_cabs_statistics.png"]
    for p, src in zip(copies, ("panels.png", "cabs_statistics.png")):
        with Image.open(p) as small, Image.open(out / "digits" / src) as big:
            assert small.size == big.size and small.mode == "P" and len(small.getcolors()) <= 64
        assert p.stat().st_size < (out / "digits" / src).stat().st_size
    with pytest.raises(ValueError, match="mnist1d.*missing"):
        copy_figures([PLANS["mnist1d"]], out, tmp_path / "docs")
