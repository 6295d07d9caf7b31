"""Run in a fresh process by test_distributed_tf.py: split the CPU into 2 logical
devices (before TensorFlow initialises them), run CABS with MirroredStrategy
and on a single device, and write what happened as JSON to argv[1]."""

import json
import os
import sys
import tempfile

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cabs_tf  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from cabs_conformance.loop_reference import problem  # noqa: E402

import cabs_core  # noqa: E402
from cabs_core.loop import digest_words, words_digest  # noqa: E402

STEPS = 8
DEVICES = cabs_tf.logical_cpu_devices(2)


def xent(y_true, y_pred):
    return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)


def mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((6,), dtype="float64"),
        keras.layers.Dense(8, activation="tanh", dtype="float64"),
        keras.layers.Dense(3, dtype="float64"),
    ])


rng = np.random.default_rng(1)
X = rng.normal(size=(60, 6))
Y = rng.integers(0, 3, size=60).astype("int32")
CTL = cabs_core.CABSController(lr=0.5, c=6.0, bs_min=3, bs_max=40, bs_init=5)
strategy = tf.distribute.MirroredStrategy(DEVICES)


def dist_trainer(check_every=1):
    with strategy.scope():
        model = mlp()
    return cabs_tf.DataParallelCABSTrainer(model, xent, CTL, (X, Y), strategy=strategy, seed=7,
                                           check_every=check_every)


def single_trainer():
    return cabs_tf.CABSTrainer(mlp(), xent, CTL, (X, Y), seed=7)


def infos(run):
    return [[i.batch_size, i.skipped, i.variance, i.loss] for i in run]


def weights(trainer):
    return [v.numpy().tolist() for v in trainer.stats.variables]


def replica_copies(trainer):
    return [[c.numpy().tolist() for c in strategy.experimental_local_results(v.value)] for v in trainer.stats.variables]


out = {"devices": DEVICES, "replicas": strategy.num_replicas_in_sync}

# 1. the same global batches on one device and on two replicas
ref = single_trainer()
sizes_ref = [ref.state.batch_size]
out["single"] = infos(ref.run(STEPS, lambda k, i: sizes_ref.append(i.batch_size)))
out["single_weights"] = weights(ref)
out["single_state"] = ref.state.to_dict()

dist = dist_trainer()
sizes = [dist.state.batch_size]
out["dist"] = infos(dist.run(STEPS, lambda k, i: sizes.append(i.batch_size)))
out["dist_weights"] = weights(dist)
out["dist_replica_copies"] = replica_copies(dist)
out["dist_state"] = dist.state.to_dict()
out["dist_sampler"] = dist.sampler.to_dict()
out["batch_sizes_used"] = sizes[:-1]
out["buckets"] = list(dist.buckets)
out["shard_buckets"] = list(cabs_core.shard_buckets(dist.buckets, 2))
out["trace_count"] = dist.trace_count

# 2. checkpoint after half the steps; resume with 2 replicas and with 1 device
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "ckpt.npz")
    first = dist_trainer()
    first.run(STEPS // 2)
    first.save(path)
    again = dist_trainer()
    again.restore(path)
    out["resume2"] = infos(again.run(STEPS - STEPS // 2))
    out["resume2_weights"] = weights(again)
    out["resume2_replica_copies"] = replica_copies(again)
    out["resume2_state"] = again.state.to_dict()
    one = single_trainer()
    one.restore(path)
    out["resume1"] = infos(one.run(STEPS - STEPS // 2))
    out["resume1_weights"] = weights(one)
    out["resume1_state"] = one.state.to_dict()
    with np.load(path) as f:
        out["checkpoint_replicas"] = json.loads(str(f["envelope"]))["replicas"]

# 3. a global batch smaller than the number of replicas: one shard is empty
tiny_d, tiny_s = dist_trainer(check_every=0), single_trainer()
xb, yb, mask = X[:2], Y[:2], np.array([1.0, 0.0])
out["tiny"] = infos([tiny_d.step((xb, yb, mask))]) + infos([tiny_s.step((xb, yb, mask))])
out["tiny_weights"] = [weights(tiny_d), weights(tiny_s)]

# 3b. no strategy given: the default (one-replica) strategy, same as CABSTrainer
plain = cabs_tf.DataParallelCABSTrainer(mlp(), xent, CTL, (X, Y), seed=7, check_every=1)
out["default"] = infos(plain.run(3))
out["default_replicas"] = plain.strategy.num_replicas_in_sync

# 4. desync: digests through the collective, equal and injected-different
big = (1 << 62) + 12345
gather = dist.backend.gather_replicas  # int32 words, one all-gather
out["gather_equal"] = [words_digest(w) for w in gather(lambda r: digest_words(big))]
dist.check_sync()  # one controller: agrees
try:
    digests = [words_digest(w) for w in gather(lambda r: digest_words(big + r))]
    cabs_core.check_digests(digests, dist.state.step, [f"replica {r}" for r in range(len(digests))])
    out["desync"] = None
except cabs_core.DesyncError as e:
    out["desync"] = {"message": str(e), "step": e.step, "digests": e.digests}

# 5. refusals
with tf.device(DEVICES[0]):
    outside = mlp()
try:
    cabs_tf.DataParallelCABSTrainer(outside, xent, CTL, (X, Y), strategy=strategy)
    out["outside_scope"] = None
except ValueError as e:
    out["outside_scope"] = str(e)
try:
    cabs_tf.logical_cpu_devices(3)
    out["late_split"] = None
except RuntimeError as e:
    out["late_split"] = str(e)

# 6. the linear problem of cabs_conformance.loop_reference on 2 replicas: plain SGD, micro-batches of at
#    most 3 per replica, Keras SGD with momentum (compared with the NumPy reference in the test)
(LX, LY), LW0 = problem()
LCTL = cabs_core.CABSController(lr=0.05, c=40.0, bs_min=4, bs_max=64, mu=0.9)
keras.backend.set_floatx("float64")  # the optimizer's learning rate: 0.05 exactly
for tag, kw in (("plain", {}), ("micro", dict(max_micro_batch=3)), ("momentum", dict(momentum=0.9))):
    with strategy.scope():
        lin = keras.Sequential([keras.Input((len(LW0),), dtype="float64"),
                                keras.layers.Dense(1, use_bias=False, dtype="float64", kernel_initializer="zeros")])
        opt = keras.optimizers.SGD(learning_rate=0.05, momentum=kw.pop("momentum")) if "momentum" in kw else None
    tr = cabs_tf.DataParallelCABSTrainer(lin, lambda yt, yp: 0.5 * (yp[:, 0] - yt) ** 2, LCTL, (LX, LY),
                                         strategy=strategy, optimizer=opt, check_every=2, **kw)
    out[f"linear_{tag}"] = [[i.batch_size for i in tr.run(STEPS)], lin.weights[0].numpy()[:, 0].tolist(),
                            tr.trace_count]
keras.backend.set_floatx("float32")

with open(sys.argv[1], "w") as f:
    json.dump(out, f)
