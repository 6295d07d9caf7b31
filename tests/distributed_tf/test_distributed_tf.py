"""Data-parallel CABS on tf.distribute.MirroredStrategy over 2 logical CPU devices.

The logical devices must be configured before TensorFlow initialises its
devices, so the distributed runs happen in one fresh subprocess
(``mirrored_scenarios.py``, bounded by a timeout) and the checks here read
the values it wrote. The digest check itself is also tested in-process.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 240  # a loaded 2-core machine took 120 s (25 s of CPU)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mirrored") / "out.json"
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    try:
        proc = subprocess.run(
            [sys.executable, os.path.join(HERE, "mirrored_scenarios.py"), str(out)],
            capture_output=True, text=True, timeout=TIMEOUT_S, env=env,
        )  # on timeout subprocess.run kills the child before raising
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"mirrored_scenarios.py ran longer than {TIMEOUT_S}s: {str(e.stderr)[-2000:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


def _close(a, b):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-10, atol=1e-13)


def _same_decisions(a, b):
    assert [i[:2] for i in a] == [i[:2] for i in b]  # batch size and skipped, exactly
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x[2:], y[2:], rtol=1e-10)  # variance and loss


def _same_state(a, b):
    exact = {k: v for k, v in a.items() if k not in ("xi_avg", "loss_avg")}
    assert exact == {k: v for k, v in b.items() if k not in ("xi_avg", "loss_avg")}
    np.testing.assert_allclose([a["xi_avg"], a["loss_avg"]], [b["xi_avg"], b["loss_avg"]], rtol=1e-12)


def test_two_replicas_match_the_single_device_run(run):
    assert run["replicas"] == 2 and len(run["devices"]) == 2
    _same_decisions(run["dist"], run["single"])
    _close(run["dist_weights"], run["single_weights"])
    _same_state(run["dist_state"], run["single_state"])
    sizes = run["batch_sizes_used"]
    assert len(set(sizes)) >= 3  # the decisions move: the comparison covers several batch sizes
    assert any(b % 2 for b in sizes)  # and uneven shards (first len % 2 ranks get one more)
    assert run["dist_sampler"]["examples_seen"] == sum(sizes)  # one global stream


def test_every_replica_holds_the_same_weights(run):
    for copies in run["dist_replica_copies"] + run["resume2_replica_copies"]:
        assert copies[0] == copies[1]  # bit for bit: the same all-reduced update everywhere


def test_at_most_one_trace_per_bucket(run):
    buckets, shard_buckets = run["buckets"], run["shard_buckets"]
    assert shard_buckets == sorted({-(-q // 2) for q in buckets})
    visited = {min(q for q in buckets if q >= b) for b in run["batch_sizes_used"]}
    visited_shards = {min(q for q in shard_buckets if q >= -(-b // 2)) for b in run["batch_sizes_used"]}
    assert run["trace_count"] == len(visited_shards) <= len(visited)
    assert len(visited_shards) >= 2


def test_resume_with_the_same_and_another_replica_count(run):
    half = len(run["dist"]) // 2
    for tag in ("resume2", "resume1"):  # 2 replicas again, then a single device
        _same_decisions(run[tag], run["dist"][half:])
        _close(run[f"{tag}_weights"], run["dist_weights"])
        _same_state(run[f"{tag}_state"], run["dist_state"])
    assert run["checkpoint_replicas"] == 2


def test_a_batch_smaller_than_the_replica_count_leaves_a_shard_empty(run):
    dist, single = run["tiny"]
    assert dist[:2] == single[:2] == [5, True]  # m = 1 < 2: the controller skips the step
    _close(run["tiny_weights"][0], run["tiny_weights"][1])  # but the SGD step still matches


def test_without_a_strategy_it_is_the_single_device_trainer(run):
    assert run["default_replicas"] == 1
    _same_decisions(run["default"], run["single"][:3])


def test_injected_desync_is_detected_through_the_collective(run):
    big = (1 << 62) + 12345
    assert run["gather_equal"] == [big, big]  # 63-bit digests travel exactly
    d = run["desync"]
    assert d is not None and d["step"] == len(run["dist"]) and d["digests"] == [big, big + 1]
    assert f"diverged at step {d['step']}" in d["message"] and "replica 1" in d["message"]


def test_two_replicas_match_the_numpy_reference_also_in_micro_batches(run):
    """The same decisions (exact) and weights (rtol 1e-10) as CABSLoop(LinearBackend()) on one
    process, with micro-batches of at most 3 examples per replica and with Keras SGD(momentum)."""
    from cabs_conformance.loop_reference import LinearBackend, problem

    from cabs_core import CABSController
    from cabs_core.loop import CABSLoop

    data, w0 = problem()
    ctl = CABSController(lr=0.05, c=40.0, bs_min=4, bs_max=64, mu=0.9)

    def reference(momentum=0.0):
        loop = CABSLoop(LinearBackend(momentum=momentum), ctl, num_examples=len(data[1]))
        state, model, sizes = loop.init(), (w0, np.zeros_like(w0)), []
        for _ in range(len(run["linear_plain"][0])):
            state, model, info = loop.step(state, model, data)
            sizes.append(info.batch_size)
        return sizes, model[0]

    plain = reference()
    assert len(set(plain[0])) > 2
    for tag, (sizes, w) in (("plain", plain), ("micro", plain), ("momentum", reference(float(np.float32(0.9))))):
        assert run[f"linear_{tag}"][0] == sizes, tag
        np.testing.assert_allclose(run[f"linear_{tag}"][1], w, rtol=1e-10, err_msg=tag)
    assert run["linear_micro"][2] <= 2  # shards of at most 3 rows: shard buckets up to 3


def test_refusals_name_the_problem(run):
    assert "strategy.scope()" in run["outside_scope"] and "kernel" in run["outside_scope"]
    assert "already initialised" in run["late_split"]
