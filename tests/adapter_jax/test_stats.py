"""Per-example statistics against a brute-force loop over single examples (float64)."""

from __future__ import annotations

import cabs_jax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cabs_jax import BatchNormTrainingError, FlaxLoss, UnsupportedModelError
from jax_test_models import MLP, EmbedLN, PaperCNN, assert_stats_close, cross_entropy, init_f64, loop_oracle

from cabs_core import FastPathFallbackWarning


def mlp_case(m: int = 9, seed: int = 0):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(m, 4)), rng.integers(0, 3, size=m)
    floss = FlaxLoss(MLP(), cross_entropy)
    return floss, init_f64(MLP(), x[:1], seed), (jnp.asarray(x), jnp.asarray(y))


def cnn_case(m: int = 4):
    rng = np.random.default_rng(1)
    module = PaperCNN(c1=4, c2=6, hidden=16)  # the paper's architecture, narrow, on 12x12 images
    x, y = rng.normal(size=(m, 12, 12, 1)), rng.integers(0, 10, size=m)
    return FlaxLoss(module, cross_entropy), init_f64(module, x[:1]), (jnp.asarray(x), jnp.asarray(y))


def embed_case(m: int = 7):
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 5, size=(m, 6))  # small vocabulary used: repeated ids within an example
    y = rng.integers(0, 3, size=m)
    module = EmbedLN(vocab=11, dim=16)  # position-wise Dense: T=6, p=q=16, so the Gram form is used
    params = init_f64(module, tokens[:1])
    # a non-trivial LayerNorm affine map, so that its gradients are checked away from scale 1, bias 0
    ln = params["LayerNorm_0"]
    params["LayerNorm_0"] = {"scale": ln["scale"] + 0.3 * jnp.arange(16.0), "bias": ln["bias"] - 0.1}
    return FlaxLoss(module, cross_entropy), params, (jnp.asarray(tokens), jnp.asarray(y))


CASES = {"mlp": mlp_case, "paper_cnn": cnn_case, "embed_layernorm": embed_case}


@pytest.mark.parametrize("case", CASES)
def test_stats_match_loop_over_single_examples_and_mask_drops_padding(case: str) -> None:
    """fast == generic == the loop, unmasked; and with a mask, == the loop over the real examples."""
    floss, params, batch = CASES[case]()
    m = jax.tree.leaves(batch)[0].shape[0]
    ones, mask = jnp.ones(m, bool), jnp.asarray(np.arange(m) < 3)
    want = loop_oracle(floss, params, batch)
    want_masked = loop_oracle(floss, params, jax.tree.map(lambda a: a[:3], batch))
    for method in ("fast", "generic"):
        step = jax.jit(lambda p, b, w, method=method: cabs_jax.batch_stats(floss, p, b, w, method=method))
        got = step(params, batch, ones)
        assert got.sq_norm_sum.dtype == jnp.float64
        assert_stats_close(got, want)
        assert_stats_close(step(params, batch, mask), want_masked)  # same program: masking is data
    # S > ||sum_i g_i||^2 / m unless all g_i are equal: the check is not vacuous
    g2 = sum(float(jnp.sum(g * g)) for g in want.grad_sum)
    assert float(want.sq_norm_sum) > 1.01 * g2 / float(want.count)
    # the oracle's own weighting agrees with dropping the examples
    assert_stats_close(loop_oracle(floss, params, batch, np.asarray(mask, np.float64)), want_masked)


@pytest.mark.parametrize("chunk_size", [2, 4, 100])
def test_chunked_equals_unchunked(chunk_size: int) -> None:
    floss, params, batch = mlp_case(m=9)
    mask = jnp.asarray(np.arange(9) != 4)
    whole = loop_oracle(floss, params, batch, np.asarray(mask, np.float64))
    chunked = jax.jit(lambda p, b, w: cabs_jax.generic_stats(floss, p, b, w, chunk_size=chunk_size))(
        params, batch, mask
    )
    assert_stats_close(chunked, whole, rtol=1e-12)
    assert float(chunked.count) == 8


def test_generic_path_on_a_plain_function() -> None:
    """Any loss(params, example) -> scalar: here a hand-written 2-layer network on a dict of arrays."""
    rng = np.random.default_rng(3)
    params = {"w1": jnp.asarray(rng.normal(size=(3, 4))), "w2": jnp.asarray(rng.normal(size=(4,)))}

    def loss(p, ex):
        return (jnp.tanh(ex["x"] @ p["w1"]) @ p["w2"] - ex["t"]) ** 2

    batch = {"x": jnp.asarray(rng.normal(size=(10, 3))), "t": jnp.asarray(rng.normal(size=10))}
    got = jax.jit(lambda p, b: cabs_jax.batch_stats(loss, p, b, chunk_size=3))(params, batch)
    assert_stats_close(got, loop_oracle(loss, params, batch))
    tree = cabs_jax.grad_tree(got, params)
    total_grad = jax.grad(lambda p: jnp.sum(jax.vmap(loss, (None, 0))(p, batch)))(params)
    np.testing.assert_allclose(tree["w2"], total_grad["w2"])
    with pytest.raises(UnsupportedModelError, match="FlaxLoss"):
        cabs_jax.batch_stats(loss, params, batch, method="fast")


class WithCustomParam(nn.Module):
    @nn.compact
    def __call__(self, x):
        temperature = self.param("temperature", nn.initializers.ones, ())
        return nn.Dense(3)(x) / temperature


class TiedEmbedding(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        emb = nn.Embed(7, 4)
        return emb.attend(jnp.mean(emb(tokens), axis=1))


class SharedDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        d = nn.Dense(4)
        return d(jnp.tanh(d(x)))


def test_unknown_layers_fall_back_or_are_refused() -> None:
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(5, 4)), rng.integers(0, 3, size=5)
    tokens, yt = rng.integers(0, 7, size=(5, 3)), rng.integers(0, 7, size=5)
    cases = [
        (WithCustomParam(), (jnp.asarray(x), jnp.asarray(y)), "temperature"),
        (SharedDense(), (jnp.asarray(x), jnp.asarray(y % 3)), "more than once"),
    ]
    for module, batch, why in cases:
        floss = FlaxLoss(module, cross_entropy)
        params = init_f64(module, batch[0][:1])
        assert cabs_jax.is_supported(floss, params, batch)[0] is False
        with pytest.raises(UnsupportedModelError, match=why):
            cabs_jax.batch_stats(floss, params, batch, method="fast")
        # "auto" falls back to the generic path: still exact
        with pytest.warns(FastPathFallbackWarning, match=why):
            auto = jax.jit(lambda p, b, floss=floss: cabs_jax.batch_stats(floss, p, b))(params, batch)
        assert_stats_close(auto, loop_oracle(floss, params, batch))
    # Embed.attend, the tied output projection Flax offers, is exact on the fast path (issue 12; it was refused)
    floss, batch = FlaxLoss(TiedEmbedding(), cross_entropy), (jnp.asarray(tokens), jnp.asarray(yt))
    params = init_f64(TiedEmbedding(), tokens[:1])
    assert cabs_jax.is_supported(floss, params, batch) == (True, None)
    assert_stats_close(cabs_jax.batch_stats(floss, params, batch, method="fast"), loop_oracle(floss, params, batch))


class WithBatchNorm(nn.Module):
    train: bool

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.BatchNorm(use_running_average=not self.train)(nn.Dense(4)(x)))


def test_batchnorm_training_is_refused_eval_is_exact() -> None:
    rng = np.random.default_rng(5)
    batch = (jnp.asarray(rng.normal(size=(6, 4))), jnp.asarray(rng.integers(0, 3, size=6)))
    variables = WithBatchNorm(train=False).init(jax.random.key(0), batch[0])
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables["params"])
    stats = {"batch_stats": {"BatchNorm_0": {"mean": jnp.full((4,), 0.2), "var": jnp.full((4,), 1.5)}}}
    for method in ("auto", "fast", "generic"):
        train = FlaxLoss(WithBatchNorm(train=True), cross_entropy, collections=stats)
        with pytest.raises(BatchNormTrainingError, match="use_running_average=True.*group_variance"):
            cabs_jax.batch_stats(train, params, batch, method=method)
    evaluation = FlaxLoss(WithBatchNorm(train=False), cross_entropy, collections=stats)
    with pytest.raises(UnsupportedModelError, match="BatchNorm_0/"):
        cabs_jax.batch_stats(evaluation, params, batch, method="fast")
    got = jax.jit(lambda p, b: cabs_jax.batch_stats(evaluation, p, b))(params, batch)
    assert_stats_close(got, loop_oracle(evaluation, params, batch))


class ConvVariants(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(3, (3, 2), strides=(2, 1), padding="VALID")(x)
        x = nn.Conv(2, (2, 2), kernel_dilation=2, padding="CIRCULAR", use_bias=False)(x)
        x = nn.Conv(2, (3, 3), padding=[(1, 0), (2, 1)])(x)
        x = nn.Conv(2, (2, 2), input_dilation=(2, 1), strides=2, padding=[(1, 1), (0, 1)])(x)  # unfolded by lax patches
        return nn.Dense(3)(x.reshape((x.shape[0], -1)))


class Conv1DVariants(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(3, 3, padding="CAUSAL", kernel_dilation=2)(x)
        x = nn.Conv(3, 2, padding="REFLECT", use_bias=False)(x)
        x = nn.LayerNorm(use_scale=False, use_fast_variance=False)(x)
        return nn.Dense(3, use_bias=False)(x.reshape((x.shape[0], -1)))


@pytest.mark.parametrize("module, shape", [(ConvVariants(), (3, 9, 7, 2)), (Conv1DVariants(), (3, 8, 2))])
def test_conv_strides_dilation_and_paddings(module: nn.Module, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(6)
    batch = (jnp.asarray(rng.normal(size=shape)), jnp.asarray(rng.integers(0, 3, size=shape[0])))
    floss = FlaxLoss(module, cross_entropy)
    params = init_f64(module, batch[0][:1])
    assert cabs_jax.is_supported(floss, params, batch) == (True, None)
    got = jax.jit(lambda p, b: cabs_jax.batch_stats(floss, p, b, method="fast"))(params, batch)
    assert_stats_close(got, loop_oracle(floss, params, batch))


def test_bad_arguments_name_the_problem() -> None:
    floss, params, batch = mlp_case()
    with pytest.raises(ValueError, match="weights must have shape"):
        cabs_jax.batch_stats(floss, params, batch, jnp.ones(3))
    with pytest.raises(ValueError, match="chunk_size"):
        cabs_jax.generic_stats(floss, params, batch, chunk_size=0)
    with pytest.raises(ValueError, match="method"):
        cabs_jax.batch_stats(floss, params, batch, method="exact")
    with pytest.raises(ValueError, match="leading example axis"):
        cabs_jax.batch_stats(floss, params, (batch[0], batch[1][:4]))


@pytest.mark.parametrize("method", ["auto", "fast", "generic"])
def test_numpy_batches_are_accepted(method: str) -> None:
    """Issue 14, item 5: NumPy batches (and a NumPy mask) give the same statistics as jax arrays."""
    floss, params, (x, y) = mlp_case()
    batch = (np.asarray(x), np.asarray(y))
    got = cabs_jax.batch_stats(floss, params, batch, np.ones(len(y)), method=method)
    assert_stats_close(got, loop_oracle(floss, params, (x, y)))


@pytest.mark.parametrize("method", ["auto", "fast", "generic"])
def test_empty_batch_is_a_skipped_step(method: str) -> None:
    """Issue 14, item 4: an empty batch gives count 0 on every path, and the controller skips it."""
    from cabs_core import CABSController

    floss, params, (x, y) = mlp_case()
    st = cabs_jax.batch_stats(floss, params, (x[:0], y[:0]), method=method)
    assert (float(st.count), float(st.loss_sum), float(st.sq_norm_sum)) == (0.0, 0.0, 0.0)
    assert [g.shape for g in st.grad_sum] == [p.shape for p in jax.tree.leaves(params)]
    ctl = CABSController(lr=0.1)
    _, info = ctl.update(ctl.init(), st)
    assert info.skipped and info.reason == "count"


@pytest.mark.parametrize("method", ["auto", "generic"])
def test_nan_and_inf_in_padding_rows_change_nothing(method: str) -> None:
    """Issue 14, item 3: masked (weight 0) rows reach no sum, whatever they hold."""
    floss, params, (x, y) = mlp_case(m=7)
    w = np.array([1, 0, 1, 1, 0, 1, 1], np.float64)
    x = np.array(x)
    x[1, 0], x[4, 2] = np.nan, np.inf
    got = cabs_jax.batch_stats(floss, params, (jnp.asarray(x), y), jnp.asarray(w), method=method)
    keep = w.astype(bool)
    assert_stats_close(got, loop_oracle(floss, params, (jnp.asarray(x[keep]), y[keep])))
