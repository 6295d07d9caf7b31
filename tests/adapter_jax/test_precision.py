"""Low-precision parameters (issue 14, item 2): bfloat16 models give exact counts and
count, loss sum and S accumulated in >= float32, on the fast, generic and auto paths.

The oracle is a loop over single examples of the same model with its weights cast
to float64 (docs/jax.md, "Mixed precision"). A bfloat16 model computes its
forward and backward passes with ~3 significant digits, so its statistics can
only agree with the float64 model to about 1e-2: the documented tolerances are
``RTOL_BF16`` (relative, loss sum and S) and ``RTOL_GRAD`` (sum g); the count must be exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import cabs_jax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cabs_jax import FlaxLoss
from jax_test_models import cross_entropy, loop_oracle

from cabs_core import BatchStats, CABSController

#: documented tolerances (docs/jax.md): bfloat16 statistics vs the float64 model, on the loss
#: sum and S, and on grad_sum (the model's own bfloat16 backward pass summed over the examples)
RTOL_BF16, RTOL_GRAD = 1e-2, 5e-2


class SmallMLP(nn.Module):
    """Dense -> tanh -> Dense in the given dtypes (bfloat16 model, float64 oracle)."""

    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(8, dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return nn.Dense(3, dtype=self.dtype, param_dtype=self.param_dtype)(jnp.tanh(h))


def _loss(logits: jax.Array, example: Any) -> jax.Array:
    return cross_entropy(logits.astype(jnp.float32), example)


def _float64(fn: Any) -> Any:
    """Run ``fn`` with jax_enable_x64 on (the oracle is float64 whatever the test's setting)."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        return fn()
    finally:
        jax.config.update("jax_enable_x64", old)


def _case(m: int, seed: int = 0) -> tuple[FlaxLoss, Any, Any, Any]:
    """A bfloat16 Flax model, its float64 twin (same weights), and a batch of m examples."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(m, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=m)
    params = _float64(lambda: SmallMLP().init(jax.random.key(seed), jnp.asarray(x[:1]))["params"])
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    return FlaxLoss(SmallMLP(), _loss), params, (jnp.asarray(x), jnp.asarray(y)), (x, y)


@lru_cache(maxsize=4)
def _oracle(m: int, seed: int, real: int) -> BatchStats:
    """The float64 loop over the first ``real`` single examples of ``_case(m, seed)``, with the
    bfloat16 weights cast to float64."""
    _, params, _, (x, y) = _case(m, seed)

    def run() -> BatchStats:
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        floss64 = FlaxLoss(SmallMLP(dtype=jnp.float64, param_dtype=jnp.float64), cross_entropy)
        assert all(p.dtype == jnp.float64 for p in jax.tree.leaves(p64))
        return loop_oracle(floss64, p64, (jnp.asarray(x[:real], jnp.float64), jnp.asarray(y[:real])))

    return _float64(run)


def _assert_close_to_oracle(got: BatchStats, want: BatchStats, m: int) -> None:
    assert float(got.count) == m  # exact
    for name in ("loss_sum", "sq_norm_sum"):
        np.testing.assert_allclose(float(getattr(got, name)), float(getattr(want, name)), rtol=RTOL_BF16,
                                   err_msg=name)
    g = np.concatenate([np.asarray(a, np.float64).ravel() for a in got.grad_sum])
    w = np.concatenate([np.asarray(a, np.float64).ravel() for a in want.grad_sum])
    assert np.linalg.norm(g - w) <= RTOL_GRAD * np.linalg.norm(w)


@pytest.fixture(params=[True, False], ids=["x64", "x32"])
def x64(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Run with jax_enable_x64 on and off (bfloat16 parameters: statistics in float32 either way)."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", request.param)
    yield request.param
    jax.config.update("jax_enable_x64", old)


@pytest.mark.parametrize("method", ["fast", "generic", "auto"])
def test_bf16_flax_model_exact_count_and_wide_statistics(method: str, x64: bool) -> None:
    """257 examples: count 257.0 exactly (bfloat16 gave 256.0), count, loss sum and S in
    float32, grad_sum in the parameters' bfloat16, all close to the float64 model."""
    m = 257
    floss, params, batch, _ = _case(m)
    got = cabs_jax.batch_stats(floss, params, batch, method=method)
    for name in ("count", "loss_sum", "sq_norm_sum"):
        assert getattr(got, name).dtype == jnp.float32, name
    assert all(g.dtype == jnp.bfloat16 for g in got.grad_sum)
    _assert_close_to_oracle(got, _oracle(m, 0, m), m)


def test_bf16_padded_batch_counts_real_examples_under_jit(x64: bool) -> None:
    """1001 real examples padded to 1024 under jit: count 1001.0 exactly on both paths."""
    floss, params, batch, _ = _case(1024, seed=1)
    mask = jnp.asarray(np.arange(1024) < 1001)
    want = _oracle(1024, 1, 1001)
    for method in ("fast", "generic"):
        got = jax.jit(lambda p, b, w, method=method: cabs_jax.batch_stats(floss, p, b, w, method=method))(
            params, batch, mask)
        _assert_close_to_oracle(got, want, 1001)


def test_bf16_plain_loss_function_generic(x64: bool) -> None:
    """A plain ``loss(params, example)`` with bfloat16 parameters (no Flax), chunked: exact count,
    wide S, and a controller step that accepts the statistics."""
    rng = np.random.default_rng(3)
    m = 257
    x, y = rng.normal(size=(m, 6)), rng.normal(size=m)
    w = rng.normal(size=6)

    def loss(p: Any, ex: Any) -> jax.Array:
        pred = jnp.dot(ex[0].astype(p["w"].dtype), p["w"]) + p["b"]
        return 0.5 * (pred.astype(jnp.float32) - ex[1]) ** 2

    params = {"w": jnp.asarray(w, jnp.bfloat16), "b": jnp.zeros((), jnp.bfloat16)}
    got = cabs_jax.batch_stats(loss, params, (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)),
                               method="generic", chunk_size=64)
    want = _float64(lambda: loop_oracle(
        lambda p, ex: 0.5 * (jnp.dot(ex[0], p["w"]) + p["b"] - ex[1]) ** 2,
        {"w": jnp.asarray(params["w"], jnp.float64), "b": jnp.zeros((), jnp.float64)},
        (jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64))))
    assert got.sq_norm_sum.dtype == jnp.float32
    _assert_close_to_oracle(got, want, m)
    ctl = CABSController(lr=0.1, bs_min=16, bs_max=4096)
    state, info = ctl.update(ctl.init(), got)
    assert not info.skipped and state.step == 1
