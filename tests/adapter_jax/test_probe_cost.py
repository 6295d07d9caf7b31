"""Issue 12, the checks' cost: what the first probe compiles, and why it is not run
through the step's own program at the full batch size.

- The first probe of a signature compiles exactly one program (the probe's) and a
  re-probe none: a regression guard for the probe that ran under
  ``jax.ensure_compile_time_eval`` and compiled every constant operation of its own
  trace separately (37 compilations for a two-layer MLP, 4x the CPU time).
- A "masked" probe through the step's program (fast S of k rows kept by the weights
  against k backward passes with one-hot weights, all at the batch size m) would
  accept models whose examples interact within the batch or whose output depends on
  the batch size: the fast S and the one-hot gradients then agree with each other but
  not with the loop over single examples. Today's probe, which compares with single
  examples at a batch size no other dimension has, refuses them; the tests show both.
"""

from __future__ import annotations

import warnings

import cabs_jax
import flax.linen as nn
import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest
from cabs_jax import FlaxLoss
from cabs_jax.flax_fast import fast_stats_unchecked
from cabs_jax.verify import resolve
from jax_test_models import MLP, assert_stats_close, cross_entropy, init_f64, loop_oracle

from cabs_core import FastPathFallbackWarning, UnsupportedModelError, relative_error

_COMPILES: list[str] | None = None


def _on_event(name: str, secs: float, **kwargs: object) -> None:
    if _COMPILES is not None and name == "/jax/core/compile/backend_compile_duration":
        _COMPILES.append(name)


jax.monitoring.register_event_duration_secs_listener(_on_event)


def _compiles(fn) -> int:
    """How many XLA compilations ``fn()`` triggers."""
    global _COMPILES
    _COMPILES = []
    try:
        fn()
        return len(_COMPILES)
    finally:
        _COMPILES = None


def _batch(m: int, d: int = 4, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(m, d))), jnp.asarray(rng.integers(0, 3, size=m))


def test_first_probe_compiles_one_program_and_a_reprobe_none() -> None:
    floss, batch = FlaxLoss(MLP(), cross_entropy), _batch(9)
    params = init_f64(MLP(), batch[0][:1])
    jax.block_until_ready((params, batch))
    assert _compiles(lambda: resolve(floss, params, batch, None, "fast")) == 1
    assert _compiles(lambda: resolve(floss, params, batch, None, "fast", reprobe=True)) == 0
    # inside a caller's jit the probe runs at trace time: its program and the caller's, nothing else
    floss2 = FlaxLoss(MLP(), cross_entropy)
    stats = jax.jit(lambda p, b: cabs_jax.batch_stats(floss2, p, b, method="fast"))
    assert _compiles(lambda: jax.block_until_ready(stats(params, batch))) == 2


class BatchCentered(nn.Module):
    """The inputs centred on the batch mean before the first layer (examples interact)."""

    @nn.compact
    def __call__(self, x):
        x = x - jnp.mean(x, axis=0, keepdims=True) + 0.5 * x
        return nn.Dense(3)(jnp.tanh(nn.Dense(5)(x)))


class BatchScaled(nn.Module):
    """A hidden layer scaled by the batch size (the output depends on m)."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(5)(x)) * (x.shape[0] ** 0.5)
        return nn.Dense(3)(h)


def _masked_probe(floss: FlaxLoss, params, batch, k: int) -> tuple[float, float]:
    """What a probe through the step's program at the full batch size would compare: the fast S
    with weights keeping the first k rows, and sum_i ||g_i||^2 with g_i the gradient of the
    one-hot weighted loss (plain backpropagation through the whole batch)."""
    m = batch[0].shape[0]
    keep = jnp.zeros((m,)).at[:k].set(1.0)
    s_fast = float(fast_stats_unchecked(floss, params, batch, keep).sq_norm_sum)

    def weighted(p, w):
        return jnp.sum(w * floss.batch_losses(p, batch))

    s_onehot = 0.0
    for i in range(k):
        g = jax.grad(weighted)(params, jnp.zeros((m,)).at[i].set(1.0))
        s_onehot += float(sum(jnp.sum(a**2) for a in jax.tree.leaves(g)))
    return s_fast, s_onehot


@pytest.mark.parametrize("module", [BatchCentered(), BatchScaled()], ids=["centered", "scaled"])
def test_a_probe_at_the_full_batch_size_would_accept_what_the_probe_refuses(module: nn.Module) -> None:
    m, k = 7, 3  # m differs from every other dimension (4, 5, 3 are the features, hidden and classes)
    floss, batch = FlaxLoss(module, cross_entropy), _batch(m, seed=1)
    params = init_f64(module, batch[0][:1])
    want = loop_oracle(floss, params, batch)
    s_fast, s_onehot = _masked_probe(floss, params, batch, k)
    assert relative_error(s_fast, s_onehot) < 1e-10  # the masked check would pass ...
    s_all = float(fast_stats_unchecked(floss, params, batch).sq_norm_sum)
    assert relative_error(s_all, float(want.sq_norm_sum)) > 1e-3  # ... on a wrong S
    with pytest.raises(UnsupportedModelError, match="fast S on a probe batch"):
        cabs_jax.batch_stats(floss, params, batch, method="fast")
    floss2 = FlaxLoss(module, cross_entropy)
    with pytest.warns(FastPathFallbackWarning):
        got = cabs_jax.batch_stats(floss2, params, batch)
    assert_stats_close(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathFallbackWarning)
        assert_stats_close(cabs_jax.batch_stats(floss2, params, batch), want)
