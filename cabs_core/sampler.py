"""A framework-free stream of example indices whose batch size changes every step.

The sampler's whole state is ``(num_examples N, seed, examples_seen s)``. The
examples form an endless stream: epoch e is a permutation of 0..N-1 fixed by
``(seed, e)``, and a batch of size b takes the next b positions of the stream.

Epoch boundaries: a batch that crosses one finishes the old epoch and continues
with the new epoch's order. So every example is seen exactly once per epoch,
batch sizes are exactly the decided ones, and ``epoch = s / N`` is a float.
(A batch larger than N spans several epochs and holds some example twice.)

The permutation is defined with SplitMix64 keys (``conformance/README.md``),
not NumPy's generator, so that a port in any language draws the same examples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_STATE_FORMAT = "cabs-sampler-state/1"


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function, elementwise on uint64 (wrapping mod 2^64)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


@lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """0..N-1 sorted by key(seed, epoch, i), ties by i (read-only int64 array)."""
    with np.errstate(over="ignore"):
        base = splitmix64(splitmix64(np.asarray([seed], dtype=np.uint64)) + np.uint64(epoch))
        keys = splitmix64(base + np.arange(num_examples, dtype=np.uint64))
    perm = np.argsort(keys, kind="stable").astype(np.int64)
    perm.flags.writeable = False
    return perm


@dataclass(frozen=True)
class SamplerState:
    """Position in the example stream; checkpoint it with :meth:`to_dict`."""

    num_examples: int
    seed: int = 0
    examples_seen: int = 0

    def __post_init__(self) -> None:
        for name, lo in (("num_examples", 1), ("seed", 0), ("examples_seen", 0)):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if self.seed >= 2**64:
            raise ValueError(f"seed must be < 2**64, got {self.seed}")

    @property
    def epoch(self) -> float:
        """Epochs completed, as a float: examples_seen / num_examples."""
        return self.examples_seen / self.num_examples

    def to_dict(self) -> dict:
        return {
            "format": _STATE_FORMAT,
            "num_examples": int(self.num_examples),
            "seed": int(self.seed),
            "examples_seen": int(self.examples_seen),
        }

    @classmethod
    def from_dict(cls, d: dict) -> SamplerState:
        if d.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a sampler state (format {d.get('format')!r}, expected {_STATE_FORMAT!r})")
        return cls(d["num_examples"], d["seed"], d["examples_seen"])


def next_batch(state: SamplerState, batch_size: int) -> tuple[np.ndarray, SamplerState]:
    """The next ``batch_size`` example indices (int64) and the advanced state."""
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    n, s = state.num_examples, state.examples_seen
    pos = np.arange(s, s + int(batch_size), dtype=np.int64)
    epochs, offsets = np.divmod(pos, n)
    out = np.empty(int(batch_size), dtype=np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = epoch_permutation(int(state.seed), int(e), int(n))[offsets[sel]]
    return out, replace(state, examples_seen=s + int(batch_size))


def shard(indices: np.ndarray, world_size: int, rank: int) -> np.ndarray:
    """Rank ``rank``'s contiguous share of a global batch split over ``world_size``
    workers: the first ``len % world_size`` ranks get one example more."""
    if not isinstance(world_size, (int, np.integer)) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
    b = len(indices)
    base, extra = divmod(b, world_size)
    start = rank * base + min(rank, extra)
    return indices[start : start + base + (1 if rank < extra else 0)]


def geometric_buckets(bs_min: int, bs_max: int, ratio: float = 2.0) -> tuple[int, ...]:
    """bs_min, ceil(bs_min * ratio), ..., bs_max: the padded batch sizes of a
    compiled step (one compilation each; padding wastes less than ratio - 1).
    Pass them as the controller's ``buckets`` to make padding unnecessary."""
    for name, v in (("bs_min", bs_min), ("bs_max", bs_max)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if bs_min > bs_max:
        raise ValueError(f"bs_min ({bs_min}) must be <= bs_max ({bs_max})")
    if not ratio > 1:
        raise ValueError(f"ratio must be > 1, got {ratio!r}")
    out, b = [], int(bs_min)
    while b < bs_max:
        out.append(b)
        b = max(math.ceil(b * ratio), b + 1)
    return (*out, int(bs_max))


def bucket_for(batch_size: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= batch_size: the size a batch is padded to."""
    for b in buckets:
        if b >= batch_size:
            return int(b)
    raise ValueError(f"batch size {batch_size} exceeds the largest bucket {buckets[-1]}; add a larger bucket")


def pad_indices(indices: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``indices`` padded to ``size`` with copies of the first index (real,
    finite data) and the 0/1 mask (bool) that marks the real examples."""
    m = len(indices)
    if m < 1 or m > size:
        raise ValueError(f"cannot pad a batch of {m} indices to size {size}")
    padded = np.concatenate([np.asarray(indices, np.int64), np.full(size - m, indices[0], np.int64)])
    return padded, np.arange(size) < m


def shard_buckets(buckets: Sequence[int], world_size: int) -> tuple[int, ...]:
    """Per-worker padded sizes ceil(q / world_size) for global ``buckets`` q: a
    global batch b <= q has shards of at most ceil(b / world_size) examples, so
    there is at most one compiled program per global bucket."""
    if not isinstance(world_size, (int, np.integer)) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    return tuple(sorted({-(-int(q) // int(world_size)) for q in buckets}))


def padded_shards(indices: np.ndarray, world_size: int, buckets: Sequence[int]) -> tuple[np.ndarray, np.ndarray, int]:
    """A global batch split with :func:`shard` and every shard padded to one
    per-worker bucket (from ``buckets``, e.g. :func:`shard_buckets`).

    Returns (indices, mask, size): arrays of length world_size * size, worker
    r's rows at [r * size, (r + 1) * size). A shard left empty (a global batch
    smaller than world_size) is all padding, copies of a real example, mask 0.
    """
    if len(indices) < 1:
        raise ValueError("cannot shard an empty batch")
    size = bucket_for(-(-len(indices) // world_size), buckets)
    idx, mask = [], []
    for r in range(world_size):
        part = shard(indices, world_size, r)
        if len(part) == 0:
            i, k = np.full(size, indices[0], np.int64), np.zeros(size, bool)
        else:
            i, k = pad_indices(part, size)
        idx.append(i)
        mask.append(k)
    return np.concatenate(idx), np.concatenate(mask), size
