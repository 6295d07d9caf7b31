"""Data-parallel CABS on MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1.

Two launches, each under a timeout, every process killed by pid and reaped in a ``finally``:

1. two ``multiworker_worker.py`` processes (``TF_CONFIG`` set here): the single-process
   CABSTrainer and the two-worker trainer on the same global batches, a desync injected
   on worker 1, then a run that checkpoints every 2 steps and loses worker 1 (SIGKILL)
   after step 5;
2. the example itself (``examples/tf_multiworker.py``, the commands of
   docs/distributed/tensorflow.md) resumed from that run's last checkpoint on 2 workers
   and, at the same time, on 1 worker.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
EXAMPLE = ROOT / "examples" / "tf_multiworker.py"
COLLECTIVE_TIMEOUT_S = 30  # the strategy's collective timeout: the documented bound on a lost worker
LAUNCH_TIMEOUT_S = 200  # per launch; a loaded 2-core machine took about 60 s
STEPS, RESUME_FROM = 8, 4  # multiworker_worker.py: 8 steps; the killed run's last checkpoint is step 4


def _free_port(consecutive: int = 1) -> int:
    """A port p with p .. p + consecutive - 1 free on 127.0.0.1 (the example's --port convention)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            for k in range(1, consecutive):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + k))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no {consecutive} consecutive free ports on 127.0.0.1")


def _env(**extra: str) -> dict[str, str]:
    paths = [str(ROOT), str(ROOT / "adapters"), str(ROOT / "conformance")]
    return {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "",
            "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]),
            **extra}


def _launch(commands: dict[str, tuple[list[str], dict[str, str]]], out: Path,
            expected: dict[str, int] | None = None) -> dict[str, str]:
    """Run every command (name: (argv, env)) at once, logs in OUT/NAME.log; wait for all under
    LAUNCH_TIMEOUT_S; always kill (by pid) and reap what still runs. Returns the logs."""
    expected = expected or {}
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, (argv, env) in commands.items():
            with open(out / f"{name}.log", "w") as log:
                procs[name] = subprocess.Popen([sys.executable, *argv], env=env, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        late = [name for name, p in procs.items() if p.poll() is None]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        for p in procs.values():
            p.wait(timeout=30)
    logs = {name: (out / f"{name}.log").read_text() for name in commands}
    codes = {name: p.returncode for name, p in procs.items()}
    want = {name: expected.get(name, 0) for name in commands}
    if codes != want:
        tails = "\n".join(f"--- {n} (exit {codes[n]}):\n{logs[n][-3000:]}" for n in commands)
        why = f"{late} still ran after {LAUNCH_TIMEOUT_S} s (killed); " if late else ""
        pytest.fail(f"{why}exit codes {codes}, expected {want}\n{tails}")
    return logs


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """Launch 1: the scenarios of multiworker_worker.py on two workers."""
    out = tmp_path_factory.mktemp("multiworker")
    addresses = [f"127.0.0.1:{_free_port()}" for _ in range(2)]
    commands = {}
    for i in range(2):
        config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": i}}
        commands[f"worker{i}"] = ([str(HERE / "multiworker_worker.py"), str(out), str(COLLECTIVE_TIMEOUT_S)],
                                  _env(TF_CONFIG=json.dumps(config)))
    _launch(commands, out, expected={"worker1": -9})  # worker 1 kills itself
    results = [json.loads((out / f"worker{i}.json").read_text()) for i in range(2)]
    return {"out": out, "addresses": addresses, "results": results}


@pytest.fixture(scope="module")
def resumed(workers):
    """Launch 2: the example resumed from the killed run's checkpoint, on 2 workers and on 1."""
    out, ckpt = workers["out"], str(workers["out"] / "killed.npz")
    two, one = _free_port(2), _free_port()
    common = ["--steps", str(STEPS), "--restore", ckpt, "--timeout", str(COLLECTIVE_TIMEOUT_S)]
    commands = {f"two{i}": ([str(EXAMPLE), "--workers", "2", "--index", str(i), "--port", str(two), *common,
                             "--every-step"], _env()) for i in range(2)}
    commands["one"] = ([str(EXAMPLE), "--workers", "1", "--index", "0", "--port", str(one), *common], _env())
    logs = _launch(commands, out)
    return {name: [json.loads(line) for line in log.splitlines() if line.startswith("{")]
            for name, log in logs.items()}


def _same_decisions(a, b):
    assert [(r["step"], r["used"], r["batch_size"], r["skipped"]) for r in a] == \
        [(r["step"], r["used"], r["batch_size"], r["skipped"]) for r in b]  # exactly
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose([x["variance"], x["loss"]], [y["variance"], y["loss"]], rtol=1e-10)


def _close(a, b):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-10, atol=1e-13)


def _same_state(a, b):
    assert {k: v for k, v in a.items() if not k.endswith("_avg")} == {k: v for k, v in b.items()
                                                                      if not k.endswith("_avg")}
    np.testing.assert_allclose([a["xi_avg"], a["loss_avg"]], [b["xi_avg"], b["loss_avg"]], rtol=1e-12)


def test_two_workers_decide_as_one_process_on_the_same_global_batches(workers):
    w0, w1 = workers["results"]
    for i, w in enumerate((w0, w1)):
        assert (w["replicas"], w["processes"], w["process_index"]) == (2, 2, i)
        _same_decisions(w["full"], w["single"])
        _close(w["full_params"], w["single_params"])
        _same_state(w["full_state"], w["single_state"])
    assert w0["full"] == w1["full"] and w0["full_params"] == w1["full_params"]  # the workers agree bit for bit
    used = [r["used"] for r in w0["full"]]
    assert len(used) == STEPS and len(set(used)) >= 3 and any(m % 2 for m in used)  # moving, uneven shards


def test_a_nudged_controller_raises_desync_on_both_workers(workers):
    for w in workers["results"]:
        d = w["desync"]
        assert d is not None and d["step"] == d["error_step"] == 2, d
        assert d["names"] == ["process 0", "process 1"]
        assert "diverged at step 2" in d["message"] and "process 1" in d["message"]


def test_a_killed_worker_fails_the_other_naming_it(workers):
    lost = workers["results"][0]["lost"]
    assert lost is not None, "worker 0 took a step without worker 1"
    assert lost["workers"] == [1] and lost["cause"] in ("UnavailableError", "DeadlineExceededError",
                                                        "CancelledError", "AbortedError")
    assert f"lost worker 1 ({workers['addresses'][1]})" in lost["message"] and "step 6" in lost["message"]
    assert lost["seconds"] < COLLECTIVE_TIMEOUT_S  # bounded: a dead peer refuses at once, a hung one times out


def test_resume_from_the_last_checkpoint_on_two_workers_and_on_one(workers, resumed):
    full, params, state = (workers["results"][0][k] for k in ("full", "full_params", "full_state"))
    for name in ("two0", "two1", "one"):
        *steps, final = resumed[name]
        assert final["final"] and final["start"] == RESUME_FROM
        assert final["workers"] == (1 if name == "one" else 2)
        if name == "one":
            steps = final["steps"]
        _same_decisions(steps, full[RESUME_FROM:])
        _close(final["params"], params)
        _same_state(final["state"], state)


def test_lost_workers_are_named_from_the_error_or_by_probing():
    from cabs_tf.distributed import lost_workers

    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    try:
        alive, dead = f"127.0.0.1:{listening.getsockname()[1]}", f"127.0.0.1:{_free_port()}"
        tf_message = ("Collective ops is aborted by: failed to connect to all addresses; last error: UNKNOWN: "
                      f"ipv4:{dead}: Failed to connect to remote host: Connection refused\nAdditional GRPC error "
                      "information from remote target /job:worker/replica:0/task:2 while calling "
                      "/tensorflow.WorkerService/RecvBuf:")
        addresses = ["127.0.0.1:1", alive, dead]
        assert lost_workers(tf_message, "worker", 0, addresses) == [2]  # the task and the address TF names
        assert lost_workers(f"ipv4:{dead}: refused", "worker", 0, addresses) == [2]  # the address alone
        heartbeat = ("Collective ops is aborted by: Error reported from /job:worker/task:1: The following tasks are "
                     "unhealthy (stopped sending heartbeats):\n/job:worker/replica:0/task:1\nThe tasks have crashed.")
        assert lost_workers(heartbeat, "worker", 0, addresses) == [1]  # a hung worker (SIGSTOP), TF 2.21's words
        assert lost_workers("Collective ops timed out", "worker", 0, [alive, alive, dead]) == [2]  # probed
        assert lost_workers("timed out", "worker", 2, [alive, alive, dead]) == []  # nobody to name
    finally:
        listening.close()
