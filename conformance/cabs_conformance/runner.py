"""Feed conformance vectors through ``cabs_core`` on one backend's arrays.

The format and the semantics are in ``conformance/README.md``. A vector passes
when every expected value matches (decisions and counters exactly, floats
within the vector's tolerance).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

import cabs_core
from cabs_core import BatchStats, CABSController, ConfigError, NonFiniteStatisticsError, ScalarStats

from .backends import Backend

FORMAT = "cabs-conformance/1"
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class VectorFormatError(ValueError):
    """A vector file that does not follow conformance/README.md."""


@dataclass(frozen=True)
class Result:
    name: str
    kind: str
    checked: int  # steps or batches compared
    passed: bool
    detail: str = ""  # the first mismatch


def decode(x: Any) -> Any:
    """JSON value -> Python, with "NaN"/"Infinity"/"-Infinity" as floats."""
    if isinstance(x, str) and x in _NONFINITE:
        return _NONFINITE[x]
    if isinstance(x, list):
        return [decode(v) for v in x]
    if isinstance(x, dict):
        return {k: decode(v) for k, v in x.items()}
    return x


def builtin_vectors() -> list[Path]:
    """The vectors shipped with this package, sorted by name."""
    root = resources.files("cabs_conformance") / "vectors"
    return sorted(Path(str(p)) for p in root.iterdir() if p.name.endswith(".json"))


def load(path: Path) -> dict:
    try:
        v = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise VectorFormatError(f"{path}: cannot read a JSON vector: {e}") from e
    if not isinstance(v, dict) or v.get("format") != FORMAT:
        raise VectorFormatError(f"{path}: not a {FORMAT} vector (format {v.get('format')!r})")
    for key in ("kind", "name"):
        if key not in v:
            raise VectorFormatError(f"{path}: missing key {key!r}")
    if v["kind"] not in ("controller", "sampler"):
        raise VectorFormatError(f"{path}: unknown kind {v['kind']!r}")
    return v


def _stats(backend: Backend, s: dict) -> BatchStats | ScalarStats:
    f64 = np.float64
    if backend.xp is None:  # TensorFlow: reduce on its device, one host copy of 4 scalars
        import tensorflow as tf

        g2 = tf.add_n([tf.reduce_sum(tf.square(backend.asarray(np.asarray(g, f64)))) for g in s["grad_sum"]])
        vec = tf.stack([backend.asarray(f64(s[k])) for k in ("count", "loss_sum", "sq_norm_sum")] + [g2])
        return ScalarStats.from_vector(backend.to_numpy(vec))
    return BatchStats(
        count=backend.asarray(f64(s["count"])),
        loss_sum=backend.asarray(f64(s["loss_sum"])),
        grad_sum=tuple(backend.asarray(np.asarray(g, f64)) for g in s["grad_sum"]),
        sq_norm_sum=backend.asarray(f64(s["sq_norm_sum"])),
    )


def _close(actual: float | None, expected: float | None, rtol: float, atol: float) -> bool:
    if expected is None or actual is None:
        return actual is expected
    if math.isinf(expected) or math.isinf(actual):
        return actual == expected
    return abs(actual - expected) <= atol + rtol * abs(expected)


def _compare_step(got: dict, want: dict, rtol: float, atol: float) -> str:
    for key, value in want.items():
        if key not in got:
            raise VectorFormatError(f"unknown expected key {key!r}")
        a = got[key]
        ok = _close(a, value, rtol, atol) if key in _FLOAT_KEYS else a == value
        if not ok:
            return f"{key}: got {a!r}, expected {value!r}"
    return ""


_FLOAT_KEYS = {"raw", "variance", "loss", "xi_avg", "loss_avg"}


def run_controller(v: dict, backend: Backend) -> Result:
    name, tol = v["name"], v.get("tolerance", {})
    rtol, atol = float(tol.get("rtol", 1e-12)), float(tol.get("atol", 0.0))
    config, expect_error = decode(v["config"]), v.get("expect_config_error")
    if config.get("buckets") is not None:
        config["buckets"] = tuple(config["buckets"])
    try:
        ctl = CABSController(**config)
    except ConfigError as e:
        if expect_error and e.argument == expect_error["argument"]:
            return Result(name, "controller", 1, True)
        want = expect_error["argument"] if expect_error else "no error"
        return Result(name, "controller", 1, False, f"config error on {e.argument!r} ({e}); expected {want}")
    if expect_error:
        return Result(name, "controller", 1, False, f"no config error; expected one on {expect_error['argument']!r}")
    state = ctl.init()
    for t, step in enumerate(v["steps"], 1):
        want = step["expect"]
        stats = _stats(backend, decode(step["stats"]))
        try:
            state, info = ctl.update(state, stats)
        except NonFiniteStatisticsError as e:
            if want.get("error") == "nonfinite" and e.field == want.get("field"):
                return Result(name, "controller", t, True)
            return Result(name, "controller", t, False, f"step {t}: unexpected error on {e.field!r}: {e}")
        if "error" in want:
            return Result(name, "controller", t, False, f"step {t}: no error; expected one on {want.get('field')!r}")
        got = {
            "skipped": info.skipped,
            "reason": info.reason,
            "variance": info.variance,
            "loss": info.loss,
            "clamped": info.clamped,
            "raw": info.raw,
            "batch_size": info.batch_size,
            "xi_avg": state.xi_avg,
            "loss_avg": state.loss_avg,
            "updates": state.updates,
            "skipped_total": state.skipped,
            "clamped_total": state.clamped,
            "nonfinite_total": state.nonfinite,
        }
        problem = _compare_step(got, decode(want), rtol, atol)
        if problem:
            return Result(name, "controller", t, False, f"step {t}: {problem}")
    return Result(name, "controller", len(v["steps"]), True)


def run_sampler(v: dict) -> Result:
    name = v["name"]
    state = cabs_core.SamplerState(v["num_examples"], v["seed"])
    world = v.get("world_size", 1)
    for t, (b, want) in enumerate(zip(v["batch_sizes"], v["expect"]), 1):
        idx, state = cabs_core.next_batch(state, b)
        got = {
            "indices": idx.tolist(),
            "shards": [cabs_core.shard(idx, world, r).tolist() for r in range(world)],
            "examples_seen": state.examples_seen,
            "epoch": state.epoch,
        }
        for key, value in want.items():
            ok = math.isclose(got[key], value, rel_tol=1e-15) if key == "epoch" else got[key] == value
            if not ok:
                return Result(name, "sampler", t, False, f"batch {t}: {key} differs")
    return Result(name, "sampler", len(v["batch_sizes"]), True)


def run(paths: list[Path], backend: Backend) -> Iterator[Result]:
    for path in paths:
        v = load(path)
        try:
            yield run_controller(v, backend) if v["kind"] == "controller" else run_sampler(v)
        except Exception as e:  # an implementation that crashes fails this vector; the others still run
            yield Result(v["name"], v["kind"], 0, False, f"unexpected {type(e).__name__}: {e}")
