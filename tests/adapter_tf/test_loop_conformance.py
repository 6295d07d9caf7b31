"""cabs_tf.CABSTrainer against the NumPy reference backend of cabs_core.loop (issue 13):
the same linear least-squares problem, initial weights 0, controller and seed give the
same decisions (exact ints) and the same weights (rtol 1e-10), for plain SGD,
micro-batches, Keras SGD with momentum, a learning-rate schedule; checkpoints."""

import cabs_tf
import keras
import numpy as np
import pytest
import tensorflow as tf
from cabs_conformance.loop_reference import LinearBackend, problem

import cabs_core
from cabs_core.loop import CABSLoop

CTL = cabs_core.CABSController(lr=0.05, c=40.0, bs_min=4, bs_max=64, mu=0.9)
DATA, W0 = problem()
STEPS = 8
MU32 = float(np.float32(0.9))


@pytest.fixture(autouse=True)
def _float64():
    """Keras keeps an optimizer's learning rate in floatx: float64, so that 0.05 is 0.05."""
    keras.backend.set_floatx("float64")
    yield
    keras.backend.set_floatx("float32")


def reference(steps=STEPS, *, max_micro_batch=None, ctl=CTL, **backend):
    loop = CABSLoop(LinearBackend(**backend), ctl, num_examples=len(DATA[1]), seed=0,
                    max_micro_batch=max_micro_batch)
    run, model, sizes = loop.init(), (W0, np.zeros_like(W0)), []
    for _ in range(steps):
        run, model, info = loop.step(run, model, DATA)
        sizes.append(info.batch_size)
    return sizes, model[0]


def linear():
    return keras.Sequential([keras.Input((len(W0),), dtype="float64"),
                             keras.layers.Dense(1, use_bias=False, dtype="float64", kernel_initializer="zeros")])


def loss_fn(y_true, y_pred):
    return 0.5 * (y_pred[:, 0] - y_true) ** 2


def trainer(ctl=CTL, **kw):
    return cabs_tf.CABSTrainer(linear(), loss_fn, ctl, DATA, **kw)


def weights(tr):
    return tr.model.weights[0].numpy()[:, 0]


def check(tr, want, steps=STEPS):
    sizes, w = want
    assert [i.batch_size for i in tr.run(steps)] == sizes
    np.testing.assert_allclose(weights(tr), w, rtol=1e-10)


def test_plain_sgd_and_micro_batches_match_the_reference():
    want = reference()
    assert len(set(want[0])) > 2  # the decisions move
    check(trainer(), want)
    split = trainer(max_micro_batch=3)
    check(split, reference(max_micro_batch=3))
    assert reference(max_micro_batch=3)[0] == want[0]  # identical decisions to the unsplit run
    assert split.trace_count <= 2  # micro-batches of at most 3: buckets up to 3


def test_keras_sgd_with_momentum_is_the_reference_convention():
    """Keras: v <- mu v - lr g, w <- w + v; the reference: v <- mu v + g, w <- w - lr v: the
    same iterates at a constant rate. Keras casts the Python momentum through float32
    (ops.cast(0.9, float64) is 0.8999999761581421), so the reference takes that value."""
    check(trainer(optimizer=keras.optimizers.SGD(learning_rate=0.05, momentum=0.9)), reference(momentum=MU32))


class Decay(keras.optimizers.schedules.LearningRateSchedule):
    def __call__(self, step):
        return 0.05 / (1.0 + 0.25 * tf.cast(step, tf.float64))


def test_a_schedule_moves_the_decisions_like_controller_update_with_lr():
    want = reference(lr_schedule=lambda t: 0.05 / (1.0 + 0.25 * t))
    assert want[0] != reference()[0]
    check(trainer(optimizer=keras.optimizers.SGD(learning_rate=Decay())), want)


def test_an_optimizer_with_another_rate_or_a_bad_controller_is_refused():
    with pytest.raises(cabs_core.ConfigError, match="differs from controller.lr"):
        trainer(optimizer=keras.optimizers.SGD(learning_rate=0.3))
    with pytest.raises(TypeError, match="CABSController"):
        cabs_tf.CABSTrainer(linear(), loss_fn, {"lr": 0.05}, DATA)


def test_checkpoint_resume_is_the_uninterrupted_run(tmp_path):
    def sgd(lr=0.05):
        return keras.optimizers.SGD(learning_rate=lr, momentum=0.9)

    full = trainer(optimizer=sgd())
    sizes = [i.batch_size for i in full.run(STEPS)]
    first = trainer(optimizer=sgd())
    first.run(3)
    path = tmp_path / "ckpt.npz"
    first.save(path)
    again = trainer(optimizer=sgd())
    again.restore(path)
    assert [i.batch_size for i in again.run(STEPS - 3)] == sizes[3:]
    np.testing.assert_allclose(weights(again), weights(full), rtol=1e-10)
    # configuration changes are refused, one difference named each, unless allowed
    for kw, key in ((dict(lr=0.04), "lr"), (dict(bs_max=32), "bs_max")):
        other = cabs_core.CABSController(**{**dict(lr=0.05, c=40.0, bs_min=4, bs_max=64, mu=0.9), **kw})
        with pytest.raises(cabs_core.CheckpointMismatchError, match=f"{key}: checkpoint"):
            trainer(ctl=other, optimizer=sgd(other.lr)).restore(path)
        trainer(ctl=other, optimizer=sgd(other.lr)).restore(path, allow=[key])
    with pytest.raises(cabs_core.CheckpointMismatchError, match="seed: checkpoint 0, now 1"):
        trainer(seed=1, optimizer=sgd()).restore(path)
    trainer(seed=1, optimizer=sgd()).restore(path, allow=["seed"])
    with pytest.raises(ValueError, match="the checkpoint holds 4 arrays, this model 1"):
        trainer().restore(path)  # weights + iterations, learning rate, velocity of the optimizer


def test_a_torn_or_foreign_file_is_a_clear_error(tmp_path):
    tr = trainer()
    path = tmp_path / "ckpt.npz"
    tr.save(path)
    data = path.read_bytes()
    (tmp_path / "torn.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.npz").write_bytes(b"not a checkpoint")
    for name in ("torn.npz", "junk.npz"):
        with pytest.raises(ValueError, match="not a CABS checkpoint file"):
            trainer().restore(tmp_path / name)


def test_one_vocabulary():
    for old in ("StatsStep", "DistributedCABSTrainer", "save_checkpoint", "load_checkpoint", "gather_digests",
                "UnsupportedLayerError"):
        assert not hasattr(cabs_tf, old)
    assert cabs_tf.UnsupportedModelError is cabs_core.UnsupportedModelError
    assert cabs_tf.BatchNormTrainingError is cabs_core.BatchNormTrainingError
