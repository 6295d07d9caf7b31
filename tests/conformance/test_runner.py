"""The conformance runner: it passes the shipped vectors, catches a wrong
decision, refuses malformed files, and the vectors are what the independent
generator writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cabs_conformance import VectorFormatError, builtin_vectors, get_backend, load, run
from cabs_conformance.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_vectors_cover_the_contract():
    names = {p.stem for p in builtin_vectors()}
    assert len(names) >= 40
    for needed in (
        "reference_default",
        "paper_default",
        "edge_clamp",
        "edge_nonfinite_skip",
        "edge_small_count_paper",
        "edge_loss_floor_above_loss",
        "reference_buckets",
        "paper_multiple_of",
    ):
        assert needed in names
    long_ones = [load(p) for p in builtin_vectors() if p.stem in ("reference_default", "paper_default")]
    assert all(len(v["steps"]) >= 50 for v in long_ones)


def test_every_shipped_vector_passes_on_numpy():
    results = list(run(builtin_vectors(), get_backend("numpy")))
    assert [r.name for r in results if not r.passed] == []


def _tampered(tmp_path: Path, name: str, edit) -> Path:
    v = json.loads(next(p for p in builtin_vectors() if p.stem == name).read_text())
    edit(v)
    out = tmp_path / f"{name}.json"
    out.write_text(json.dumps(v))
    return out


def test_a_wrong_decision_fails(tmp_path):
    def edit(v):
        v["steps"][30]["expect"]["batch_size"] += 1

    (r,) = run([_tampered(tmp_path, "paper_default", edit)], get_backend("numpy"))
    assert not r.passed and r.checked == 31 and "batch_size" in r.detail


def test_a_wrong_average_fails(tmp_path):
    def edit(v):
        v["steps"][5]["expect"]["xi_avg"] *= 1 + 1e-9

    (r,) = run([_tampered(tmp_path, "reference_default", edit)], get_backend("numpy"))
    assert not r.passed and "xi_avg" in r.detail


def test_a_missing_config_error_fails(tmp_path):
    def edit(v):
        v["config"]["bs_min"] = 16

    (r,) = run([_tampered(tmp_path, "config_error_bs_min_zero", edit)], get_backend("numpy"))
    assert not r.passed and "no config error" in r.detail


def test_sampler_mismatch_fails(tmp_path):
    def edit(v):
        v["expect"][1]["indices"][0] += 1

    (r,) = run([_tampered(tmp_path, "sampler_small_epochs", edit)], get_backend("numpy"))
    assert not r.passed and "indices" in r.detail


@pytest.mark.parametrize(
    "text,match",
    [
        ("{", "cannot read"),
        ('{"format": "x"}', "not a cabs-conformance/1"),
        ('{"format": "cabs-conformance/1", "name": "a", "kind": "z"}', "unknown kind"),
    ],
)
def test_malformed_files_are_refused(tmp_path, text, match):
    p = tmp_path / "bad.json"
    p.write_text(text)
    with pytest.raises(VectorFormatError, match=match):
        load(p)
    assert main(["--vectors", str(p)]) == 2


def test_cli_runs_external_files_and_prints_a_table(tmp_path, capsys):
    bad = _tampered(tmp_path, "paper_mu_zero", lambda v: v["steps"][0]["expect"].update(batch_size=7))
    assert main(["--backend", "numpy", "--vectors", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "paper_mu_zero" in out and "FAIL" in out and "0 passed, 1 failed" in out
    assert bad.exists()


def test_generator_reproduces_the_shipped_vectors(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "conformance" / "generate_vectors.py"), str(tmp_path)],
        check=True,
        capture_output=True,
    )
    shipped = {p.name: p.read_bytes() for p in builtin_vectors()}
    fresh = {p.name: p.read_bytes() for p in tmp_path.glob("*.json")}
    assert fresh == shipped
