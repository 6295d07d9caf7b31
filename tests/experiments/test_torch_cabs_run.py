"""The torch experiment backend's CABS run (issue 13): cabs_torch.CABSTrainer on the
training split, drawing the batches the core's sampler draws from the seed, and
training the experiment trainer's own model (what evaluate() sees)."""

from __future__ import annotations

import math

import pytest

from cabs_core import CABSController, NonFiniteStatisticsError, SamplerState, next_batch

torch = pytest.importorskip("torch")

from cabs_experiments.backends import make_trainer  # noqa: E402
from cabs_experiments.data import load_digits_dataset  # noqa: E402


@pytest.fixture(scope="module")
def tr():
    return make_trainer("torch", load_digits_dataset(), "mlp", threads=1)


def test_a_cabs_step_is_the_sgd_step_on_the_sampled_batch(tr):
    ctl = CABSController(lr=0.5, bs_min=8, bs_max=256, bs_init=20)
    idx, _ = next_batch(SamplerState(len(tr.y["train"]), 7), 20)
    tr.reset(5)
    tr.sgd_step(idx, 0.5)
    after_sgd = tr.evaluate("test")
    tr.reset(5)
    run = tr.cabs_run(ctl, seed=7)
    assert run.batch_size == 20 and run.examples_seen == 0
    info = run.step()
    assert run.examples_seen == 20 and run.batch_size == info.batch_size and not info.skipped
    assert info.loss > 0 and info.variance > 0
    assert tr.evaluate("test") == pytest.approx(after_sgd, rel=1e-5)  # the trainer's own parameters moved
    sizes = [run.step().batch_size for _ in range(3)]
    assert run.examples_seen == 20 + info.batch_size + sum(sizes[:2])


def test_a_diverging_run_raises_under_the_default_policy(tr):
    tr.reset(0)
    run = tr.cabs_run(CABSController(lr=1e6, bs_min=8, bs_max=64), seed=0)
    with pytest.raises(NonFiniteStatisticsError):
        for _ in range(20):
            before = [p.detach().clone() for p in tr.model.parameters()]
            info = run.step()
            assert math.isfinite(info.loss)
    # the non-finite step applied no update (the driver's old loop stepped anyway)
    assert all(torch.equal(p, q) for p, q in zip(tr.model.parameters(), before))
