"""The TensorFlow experiment backend's CABS run (issue 13): cabs_tf.CABSTrainer on the
experiment's own model and train split, stepping like the driver's SGD step."""

from __future__ import annotations

import numpy as np
import pytest

from cabs_core import CABSController, SamplerState, next_batch

pytest.importorskip("tensorflow")

from cabs_experiments.backends import make_trainer  # noqa: E402
from cabs_experiments.data import load_digits_dataset  # noqa: E402


def test_cabs_run_steps_the_trainers_own_parameters_like_sgd():
    digits = load_digits_dataset()
    tr = make_trainer("tensorflow", digits, "mlp", threads=1)
    ctl = CABSController(lr=0.5, bs_min=8, bs_max=64, bs_init=20)
    tr.reset(5)
    run = tr.cabs_run(ctl, seed=3)
    assert run.batch_size == 20 and run.examples_seen == 0
    sizes = []
    for _ in range(3):
        sizes.append(run.batch_size)
        info = run.step()
        assert info.batch_size == run.batch_size and 8 <= info.batch_size <= 64
    assert run.examples_seen == sum(sizes)
    after_cabs = tr.evaluate("test")  # evaluate() sees the parameters the run trained
    tr.reset(5)
    sampler = SamplerState(len(digits.y_train), 3)  # the same examples, through the SGD step
    for b in sizes:
        idx, sampler = next_batch(sampler, b)
        tr.sgd_step(idx, 0.5)
    np.testing.assert_allclose(tr.evaluate("test"), after_cabs, rtol=1e-4)
