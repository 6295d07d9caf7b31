"""cabs_core.trainer: the stateful trainer the in-place adapters share, and the
sampler of a caller's data loader, on the reference backend (NumPy least squares)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
from cabs_conformance.loop_reference import LinearBackend, problem

from cabs_core import CABSController, CheckpointMismatchError, SamplerState, next_batch, shard
from cabs_core.loop import CABSLoop, check_arrays
from cabs_core.trainer import BackendDefaults, DecisionSampler, Trainer

CONTROLLER = dict(lr=0.05, c=40.0, bs_min=4, bs_max=64, bs_init=8, mu=0.9)


class LinearTrainer(Trainer):
    """The smallest :class:`Trainer`: the reference backend, its weights and velocity as arrays."""

    def __init__(self, data: Any = None, *, seed: int = 3, momentum: float = 0.9, **options: Any) -> None:
        self.data, (_, w) = data, problem()
        self.model = (w, np.zeros_like(w))
        n = None if data is None else len(data[0])
        self._start(LinearBackend(momentum=momentum), CABSController(**CONTROLLER), n, seed, **options)

    def _arrays(self) -> tuple[list[Any], dict[str, Any]]:
        return [np.array(a) for a in self.model], {"note": "velocity second"}

    def _load_arrays(self, path: str | os.PathLike[str], arrays: list[np.ndarray], extra: dict[str, Any]) -> None:
        check_arrays(path, arrays, self.model)
        assert extra["note"] == "velocity second"
        self.model = tuple(np.array(a) for a in arrays)


def test_run_is_the_loop_stepped_by_hand():
    data, w = problem()
    tr = LinearTrainer(data, max_micro_batch=5)
    infos = tr.run(12)
    loop = CABSLoop(LinearBackend(momentum=0.9), CABSController(**CONTROLLER), num_examples=len(data[0]), seed=3,
                    max_micro_batch=5)
    run, model = loop.init(), (w, np.zeros_like(w))
    for info in infos:
        run, model, ref = loop.step(run, model, data)
        assert info == ref
    assert tr.state == run.controller and tr.sampler == run.sampler and tr.batch_size == run.controller.batch_size
    np.testing.assert_array_equal(tr.model[0], model[0])
    assert tr.examples_seen == run.sampler.examples_seen and tr.epoch == run.sampler.epoch
    assert len({i.batch_size for i in infos}) > 1  # the decisions moved


def test_save_restore_is_the_uninterrupted_run(tmp_path):
    data, _ = problem()
    full = LinearTrainer(data)
    full.run(4)
    full.save(tmp_path / "ck.npz")
    rest = [(i.batch_size, i.loss) for i in full.run(5)]
    again = LinearTrainer(data)
    again.restore(tmp_path / "ck.npz")
    assert [(i.batch_size, i.loss) for i in again.run(5)] == rest
    np.testing.assert_array_equal(again.model[1], full.model[1])  # the velocity came back too


def test_restore_refuses_other_arrays_and_other_configurations(tmp_path):
    data, _ = problem()
    tr = LinearTrainer(data)
    tr.run(2)
    tr.save(tmp_path / "ck.npz")
    wider = LinearTrainer(data)
    wider.model = tuple(np.zeros(7) for _ in range(2))
    with pytest.raises(ValueError, match="array 0 has shape"):
        wider.restore(tmp_path / "ck.npz")
    other_seed = LinearTrainer(data, seed=4)
    with pytest.raises(CheckpointMismatchError, match="seed"):
        other_seed.restore(tmp_path / "ck.npz")
    other_seed.restore(tmp_path / "ck.npz", allow=["seed"])
    assert other_seed.state == tr.state


def test_step_needs_a_batch_or_data():
    with pytest.raises(ValueError, match="pass a batch"):
        LinearTrainer()._step()


def test_a_fed_trainer_draws_the_core_stream_and_checkpoints_its_position():
    data, _ = problem(40)
    tr = LinearTrainer()
    feeder = tr._feed(DecisionSampler(40, lambda: tr.batch_size, seed=5, max_batches=6))
    ref, sizes = SamplerState(40, 5), []
    for idx in feeder:
        want, ref = next_batch(ref, tr.batch_size)
        np.testing.assert_array_equal(idx, want)
        sizes.append(tr._step((data[0][idx], data[1][idx])).batch_size)
    assert feeder.batches == 6 and tr.sampler == ref and len(feeder) == 0
    d = tr.state_dict()
    assert d["batches"] == 6 and SamplerState.from_dict(d["sampler"]) == ref
    other = LinearTrainer()
    other_feeder = other._feed(DecisionSampler(40, lambda: other.batch_size, seed=5, max_batches=6))
    other.load_state_dict(d)
    assert other_feeder.state == ref and other_feeder.batches == 6 and other.state == tr.state
    with pytest.raises(CheckpointMismatchError, match="batch sampler"):
        LinearTrainer().load_state_dict(d)  # no sampler to restore the position into
    with pytest.raises(ValueError, match="its own data"):
        LinearTrainer(data)._feed(DecisionSampler(40, lambda: 4))


def test_decision_sampler_shards_stops_and_restores():
    planned = [10, 7, 7, 9, 12, 5, 30, 30]
    sizes = iter(planned)
    s = DecisionSampler(25, lambda: next(sizes), seed=4, max_epochs=2.0, world_size=3, rank=1)
    ref, got = SamplerState(25, 4), []
    for idx in s:
        want, ref = next_batch(ref, planned[len(got)])
        np.testing.assert_array_equal(idx, shard(want, 3, 1))
        got.append(idx)
    assert s.state.epoch >= 2.0 and s.state == ref and s.batches == len(got) == 6
    t = DecisionSampler(25, lambda: 4, seed=4)
    t.load_state_dict(s.state_dict())
    assert t.state == s.state and t.batches == 6
    with pytest.raises(ValueError, match="25 examples"):
        DecisionSampler(26, lambda: 4).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="rank"):
        DecisionSampler(10, lambda: 4, world_size=2, rank=2)
    with pytest.raises(TypeError, match="no length"):
        len(DecisionSampler(10, lambda: 4))
    assert len(DecisionSampler(10, lambda: 4, max_batches=3)) == 3


def test_backend_defaults_are_one_process():
    b = BackendDefaults()
    np.testing.assert_array_equal(b.gather(np.asarray([1, 2, 3], np.int32)), [[1, 2, 3]])
    b.processes = 2
    with pytest.raises(NotImplementedError, match="must gather"):
        b.gather(np.zeros(3, np.int32))
