"""Issue 12, the checks' cost: a re-probe reuses the first probe's trace, and the
probe is not replaced by one through the step's own function at the full batch size.

A probe at the full batch size m (fast S of k rows kept by the weights against
backward passes with one-hot weights, all through the batch of m) cannot see a
model whose output depends on the batch itself: the examples interacting (the zoo's
``batch_mix``, centring over the batch) or a scale by the batch size (below). The
probe compares with single examples at a batch size no other dimension has, and
refuses both (docs/performance.md, TensorFlow, issue 12)."""

import cabs_tf
import keras
import numpy as np
import pytest
import tensorflow as tf
from exactness_models import F64, build, float_data, oracle_s, run_stats
from keras import layers as kl
from keras import ops
from tf_adapter_helpers import mlp, xent


class BatchScaled(keras.Model):
    """A hidden layer scaled by the square root of the batch size: the output depends on m."""

    def __init__(self, d: int, classes: int = 3, **kw):
        super().__init__(dtype=F64, **kw)
        self.inner = kl.Dense(d, activation="tanh", dtype=F64, name="inner")
        self.head = kl.Dense(classes, dtype=F64, name="head")

    def call(self, x):
        scale = ops.sqrt(ops.cast(ops.shape(x)[0], x.dtype))
        return self.head(ops.mean(self.inner(x) * scale, axis=1))


@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_a_batch_size_dependent_model_is_refused_and_auto_is_exact(mode):
    t, d, m = 3, 4, 7
    model = build(BatchScaled(d), float_data(2, t, d)[0])
    x, y = float_data(m, t, d)
    what, err = run_stats(model, xent, x, y, "fast", mode)
    assert what == "refused" and "probe batch" in str(err)
    what, s = run_stats(model, xent, x, y, "auto", mode)
    assert what == "fallback"
    np.testing.assert_allclose(s, oracle_s(model, xent, x, y), rtol=1e-9)


def test_a_reprobe_reuses_the_first_probes_trace():
    model = mlp()
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(9, 12)))
    y = tf.constant(rng.integers(0, 5, size=9))
    step = cabs_tf.PerExampleStats(model, xent, method="fast")
    assert step.verify(x, y) and step.verify(x, y)
    x2 = tf.constant(rng.normal(size=(9, 12)))
    assert step.verify(x2, y)
    assert step.probe_count == 3
    (fn,) = step._probe_fns.values()
    assert fn.experimental_get_tracing_count() == 1  # one trace per signature, however many probes
