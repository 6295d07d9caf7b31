"""What the data-parallel trainers share about their workers, whatever the framework:
the layout of shards over processes, one fast-path verdict for all, and naming the worker a failed collective lost
(:class:`WorkerLostError`, raised by :class:`cabs_core.trainer.Trainer` for the error
types an adapter declares)."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from .exactness import agree_on_path


class WorkerLostError(RuntimeError):
    """A collective of a multi-worker run failed or timed out: a worker was lost (``lost``: the
    indices named, empty when none could be named). The others cannot continue: restart every
    worker from the last checkpoint."""

    def __init__(self, message: str, lost: list[int]) -> None:
        super().__init__(message)
        self.lost = lost


class Cluster(NamedTuple):
    """A multi-worker run as a lost worker is named in it: this worker's job name (``task_type``),
    its index (``task_id``), the addresses ``host:port`` of the job's workers, and the collectives' timeout
    in seconds (None: none)."""

    task_type: str
    task_id: int
    addresses: list[str]
    timeout_s: float | None = None


_SAYS_WHY = ("abort", "fail", "timed out", "unhealthy", "refused", "reset")  # the line of an error to quote


def refuses(address: str, timeout_s: float = 1.0) -> bool:
    """Whether nothing listens at ``host:port`` any more (a dead worker; a hung one still accepts)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return False
    except OSError:
        return True


def lost_workers(message: str, task_type: str, me: int, addresses: list[str]) -> list[int]:
    """The peers a collective's error ``message`` names (``/job:T[/replica:0]/task:i`` or an address
    of the cluster), else those that no longer accept connections; never ``me``."""
    named = {int(i) for i in re.findall(rf"/job:{re.escape(task_type)}/(?:replica:\d+/)?task:(\d+)", message)}
    named |= {i for i, a in enumerate(addresses) if re.search(rf"(?<![\w.]){re.escape(a)}(?!\d)", message)}
    named.discard(me)
    if not named:
        named = {i for i, a in enumerate(addresses) if i != me and refuses(a)}
    return sorted(named)


def worker_lost(error: BaseException, what: str, cluster: Cluster) -> WorkerLostError:
    """The :class:`WorkerLostError` for a collective that failed with ``error`` during ``what``
    (e.g. ``"step 6"``): the workers it names (:func:`lost_workers`), the line of the error that
    says why, the timeout, and what to do."""
    task_type, me, addresses, timeout = cluster
    lost = lost_workers(str(error), task_type, me, addresses)
    who = (", ".join(f"{task_type} {i} ({addresses[i]})" for i in lost)
           or "a worker (none could be named: the error names none and every peer accepts connections)")
    bound = "no collective timeout" if timeout is None else f"collective timeout {timeout} s"
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    first = next((ln for ln in lines if any(w in ln.lower() for w in _SAYS_WHY)), lines[0] if lines else "")
    return WorkerLostError(
        f"{task_type} {me}: lost {who} during {what} (a collective failed with {type(error).__name__}: "
        f"{first[:300]}; {bound}). The other workers cannot continue: restart every "
        f"worker from the last checkpoint (trainer.restore), with the same or another number of workers.", lost)


def agreed_path(cache: dict[Any, str], key: Any, probe: Callable[[], str], gather: Callable[[np.ndarray], np.ndarray],
                *, processes: int, verify: bool) -> str:
    """The path of a step (``"fast"`` or ``"generic"``): ``probe()`` with one process; with several,
    :func:`cabs_core.agree_on_path` of every process's probe (a collective), kept in ``cache`` per
    ``key`` (e.g. a shard's size) and agreed on again when ``verify``."""
    if processes == 1:
        return probe()
    if verify or key not in cache:
        cache[key] = agree_on_path(probe, gather)
    return cache[key]


def process_shards(owners: Sequence[int], processes: int, process_index: int) -> int:
    """The number of shards (devices) each process drives, given the process that owns each
    device of a data-parallel axis in order; refuses a layout other than the loop's (the same
    number of devices per process, grouped in process order, :func:`cabs_core.loop.plan_batch`)."""
    owners = list(owners)
    shards = owners.count(process_index)
    if owners != [p for p in range(processes) for _ in range(shards)]:
        raise ValueError(f"the mesh must hold the same number of devices of every process, grouped in process "
                         f"order (the loop's shard layout); its devices belong to processes {owners}")
    return shards


__all__ = ["Cluster", "WorkerLostError", "agreed_path", "lost_workers", "process_shards", "refuses", "worker_lost"]
