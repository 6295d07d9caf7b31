"""What the adapters' trainers share through the core (issue 13): the lost-worker error and
its message, the shard layout, host batches of the decided sizes, the per-step history, one
learning rate per optimizer and an optimizer's state in a checkpoint envelope."""

from __future__ import annotations

import json
import os
import socket
from collections import namedtuple
from typing import Any

import numpy as np
import pytest
from cabs_conformance.loop_reference import LinearBackend, problem

from cabs_core import CABSController, SamplerState, WorkerLostError, next_batch
from cabs_core.exactness import PATH_CODES
from cabs_core.loop import check_arrays, join_arrays, one_rate, plan_batch, split_arrays
from cabs_core.trainer import DecisionBatches, Trainer, history, num_rows, take_rows
from cabs_core.workers import Cluster, agreed_path, lost_workers, process_shards, worker_lost


class Flaky(Exception):
    """Stands for a framework's collective error."""


class FlakyBackend(LinearBackend):
    """The reference backend whose statistics fail like a collective that lost a peer, from step ``fail_at``."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at, self.calls = fail_at, 0

    def statistics(self, model: Any, batch: Any, micro: Any, *, verify: bool) -> Any:
        self.calls += 1
        if self.calls >= self.fail_at:
            raise Flaky("Collective ops is aborted by: failed\nfrom /job:worker/replica:0/task:1 ...")
        return super().statistics(model, batch, micro, verify=verify)


class ClusterTrainer(Trainer):
    lost_errors = (Flaky,)

    def __init__(self, cluster: Cluster | None, fail_at: int = 3) -> None:
        self.data, w = problem()
        self.model, self.cluster = (w, np.zeros_like(w)), cluster
        controller = CABSController(lr=0.05, bs_min=4, bs_max=64, bs_init=8)
        self._start(FlakyBackend(fail_at), controller, len(self.data[0]), 0)

    def _cluster(self) -> Cluster | None:
        return self.cluster

    def _arrays(self) -> tuple[list[Any], dict[str, Any]]:
        return [np.array(a) for a in self.model], {}

    def _load_arrays(self, path: str | os.PathLike[str], arrays: list[np.ndarray], extra: dict[str, Any]) -> None:
        check_arrays(path, arrays, self.model)


def test_a_failed_collective_names_the_lost_worker_and_what_to_do():
    tr = ClusterTrainer(Cluster("worker", 0, ["10.0.0.1:2222", "10.0.0.2:2222"], 30.0))
    tr.run(2)
    with pytest.raises(WorkerLostError) as e:
        tr.run(1)
    assert e.value.lost == [1]
    msg = str(e.value)
    assert msg.startswith("worker 0: lost worker 1 (10.0.0.2:2222) during step 3 ")
    assert "Flaky: Collective ops is aborted by: failed;" in msg and "collective timeout 30.0 s" in msg
    assert "restart every worker from the last checkpoint" in msg
    assert isinstance(e.value.__cause__, Flaky) and tr.state.step == 2  # nothing committed


def test_without_a_cluster_the_error_is_the_frameworks():
    with pytest.raises(Flaky):
        ClusterTrainer(None, fail_at=1).run(1)


def test_lost_workers_names_the_task_or_the_address_else_probes():
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    dead = f"127.0.0.1:{probe.getsockname()[1]}"
    probe.close()
    try:
        alive = f"127.0.0.1:{listening.getsockname()[1]}"
        assert lost_workers("from /job:worker/task:2 while", "worker", 0, ["a:1", "b:1", "c:1"]) == [2]
        assert lost_workers("from /job:worker/task:0 and /job:ps/task:1", "worker", 0, [alive, alive]) == []  # me
        assert lost_workers("Collective timed out", "worker", 0, [alive, alive, dead]) == [2]
        assert lost_workers(f"ipv4:{alive}0 refused", "worker", 0, [alive, alive]) == []  # another port, all alive
        e = worker_lost(Flaky(""), "the agreement check at step 4", Cluster("worker", 1, [alive, alive]))
        assert e.lost == [] and "lost a worker (none could be named" in str(e) and "no collective timeout" in str(e)
    finally:
        listening.close()


def test_process_shards_is_the_loops_layout():
    assert process_shards([0, 0, 1, 1], 2, 1) == 2
    assert process_shards([0], 1, 0) == 1
    with pytest.raises(ValueError, match=r"grouped in process order.*\[0, 1, 0, 1\]"):
        process_shards([0, 1, 0, 1], 2, 0)
    with pytest.raises(ValueError, match="same number of devices"):
        process_shards([0, 0, 1], 2, 0)


def test_take_rows_and_num_rows_over_nests():
    Pair = namedtuple("Pair", "a b")
    x = {"img": np.arange(12.0).reshape(6, 2), "tok": [np.arange(6), np.arange(6) * 10]}
    data = (x, Pair(np.arange(6) + 100, np.ones(6)))
    assert num_rows(data) == 6
    got = take_rows(data, np.array([4, 0, 4]))
    np.testing.assert_array_equal(got[0]["img"], [[8, 9], [0, 1], [8, 9]])
    np.testing.assert_array_equal(got[0]["tok"][1], [40, 0, 40])
    assert isinstance(got[1], Pair) and list(got[1].a) == [104, 100, 104]
    with pytest.raises(ValueError, match=r"same number of examples, got \[5, 6\]"):
        num_rows((np.zeros(6), np.zeros(5)))


def test_decision_batches_draw_the_samplers_examples_padded_to_a_bucket():
    x, y = np.arange(20.0)[:, None] * np.ones(3), np.arange(20) + 1000
    batches = DecisionBatches((x, y), buckets=[4, 8], seed=5, mask_dtype="float64")
    state = SamplerState(20, 5)
    for size in (3, 5, 8, 7):
        bx, by, mask = batches.next(size)
        idx, state = next_batch(state, size)
        assert len(by) == (4 if size <= 4 else 8) and mask.dtype == np.float64 and mask.sum() == size
        np.testing.assert_array_equal(by[:size], y[idx])
        np.testing.assert_array_equal(bx[:size], x[idx])
        assert (by[size:] == y[idx[0]]).all()  # padding repeats a real example with mask 0
        assert batches.sampler == state


def test_history_logs_every_step_of_run():
    data, w = problem()

    class T(ClusterTrainer):
        def __init__(self) -> None:
            self.data, self.model = data, (w, np.zeros_like(w))
            self._start(LinearBackend(), CABSController(lr=0.05, bs_min=4, bs_max=64, bs_init=8), len(data[0]), 3)

    ref, got = T(), history(T(), 6)
    infos = ref.run(6)
    assert got["batch_size"] == [i.batch_size for i in infos] and got["loss"] == [i.loss for i in infos]
    seen = np.cumsum([8] + [i.batch_size for i in infos[:-1]])
    np.testing.assert_allclose(got["epoch"], seen / len(data[0]))


def test_one_rate_refuses_several():
    assert one_rate([0.1, 0.1]) == 0.1
    with pytest.raises(ValueError, match=r"same lr .* got \[0.1, 0.2\]"):
        one_rate([0.1, 0.2])


def test_split_join_arrays_round_trip_through_json():
    a, b = np.arange(3.0), np.ones((2, 2))
    state = {"state": {0: {"step": 3, "exp_avg": a}, 1: {"exp_avg": b}},
             "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]}
    skeleton, arrays = split_arrays(state, lambda v: isinstance(v, np.ndarray))
    assert arrays[0] is a and arrays[1] is b and skeleton["state"][1] == {"exp_avg": {"array": 1}}
    back = join_arrays(json.loads(json.dumps(skeleton)), arrays)
    assert back["state"]["0"] == {"step": 3, "exp_avg": a} and back["state"]["1"]["exp_avg"] is b
    assert back["param_groups"] == [{"lr": 0.1, "betas": [0.9, 0.99]}]
    assert split_arrays(None, callable) == (None, [])


def test_plan_batch_is_what_decision_batches_pad_with():
    (mb,) = plan_batch(np.array([7, 2, 9]), buckets=[4, 8])
    assert list(mb.rows) == [7, 2, 9, 7] and list(mb.mask) == [True, True, True, False]


def test_agreed_path_probes_alone_or_agrees_once_per_key():
    probes, gathers = [], []

    def probe() -> str:
        probes.append(1)
        return "fast"

    def gather(words: np.ndarray) -> np.ndarray:  # two processes, the other one agreeing
        gathers.append(words)
        return np.stack([words, words])

    cache: dict[Any, str] = {}
    assert agreed_path(cache, 8, probe, gather, processes=1, verify=False) == "fast" and not gathers and not cache
    assert agreed_path(cache, 8, probe, gather, processes=2, verify=False) == "fast"
    assert agreed_path(cache, 8, probe, gather, processes=2, verify=False) == "fast"  # kept: no probe, no collective
    assert len(probes) == 2 and len(gathers) == 1
    generic = np.asarray([PATH_CODES["generic"]], np.int32)
    assert agreed_path(cache, 8, probe, lambda w: np.stack([w, generic]), processes=2, verify=True) == "generic"
    assert cache == {8: "generic"} and len(probes) == 3
