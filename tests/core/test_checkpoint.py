"""The checkpoint envelope: a run resumes only under the configuration it was written with,
unless the caller names the keys it changes (issue 14 item 6; issue 13's one format)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cabs_core import CABSController, CheckpointMismatchError, SamplerState
from cabs_core.checkpoint import FORMAT, envelope, restore, write_atomic


def _ckpt(ctl, batch_size=130, seed=3, n=100, seen=250):
    state = dataclasses.replace(ctl.init(), batch_size=batch_size, step=7, updates=7)
    return json.loads(json.dumps(envelope(ctl, state, SamplerState(n, seed, seen), params="p.npz")))


def test_round_trip_through_json():
    ctl = CABSController(lr=0.1, bs_min=16, bs_max=256, buckets=(16, 130, 256))
    d = _ckpt(ctl)
    assert d["format"] == FORMAT and d["config"]["buckets"] == [16, 130, 256] and d["params"] == "p.npz"
    state, sampler = restore(d, ctl, SamplerState(100, 3))
    assert (state.batch_size, state.step, sampler.examples_seen, sampler.seed) == (130, 7, 250, 3)


def test_every_difference_is_named():
    d = _ckpt(CABSController(lr=0.1, bs_min=16, bs_max=256))
    with pytest.raises(CheckpointMismatchError) as e:
        restore(d, CABSController(lr=0.2, bs_min=16, bs_max=128, mu=0.9), SamplerState(99, 4))
    diffs = e.value.differences
    assert [x.split(":")[0] for x in diffs] == ["lr", "bs_max", "mu", "num_examples", "seed"]
    assert "lr: checkpoint 0.1, now 0.2" in str(e.value) and "allow=" in str(e.value)


def test_allowed_changes_rediscretise_the_decision_in_force():
    d = _ckpt(CABSController(lr=0.1, bs_min=16, bs_max=256))  # decided 130
    state, _ = restore(d, CABSController(lr=0.1, bs_min=16, bs_max=128), SamplerState(100, 3), allow=["bs_max"])
    assert state.batch_size == 128
    state, _ = restore(d, CABSController(lr=0.1, bs_min=16, bs_max=256, multiple_of=32), allow=["multiple_of"])
    assert state.batch_size == 160
    state, sampler = restore(d, CABSController(lr=0.1, bs_min=16, bs_max=256), SamplerState(100, 9), allow=["seed"])
    assert (sampler.seed, sampler.examples_seen) == (9, 250)
    with pytest.raises(ValueError, match="unknown keys"):
        restore(d, CABSController(lr=0.1), allow=["learning_rate"])


def test_not_a_checkpoint():
    with pytest.raises(ValueError, match="not a CABS checkpoint"):
        restore({"format": "cabs-torch-state/1"}, CABSController(lr=0.1))


def test_write_atomic_replaces_whole_files(tmp_path, monkeypatch):
    p = tmp_path / "ckpt.json"
    write_atomic(p, b"old")
    write_atomic(p, b"new")
    assert p.read_bytes() == b"new"

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", broken)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(p, b"torn")
    assert p.read_bytes() == b"new" and [q.name for q in tmp_path.iterdir()] == ["ckpt.json"]
