"""Launching ranks for the data-parallel tests: subprocesses with torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, a free
MASTER_PORT), gloo on the CPU, one thread each, a hard timeout, and every
process killed and reaped whatever happens."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
WORKER = HERE / "worker.py"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LaunchError(RuntimeError):
    pass


def start(scenario: str, out: Path, *args: str, world_size: int = 2) -> list[subprocess.Popen]:
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = {
            **os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
        }
        with open(out / f"log{rank}.txt", "w") as log:
            procs.append(subprocess.Popen([sys.executable, str(WORKER), scenario, str(out), *args], env=env,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    """Kill (by pid) and reap every process still running."""
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait(timeout=30)


def wait(procs: list[subprocess.Popen], out: Path, timeout: float) -> None:
    """Wait for all ranks; on a failure or the timeout kill them all and raise with their logs."""
    deadline = time.monotonic() + timeout
    try:
        while None in [p.poll() for p in procs]:
            failed = [p for p in procs if p.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                why = f"timed out after {timeout:.0f} s" if not failed else "a rank failed"
                raise LaunchError(why + "\n" + logs(out, len(procs)))
            time.sleep(0.1)
        if any(p.returncode != 0 for p in procs):
            raise LaunchError(f"exit codes {[p.returncode for p in procs]}\n" + logs(out, len(procs)))
    finally:
        stop(procs)


def logs(out: Path, world_size: int) -> str:
    return "\n".join(f"--- rank {r}:\n" + (out / f"log{r}.txt").read_text()[-3000:] for r in range(world_size))


def launch(scenario: str, out: Path, *args: str, world_size: int = 2, timeout: float = 240) -> list[dict[str, Any]]:
    wait(start(scenario, out, *args, world_size=world_size), out, timeout)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]
