"""How TensorFlow values reach the core: TF tensors have no Array API
namespace, so statistics are reduced with TF ops on their device to the four
scalars of ScalarStats, stacked, and copied to the host once."""

from __future__ import annotations

import numpy as np
import pytest

from cabs_core import CABSController, ScalarStats, batch_stats_from_per_example, reduce_stats, to_host

tf = pytest.importorskip("tensorflow")


def _tf_scalar_stats(losses, grads) -> ScalarStats:
    """The reduction a TF adapter does inside tf.function: four scalars, one tensor."""
    g2 = tf.add_n([tf.reduce_sum(tf.square(tf.reduce_sum(g, axis=0))) for g in grads])
    s = tf.add_n([tf.reduce_sum(tf.square(g)) for g in grads])
    m = tf.cast(tf.shape(losses)[0], losses.dtype)
    return ScalarStats.from_vector(tf.stack([m, tf.reduce_sum(losses), s, g2]).numpy())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tf_reduction_feeds_the_core_like_numpy(dtype):
    rng = np.random.default_rng(0)
    losses, grads = (
        rng.random(9).astype(dtype),
        [rng.normal(size=(9, 3, 2)).astype(dtype), rng.normal(size=(9, 4)).astype(dtype)],
    )
    via_tf = _tf_scalar_stats(tf.constant(losses), [tf.constant(g) for g in grads])
    via_np = reduce_stats(batch_stats_from_per_example(losses, grads))
    np.testing.assert_allclose(to_host(via_tf), to_host(via_np), rtol=1e-6 if dtype == np.float32 else 1e-13)
    ctl = CABSController(lr=0.5, bs_min=1, bs_max=10_000)
    assert ctl.update(ctl.init(), via_tf)[1].batch_size == ctl.update(ctl.init(), via_np)[1].batch_size


def test_eager_tf_scalars_are_accepted_directly():
    s = ScalarStats(*(tf.constant(v, tf.float64) for v in (4.0, 8.0, 41.0, 4.0)))
    assert to_host(s) == (4.0, 8.0, 41.0, 4.0)


def test_from_vector_needs_four_values():
    with pytest.raises(ValueError, match="needs 4 values"):
        ScalarStats.from_vector(np.zeros(3))
