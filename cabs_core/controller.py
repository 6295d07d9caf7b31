"""The smoothed CABS controller: optax-style ``init`` / ``update`` on an
immutable state.

Algorithm (docs/spec.md sections 2, 3 and 5; ``conformance/README.md`` step by step)::

    m, L_sum, S, G2  <- the step's statistics (one device-to-host copy)
    if not finite:     raise, or skip (policy ``nonfinite``)
    if m < 1 + ddof:   skip (variance undefined)
    L_hat = L_sum / m;  xi = max(0, (S - G2 / m) / (m - ddof))
    xi_avg <- mu xi_avg + (1 - mu) xi;  L_avg <- mu L_avg + (1 - mu) L_hat
    raw = c lr xi_avg / (L_avg - L* + eps)   (bias-corrected averages in paper mode)
    m_next = discretise(raw)

The decision is computed in float64 on the host from four scalars, so every
backend and device reaches the same decision from the same statistics.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

import numpy as np

from .rules import cabs_batch_size, discretise
from .sampler import geometric_buckets
from .stats import BatchStats, ScalarStats, reduce_stats, to_host
from .variance import within_batch_variance

Mode = Literal["paper", "reference"]
_STATE_FORMAT = "cabs-controller-state/1"


class ConfigError(ValueError):
    """An invalid controller configuration; ``argument`` names the offending key."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(message)
        self.argument = argument


class NonFiniteStatisticsError(FloatingPointError, ValueError):
    """A step's loss or gradient statistics are NaN or infinite."""

    def __init__(self, field_name: str, value: float, step: int) -> None:
        super().__init__(
            f"non-finite {field_name} = {value!r} at step {step}; the controller state is "
            f"unchanged. Check the loss and learning rate, or pass nonfinite='skip' to "
            f"skip such steps."
        )
        self.field = field_name
        self.value = value
        self.step = step


class DesyncError(RuntimeError):
    """Data-parallel workers whose controllers disagree: their decisions diverged."""

    def __init__(
        self, message: str, step: int | None = None, digests: Sequence[int] = (), names: Sequence[str] = ()
    ) -> None:
        super().__init__(message)
        self.step, self.digests, self.names = step, [int(d) for d in digests], list(names)


def check_digests(digests: Sequence[int], step: int, names: Sequence[str] | None = None) -> None:
    """Raise :class:`DesyncError` naming ``step`` unless every worker's
    :meth:`ControllerState.digest` in ``digests`` is the same. ``names`` labels
    them (default ``"worker 0"``, ...). Gathering the digests is the engine's job."""
    digests = [int(d) for d in digests]
    if not digests:
        raise ValueError("check_digests needs at least one digest")
    names = [f"worker {i}" for i in range(len(digests))] if names is None else list(names)
    if len(names) != len(digests):
        raise ValueError(f"got {len(digests)} digests but {len(names)} names")
    if any(d != digests[0] for d in digests[1:]):
        groups: dict[int, list[str]] = {}
        for d, n in zip(digests, names):
            groups.setdefault(d, []).append(n)
        parts = "; ".join(f"{', '.join(ns)}: {d:#018x}" for d, ns in groups.items())
        raise DesyncError(
            f"CABS controllers diverged at step {step}: their state digests differ ({parts}). The workers "
            f"no longer make the same batch-size decisions: check that every worker runs the same "
            f"controller configuration, seed and checkpoint, and that statistics are all-reduced before "
            f"controller.update.",
            step,
            digests,
            names,
        )


@dataclass(frozen=True)
class ControllerState:
    """Everything a resumed controller needs (all plain Python numbers).

    step: update calls; updates: accepted steps n; xi_avg, loss_avg: the
    exponential moving averages; batch_size: the decision in force;
    skipped, clamped, nonfinite: diagnostic counters.
    """

    step: int
    updates: int
    xi_avg: float
    loss_avg: float
    batch_size: int
    skipped: int = 0
    clamped: int = 0
    nonfinite: int = 0

    def to_dict(self) -> dict:
        return {"format": _STATE_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> ControllerState:
        if d.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a controller state (format {d.get('format')!r}, expected {_STATE_FORMAT!r})")
        kinds = {"xi_avg": float, "loss_avg": float}
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in d:
                raise ValueError(f"controller state is missing {f.name!r}")
            v = d[f.name]
            want = kinds.get(f.name, int)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (want is int and not isinstance(v, int)):
                raise ValueError(f"controller state field {f.name!r} must be {want.__name__}, got {v!r}")
            if not math.isfinite(v):
                raise ValueError(f"controller state field {f.name!r} is not finite: {v!r}")
            values[f.name] = want(v)
        return cls(**values)

    def to_json(self) -> str:
        """JSON text; floats are written so that they read back bit for bit."""
        return json.dumps(self.to_dict(), allow_nan=False)

    def digest(self) -> int:
        """A 63-bit fingerprint of the whole state (averages bit for bit, the
        decision, the counters). Data-parallel ranks compare digests to detect
        that their controllers have diverged (they must agree after every step)."""
        h = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).digest()
        return int.from_bytes(h[:8], "big") >> 1

    @classmethod
    def from_json(cls, text: str) -> ControllerState:
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class StepInfo:
    """What one :meth:`CABSController.update` saw and decided.

    ``raw``, ``variance`` (xi, after clamping) and ``loss`` (L_hat) are None
    for a skipped step; ``reason`` is then ``"count"`` or ``"nonfinite"``.
    """

    batch_size: int
    skipped: bool
    reason: str | None = None
    raw: float | None = None
    variance: float | None = None
    loss: float | None = None
    clamped: bool = False


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _finite_number(name: str, x: object) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)) or not math.isfinite(x):
        raise ConfigError(name, f"{name} must be a finite number, got {x!r}")
    return float(x)


@dataclass(frozen=True)
class CABSController:
    """CABS batch-size controller (Balles, Romero, Hennig 2017).

    lr: the SGD learning rate; the rule is proportional to it.
    bs_min, bs_max: bounds on the decision. mu: EMA constant of xi and L.
    c: multiplier on the rule. eps: added to the denominator.
    loss_floor: L*, the minimal loss (beyond the paper, which assumes 0).
    mode: "paper" (ddof 1, bias-corrected averages from 0) or "reference"
    (ddof 0, averages start at xi = 0 and L = 1: the authors' TF code).
    bs_init: the first batch size (default: bs_min, discretised). Like every
    decision it obeys ``multiple_of`` / ``buckets``; one that does not is refused.
    multiple_of / buckets: optional discretisation after clipping.
    nonfinite: "raise" (default) or "skip" steps with NaN/inf statistics.
    """

    lr: float
    bs_min: int = 16
    bs_max: int = 2048
    mu: float = 0.95
    c: float = 1.0
    eps: float = 0.0
    loss_floor: float = 0.0
    mode: Mode = "paper"
    bs_init: int | None = None
    multiple_of: int | None = None
    buckets: tuple[int, ...] | None = field(default=None)
    nonfinite: Literal["raise", "skip"] = "raise"

    def __post_init__(self) -> None:
        lr = _finite_number("lr", self.lr)
        if lr <= 0:
            raise ConfigError("lr", f"lr must be > 0, got {self.lr!r}")
        for name in ("bs_min", "bs_max"):
            if not _is_int(getattr(self, name)):
                raise ConfigError(name, f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.bs_min < 1:
            raise ConfigError("bs_min", f"bs_min must be >= 1, got {self.bs_min}")
        if self.bs_min > self.bs_max:
            raise ConfigError("bs_max", f"bs_min ({self.bs_min}) must be <= bs_max ({self.bs_max})")
        mu = _finite_number("mu", self.mu)
        if not 0.0 <= mu < 1.0:
            raise ConfigError("mu", f"mu must lie in [0, 1), got {self.mu!r}")
        if _finite_number("c", self.c) <= 0:
            raise ConfigError("c", f"c must be > 0, got {self.c!r}")
        if _finite_number("eps", self.eps) < 0:
            raise ConfigError("eps", f"eps must be >= 0, got {self.eps!r}")
        _finite_number("loss_floor", self.loss_floor)
        if self.mode not in ("paper", "reference"):
            raise ConfigError("mode", f"mode must be 'paper' or 'reference', got {self.mode!r}")
        if self.bs_init is not None and (not _is_int(self.bs_init) or not self.bs_min <= self.bs_init <= self.bs_max):
            raise ConfigError(
                "bs_init",
                f"bs_init must be an integer in [bs_min, bs_max] = [{self.bs_min}, {self.bs_max}], "
                f"got {self.bs_init!r}",
            )
        if self.multiple_of is not None:
            k = self.multiple_of
            if not _is_int(k) or k < 1:
                raise ConfigError("multiple_of", f"multiple_of must be an integer >= 1, got {k!r}")
            if self.bs_max // k * k < self.bs_min:
                raise ConfigError(
                    "multiple_of",
                    f"multiple_of={k} has no multiple in [bs_min, bs_max] = [{self.bs_min}, {self.bs_max}]",
                )
        if self.buckets is not None:
            b = self.buckets
            if self.multiple_of is not None:
                raise ConfigError("buckets", "buckets and multiple_of exclude each other; give one")
            if isinstance(b, (str, bytes)) or not isinstance(b, Sequence) or len(b) == 0:
                raise ConfigError("buckets", f"buckets must be a non-empty sequence of integers, got {b!r}")
            if not all(_is_int(q) for q in b) or any(q2 <= q1 for q1, q2 in zip(b, b[1:])):
                raise ConfigError("buckets", f"buckets must be strictly increasing integers, got {b!r}")
            if b[0] < self.bs_min or b[-1] > self.bs_max:
                raise ConfigError(
                    "buckets", f"buckets must lie in [bs_min, bs_max] = [{self.bs_min}, {self.bs_max}], got {b!r}"
                )
            object.__setattr__(self, "buckets", tuple(int(q) for q in b))
        if self.nonfinite not in ("raise", "skip"):
            raise ConfigError("nonfinite", f"nonfinite must be 'raise' or 'skip', got {self.nonfinite!r}")
        # plain Python numbers from here on (NumPy scalars would break to_json and digest)
        for name in ("lr", "mu", "c", "eps", "loss_floor"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("bs_min", "bs_max", "bs_init", "multiple_of"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))
        if self.bs_init is not None and self.discretise(self.bs_init) != self.bs_init:
            allowed = f"a multiple of {self.multiple_of}" if self.multiple_of is not None else f"one of {self.buckets}"
            raise ConfigError(
                "bs_init",
                f"bs_init={self.bs_init} is not a batch size this controller can decide: it must be {allowed} "
                f"(e.g. {self.discretise(self.bs_init)}), like every other decision",
            )

    def discretise(self, raw: float) -> int:
        """The decision for a raw size: clip to [bs_min, bs_max], round half to even, then
        ``multiple_of`` / ``buckets`` (:func:`cabs_core.discretise` with this configuration)."""
        return discretise(raw, self.bs_min, self.bs_max, self.multiple_of, self.buckets)

    @property
    def ddof(self) -> int:
        """1 (the paper's unbiased estimator) or 0 (the reference implementation)."""
        return 1 if self.mode == "paper" else 0

    def padding_buckets(self, buckets: Sequence[int] | None = None) -> tuple[int, ...]:
        """The batch sizes a compiled step pads to (one program each): this
        controller's own ``buckets`` (decisions are then buckets and nothing is
        padded), else ``buckets``, else :func:`cabs_core.geometric_buckets`."""
        if self.buckets is not None:
            return self.buckets
        if buckets is None:
            return geometric_buckets(self.bs_min, self.bs_max)
        b = tuple(int(q) for q in buckets)
        if not b or b[0] < 1 or any(q2 <= q1 for q1, q2 in zip(b, b[1:])):
            raise ValueError(f"buckets must be strictly increasing positive integers, got {b}")
        if b[-1] < self.bs_max:
            raise ValueError(f"the largest bucket {b[-1]} is below bs_max = {self.bs_max}: every decision needs one")
        return b

    def init(self) -> ControllerState:
        """The state before the first step: averages as the mode says; the first
        batch size is ``bs_init``, by default the smallest size the
        discretisation allows (``bs_min`` without ``multiple_of``/``buckets``)."""
        bs = self.discretise(self.bs_min if self.bs_init is None else self.bs_init)
        return ControllerState(
            step=0, updates=0, xi_avg=0.0, loss_avg=0.0 if self.mode == "paper" else 1.0, batch_size=bs
        )

    def _nonfinite(self, state: ControllerState, name: str, value: float) -> tuple[ControllerState, StepInfo]:
        """The ``nonfinite`` policy for step ``state.step + 1``: raise, or skip and count it."""
        if self.nonfinite == "raise":
            raise NonFiniteStatisticsError(name, value, state.step + 1)
        new = replace(state, step=state.step + 1, skipped=state.skipped + 1, nonfinite=state.nonfinite + 1)
        return new, StepInfo(state.batch_size, skipped=True, reason="nonfinite")

    def update(
        self, state: ControllerState, stats: BatchStats | ScalarStats, *, lr: float | None = None
    ) -> tuple[ControllerState, StepInfo]:
        """One step: fold this batch's statistics into the averages and decide
        the next batch size. Pure: ``state`` is not modified. ``lr``: the
        learning rate in force for the next step when a schedule moves it
        (default ``self.lr``); the decision is proportional to it."""
        if lr is None:
            lr = self.lr
        elif isinstance(lr, bool) or not isinstance(lr, (int, float, np.integer, np.floating)) or not (
            math.isfinite(lr) and lr >= 0
        ):
            raise ConfigError("lr", f"the learning rate passed to update must be a finite number >= 0, got {lr!r}")
        with np.errstate(over="ignore", invalid="ignore"):  # overflow shows as inf, handled by name below
            s = reduce_stats(stats) if isinstance(stats, BatchStats) else stats
            m, loss_sum, sq_norm_sum, g2 = to_host(s)
        step = state.step + 1
        for name, v in (("count", m), ("loss_sum", loss_sum), ("sq_norm_sum", sq_norm_sum), ("grad_sum", g2)):
            if not math.isfinite(v):
                return self._nonfinite(state, name, v)
        if m < 1 or m < 1 + self.ddof:
            new = replace(state, step=step, skipped=state.skipped + 1)
            return new, StepInfo(state.batch_size, skipped=True, reason="count")

        loss = loss_sum / m
        with np.errstate(over="ignore", invalid="ignore"):
            xi = float(within_batch_variance(ScalarStats(m, loss_sum, sq_norm_sum, g2), self.ddof))
            clamped = xi < 0
            xi = max(xi, 0.0)
            xi_avg = self.mu * state.xi_avg + (1 - self.mu) * xi
            loss_avg = self.mu * state.loss_avg + (1 - self.mu) * loss
            updates = state.updates + 1
            debias = 1.0 - self.mu**updates if self.mode == "paper" else 1.0
            raw = float(
                cabs_batch_size(
                    float(lr),
                    np.float64(xi_avg / debias),
                    np.float64(loss_avg / debias),
                    c=self.c,
                    loss_floor=self.loss_floor,
                    eps=self.eps,
                )
            )
        # finite statistics so large that a derived quantity overflows: the same policy
        # as non-finite statistics (raw = +inf alone is a valid decision, bs_max)
        for name, v in (("variance", xi), ("xi_avg", xi_avg), ("loss_avg", loss_avg), ("raw", raw)):
            if math.isnan(v) or (name != "raw" and not math.isfinite(v)):
                return self._nonfinite(state, name, v)
        bs = self.discretise(raw)
        new = ControllerState(
            step=step,
            updates=updates,
            xi_avg=xi_avg,
            loss_avg=loss_avg,
            batch_size=bs,
            skipped=state.skipped,
            clamped=state.clamped + int(clamped),
            nonfinite=state.nonfinite,
        )
        return new, StepInfo(bs, skipped=False, raw=raw, variance=xi, loss=loss, clamped=clamped)
