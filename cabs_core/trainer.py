"""The stateful trainer every in-place framework shares (PyTorch, Keras): one
:class:`CABSLoop` run held in an object, with its steps, its checkpoints, its
agreement check and a sampler for the framework's own data loader.

An adapter's trainer subclasses :class:`Trainer`, builds its :class:`Backend`
and calls :meth:`Trainer._start`; it supplies only how its model's arrays go to
and come from a checkpoint (:meth:`Trainer._arrays`, :meth:`Trainer._load_arrays`).
A functional framework (JAX) threads :class:`RunState` itself and uses
:class:`CABSLoop` directly. :class:`BackendDefaults` holds the parts of a
:class:`Backend` that are the same in every framework; :class:`DecisionBatches`
and :func:`history` serve a loop of the caller's own and a ``fit``-like entry point.
A data-parallel trainer names the collective errors that mean a lost worker
(:attr:`Trainer.lost_errors`, :meth:`Trainer._cluster`; :mod:`cabs_core.workers`).
"""

from __future__ import annotations

import abc
import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from .controller import CABSController, StepInfo
from .loop import CABSLoop, RunState, plan_batch
from .sampler import SamplerState, next_batch, shard
from .stats import BatchStats, ScalarStats, combine, reduce_stats
from .workers import Cluster, worker_lost


class BackendDefaults:
    """The framework-neutral parts of a :class:`cabs_core.loop.Backend`: one process
    and one shard, :class:`BatchStats` added with :func:`cabs_core.combine`, no
    all-reduce, the scalars of :func:`cabs_core.reduce_stats`, plain SGD (no rate of
    its own). A data-parallel backend overrides what its collectives change."""

    shards, processes, process_index, pads = 1, 1, 0, False

    def combine(self, a: BatchStats, b: BatchStats) -> BatchStats:
        return combine(a, b)

    def all_reduce(self, stats: Any) -> Any:
        return stats

    def scalars(self, model: Any, stats: BatchStats) -> tuple[ScalarStats, float | None]:
        return reduce_stats(stats), None

    def gather(self, words: np.ndarray) -> np.ndarray:
        if self.processes != 1:
            raise NotImplementedError(f"{type(self).__name__} runs {self.processes} processes: it must gather")
        return np.asarray(words)[None]


class DecisionSampler:
    """Batches of the decided sizes for a data loader (e.g. PyTorch's ``batch_sampler``):
    ``batch_size()`` indices per batch from the core's sampler (:func:`cabs_core.next_batch`),
    this process's :func:`cabs_core.shard` of them; stops after ``max_epochs`` epochs or
    ``max_batches`` batches if given. Draw each batch after the step before it has decided
    (no workers drawing ahead)."""

    def __init__(self, num_examples: int, batch_size: Callable[[], int], *, seed: int = 0,
                 max_epochs: float | None = None, max_batches: int | None = None, world_size: int = 1,
                 rank: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size) = [0, {world_size}), got {rank}")
        self.state, self.batch_size, self.batches = SamplerState(num_examples, seed), batch_size, 0
        self.max_epochs, self.max_batches, self.world_size, self.rank = max_epochs, max_batches, world_size, rank

    def next_indices(self) -> np.ndarray:
        """The next batch of this process's example indices (int64), advancing the state."""
        idx, self.state = next_batch(self.state, int(self.batch_size()))
        self.batches += 1
        return shard(idx, self.world_size, self.rank)

    def __iter__(self) -> Iterator[Any]:
        while (self.max_epochs is None or self.state.epoch < self.max_epochs) and (
                self.max_batches is None or self.batches < self.max_batches):
            yield self.next_indices()

    def __len__(self) -> int:
        if self.max_batches is None:
            raise TypeError(f"a {type(self).__name__} without max_batches has no length (sizes are decided online)")
        return max(0, self.max_batches - self.batches)

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.state.to_dict(), "batches": self.batches}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        state = SamplerState.from_dict(d["sampler"])
        if state.num_examples != self.state.num_examples:
            raise ValueError(f"checkpoint is for {state.num_examples} examples, this sampler has "
                             f"{self.state.num_examples}")
        self.state, self.batches = state, int(d["batches"])


def take_rows(tree: Any, rows: np.ndarray) -> Any:
    """Rows ``rows`` (of the leading axis) of every array in a nest of tuples, lists and dicts,
    as NumPy arrays of the same nest."""
    if isinstance(tree, dict):
        return {k: take_rows(v, rows) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        parts = [take_rows(v, rows) for v in tree]
        return type(tree)(*parts) if hasattr(tree, "_fields") else type(tree)(parts)
    return np.take(np.asarray(tree), rows, axis=0)


def num_rows(tree: Any) -> int:
    """The number of examples (leading axis) of a nest's arrays; refuses a nest whose arrays differ."""
    sizes: set[int] = set()

    def visit(t: Any) -> None:
        if isinstance(t, (tuple, list, dict)):
            for v in t.values() if isinstance(t, dict) else t:
                visit(v)
        else:
            sizes.add(len(t))

    visit(tree)
    if len(sizes) != 1:
        raise ValueError(f"the data's arrays (x and y) must have the same number of examples, got {sorted(sizes)}")
    return sizes.pop()


class DecisionBatches:
    """Batches ``(*data, mask)`` whose size follows the decisions, for a loop of your own: the
    sampler's next ``batch_size`` examples of ``data`` (a tuple of host arrays, or nests of them),
    padded to ``buckets`` (padding repeats an example, with mask 0); seeded by ``seed``."""

    def __init__(self, data: tuple[Any, ...], *, buckets: Sequence[int] | None = None, seed: int = 0,
                 mask_dtype: str = "float32") -> None:
        self.data, self.buckets, self.mask_dtype = data, buckets, mask_dtype
        self.sampler = SamplerState(num_rows(data), seed)

    def next(self, batch_size: int) -> tuple[Any, ...]:
        """The next ``batch_size`` examples (padded) and their mask, advancing the sampler."""
        idx, self.sampler = next_batch(self.sampler, batch_size)
        (mb,) = plan_batch(idx, buckets=self.buckets)
        return (*take_rows(self.data, mb.rows), mb.mask.astype(self.mask_dtype))


def history(trainer: Trainer, steps: int, verbose: bool = False) -> dict[str, list[float]]:
    """``trainer.run(steps)`` logged as ``{"loss", "batch_size", "epoch"}`` per step (the loss
    NaN where a step had none); ``verbose``: print a line per step."""
    out: dict[str, list[float]] = {"loss": [], "batch_size": [], "epoch": []}

    def log(k: int, info: StepInfo) -> None:
        for key, v in zip(out, (float("nan") if info.loss is None else info.loss, info.batch_size, trainer.epoch)):
            out[key].append(v)
        if verbose:
            print(f"step {k + 1}: loss {info.loss} next batch {info.batch_size} epoch {trainer.epoch:.3f}")

    trainer.run(steps, log)
    return out


class Trainer(abc.ABC):
    """One CABS run (:class:`CABSLoop`) of a model updated in place.

    Attributes: ``model``, ``data`` (the examples :meth:`step` draws from, or None
    when the caller passes every batch), ``loop``, ``run_state``
    (:class:`RunState`: the controller's state and the sampler's position) and
    ``feeder`` (the :class:`DecisionSampler` of the caller's loader, if any).
    """

    model: Any = None
    data: Any = None
    loop: CABSLoop
    run_state: RunState
    feeder: DecisionSampler | None = None
    lost_errors: tuple[type[BaseException], ...] = ()
    """The errors of a collective that mean a lost worker (a data-parallel trainer sets them)."""

    def _cluster(self) -> Cluster | None:
        """The multi-worker run a lost worker is named in (None: one worker, nothing to name)."""
        return None

    @contextlib.contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        """Re-raise one of :attr:`lost_errors` of a multi-worker run as
        :class:`cabs_core.workers.WorkerLostError` naming the lost worker."""
        try:
            yield
        except self.lost_errors as e:
            cluster = self._cluster()
            if cluster is None:
                raise
            raise worker_lost(e, what, cluster) from e

    def _start(self, backend: Any, controller: CABSController, num_examples: int | None, seed: int,
               **options: Any) -> None:
        """A fresh run of ``backend`` (``options``: :class:`CABSLoop`'s)."""
        self.backend, self.seed, self._options = backend, seed, options
        self.loop = CABSLoop(backend, controller, num_examples=num_examples, seed=seed, **options)
        self.controller, self.run_state = controller, self.loop.init()

    state = property(lambda self: self.run_state.controller,
                     lambda self, s: setattr(self, "run_state", self.run_state._replace(controller=s)),
                     doc="The controller's :class:`ControllerState`.")
    batch_size = property(lambda self: self.run_state.controller.batch_size, doc="The next (global) batch's size.")
    sampler = property(lambda self: self.run_state.sampler if self.feeder is None else self.feeder.state,
                       doc="The sampler's position (None: no data).")
    examples_seen = property(lambda self: self.sampler.examples_seen, doc="Examples drawn so far.")
    epoch = property(lambda self: self.sampler.epoch, doc="Epochs drawn so far.")
    buckets = property(lambda self: self.loop.buckets, doc="The padded sizes of the whole batch.")

    def _step(self, batch: Any = None) -> StepInfo:
        """One step on ``batch`` (this process's examples) or, without one, on the decided
        number of examples drawn from ``data``."""
        if batch is None and self.data is None:
            raise ValueError("pass a batch to step(), or give the trainer its data")
        self._sync()
        with self._collective(f"step {self.run_state.controller.step + 1}"):
            self.run_state, self.model, info = self.loop.step(self.run_state, self.model, self.data, batch=batch)
        return info

    def run(self, steps: int, callback: Callable[[int, StepInfo], None] | None = None) -> list[StepInfo]:
        """``steps`` steps drawn from ``data``; ``callback(k, info)`` after each."""
        infos: list[StepInfo] = []
        for k in range(steps):
            infos.append(self._step())
            if callback is not None:
                callback(k, infos[-1])
        return infos

    # -- a sampler for the framework's own data loader ------------------------------------
    def _feed(self, sampler: DecisionSampler) -> DecisionSampler:
        """Draw the batches from ``sampler`` (a fresh one: its position becomes the run's,
        in checkpoints and digests); the controller's state is kept."""
        if self.data is not None:
            raise ValueError("this trainer draws from its own data: call step() without a batch")
        state = self.run_state.controller
        self._start(self.backend, self.controller, sampler.state.num_examples, sampler.state.seed, **self._options)
        self.state, self.feeder = state, sampler
        return sampler

    def _sync(self) -> None:
        if self.feeder is not None:
            self.run_state = self.run_state._replace(sampler=self.feeder.state)

    # -- agreement and checkpoints ---------------------------------------------------------
    def check_sync(self) -> None:
        """Raise :class:`cabs_core.DesyncError` on every process unless all agree (collective;
        nothing with one process or ``check_every=0``)."""
        if self.loop.check_every and self.backend.processes > 1:
            self._sync()
            with self._collective(f"the agreement check at step {self.run_state.controller.step}"):
                self.loop.check_sync(self.run_state)

    def _extra(self) -> dict[str, Any]:
        """Informative entries of the envelope (a data-parallel trainer adds its size)."""
        return {} if self.feeder is None else {"batches": self.feeder.batches}

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint envelope (controller, sampler; plain values)."""
        self._sync()
        return self.loop.state_dict(self.run_state, **self._extra())

    def load_state_dict(self, d: dict[str, Any], *, allow: Sequence[str] = ()) -> None:
        """Resume from :meth:`state_dict`; another configuration raises
        :class:`cabs_core.CheckpointMismatchError` unless its keys are in ``allow``."""
        self._loaded(self.loop.load_state_dict(d, allow=allow), d)

    def _loaded(self, run: RunState, extra: dict[str, Any]) -> None:
        self.run_state = run
        if self.feeder is not None and run.sampler is not None:
            self.feeder.state, self.feeder.batches = run.sampler, int(extra.get("batches", 0))
        self.check_sync()  # a checkpoint of any world size: then the processes must agree

    @abc.abstractmethod
    def _arrays(self) -> tuple[list[Any], dict[str, Any]]:
        """The model's (and optimizer's) arrays as host arrays, and extra envelope entries."""

    @abc.abstractmethod
    def _load_arrays(self, path: str | os.PathLike[str], arrays: list[np.ndarray], extra: dict[str, Any]) -> None:
        """Check checkpoint ``arrays`` (:func:`cabs_core.loop.check_arrays`) and put them back."""

    def save(self, path: str | os.PathLike[str]) -> None:
        """One ``.npz`` file, written atomically (:meth:`CABSLoop.save`): the envelope, then the
        model's arrays and the optimizer's."""
        arrays, extra = self._arrays()
        self._sync()
        self.loop.save(path, self.run_state, arrays, **extra, **self._extra())

    def restore(self, path: str | os.PathLike[str], *, allow: Sequence[str] = ()) -> None:
        """Load a :meth:`save` file into this trainer, its model and optimizer (all checked first);
        a changed configuration raises :class:`cabs_core.CheckpointMismatchError` unless its
        keys are in ``allow``."""
        run, arrays, extra = self.loop.load(path, allow=allow)
        self._load_arrays(path, arrays, extra)
        self._loaded(run, extra)


__all__ = ["BackendDefaults", "DecisionBatches", "DecisionSampler", "Trainer", "history", "num_rows", "take_rows"]
