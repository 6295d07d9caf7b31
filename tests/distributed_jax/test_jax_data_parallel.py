"""Data-parallel CABS on JAX (issue 8): 4 host CPU devices against one device, resume, desync.

The multi-device run needs ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
before jax starts, so it runs once per module in a subprocess (``jax_dp_worker.py``,
bounded by a timeout, killed on expiry) and reports decisions and parameters as
JSON; the tests below check those values. Desync checks on digests run in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cabs_jax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cabs_core import CABSController, DesyncError
from cabs_core.loop import RunState, digest_words

WORKER = Path(__file__).with_name("jax_dp_worker.py")
TIMEOUT_S = 240  # a bound for a hung worker; it takes ~100 s on a busy 2-core machine
RTOL = 1e-10


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("jax_dp")
    out = tmp / "out.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    try:
        proc = subprocess.run(
            [sys.executable, str(WORKER), str(out), str(tmp)],
            env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
        )  # on timeout, subprocess.run kills the worker and waits for it
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the 4-device JAX worker did not finish within {TIMEOUT_S} s:\n{e.stderr}")
    assert proc.returncode == 0, f"the 4-device JAX worker failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


def _rel(a: list[float], b: list[float]) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_the_worker_ran_on_four_float64_devices(result: dict) -> None:
    assert result["device_count"] == 4 and result["x64"]


def test_four_devices_match_one_device_with_uneven_shards(result: dict) -> None:
    one, dp = result["sgd"]["single"], result["sgd"]["dp4"]
    assert dp["decisions"] == one["decisions"]
    assert len(set(dp["decisions"])) >= 3, "the decisions should vary in this test"
    assert any(b % 4 for b in dp["sizes"]), "some global batches should not split evenly over 4 devices"
    assert dp["seen"] == one["seen"] == sum(one["sizes"])
    # (digests differ: the averages differ in the last bits, the sums being added in another order)
    assert _rel(dp["params"], one["params"]) < RTOL
    assert _rel(one["params"], result["sgd"]["init_params"]) > 0.1  # the parameters did move
    assert dp["param_shardings_replicated"] and dp["param_devices"] == 4


def test_optax_generic_path_and_even_shards_match(result: dict) -> None:
    one, dp = result["momentum"]["single"], result["momentum"]["dp4"]
    assert dp["decisions"] == one["decisions"]
    assert all(b % 4 == 0 for b in dp["sizes"])
    assert _rel(dp["params"], one["params"]) < RTOL
    assert _rel(dp["opt"], one["opt"]) < RTOL


def test_global_batches_smaller_than_the_device_count(result: dict) -> None:
    one, dp = result["tiny"]["single"], result["tiny"]["dp4"]
    assert dp["decisions"] == one["decisions"]
    assert all(b < 4 for b in dp["sizes"])
    assert _rel(dp["params"], one["params"]) < RTOL


def test_at_most_one_compilation_per_device_bucket(result: dict) -> None:
    dp = result["sgd"]["dp4"]
    used = set(dp["per_device_sizes"])
    assert used <= set(dp["device_buckets"])
    assert dp["traces"] == len(used)  # 9 steps, several batch sizes, one program per bucket used
    assert result["momentum"]["dp4"]["traces"] <= 2


def test_resume_on_the_same_or_another_device_count(result: dict) -> None:
    full = result["sgd"]["dp4"]
    r = result["resume"]
    assert r["dp4"]["decisions"] == full["decisions"][4:]
    assert r["dp4"]["params"] == full["params"]  # same device count: bit for bit
    assert r["dp4"]["digest"] == full["digest"]
    for name in ("dp2", "single"):  # another split of the same global batches: same decisions, last bits
        assert r[name]["decisions"] == full["decisions"][4:], name
        assert r[name]["seen"] == full["seen"], name
        assert _rel(r[name]["params"], full["params"]) < RTOL, name
    assert r["dp2"]["world_size"] == 2


def test_linear_problem_matches_the_reference_loop_whole_and_in_micro_batches(result: dict) -> None:
    ref = result["linear"]["reference"]
    assert len(set(ref["decisions"])) > 3
    for name in ("dp4", "dp4_micro3"):
        dp = result["linear"][name]
        assert dp["decisions"] == ref["decisions"], name
        assert _rel(dp["params"], ref["params"]) < RTOL, name
    assert result["linear"]["dp4_micro3"]["traces"] <= 3  # at most 3 rows per device: buckets 1, 2, 3


def test_gathered_digests_that_differ_raise_desync_error() -> None:
    """The loop compares digests through the backend's gather (one process here: itself)."""
    x = np.random.default_rng(0).normal(size=(40, 3))
    ctrl = CABSController(lr=0.1, bs_min=2, bs_max=16)
    t = cabs_jax.DataParallelCABSTrainer(lambda w, e: 0.5 * (e @ w) ** 2, ctrl, x, check_every=3,
                                         mesh=cabs_jax.data_mesh(jax.devices()[:1]))
    assert t.loop.check_every == 3 and t.backend.processes == 1 and t.world_size == 1
    st, _ = t.step(t.init(jnp.ones(3)))
    run = RunState(st.controller, st.sampler)
    words = digest_words(t.loop.digest(run))
    np.testing.assert_array_equal(t.backend.gather(words), words[None])
    t.loop.check_sync(run)  # in sync
    t.backend.gather = lambda w: np.stack([w, w, w ^ 1, w])  # process 2 reports another state
    with pytest.raises(DesyncError, match=r"diverged at step 1: .*process 2: ") as e:
        t.loop.check_sync(run)
    assert e.value.step == 1 and e.value.names == [f"process {p}" for p in range(4)]
    with pytest.raises(ValueError, match="check_every"):
        cabs_jax.DataParallelCABSTrainer(lambda w, e: 0.5 * (e @ w) ** 2, ctrl, x, check_every=-1)
