"""The conformance vectors (every docs/spec.md section 5 case among them) with statistics as jax arrays."""

from __future__ import annotations

import json
import math
from importlib.resources import files

import cabs_jax
import jax.numpy as jnp
import numpy as np
import pytest

from cabs_core import BatchStats, CABSController, NonFiniteStatisticsError, SamplerState, next_batch, shard
from cabs_core.loop import plan_batch

VECTORS = sorted(p for p in files("cabs_conformance").joinpath("vectors").iterdir() if p.name.endswith(".json"))


def _num(v):
    return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}.get(v, v)


def _jax_stats(s: dict) -> BatchStats:
    return BatchStats(
        jnp.asarray(_num(s["count"]), jnp.float64),
        jnp.asarray(_num(s["loss_sum"]), jnp.float64),
        tuple(jnp.asarray([_num(v) for v in g], jnp.float64) for g in s["grad_sum"]),
        jnp.asarray(_num(s["sq_norm_sum"]), jnp.float64),
    )


def _close(actual, expected, tol) -> None:
    expected = _num(expected)
    if expected is None or isinstance(expected, float) and math.isinf(expected):
        assert actual == expected
    else:
        assert abs(actual - expected) <= tol["atol"] + tol["rtol"] * abs(expected), (actual, expected)


def test_vectors_are_found() -> None:
    assert len(VECTORS) > 20


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.name[:-5])
def test_conformance_vector(path) -> None:
    v = json.loads(path.read_text())
    if v["kind"] == "sampler":
        data = jnp.arange(v["num_examples"])  # gathering jax rows must give the indices themselves
        state = SamplerState(v["num_examples"], v["seed"])
        backend = cabs_jax.CABSTrainer(lambda p, e: p * e, CABSController(lr=0.1), data).backend
        for b, exp in zip(v["batch_sizes"], v["expect"]):
            idx, state = next_batch(state, b)
            (micro,) = plan_batch(idx)  # the trainer's loop plans, its backend gathers
            batch = backend.take(data, micro.rows)
            assert np.asarray(batch).tolist() == exp["indices"] and bool(np.all(micro.mask))
            got = [shard(np.asarray(batch), v["world_size"], r).tolist() for r in range(v["world_size"])]
            assert got == exp["shards"] and state.examples_seen == exp["examples_seen"]
        return
    config = dict(v["config"])
    if config["buckets"] is not None:
        config["buckets"] = tuple(config["buckets"])
    if v["expect_config_error"]:
        with pytest.raises(ValueError, match=v["expect_config_error"]["argument"]):
            CABSController(**config)
        return
    controller = CABSController(**config)
    state = controller.init()
    tol = v["tolerance"]
    for step in v["steps"]:
        exp = step["expect"]
        if "error" in exp:
            with pytest.raises(NonFiniteStatisticsError, match=exp["field"]):
                controller.update(state, _jax_stats(step["stats"]))
            return
        state, info = controller.update(state, _jax_stats(step["stats"]))
        assert (info.batch_size, info.skipped, info.reason, info.clamped) == (
            exp["batch_size"], exp["skipped"], exp["reason"], exp["clamped"])
        assert (state.updates, state.skipped, state.clamped, state.nonfinite) == (
            exp["updates"], exp["skipped_total"], exp["clamped_total"], exp["nonfinite_total"])
        for key in ("raw", "variance", "loss"):
            _close(getattr(info, key), exp[key], tol)
        _close(state.xi_avg, exp["xi_avg"], tol)
        _close(state.loss_avg, exp["loss_avg"], tol)
