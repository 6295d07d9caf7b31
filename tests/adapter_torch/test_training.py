"""Training integration: the SGD step, the DataLoader batch sampler,
checkpointing, docs/spec.md section 5 on this backend and the conformance vectors on
torch tensors."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cabs_torch import BatchNormTrainingError, CABSBatchSampler, CABSTrainer, MicroBatchStats, PerExampleStats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cabs_core import (
    BatchStats,
    CABSController,
    CheckpointMismatchError,
    NonFiniteStatisticsError,
    SamplerState,
    next_batch,
    shard,
)


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    return x, torch.tensor(d.target, dtype=torch.int64)


def small_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def full_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(ce(model(x), y).mean())


# ----------------------------------------------------------------------------- the step


def test_step_applies_lr_times_mean_gradient_and_returns_the_decision(digits):
    x, y = digits[0][:40].double(), digits[1][:40]
    model = small_mlp().double()
    before = [p.detach().clone() for p in model.parameters()]
    ctrl = CABSController(lr=0.3, bs_min=8, bs_max=512)
    stats = PerExampleStats(model, ce)(x, y)
    expect_state, expect_info = ctrl.update(ctrl.init(), stats)
    opt = CABSTrainer(model, ce, ctrl)
    nxt = opt.step(x, y).batch_size
    assert nxt == expect_info.batch_size == opt.batch_size == opt.state.batch_size
    assert opt.state == expect_state
    for p, p0, g in zip(model.parameters(), before, stats.grad_sum):
        torch.testing.assert_close(p.detach(), p0 - 0.3 * g / 40, rtol=1e-12, atol=1e-14)
        assert p.grad is None


def test_training_on_digits_lowers_the_loss(digits):
    x, y = digits
    model = small_mlp(1)
    opt = CABSTrainer(model, ce, CABSController(lr=0.5, bs_min=8, bs_max=256, c=10.0, mu=0.9))
    sampler = opt.batch_sampler(len(x), seed=3)
    start = full_loss(model, x, y)
    sizes = []
    for _ in range(60):
        idx = torch.from_numpy(sampler.next_indices())
        sizes.append(len(idx))
        opt.step(x[idx], y[idx])
    end = full_loss(model, x, y)
    assert end < 0.3 * start, (start, end)
    assert sizes[0] == 8 and sizes[-1] > 4 * sizes[1]  # the batch grows as the loss falls
    assert opt.state.updates == 60


def test_dataloader_delivers_the_decided_sizes(digits):
    x, y = digits
    model = small_mlp(2)
    opt = CABSTrainer(model, ce, CABSController(lr=0.5, bs_min=4, bs_max=300, mu=0.5, c=10.0))
    loader = DataLoader(TensorDataset(x, y), batch_sampler=opt.batch_sampler(len(x), seed=1, max_batches=25))
    assert len(loader) == 25
    expected = [opt.batch_size]
    got = []
    ref = SamplerState(len(x), 1)
    for xb, yb in loader:
        got.append(len(xb))
        idx, ref = next_batch(ref, len(xb))  # the core's sampler draws the same examples
        torch.testing.assert_close(xb, x[torch.from_numpy(idx)])
        expected.append(opt.step(xb, yb).batch_size)
    assert got == expected[:-1]
    assert len(set(got)) > 3
    assert opt.sampler == ref


def test_sampler_shards_stops_and_restores():
    sizes = iter([10, 7, 7, 9, 12, 5, 30, 30])
    s = CABSBatchSampler(25, lambda: next(sizes), seed=4, max_epochs=2.0, world_size=3, rank=1)
    ref = SamplerState(25, 4)
    got = list(s)
    expect = []
    for b in [10, 7, 7, 9, 12, 5]:
        idx, ref = next_batch(ref, b)
        expect.append(shard(idx, 3, 1).tolist())
    assert got == expect and s.state.epoch == 2.0  # stops once 2 epochs are done
    t = CABSBatchSampler(25, lambda: 4, seed=4)
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert t.state == s.state and t.batches == 6
    with pytest.raises(ValueError, match="for 25 examples, this sampler has 26"):
        CABSBatchSampler(26, lambda: 4).load_state_dict(s.state_dict())
    with pytest.raises(TypeError, match="no length"):
        len(t)
    with pytest.raises(ValueError, match="rank"):
        CABSBatchSampler(10, lambda: 4, world_size=2, rank=2)


def _run(model, opt, sampler, x, y, steps):
    decisions = []
    for _ in range(steps):
        idx = torch.from_numpy(sampler.next_indices())
        decisions.append(opt.step(x[idx], y[idx]).batch_size)
    return decisions


def test_resumed_run_makes_the_same_decisions(digits):
    x, y = digits
    ctrl = CABSController(lr=0.4, bs_min=8, bs_max=400, mu=0.8, c=10.0)
    model = small_mlp(5)
    opt = CABSTrainer(model, ce, ctrl)
    sampler = opt.batch_sampler(len(x), seed=9)
    full = _run(model, opt, sampler, x, y, 20)
    final = copy.deepcopy(model.state_dict())

    model2 = small_mlp(5)
    opt2 = CABSTrainer(model2, ce, ctrl)
    sampler2 = opt2.batch_sampler(len(x), seed=9)
    first = _run(model2, opt2, sampler2, x, y, 8)
    buf = io.BytesIO()
    torch.save({"model": model2.state_dict(), "cabs": opt2.state_dict()}, buf)
    del model2, opt2, sampler2

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model3 = small_mlp(123)
    model3.load_state_dict(ckpt["model"])
    opt3 = CABSTrainer(model3, ce, ctrl)
    sampler3 = opt3.batch_sampler(len(x), seed=9)
    opt3.load_state_dict(ckpt["cabs"])
    rest = _run(model3, opt3, sampler3, x, y, 12)
    assert first + rest == full
    assert len(set(full)) > 3
    for k, v in model3.state_dict().items():
        torch.testing.assert_close(v, final[k], rtol=0, atol=0)


def test_load_state_dict_checks():
    opt = CABSTrainer(small_mlp(), ce, CABSController(lr=0.1, bs_min=16, bs_max=64))
    with pytest.raises(ValueError, match="not a CABS checkpoint"):
        opt.load_state_dict({"controller": {}})
    other = CABSTrainer(small_mlp(), ce, CABSController(lr=0.1, bs_min=100, bs_max=200))
    with pytest.raises(CheckpointMismatchError, match="bs_min: checkpoint 100, now 16; bs_max: checkpoint 200"):
        opt.load_state_dict(other.state_dict())
    opt.batch_sampler(10)
    fresh = CABSTrainer(small_mlp(), ce, CABSController(lr=0.1, bs_min=16, bs_max=64))
    with pytest.raises(ValueError, match=r"its batch sampler\) before loading"):
        fresh.load_state_dict(opt.state_dict())


# ----------------------------------------------------------------------------- docs/spec.md section 5 on torch


def test_single_example_is_skipped_but_still_trains(digits):
    x, y = digits[0][:1], digits[1][:1]
    model = small_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = CABSTrainer(model, ce, CABSController(lr=0.1))
    assert opt.step(x, y).batch_size == 16
    assert opt.last_info.skipped and opt.last_info.reason == "count" and opt.state.skipped == 1
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    ref = CABSTrainer(small_mlp(), ce, CABSController(lr=0.1, mode="reference"))
    ref.step(x, y)  # ddof 0: one example is enough
    assert not ref.last_info.skipped


def test_all_masked_batch_changes_nothing(digits):
    x, y = digits[0][:6], digits[1][:6]
    model = small_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = CABSTrainer(model, ce, CABSController(lr=0.1))
    opt.step(x, y, mask=torch.zeros(6))
    assert opt.last_info.reason == "count"
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_loss_leaves_model_and_state(policy, digits):
    x, y = digits[0][:8].clone(), digits[1][:8]
    x[3, 5] = float("nan")
    model = small_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = CABSTrainer(model, ce, CABSController(lr=0.1, nonfinite=policy))
    state = opt.state
    if policy == "raise":
        with pytest.raises(NonFiniteStatisticsError, match="loss_sum"):
            opt.step(x, y)
        assert opt.state == state
    else:
        assert opt.step(x, y).batch_size == 16
        assert opt.state.nonfinite == 1 and opt.state.updates == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_loss_below_floor_gives_bs_max(digits):
    x, y = digits[0][:8], digits[1][:8]
    opt = CABSTrainer(small_mlp(), ce, CABSController(lr=0.1, bs_max=99, loss_floor=50.0))
    assert opt.step(x, y).batch_size == 99


def test_discretisation_options(digits):
    x, y = digits[0][:32], digits[1][:32]
    opt = CABSTrainer(small_mlp(), ce, CABSController(lr=2.0, bs_min=8, bs_max=256, multiple_of=8))
    assert opt.step(x, y).batch_size % 8 == 0
    opt = CABSTrainer(small_mlp(), ce, CABSController(lr=2.0, bs_min=8, bs_max=256, buckets=(8, 64, 256)))
    assert opt.step(x, y).batch_size in (8, 64, 256)


# ----------------------------------------------------------------------------- micro-batches (BatchNorm)


@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_group_estimator_with_singletons_equals_within_batch(mode, digits):
    """With k = m groups of one example, the group estimator is the within-batch one (ddof 1);
    the controller sees the same variance from both."""
    x, y = digits[0][:6].double(), digits[1][:6]
    model = small_mlp(3).double()
    ctrl = CABSController(lr=0.1, mode=mode)
    per_ex = PerExampleStats(model, ce)(x, y)
    groups = MicroBatchStats(model, ce, 6, ddof=ctrl.ddof)(x, y)
    _, a = ctrl.update(ctrl.init(), per_ex)
    _, b = ctrl.update(ctrl.init(), groups)
    ddof1 = (float(per_ex.sq_norm_sum) - sum(float(g.pow(2).sum()) for g in per_ex.grad_sum) / 6) / 5
    assert b.variance == pytest.approx(ddof1, rel=1e-9)
    if mode == "paper":
        assert b.variance == pytest.approx(a.variance, rel=1e-9)
    for g1, g2 in zip(per_ex.grad_sum, groups.grad_sum):
        torch.testing.assert_close(g1, g2)


def test_batchnorm_training_needs_micro_batches(digits):
    x, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    with pytest.raises(BatchNormTrainingError):
        CABSTrainer(model, ce, CABSController(lr=0.5)).step(x[:16], y[:16])
    opt = CABSTrainer(model, ce, CABSController(lr=0.5, bs_min=16, bs_max=256), micro_batches=4)
    sampler = opt.batch_sampler(len(x))
    start = full_loss(model.eval(), x, y)
    model.train()
    for _ in range(30):
        idx = torch.from_numpy(sampler.next_indices())
        opt.step(x[idx], y[idx])
    assert full_loss(model.eval(), x, y) < 0.6 * start
    assert opt.state.updates == 30 and opt.state.xi_avg > 0
    with pytest.raises(ValueError, match="num_groups"):
        MicroBatchStats(model, ce, 1)


# ----------------------------------------------------------------------------- conformance vectors


def _vectors() -> list[Path]:
    import cabs_conformance

    return sorted((Path(cabs_conformance.__file__).parent / "vectors").glob("*.json"))


def _num(v):
    special = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}
    return special[v] if isinstance(v, str) and v in special else v


def _torch_stats(s: dict, dtype: torch.dtype) -> BatchStats:
    def t(v):
        return torch.tensor(_num(v), dtype=dtype)

    grads = tuple(torch.tensor([_num(v) for v in g], dtype=dtype) for g in s["grad_sum"])
    return BatchStats(t(s["count"]), t(s["loss_sum"]), grads, t(s["sq_norm_sum"]))


VECTORS = _vectors()


def test_conformance_vectors_present():
    assert len(VECTORS) >= 30


@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
def test_conformance_vector_on_torch_tensors(path):
    v = json.loads(path.read_text())
    if v["kind"] == "sampler":
        sizes = iter(v["batch_sizes"])
        samplers = [CABSBatchSampler(v["num_examples"], lambda it=sizes: 0, seed=v["seed"],
                                     world_size=v["world_size"], rank=r) for r in range(v["world_size"])]
        for b, exp in zip(v["batch_sizes"], v["expect"]):
            shards = []
            for s in samplers:
                s.batch_size = lambda b=b: b
                shards.append(s.next_indices().tolist())
            assert shards == exp["shards"] and sum(shards, []) == exp["indices"]
            assert samplers[0].state.examples_seen == exp["examples_seen"]
            assert samplers[0].state.epoch == pytest.approx(exp["epoch"], rel=1e-15)
        return
    cfg = {k: _num(val) for k, val in v["config"].items()}
    if isinstance(cfg["buckets"], list):
        cfg["buckets"] = tuple(cfg["buckets"])
    if v["expect_config_error"]:
        with pytest.raises(ValueError, match=v["expect_config_error"]["argument"]):
            CABSController(**cfg)
        return
    ctrl = CABSController(**cfg)
    state = ctrl.init()
    tol = v["tolerance"]
    for step in v["steps"]:
        stats = _torch_stats(step["stats"], torch.float64)
        exp = step["expect"]
        if "error" in exp:
            with pytest.raises(NonFiniteStatisticsError) as err:
                ctrl.update(state, stats)
            assert err.value.field == exp["field"]
            return
        state, info = ctrl.update(state, stats)
        assert info.batch_size == exp["batch_size"] == state.batch_size
        assert info.skipped == exp["skipped"] and info.reason == exp["reason"]
        assert info.clamped == exp["clamped"]
        assert (state.updates, state.skipped, state.clamped, state.nonfinite) == (
            exp["updates"], exp["skipped_total"], exp["clamped_total"], exp["nonfinite_total"])
        for key, got in (("raw", info.raw), ("variance", info.variance), ("loss", info.loss),
                         ("xi_avg", state.xi_avg), ("loss_avg", state.loss_avg)):
            want = _num(exp[key])
            if want is None or np.isinf(want):
                assert got == want, key
            else:
                assert got == pytest.approx(want, rel=tol["rtol"], abs=tol["atol"]), key


# ----------------------------------------------------------------------------- issue 13: micro-batches, save/restore


def test_micro_batches_of_a_masked_batch_are_the_whole_batch(digits):
    """max_micro_batch splits the caller's batch (and its mask): the same statistics,
    decision and update as one pass (float64)."""
    x, y = digits[0][:11].double(), digits[1][:11]
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1.0], dtype=torch.float64)
    results = []
    for micro in (None, 3):
        model = small_mlp(4).double()
        opt = CABSTrainer(model, ce, CABSController(lr=0.3, bs_min=4, bs_max=64), max_micro_batch=micro)
        info = opt.step(x, y, mask)
        results.append((info, opt.last_stats, [p.detach().clone() for p in model.parameters()]))
    (a, sa, pa), (b, sb, pb) = results
    assert a.batch_size == b.batch_size and float(sb.count) == 8
    assert b.variance == pytest.approx(a.variance, rel=1e-12) and b.loss == pytest.approx(a.loss, rel=1e-12)
    torch.testing.assert_close(sb.sq_norm_sum, sa.sq_norm_sum, rtol=1e-12, atol=0)
    for p, q in zip(pa, pb):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="cannot be combined"):
        CABSTrainer(small_mlp(), ce, CABSController(lr=0.1), micro_batches=2, max_micro_batch=4)


def test_save_restore_keeps_the_dataloader_sampler(digits, tmp_path):
    x, y = digits
    ctrl = CABSController(lr=0.4, bs_min=8, bs_max=400, mu=0.8, c=10.0)
    opt = CABSTrainer(small_mlp(5), ce, ctrl, seed=9)
    sampler = opt.batch_sampler(len(x))
    first = _run(opt.model, opt, sampler, x, y, 4)
    opt.save(tmp_path / "c.npz")
    rest = _run(opt.model, opt, sampler, x, y, 3)
    again = CABSTrainer(small_mlp(6), ce, ctrl, seed=9)
    with pytest.raises(ValueError, match=r"its batch sampler\) before loading"):
        again.load_state_dict(opt.state_dict())
    sampler2 = again.batch_sampler(len(x))
    again.restore(tmp_path / "c.npz")
    assert sampler2.batches == 4 and again.state.step == 4 and len(set(first)) > 1
    assert _run(again.model, again, sampler2, x, y, 3) == rest
    for p, q in zip(again.model.parameters(), opt.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
