"""Nothing lost, nothing silently wrong in the experiment command (issue 14, items 1 and 8;
issue 16: the default output folder, the missing extra)."""

from __future__ import annotations

import json

import pytest

import cabs_experiments.run as run_module
from cabs_experiments.report import read_jsonl, summarize
from cabs_experiments.run import ExperimentConfig, main, run_experiment

from .test_last_batch import fake, fake_dataset  # noqa: F401  (fixture)


def _previous_run(d):
    d.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"kind": "step", "k": k}) for k in range(118)]
    (d / "log.jsonl").write_text("\n".join(lines) + "\n")
    (d / "summary.md").write_text("old summary\n")
    return {p.name: p.read_bytes() for p in d.iterdir()}


def _exit_code(argv):
    try:
        return main(argv)
    except SystemExit as e:  # argparse's parser.error
        return e.code


@pytest.mark.parametrize("bad", [["--cabs-bs-init", "5"], ["--epochs", "inf"], ["--eval-every", "nan"],
                                 ["--cabs-lr", "0"], ["--epochs", "1"]])
def test_a_failed_rerun_leaves_the_previous_run_alone(tmp_path, capsys, bad):
    before = _previous_run(tmp_path / "D")
    assert _exit_code(["--out", str(tmp_path / "D"), "--no-progress", *bad]) == 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "D").iterdir()} == before
    err = capsys.readouterr().err.strip().splitlines()[-1]
    flag = bad[0] if bad != ["--epochs", "1"] else "--out"  # a valid run into a used folder: refused too
    assert flag in err, err


def test_out_under_a_file_names_the_flag(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert _exit_code(["--out", str(tmp_path / "f" / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "is a file" in err, err


def test_overwrite_replaces_a_previous_run(tmp_path, fake):  # noqa: F811
    _previous_run(tmp_path)
    cfg = dict(epochs=0.2, methods=("sgd",), batch_sizes=(50,), lrs=(0.1,), out=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="already holds files.*--overwrite"):
        run_experiment(ExperimentConfig(**cfg), fake_dataset())
    run_experiment(ExperimentConfig(**cfg, overwrite=True), fake_dataset())
    assert read_jsonl(tmp_path / "log.jsonl")[0]["kind"] == "config"


def test_default_output_folder_names_dataset_model_and_backend():
    assert ExperimentConfig(dataset="digits", backend="jax").out == "runs/digits-mlp-jax"
    assert ExperimentConfig(dataset="svhn", backend="tensorflow").out == "runs/svhn-cnn-tensorflow"


def test_an_interrupted_log_says_so(tmp_path, fake):  # noqa: F811
    cfg = ExperimentConfig(epochs=1.0, eval_every=0.5, methods=("sgd",), batch_sizes=(50,), lrs=(0.1,),
                           out=str(tmp_path), progress=False)
    run_experiment(cfg, fake_dataset())
    lines = (tmp_path / "log.jsonl").read_text().splitlines(keepends=True)
    # cut after the 3rd step, before any evaluation after step 0, in the middle of a line
    k = [i for i, line in enumerate(lines) if json.loads(line)["kind"] == "step"][2]
    (tmp_path / "log.jsonl").write_text("".join(lines[: k + 1]) + lines[k + 1][:17])
    records = read_jsonl(tmp_path / "log.jsonl")  # the torn last line is left out
    assert records[-1]["kind"] == "step" and records[-1]["step"] == 3
    with pytest.raises(ValueError, match="interrupted at step 3 of SGD"):
        summarize(records)


def test_a_missing_extra_is_named(tmp_path, capsys, monkeypatch):
    def missing(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'sklearn'", name="sklearn")

    monkeypatch.setattr(run_module, "load_dataset", missing)
    assert main(["--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "sklearn is not installed" in err and "'.[experiments]'" in err and "'.[torch]'" in err


@pytest.mark.parametrize("argv, flag", [(["--dataset", "mnist1d", "--model", "cnn"], "--model"),
                                        (["--dataset", "digits", "--mnist1d-size", "500"], "--mnist1d-size")])
def test_dataset_options_that_do_not_fit_are_refused(tmp_path, capsys, argv, flag):
    assert _exit_code(["--out", str(tmp_path / "D"), "--no-progress", *argv]) == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "D").exists()


def test_default_models_of_the_packaged_data_sets():
    assert ExperimentConfig(dataset="mnist-5k").model == "cnn" and ExperimentConfig(dataset="mnist1d").model == "mlp"
