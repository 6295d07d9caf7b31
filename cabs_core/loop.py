"""The CABS step, written once for every framework (Algorithm 1 of Balles et al. 2017).

One step t, whatever the framework (docs/spec.md section 2):

1. **plan**: draw the decided m_t example indices from the sampler (or take the
   batch the caller passes), split them into micro-batches of at most
   ``max_micro_batch`` examples per shard, split each over the data-parallel
   shards (devices, replicas or ranks) and pad every shard to a common bucket
   (:func:`plan_batch`);
2. **statistics**: the adapter computes the exact sums of docs/spec.md section 4
   for each micro-batch on its devices; they add (:func:`cabs_core.combine`),
   across micro-batches and across workers, so the step sees the statistics of
   the whole batch whatever the split;
3. **decide**: one host copy of the four scalars (:class:`ScalarStats`) feeds
   :meth:`CABSController.update` with the learning rate in force;
4. **update**: unless the controller rejected the statistics as non-finite (the
   one non-finite policy: the parameters and optimizer state stay as they were),
   the adapter's optimizer takes the batch's mean gradient g_bar = grad_sum / m;
5. **agree**: every ``check_every`` steps the workers compare one digest of the
   controller's configuration, its state and the sampler's position
   (:class:`DesyncError` on every worker if they differ).

A framework supplies only what it alone can do, the small :class:`Backend`
protocol; :class:`CABSLoop` does the rest. Everything here is pure: a
:class:`RunState` and the framework's model state go in, new ones come out.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np

from . import checkpoint as _ckpt
from .controller import CABSController, ConfigError, ControllerState, StepInfo, check_digests
from .exactness import VERIFY_EVERY, verify_due
from .sampler import SamplerState, bucket_for, next_batch, shard, shard_buckets
from .stats import ScalarStats

CHECK_EVERY = 100
"""Default: compare the workers' digests every this many steps (0: never)."""


@dataclass(frozen=True)
class MicroBatch:
    """This process's part of one micro-batch: ``shards`` blocks of ``size`` rows.

    rows: indices into the source (the data set, or the batch the caller
    passed), shard s at ``[s * size, (s + 1) * size)``; padding rows repeat a
    real example (finite data). mask: True for the real rows. ``count`` real
    rows in all. Without padding (``mask.all()``) ``rows`` holds the examples in
    order.
    """

    rows: np.ndarray
    mask: np.ndarray
    shards: int
    size: int

    @property
    def count(self) -> int:
        return int(self.mask.sum())


def plan_batch(
    indices: np.ndarray,
    *,
    shards: int = 1,
    processes: int = 1,
    process_index: int = 0,
    buckets: Sequence[int] | None = None,
    max_micro_batch: int | None = None,
) -> list[MicroBatch]:
    """Split a global batch into micro-batches, shards and padding; this process's part.

    The global batch ``indices`` is cut into consecutive micro-batches of at most
    ``max_micro_batch`` examples per shard (None: one micro-batch). Each is
    split contiguously over ``processes * shards`` shards (:func:`shard`; process
    p owns shards ``[p * shards, (p + 1) * shards)``) and every shard is padded
    to one common size: the smallest of the per-shard ``buckets``
    (:func:`shard_buckets`, capped at ``max_micro_batch``) that holds it, or
    without buckets the largest shard. An empty batch gives one empty
    micro-batch (its statistics have count 0: a skipped step).
    """
    for name, v in (("shards", shards), ("processes", processes)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not 0 <= process_index < processes:
        raise ValueError(f"process_index must lie in [0, {processes}), got {process_index!r}")
    if max_micro_batch is not None and (
        not isinstance(max_micro_batch, (int, np.integer)) or isinstance(max_micro_batch, bool) or max_micro_batch < 1
    ):
        raise ValueError(f"max_micro_batch must be None or an integer >= 1, got {max_micro_batch!r}")
    indices = np.asarray(indices, np.int64)
    total = shards * processes
    if len(indices) == 0:
        return [MicroBatch(indices, np.zeros(0, bool), shards, 0)]
    if total == 1 and buckets is None and (max_micro_batch is None or len(indices) <= max_micro_batch):
        return [MicroBatch(indices, np.ones(len(indices), bool), 1, len(indices))]  # the common eager case
    per_shard = None if buckets is None else shard_buckets(buckets, total)
    if per_shard is not None and max_micro_batch is not None:
        per_shard = tuple(q for q in per_shard if q < max_micro_batch) + (int(max_micro_batch),)
    step = len(indices) if max_micro_batch is None else int(max_micro_batch) * total
    out = []
    for start in range(0, len(indices), step):
        chunk = indices[start : start + step]
        widest = -(-len(chunk) // total)
        size = widest if per_shard is None else bucket_for(widest, per_shard)
        rows, mask = [], []
        for s in range(process_index * shards, (process_index + 1) * shards):
            part = shard(chunk, total, s)
            rows.append(np.concatenate([part, np.full(size - len(part), chunk[0], np.int64)]))
            mask.append(np.arange(size) < len(part))
        out.append(MicroBatch(np.concatenate(rows), np.concatenate(mask), shards, size))
    return out


class Backend(Protocol):
    """What a framework supplies to :class:`CABSLoop` (see docs/porting.md).

    ``Model`` is whatever the framework threads through a step: a mutable
    module (returned unchanged after an in-place update) or a functional
    state such as JAX's ``(params, opt_state)``. ``Stats`` holds the sums of
    docs/spec.md section 4 on the device (e.g. a :class:`cabs_core.BatchStats`).

    shards: the shards this process drives (devices or replicas; 1 for one
    device); processes, process_index: the data-parallel workers (1 and 0 for
    one process); pads: whether shapes must be padded to buckets (compiled
    steps; an eager framework says False and is given unpadded batches when
    there is one shard).
    """

    shards: int
    processes: int
    process_index: int
    pads: bool

    def take(self, source: Any, rows: np.ndarray) -> Any:
        """Rows ``rows`` of ``source`` (the data set or the caller's batch), on the device."""
        ...

    def num_examples(self, source: Any) -> int:
        """The number of examples in ``source`` (its leading axis)."""
        ...

    def statistics(self, model: Any, batch: Any, micro: MicroBatch, *, verify: bool) -> Any:
        """The exact sums over the real rows of ``batch`` (``micro.mask``), summed over
        this process's shards; ``verify``: probe the fast path now (exactness)."""
        ...

    def combine(self, a: Any, b: Any) -> Any:
        """The sums of two disjoint micro-batches."""
        ...

    def all_reduce(self, stats: Any) -> Any:
        """The sums over all processes (identity for one process)."""
        ...

    def scalars(self, model: Any, stats: Any) -> tuple[ScalarStats, float | None]:
        """The four scalars m, sum l_i, S, ||sum g_i||^2 and the learning rate this
        step's update will use (the optimizer's, after any schedule; None for plain
        SGD at ``controller.lr``), in one host copy."""
        ...

    def apply(self, model: Any, stats: Any, lr: float) -> Any:
        """The update with the mean gradient ``grad_sum / max(count, 1)``; returns the model."""
        ...

    def gather(self, words: np.ndarray) -> np.ndarray:
        """Every process's ``words`` (int32, shape (k,)) as an array (processes, k); collective."""
        ...


class RunState(NamedTuple):
    """The controller's state and the sampler's position (None when the caller
    supplies the batches)."""

    controller: ControllerState
    sampler: SamplerState | None


def check_learning_rate(controller: CABSController, optimizer_lr: float | None) -> None:
    """Refuse an optimizer whose learning rate differs from ``controller.lr``.

    The rule m = c lr xi / L couples the batch size to the rate of the update;
    two rates (one in the optimizer, one in the controller) would decide with
    one and step with the other. After construction the optimizer's rate, as
    its schedule moves it, is the one both use."""
    if optimizer_lr is not None and not math.isclose(float(optimizer_lr), controller.lr, rel_tol=1e-6, abs_tol=0.0):
        raise ConfigError(
            "lr",
            f"the optimizer's learning rate {float(optimizer_lr)!r} differs from controller.lr {controller.lr!r}: "
            f"CABS couples the batch size to the rate the update uses; give both the same value",
        )


def digest_words(value: int) -> np.ndarray:
    """A 63-bit digest as three 21-bit int32 words: exact in int32 and float32/64
    collectives alike, so every framework gathers the same words."""
    if not 0 <= value < 2**63:
        raise ValueError(f"a digest is a 63-bit non-negative integer, got {value!r}")
    mask = (1 << 21) - 1
    return np.asarray([(value >> 42) & mask, (value >> 21) & mask, value & mask], np.int32)


def words_digest(words: Sequence[int] | np.ndarray) -> int:
    """The inverse of :func:`digest_words`."""
    a, b, c = (int(w) for w in words)
    return (a << 42) | (b << 21) | c


class CABSLoop:
    """The CABS training loop for one :class:`Backend` (see the module docstring).

    controller: the decisions. num_examples, seed: the data set the loop draws
    from (None: the caller passes every batch). buckets: padded sizes for a
    backend that pads (:meth:`CABSController.padding_buckets`).
    max_micro_batch: at most this many examples per shard in one pass; larger
    decisions are split and their statistics added (identical decisions and
    updates up to rounding). check_every: compare the workers' digests every
    so many steps (0: never; only with several processes). verify_every: the
    fast-path probe schedule passed to the backend (:func:`verify_due`).
    """

    def __init__(
        self,
        backend: Backend,
        controller: CABSController,
        *,
        num_examples: int | None = None,
        seed: int = 0,
        buckets: Sequence[int] | None = None,
        max_micro_batch: int | None = None,
        check_every: int = CHECK_EVERY,
        verify_every: int | None = VERIFY_EVERY,
    ) -> None:
        if not isinstance(controller, CABSController):
            raise TypeError(f"controller must be a cabs_core.CABSController, got {type(controller).__name__}")
        if not isinstance(check_every, (int, np.integer)) or isinstance(check_every, bool) or check_every < 0:
            raise ValueError(f"check_every must be an integer >= 0 (0: never), got {check_every!r}")
        verify_due(0, verify_every)  # validates it
        plan_batch(np.zeros(0, np.int64), max_micro_batch=max_micro_batch)  # validates it
        self.backend, self.controller = backend, controller
        self.num_examples, self.seed = num_examples, seed
        self.buckets = controller.padding_buckets(buckets) if backend.pads else None
        self.max_micro_batch, self.check_every, self.verify_every = max_micro_batch, int(check_every), verify_every
        self._config = json.dumps(_ckpt.controller_config(controller), sort_keys=True)

    def init(self) -> RunState:
        """The state before the first step."""
        sampler = None if self.num_examples is None else SamplerState(self.num_examples, self.seed)
        return RunState(self.controller.init(), sampler)

    def plan(self, run: RunState, batch: Any = None) -> tuple[list[MicroBatch], SamplerState | None]:
        """The micro-batches of the next step: drawn from the sampler, or the rows of ``batch``
        (this process's examples, split over its own shards)."""
        be = self.backend
        if batch is None:
            if run.sampler is None:
                raise ValueError("this loop has no data to draw from (num_examples=None): pass the batch")
            idx, sampler = next_batch(run.sampler, run.controller.batch_size)
            return plan_batch(idx, shards=be.shards, processes=be.processes, process_index=be.process_index,
                              buckets=self.buckets, max_micro_batch=self.max_micro_batch), sampler
        n = be.num_examples(batch)
        return plan_batch(np.arange(n), shards=be.shards, buckets=self.buckets,
                          max_micro_batch=self.max_micro_batch), run.sampler

    def step(self, run: RunState, model: Any, data: Any = None, *, batch: Any = None) -> tuple[RunState, Any, StepInfo]:
        """One CABS step with ``run.controller.batch_size`` examples drawn from ``data``
        (or the given ``batch``); returns the new run state, the model and what was decided."""
        micro, sampler = self.plan(run, batch)
        source = data if batch is None else batch
        verify = verify_due(run.controller.step, self.verify_every)
        stats = None
        for k, mb in enumerate(micro):
            s = self.backend.statistics(model, self.backend.take(source, mb.rows), mb, verify=verify and k == 0)
            stats = s if stats is None else self.backend.combine(stats, s)
        stats = self.backend.all_reduce(stats)
        scalars, lr = self.backend.scalars(model, stats)
        lr = self.controller.lr if lr is None else float(lr)
        cstate, info = self.controller.update(run.controller, scalars, lr=lr)
        if info.reason != "nonfinite":
            model = self.backend.apply(model, stats, lr)
        new = RunState(cstate, sampler)
        if self.check_every and self.backend.processes > 1 and cstate.step % self.check_every == 0:
            self.check_sync(new)
        return new, model, info

    # -- agreement across workers ----------------------------------------------------------
    def digest(self, run: RunState) -> int:
        """A 63-bit digest of the configuration, the controller state and the sampler position."""
        text = json.dumps([self._config, run.controller.to_dict(),
                           None if run.sampler is None else run.sampler.to_dict()], sort_keys=True)
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1

    def check_sync(self, run: RunState) -> None:
        """Raise :class:`cabs_core.DesyncError` on every process unless all agree (collective)."""
        table = np.asarray(self.backend.gather(digest_words(self.digest(run))))
        digests = [words_digest(row) for row in table.reshape(-1, 3)]
        check_digests(digests, run.controller.step, [f"process {p}" for p in range(len(digests))])

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self, run: RunState, **extra: Any) -> dict[str, Any]:
        """The checkpoint envelope of this run (:func:`cabs_core.checkpoint.envelope`)."""
        return _ckpt.envelope(self.controller, run.controller, run.sampler, **extra)

    def load_state_dict(
        self, d: dict[str, Any], *, allow: Sequence[str] = (), sampler: SamplerState | None = None
    ) -> RunState:
        """The run state of envelope ``d``, checked against this run's configuration
        (:class:`cabs_core.CheckpointMismatchError` naming every difference not in ``allow``).

        ``sampler``: the run's fresh sampler when the adapter keeps it outside the loop
        (e.g. a DataLoader's batch sampler); the restored position is then returned in
        ``RunState.sampler`` for the adapter to install. A checkpoint with a sampler
        position for a run that has none (or the reverse) is refused.
        """
        fresh = self.init().sampler if sampler is None else sampler
        if fresh is None and d.get("sampler") is not None:
            raise _ckpt.CheckpointMismatchError(
                ["sampler: the checkpoint has a sampler position, this run draws no batches (num_examples=None)"],
                "Give the run its data (or its batch sampler) before loading.",
            )
        controller, restored = _ckpt.restore(d, self.controller, fresh, allow=allow)
        return RunState(controller, restored)

    def save(self, path: str | os.PathLike[str], run: RunState, arrays: Sequence[Any], **extra: Any) -> None:
        """Write the envelope and the framework's arrays (parameters, optimizer
        state, in a fixed order) to one ``.npz`` file, atomically."""
        envelope = self.state_dict(run, **extra)
        buf = io.BytesIO()
        named: dict[str, Any] = {f"array_{k}": np.asarray(a) for k, a in enumerate(arrays)}
        named["envelope"], named["num_arrays"] = np.asarray(json.dumps(envelope)), np.asarray(len(arrays))
        np.savez(buf, **named)
        _ckpt.write_atomic(path, buf.getvalue())

    def load(
        self, path: str | os.PathLike[str], *, allow: Sequence[str] = (), sampler: SamplerState | None = None
    ) -> tuple[RunState, list[np.ndarray], dict[str, Any]]:
        """Read a :meth:`save` file: (run state, arrays, the envelope's extra entries);
        ``allow`` and ``sampler`` as in :meth:`load_state_dict`."""
        try:
            with np.load(os.fspath(path), allow_pickle=False) as f:
                envelope = json.loads(str(f["envelope"]))
                arrays = [f[f"array_{k}"] for k in range(int(f["num_arrays"]))]
        except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{os.fspath(path)}: not a CABS checkpoint file ({type(e).__name__}: {e})") from e
        if not isinstance(envelope, dict):
            raise ValueError(f"{os.fspath(path)}: not a CABS checkpoint file (its envelope is not a JSON object)")
        run = self.load_state_dict(envelope, allow=allow, sampler=sampler)
        extra = {k: v for k, v in envelope.items() if k not in ("format", "config", "controller", "sampler")}
        return run, arrays, extra


def check_arrays(path: str | os.PathLike[str], arrays: Sequence[np.ndarray], like: Sequence[Any]) -> None:
    """Refuse checkpoint ``arrays`` whose number or shapes differ from the model's (``like``)."""
    if len(arrays) != len(like):
        raise ValueError(f"{os.fspath(path)}: the checkpoint holds {len(arrays)} arrays, this model {len(like)}")
    for k, (a, t) in enumerate(zip(arrays, like)):
        shape = tuple(getattr(t, "shape", np.shape(t)))
        if tuple(a.shape) != shape:
            raise ValueError(
                f"{os.fspath(path)}: array {k} has shape {tuple(a.shape)} in the checkpoint, {shape} "
                f"in this model"
            )


def one_rate(rates: Iterable[float]) -> float:
    """The one learning rate of an optimizer's parameter groups (``rates``, one per group);
    refuses several (CABS couples the batch size to one rate)."""
    distinct = {float(r) for r in rates}
    if len(distinct) != 1:
        raise ValueError(f"every parameter group of the optimizer must have the same lr (CABS couples the batch "
                         f"size to one rate), got {sorted(distinct)}")
    return distinct.pop()


def split_arrays(tree: Any, is_array: Callable[[Any], bool]) -> tuple[Any, list[Any]]:
    """A nest of dicts, lists and tuples (e.g. an optimizer's state dict) as a JSON-able skeleton,
    each array (``is_array``) replaced by ``{"array": k}``, and the arrays in order of ``k``
    (for :meth:`CABSLoop.save`; :func:`join_arrays` puts them back)."""
    arrays: list[Any] = []

    def walk(t: Any) -> Any:
        if is_array(t):
            arrays.append(t)
            return {"array": len(arrays) - 1}
        if isinstance(t, dict):
            return {k: walk(v) for k, v in t.items()}
        return [walk(v) for v in t] if isinstance(t, (list, tuple)) else t

    return walk(tree), arrays


def join_arrays(skeleton: Any, arrays: Sequence[Any]) -> Any:
    """The inverse of :func:`split_arrays` (tuples come back as lists, keys as JSON left them)."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {"array"}:
            return arrays[int(skeleton["array"])]
        return {k: join_arrays(v, arrays) for k, v in skeleton.items()}
    return [join_arrays(v, arrays) for v in skeleton] if isinstance(skeleton, list) else skeleton
