"""cabs_torch's CABSTrainer against the core's NumPy reference backend
(cabs_conformance.loop_reference) on the same problem: the same data, zero
initial weights, the same controller and seed, float64. Same decisions (exact)
and weights (rtol 1e-10) for plain SGD, micro-batches, momentum and a learning
rate schedule; checkpoints resume exactly and refuse another configuration."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cabs_conformance.loop_reference import LinearBackend, problem
from cabs_torch import CABSTrainer
from torch import nn

from cabs_core import CABSController, CheckpointMismatchError, ConfigError
from cabs_core.loop import CABSLoop

CTL = dict(lr=0.05, c=40.0, bs_min=4, bs_max=64, mu=0.9)
STEPS = 12


def sq_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out[:, 0] - y) ** 2


def linear(dim: int) -> nn.Module:
    model = nn.Linear(dim, 1, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    return model


def reference(steps: int = STEPS, **backend) -> tuple[list[int], np.ndarray]:
    data, w = problem()
    loop = CABSLoop(LinearBackend(**backend), CABSController(**CTL), num_examples=len(data[1]), seed=3)
    run, model, sizes = loop.init(), (w, np.zeros_like(w)), []
    for _ in range(steps):
        run, model, info = loop.step(run, model, data)
        sizes.append(info.batch_size)
    return sizes, model[0]


def trainer(optimizer=None, **kw) -> tuple[CABSTrainer, nn.Module]:
    data, w = problem()
    model = linear(len(w))
    opt = None if optimizer is None else optimizer(model.parameters())
    return CABSTrainer(model, sq_loss, CABSController(**CTL), data=data, seed=3, optimizer=opt, **kw), model


def run(tr: CABSTrainer, steps: int = STEPS, after=None) -> list[int]:
    sizes = []
    for _ in range(steps):
        sizes.append(tr.step().batch_size)
        if after is not None:
            after()
    return sizes


def assert_weights(model: nn.Module, w: np.ndarray) -> None:
    np.testing.assert_allclose(model.weight.detach().numpy()[0], w, rtol=1e-10, atol=1e-14)


@pytest.fixture(scope="module")
def plain() -> tuple[list[int], np.ndarray]:
    return reference()


@pytest.mark.parametrize("micro", [None, 3])
def test_plain_sgd_is_the_reference(plain, micro):
    sizes, w = plain
    assert len(set(sizes)) > 3, sizes  # the decisions move: the comparison has teeth
    tr, model = trainer(max_micro_batch=micro)
    assert run(tr) == sizes
    assert_weights(model, w)
    assert tr.state.step == STEPS and tr.last_stats is not None


def test_momentum_is_torch_sgd_convention():
    """torch.optim.SGD(momentum=mu) keeps v = mu v + g, w -= lr v: LinearBackend(momentum=mu)."""
    sizes, w = reference(momentum=0.9)
    tr, model = trainer(lambda p: torch.optim.SGD(p, lr=CTL["lr"], momentum=0.9))
    assert run(tr) == sizes
    assert_weights(model, w)
    assert sizes != reference()[0]


def test_a_schedule_moves_the_decisions_as_the_reference():
    def factor(t: int) -> float:
        return 1.0 / (1.0 + 0.5 * t)

    sizes, w = reference(lr_schedule=lambda t: CTL["lr"] * factor(t))
    tr, model = trainer(lambda p: torch.optim.SGD(p, lr=CTL["lr"]))
    sched = torch.optim.lr_scheduler.LambdaLR(tr.optimizer, factor)
    assert run(tr, after=sched.step) == sizes
    assert_weights(model, w)
    assert sizes != reference()[0]


def test_optimizer_learning_rate_is_checked():
    with pytest.raises(ConfigError, match="differs from controller.lr"):
        trainer(lambda p: torch.optim.SGD(p, lr=0.3))
    with pytest.raises(ValueError, match="same lr"):
        trainer(lambda p: torch.optim.SGD([{"params": list(p)}, {"params": [nn.Parameter(torch.ones(1))],
                                                                 "lr": 0.1}], lr=CTL["lr"]))
    with pytest.raises(ValueError, match="not the model's"):
        trainer(lambda p: torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=CTL["lr"]))
    with pytest.raises(TypeError, match="CABSController"):
        CABSTrainer(linear(2), sq_loss, object())


def momentum(p):
    return torch.optim.SGD(p, lr=CTL["lr"], momentum=0.9)


@pytest.mark.parametrize("k", [0, 5])
def test_resume_after_k_steps_is_the_uninterrupted_run(tmp_path, k):
    sizes, w = reference(momentum=0.9)
    first, _ = trainer(momentum)
    head = run(first, k)
    first.save(tmp_path / "ckpt.npz")
    again, model = trainer(momentum)
    with torch.no_grad():
        model.weight.fill_(7.0)  # overwritten by the checkpoint
    again.restore(tmp_path / "ckpt.npz")
    assert again.state == first.state and again.sampler == first.sampler
    assert head + run(again, STEPS - k) == sizes
    assert_weights(model, w)


@pytest.mark.parametrize("key, change", [("lr", dict(lr=0.04)), ("bs_max", dict(bs_max=32)), ("seed", None)])
def test_another_configuration_is_refused_unless_allowed(tmp_path, key, change):
    tr, _ = trainer()
    run(tr, 2)
    tr.save(tmp_path / "c.npz")
    data, w = problem()
    other = CABSTrainer(linear(len(w)), sq_loss, CABSController(**{**CTL, **(change or {})}), data=data,
                        seed=4 if change is None else 3)
    with pytest.raises(CheckpointMismatchError, match=f"{key}: checkpoint"):
        other.restore(tmp_path / "c.npz")
    with pytest.raises(CheckpointMismatchError, match=f"{key}: checkpoint"):
        other.load_state_dict(tr.state_dict())
    assert other.state.step == 0
    other.restore(tmp_path / "c.npz", allow=[key])
    assert other.state.step == 2


def test_torn_or_foreign_files_are_refused_clearly(tmp_path):
    tr, model = trainer(momentum)
    run(tr, 2)
    tr.save(tmp_path / "c.npz")
    blob = (tmp_path / "c.npz").read_bytes()
    (tmp_path / "torn.npz").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "junk.npz").write_bytes(b"not a checkpoint")
    before = model.weight.detach().clone()
    for name in ("torn.npz", "junk.npz"):
        with pytest.raises(ValueError, match="not a CABS checkpoint file"):
            tr.restore(tmp_path / name)
    plain, _ = trainer()
    with pytest.raises(ValueError, match="holds an optimizer state, this trainer has no optimizer"):
        plain.restore(tmp_path / "c.npz")
    wide = CABSTrainer(linear(6), sq_loss, CABSController(**CTL), data=(np.ones((256, 6)), np.ones(256)), seed=3,
                       optimizer=None)
    plain.save(tmp_path / "p.npz")
    with pytest.raises(ValueError, match=r"array 0 has shape \(1, 5\) in the checkpoint, \(1, 6\)"):
        wide.restore(tmp_path / "p.npz")
    assert torch.equal(model.weight, before) and wide.state.step == 0
