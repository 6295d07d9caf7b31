"""Per-framework training behind one small protocol, so that the driver
(:mod:`cabs_experiments.run`) never imports a framework.

A backend module defines ``make_trainer(dataset, model, threads) -> Trainer``; see
:class:`Trainer` for what a trainer does. Models are described once,
framework-free, in :mod:`.models`; each backend builds the same layers.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Protocol

import numpy as np

from cabs_core import CABSController, StepInfo

from ..data import Dataset

BACKENDS = ("torch", "jax", "tensorflow")

#: the packages each backend imports (for the error when one is missing)
REQUIRES = {"torch": "torch (from a checkout: pip install '.[torch]')",
            "jax": "jax, flax (from a checkout: pip install '.[jax]')",
            "tensorflow": "tensorflow, keras (from a checkout: pip install '.[tf]')"}


class CABSRun(Protocol):
    """One CABS run through an adapter's ``CABSTrainer``: the adapter owns the step."""

    @property
    def batch_size(self) -> int:
        """The decided size of the next batch."""

    @property
    def examples_seen(self) -> int:
        """Examples drawn so far (the sampler's position)."""

    def step(self) -> StepInfo:
        """One CABS step (raises :class:`cabs_core.NonFiniteStatisticsError` under the default policy)."""


class Trainer(Protocol):
    """One model on one in-memory data set, stepped by the driver.

    The driver owns the SGD baselines' sampler and learning-rate schedule, the
    budget and logging; a CABS run is the adapter's own trainer (:meth:`cabs_run`).
    A trainer owns the parameters and does the arithmetic.
    """

    #: the number of trainable parameters (for the log)
    num_parameters: int

    def reset(self, seed: int) -> None:
        """(Re)initialise the parameters from ``seed``: every method starts from the same point."""

    def sgd_step(self, indices: np.ndarray, lr: float) -> float:
        """theta <- theta - lr * (mean gradient of the batch ``indices``); returns the batch's mean loss."""

    def cabs_run(self, controller: CABSController, seed: int) -> CABSRun:
        """The adapter's own CABS trainer on this trainer's parameters and training split,
        drawing batches with ``seed`` (the stream the SGD runs draw too)."""

    def evaluate(self, split: str, indices: np.ndarray | None = None) -> tuple[float, float]:
        """(mean loss, accuracy) over ``split`` ("train" or "test"), or the given subset of it."""


def make_trainer(backend: str, dataset: Dataset, model: str, threads: int | None = None) -> Trainer:
    """The trainer of ``backend`` (one of :data:`BACKENDS`) for ``model`` on ``dataset``.

    threads: CPU threads for the framework's operations (None: its default).
    Small models run faster on one thread, above all on a busy machine.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "jax" and threads == 1 and "jax" not in sys.modules:
        # XLA reads its CPU thread settings once, when jax starts
        flags = os.environ.get("XLA_FLAGS", "")
        if "multi_thread_eigen" not in flags:
            one = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
            os.environ["XLA_FLAGS"] = f"{flags} {one}".strip()
    try:
        module = importlib.import_module(f".{backend}", __name__)
    except ImportError as e:
        raise ImportError(f"backend {backend!r} needs {REQUIRES[backend]}: {e}") from e
    return module.make_trainer(dataset, model, threads)
