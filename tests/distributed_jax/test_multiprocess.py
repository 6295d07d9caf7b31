"""Data-parallel CABS on JAX across processes (issue 19): ``jax.distributed`` on
127.0.0.1 with gloo CPU collectives, 2 processes of 2 CPU devices each, running
the user-facing script examples/jax_multiprocess.py.

Shown: the decisions and parameters equal a single process's on the same global
batches (float64: identical decisions, parameters within 1e-10); a checkpoint of
the 2-process run resumes with 2 processes and with 1, continuing the single
process's sequence; a desync on one process raises DesyncError on both; a killed
process makes the other stop within a bounded time, naming the lost process,
and the run resumes from its last checkpoint on one process.
Every process is launched with a timeout and killed in a ``finally``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "jax_multiprocess.py"
DESYNC = Path(__file__).with_name("jax_mp_desync.py")
TIMEOUT_S = 240  # a bound for a hung run; a run takes ~15-40 s on a busy 2-core machine
HEARTBEAT_S = 5  # the coordination service's heartbeat timeout in the fault test
RTOL = 1e-10


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script: Path, processes: int, *extra: str, local_devices: int = 2) -> list[subprocess.Popen]:
    port, env = _port(), dict(os.environ, JAX_PLATFORMS="cpu")
    return [subprocess.Popen([sys.executable, str(script), "--processes", str(processes), "--process-id", str(p),
                              "--coordinator", f"127.0.0.1:{port}", "--local-devices", str(local_devices), *extra],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for p in range(processes)]


def _finish(procs: list[subprocess.Popen], timeout: float = TIMEOUT_S) -> list[tuple[int, str, str]]:
    """Wait for every process (killing all of them on expiry or error); (rc, stdout, stderr) each."""
    out, deadline = [], time.monotonic() + timeout
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append((p.returncode, stdout, stderr))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a JAX process did not finish within {timeout} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def _run(processes: int, *extra: str, local_devices: int = 2) -> list[dict]:
    """The JSON lines process 0 printed (every process must exit 0)."""
    return _lines(_finish(_launch(EXAMPLE, processes, *extra, local_devices=local_devices)))


def _lines(results: list[tuple[int, str, str]]) -> list[dict]:
    for rc, stdout, stderr in results:
        assert rc == 0, f"a process failed (rc {rc}):\n{stdout[-2000:]}\n{stderr[-4000:]}"
    return [json.loads(line) for line in results[0][1].splitlines() if line.startswith("{")]


def _steps(lines: list[dict]) -> list[tuple[int, int]]:
    return [(r["size"], r["decision"]) for r in lines if "step" in r]


def _rel(a: list, b: list) -> float:
    a, b = np.concatenate([np.ravel(x) for x in a]), np.concatenate([np.ravel(x) for x in b])
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    ck = str(tmp_path_factory.mktemp("jax_mp") / "ck-{step}.npz")
    single = _launch(EXAMPLE, 1, "--float64", "--steps", "20", local_devices=1)  # beside the 2-process run
    out = {"two": _run(2, "--float64", "--steps", "20", "--save", ck, "--save-every", "10")}
    out["single"] = _lines(_finish(single))
    resumed = _launch(EXAMPLE, 1, "--float64", "--steps", "10", "--restore", ck.format(step=10), local_devices=3)
    out["resumed_two"] = _run(2, "--float64", "--steps", "10", "--restore", ck.format(step=10))
    out["resumed_one"] = _lines(_finish(resumed))
    return out


def test_two_processes_equal_one_process(runs: dict) -> None:
    single, two = runs["single"], runs["two"]
    assert two[-1]["processes"] == 2 and two[-1]["devices"] == 4 and single[-1]["devices"] == 1
    assert _steps(two) == _steps(single)
    assert len({d for _, d in _steps(single)}) > 3  # the decisions moved
    assert _rel(two[-1]["params"], single[-1]["params"]) < RTOL
    assert two[-1]["examples_seen"] == single[-1]["examples_seen"]


def test_resume_with_the_same_or_another_process_count(runs: dict) -> None:
    single = _steps(runs["single"])
    for key in ("resumed_two", "resumed_one"):
        assert _steps(runs[key]) == single[10:], key
        assert _rel(runs[key][-1]["params"], runs["single"][-1]["params"]) < RTOL, key
    assert runs["resumed_one"][-1]["processes"] == 1 and runs["resumed_one"][-1]["devices"] == 3


def test_a_desync_on_one_process_raises_on_both() -> None:
    results = _finish(_launch(DESYNC, 2, "--float64"))
    reports = []
    for rc, stdout, stderr in results:
        assert rc == 0, f"{stdout[-2000:]}\n{stderr[-3000:]}"
        reports.append(json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1]))
    assert [r["raised_at"] for r in reports] == [5, 5]  # check_every=5: the first check after the nudge
    assert all("process 1" in r["message"] for r in reports)


def test_a_killed_process_stops_the_other_naming_it_and_the_run_resumes(runs: dict, tmp_path: Path) -> None:
    ck = str(tmp_path / "ck-{step}.npz")
    procs = _launch(EXAMPLE, 2, "--float64", "--steps", "100000", "--save", ck, "--save-every", "2",
                    "--heartbeat-timeout", str(HEARTBEAT_S))
    try:
        lead = procs[0]
        for line in lead.stdout:  # wait until the run is under way
            if line.startswith('{"step": 5,'):
                break
        os.kill(procs[1].pid, signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = lead.communicate(timeout=HEARTBEAT_S + 60)
        waited = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert lead.returncode != 0
    assert waited < HEARTBEAT_S + 60
    assert "tasks are unhealthy (stopped sending heartbeats):\n1" in stderr, stderr[-3000:]
    # resume from the last checkpoint on one process: the single process's sequence continues
    last = max(int(f.stem.split("-")[1]) for f in tmp_path.glob("ck-*.npz"))
    assert 4 <= last < 20
    resumed = _run(1, "--float64", "--steps", str(20 - last), "--restore", ck.format(step=last), local_devices=1)
    assert _steps(resumed) == _steps(runs["single"])[last:]
    assert _rel(resumed[-1]["params"], runs["single"][-1]["params"]) < RTOL
