"""The one CABS step (cabs_core.loop) against Algorithm 1 written out by hand, with the
NumPy reference backend: plans, micro-batches, workers, the learning rate in force,
the non-finite policy, checkpoints and the agreement check (issue 13)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from cabs_conformance.loop_reference import LinearBackend, World, problem
from hypothesis import given
from hypothesis import strategies as st

from cabs_core import (
    CABSController,
    CheckpointMismatchError,
    ConfigError,
    DesyncError,
    NonFiniteStatisticsError,
    SamplerState,
    batch_stats_from_per_example,
    geometric_buckets,
    next_batch,
)
from cabs_core.loop import CABSLoop, check_learning_rate, digest_words, plan_batch, words_digest

CTL = dict(lr=0.05, c=40.0, bs_min=4, bs_max=64, mu=0.9)


@given(
    n=st.integers(0, 300),
    shards=st.integers(1, 4),
    processes=st.integers(1, 3),
    micro=st.none() | st.integers(1, 40),
    bucketed=st.booleans(),
)
def test_plan_covers_every_example_once_in_order(n, shards, processes, micro, bucketed):
    idx = np.random.default_rng(n).permutation(1000)[:n]
    buckets = geometric_buckets(1, max(n, 1)) if bucketed else None
    plans = [plan_batch(idx, shards=shards, processes=processes, process_index=p, buckets=buckets,
                        max_micro_batch=micro) for p in range(processes)]
    assert len({len(pl) for pl in plans}) == 1
    real = []
    for k in range(len(plans[0])):
        sizes = {pl[k].size for pl in plans}
        assert len(sizes) == 1  # every process pads micro-batch k to the same shard size
        for pl in plans:
            mb = pl[k]
            assert len(mb.rows) == len(mb.mask) == mb.shards * mb.size and mb.shards == shards
            if micro is not None:
                assert mb.size <= micro
            if n:
                assert set(mb.rows[~mb.mask]) <= set(idx)  # padding repeats real examples
        real += [r for pl in plans for r in pl[k].rows[pl[k].mask]]
    assert real == list(idx)


def test_plan_rejects_bad_values():
    for kw in (dict(shards=0), dict(processes=2, process_index=2), dict(max_micro_batch=0)):
        with pytest.raises(ValueError):
            plan_batch(np.arange(4), **kw)


def _by_hand(ctl, data, w, steps, seed=0):
    """Algorithm 1 written out: sampler, per-example statistics, update, SGD step."""
    x, y = data
    state, sampler, sizes = ctl.init(), SamplerState(len(y), seed), []
    for _ in range(steps):
        idx, sampler = next_batch(sampler, state.batch_size)
        r = x[idx] @ w - y[idx]
        stats = batch_stats_from_per_example(0.5 * r**2, [r[:, None] * x[idx]])
        state, info = ctl.update(state, stats)
        w = w - ctl.lr * stats.grad_sum[0] / float(stats.count)
        sizes.append(info.batch_size)
    return sizes, w, state


def _run(loop, model, data, steps):
    run, sizes = loop.init(), []
    for _ in range(steps):
        run, model, info = loop.step(run, model, data)
        sizes.append(info.batch_size)
    return sizes, model, run


@pytest.mark.parametrize("micro", [None, 3, 7])
@pytest.mark.parametrize("shards", [1, 3])
def test_loop_is_algorithm_1_whatever_the_split(micro, shards):
    data, w0 = problem()
    ctl = CABSController(**CTL)
    want_sizes, want_w, want_state = _by_hand(ctl, data, w0, 25)
    loop = CABSLoop(LinearBackend(shards=shards), ctl, num_examples=256, max_micro_batch=micro)
    sizes, (w, _), run = _run(loop, (w0, np.zeros_like(w0)), data, 25)
    assert sizes == want_sizes and len(set(sizes)) > 3
    np.testing.assert_allclose(w, want_w, rtol=1e-12, atol=1e-13)
    assert run.controller.step == want_state.step
    np.testing.assert_allclose(run.controller.xi_avg, want_state.xi_avg, rtol=1e-10)


def test_processes_make_the_decisions_of_one():
    data, w0 = problem()
    ctl = CABSController(**CTL)
    want_sizes, want_w, _ = _by_hand(ctl, data, w0, 15)
    world, results = World(3), {}

    def worker(p):
        loop = CABSLoop(LinearBackend(shards=2, world=world, process_index=p), ctl, num_examples=256,
                        check_every=5, max_micro_batch=4)
        results[p] = _run(loop, (w0, np.zeros_like(w0)), data, 15)

    threads = [threading.Thread(target=worker, args=(p,)) for p in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for p in range(3):
        sizes, (w, _), _ = results[p]
        assert sizes == want_sizes
        np.testing.assert_allclose(w, want_w, rtol=1e-12, atol=1e-13)


def test_workers_that_disagree_raise_on_every_worker():
    data, w0 = problem()
    world, errors = World(2), {}

    def worker(p):
        loop = CABSLoop(LinearBackend(world=world, process_index=p), CABSController(**CTL), num_examples=256,
                        seed=p, check_every=2)  # another seed: another sampler position digest
        try:
            _run(loop, (w0, np.zeros_like(w0)), data, 4)
        except DesyncError as e:
            errors[p] = e

    threads = [threading.Thread(target=worker, args=(p,)) for p in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(errors) == {0, 1} and all(e.step == 2 for e in errors.values())


def test_digest_words_round_trip():
    for v in (0, 1, 2**63 - 1, 0x123456789ABCDEF):
        w = digest_words(v)
        assert w.dtype == np.int32 and words_digest(w) == v and np.all(w.astype(np.float32) == w)
    with pytest.raises(ValueError):
        digest_words(2**63)


def test_given_batches_need_no_sampler():
    data, w0 = problem()
    ctl = CABSController(**CTL)
    loop = CABSLoop(LinearBackend(), ctl)
    run, model = loop.init(), (w0, np.zeros_like(w0))
    assert run.sampler is None
    want, _, _ = _by_hand(ctl, data, w0, 5)
    sampler, sizes = SamplerState(256, 0), []
    for _ in range(5):
        idx, sampler = next_batch(sampler, run.controller.batch_size)
        run, model, info = loop.step(run, model, batch=(data[0][idx], data[1][idx]))
        sizes.append(info.batch_size)
    assert sizes == want
    with pytest.raises(ValueError, match="pass the batch"):
        loop.step(run, model)


def test_the_learning_rate_in_force_drives_decision_and_update():
    data, w0 = problem()
    ctl = CABSController(**CTL)
    schedule = lambda t: 0.05 * 0.8**t  # noqa: E731
    loop = CABSLoop(LinearBackend(lr_schedule=schedule), ctl, num_examples=256)
    run, model = loop.init(), (w0, np.zeros_like(w0))
    state, sampler, w = ctl.init(), SamplerState(256, 0), w0
    x, y = data
    for t in range(12):
        run, model, info = loop.step(run, model, data)
        idx, sampler = next_batch(sampler, state.batch_size)
        r = x[idx] @ w - y[idx]
        stats = batch_stats_from_per_example(0.5 * r**2, [r[:, None] * x[idx]])
        state, want = ctl.update(state, stats, lr=schedule(t))
        w = w - schedule(t) * stats.grad_sum[0] / float(stats.count)
        assert (info.batch_size, info.skipped) == (want.batch_size, want.skipped)
        np.testing.assert_allclose([info.raw, info.variance, info.loss], [want.raw, want.variance, want.loss],
                                   rtol=1e-12)
    np.testing.assert_allclose(model[0], w, rtol=1e-12)
    # with a decaying rate the coupled sizes fall where a constant rate's would not
    assert state.batch_size < _by_hand(ctl, data, w0, 12)[0][-1]


def test_an_optimizer_rate_that_disagrees_is_refused():
    check_learning_rate(CABSController(lr=0.1), 0.1)
    check_learning_rate(CABSController(lr=0.1), None)
    with pytest.raises(ConfigError, match="differs from controller.lr"):
        check_learning_rate(CABSController(lr=0.1), 0.3)
    with pytest.raises(ConfigError):
        CABSController(lr=0.1).update(CABSController(lr=0.1).init(), (2.0, 1.0, 1.0, 1.0), lr=float("nan"))


class _Poisoned(LinearBackend):
    def statistics(self, model, batch, micro, *, verify):
        s = super().statistics(model, batch, micro, verify=verify)
        return s._replace(sq_norm_sum=np.float64(np.nan)) if self.updates == 2 else s


def test_a_nonfinite_step_changes_nothing():
    data, w0 = problem()
    loop = CABSLoop(_Poisoned(), CABSController(**CTL, nonfinite="skip"), num_examples=256)
    run, model = loop.init(), (w0, np.zeros_like(w0))
    for _ in range(2):
        run, model, _ = loop.step(run, model, data)
    before = model
    run, model, info = loop.step(run, model, data)
    assert info.reason == "nonfinite" and model is before and run.controller.nonfinite == 1
    loop = CABSLoop(_Poisoned(), CABSController(**CTL), num_examples=256)
    run, model = loop.init(), (w0, np.zeros_like(w0))
    for _ in range(2):
        run, model, _ = loop.step(run, model, data)
    with pytest.raises(NonFiniteStatisticsError, match="sq_norm_sum"):
        loop.step(run, model, data)


def test_a_step_skipped_for_its_count_still_steps():
    data, w0 = problem()
    loop = CABSLoop(LinearBackend(), CABSController(lr=0.05, bs_min=1, bs_max=8))  # paper mode: m = 1 is skipped
    run, model = loop.init(), (w0, np.zeros_like(w0))
    run, model, info = loop.step(run, model, batch=(data[0][:1], data[1][:1]))
    assert info.reason == "count" and not np.array_equal(model[0], w0)


def test_verify_schedule_reaches_the_backend():
    data, w0 = problem()
    be = LinearBackend()
    loop = CABSLoop(be, CABSController(**CTL), num_examples=256, verify_every=3, max_micro_batch=2)
    _run(loop, (w0, np.zeros_like(w0)), data, 7)
    assert be.probes == 3  # steps 0, 3, 6; only the first micro-batch of each


def test_checkpoint_resumes_bit_for_bit_and_refuses_another_configuration(tmp_path):
    data, w0 = problem()
    ctl = CABSController(**CTL)
    loop = CABSLoop(LinearBackend(momentum=0.9), ctl, num_examples=256, seed=5)
    want_sizes, want_model, _ = _run(loop, (w0, np.zeros_like(w0)), data, 12)
    run, model = loop.init(), (w0, np.zeros_like(w0))
    for _ in range(6):
        run, model, _ = loop.step(run, model, data)
    path = tmp_path / "ckpt.npz"
    loop.save(path, run, list(model), framework="numpy")
    fresh = CABSLoop(LinearBackend(momentum=0.9), ctl, num_examples=256, seed=5)
    run2, arrays, extra = fresh.load(path)
    assert extra == {"framework": "numpy"} and run2 == run
    model2, sizes = tuple(arrays), []
    for _ in range(6):
        run2, model2, info = fresh.step(run2, model2, data)
        sizes.append(info.batch_size)
    assert sizes == want_sizes[6:]
    np.testing.assert_array_equal(model2[0], want_model[0])
    other = CABSLoop(LinearBackend(), CABSController(**{**CTL, "lr": 0.1}), num_examples=256, seed=6)
    with pytest.raises(CheckpointMismatchError, match=r"lr: checkpoint 0.05, now 0.1.*seed: checkpoint 5, now 6"):
        other.load(path)
    assert other.load(path, allow=["lr", "seed"])[0].sampler.seed == 6
    for name, content in (("junk.npz", b"not a zip"), ("empty.npz", b""), ("torn.npz", path.read_bytes()[:300])):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match="not a CABS checkpoint file"):
            fresh.load(tmp_path / name)
    # a position kept outside the loop (a DataLoader's batch sampler) is checked and handed back
    outside = CABSLoop(LinearBackend(momentum=0.9), ctl)
    with pytest.raises(CheckpointMismatchError, match="sampler position"):
        outside.load(path)
    assert outside.load(path, sampler=SamplerState(256, 5))[0].sampler == run.sampler
    with pytest.raises(CheckpointMismatchError, match="seed"):
        outside.load(path, sampler=SamplerState(256, 4))


def test_configuration_errors():
    with pytest.raises(TypeError, match="CABSController"):
        CABSLoop(LinearBackend(), {"lr": 0.1})
    with pytest.raises(ValueError, match="check_every"):
        CABSLoop(LinearBackend(), CABSController(**CTL), check_every=-1)
    with pytest.raises(ValueError, match="max_micro_batch"):
        CABSLoop(LinearBackend(), CABSController(**CTL), max_micro_batch=0)
