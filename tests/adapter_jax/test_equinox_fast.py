"""The fast path for Equinox modules (issue 15, cabs_jax.eqx_fast) against float64 loops over single
examples: an MLP, CNNs (strides, dilation, groups, reflect padding), a small GPT (Embedding, learned
positions, causal MultiheadAttention, LayerNorm, tied head), raw uses of a weight, a generated stack
of supported layers; the steps aside (a layer inside lax.scan, an unseen use of a weight, too much
to materialise) and one CABSTrainer step on the fast path."""

from __future__ import annotations

import cabs_jax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cabs_jax import CABSTrainer, EquinoxLoss, eqx_fast
from cabs_jax.verify import probes_run
from hypothesis import given, settings
from hypothesis import strategies as st
from jax_test_models import assert_fast_exact as exact_on_fast_path
from jax_test_models import assert_stats_close, cross_entropy, loop_oracle

from cabs_core import CABSController, FastPathFallbackWarning, UnsupportedModelError

F64 = jnp.float64


def data(n: int, shape: tuple[int, ...], classes: int, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(n,) + shape)), jnp.asarray(rng.integers(0, classes, size=n))


def tokens(n: int, seq: int, vocab: int, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, vocab, (n, seq))), jnp.asarray(rng.integers(0, vocab, (n, seq)))


def assert_fast_exact(loss: EquinoxLoss, batch: tuple, mask: np.ndarray | None = None) -> None:
    """method="fast" and "auto" equal the float64 loop, from one established verdict."""
    exact_on_fast_path(loss, batch, mask, probes=1)


def token_loss(logits: jax.Array, example: tuple) -> jax.Array:
    """Mean next-token cross-entropy of one sequence."""
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), example[1][:, None], axis=-1))


def test_mlp_with_padding_is_exact_on_the_fast_path() -> None:
    model = eqx.nn.MLP(4, 3, 6, 2, activation=jnp.tanh, key=jax.random.PRNGKey(0), dtype=F64)
    loss = EquinoxLoss(model, cross_entropy)
    assert_fast_exact(loss, data(9, (4,), 3), np.array([1, 1, 0, 1, 1, 1, 0, 1, 1], np.float64))
    jitted = jax.jit(lambda p, b, w: cabs_jax.batch_stats(loss, p, b, w, method="fast"))  # inside the user's jit
    batch, mask = data(8, (4,), 3, seed=1), np.array([1, 1, 1, 0, 1, 1, 1, 1], np.float64)
    assert_stats_close(jitted(loss.params, batch, jnp.asarray(mask)), loop_oracle(loss, loss.params, batch, mask))


class Reused(eqx.Module):
    """A Linear called twice and its weight reused as ``W @ h`` (y = W a: the calls' positions and the
    product's are one layer's), a head whose bias is frozen (filter_spec)."""

    lin: eqx.nn.Linear
    head: eqx.nn.Linear

    def __init__(self, key: jax.Array) -> None:
        k1, k2 = jax.random.split(key)
        self.lin, self.head = eqx.nn.Linear(4, 4, key=k1, dtype=F64), eqx.nn.Linear(4, 3, key=k2, dtype=F64)

    def __call__(self, x: jax.Array) -> jax.Array:
        assert isinstance(self.lin, eqx.nn.Linear)  # also the recording wrapper the fast path puts in its place
        h = jnp.tanh(self.lin(x))
        h = jnp.tanh(self.lin(h) + self.lin.weight @ (h * h))
        return self.head(h)


def test_a_layer_called_twice_and_its_weight_reused_is_exact_and_frozen_leaves_are_left_out() -> None:
    model = Reused(jax.random.PRNGKey(1))
    spec = eqx.tree_at(lambda m: m.head.bias, jax.tree.map(eqx.is_inexact_array, model), replace=False)
    loss = EquinoxLoss(model, cross_entropy, filter_spec=spec)
    assert loss.params.head.bias is None
    assert_fast_exact(loss, data(7, (4,), 3, seed=1), np.array([1, 1, 1, 0, 1, 1, 1], np.float64))
    methods = [u.method for u in eqx_fast._plan(loss, loss.params, data(7, (4,), 3)[0], 7) if u.path == ("lin",)]
    assert methods == ["0", "1", "2@"]


class CNN(eqx.Module):
    """conv (stride, reflect padding), grouped dilated conv, a conv without bias, LayerNorm over
    (channels, height, width), a linear head."""

    c1: eqx.nn.Conv2d
    c2: eqx.nn.Conv2d
    c3: eqx.nn.Conv2d
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, key: jax.Array) -> None:
        k = jax.random.split(key, 4)
        self.c1 = eqx.nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=1, padding_mode="REFLECT", key=k[0], dtype=F64)
        self.c2 = eqx.nn.Conv2d(4, 6, (3, 2), padding="SAME", dilation=(1, 2), groups=2, key=k[1], dtype=F64)
        self.c3 = eqx.nn.Conv2d(6, 3, 1, use_bias=False, key=k[2], dtype=F64)
        self.norm = eqx.nn.LayerNorm((3, 4, 4), dtype=F64)
        self.head = eqx.nn.Linear(48, 5, key=k[3], dtype=F64)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.tanh(self.c2(jnp.tanh(self.c1(x))))
        return self.head(jnp.ravel(self.norm(self.c3(h))))


def test_cnn_with_strides_groups_and_layernorm_is_exact() -> None:
    assert_fast_exact(EquinoxLoss(CNN(jax.random.PRNGKey(1)), cross_entropy), data(7, (2, 8, 8), 5, seed=2),
                      np.array([1, 1, 1, 0, 1, 1, 1], np.float64))


class Conv1dNet(eqx.Module):
    """A grouped Conv1d applied inside an inner vmap over axis 1 with out_axes=2 (two positions per
    example), a scalar Linear."""

    conv: eqx.nn.Conv1d
    out: eqx.nn.Linear

    def __init__(self, key: jax.Array) -> None:
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv1d(4, 6, 3, stride=2, groups=2, padding="VALID", key=k1, dtype=F64)
        self.out = eqx.nn.Linear("scalar", 6, key=k2, dtype=F64)

    def __call__(self, x: jax.Array) -> jax.Array:  # x (4, 2, 9): the inner vmap over axis 1
        h = jnp.tanh(jax.vmap(self.conv, in_axes=1, out_axes=2)(x))  # (6, 4, 2)
        return jax.vmap(self.out)(jnp.mean(h, axis=(1, 2)))[:3, 0] + h[:3, 0, 0]


def test_grouped_conv1d_under_an_inner_vmap_and_a_scalar_linear_are_exact() -> None:
    assert_fast_exact(EquinoxLoss(Conv1dNet(jax.random.PRNGKey(2)), cross_entropy), data(6, (4, 2, 9), 3, seed=4))


class GPT(eqx.Module):
    """Token embedding, learned positions (a raw array), causal MultiheadAttention blocks with an MLP
    and LayerNorms, a final LayerNorm and a head tied to the embedding (``head`` picks how it is written)."""

    embed: eqx.nn.Embedding
    pos: jax.Array
    blocks: tuple
    norm: eqx.nn.LayerNorm
    head: str = eqx.field(static=True)

    def __init__(self, key: jax.Array, head: str = "h @ W.T", vocab: int = 11, d: int = 8, seq: int = 5,
                 layers: int = 1) -> None:
        k = jax.random.split(key, 2 + 2 * layers)
        self.embed = eqx.nn.Embedding(vocab, d, key=k[0], dtype=F64)
        self.pos = 0.1 * jax.random.normal(k[1], (seq, d), F64)
        self.blocks = tuple(
            (eqx.nn.LayerNorm(d, dtype=F64),
             eqx.nn.MultiheadAttention(2, d, use_query_bias=True, use_output_bias=True, key=k[2 + 2 * i], dtype=F64),
             eqx.nn.LayerNorm(d, dtype=F64),
             eqx.nn.MLP(d, d, 16, 1, activation=jax.nn.gelu, key=k[3 + 2 * i], dtype=F64))
            for i in range(layers))
        self.norm = eqx.nn.LayerNorm(d, dtype=F64)
        self.head = head

    def __call__(self, toks: jax.Array) -> jax.Array:
        t = toks.shape[0]
        h = jax.vmap(self.embed)(toks) + self.pos[:t]
        causal = jnp.tril(jnp.ones((t, t), bool))
        for norm1, attn, norm2, mlp in self.blocks:
            a = jax.vmap(norm1)(h)
            h = h + attn(a, a, a, mask=causal)
            h = h + jax.vmap(mlp)(jax.vmap(norm2)(h))
        h = jax.vmap(self.norm)(h)
        if self.head == "h @ W.T":
            return h @ self.embed.weight.T
        return jnp.einsum("td,vd->tv", h, self.embed.weight)  # another raw use: materialised per example


def test_small_gpt_with_tied_head_and_learned_positions_is_exact_on_the_fast_path() -> None:
    loss = EquinoxLoss(GPT(jax.random.PRNGKey(4)), token_loss)
    batch, mask = tokens(5, 5, 11, seed=5), np.array([1, 0, 1, 1, 1], np.float64)  # T == m
    assert_fast_exact(loss, batch, mask)
    uses = {(u.path, u.method) for u in eqx_fast._plan(loss, loss.params, batch[0], 5)}
    assert (("pos",), "array") in uses  # the learned positions: materialised per example
    assert (("embed",), "1@") in uses  # the tied head recorded as a use of the table (Gram form)


def test_a_tied_head_through_einsum_is_materialised_with_its_cross_term() -> None:
    loss = EquinoxLoss(GPT(jax.random.PRNGKey(5), head="einsum", layers=0), token_loss)
    batch, mask = tokens(5, 4, 11, seed=6), np.array([1, 1, 1, 0, 1], np.float64)
    assert_fast_exact(loss, batch, mask)
    uses = {(u.path, u.method) for u in eqx_fast._plan(loss, loss.params, batch[0], 5)}
    assert (("embed",), "raw:weight") in uses  # the table's raw use: materialised, cross term by a JVP


class Scanned(eqx.Module):
    """Linear layers stacked with eqx.filter_vmap and applied with lax.scan (materialised per example:
    the stack is not a layer as declared), and a Linear cell called in a lax.scan loop (an inner trace)."""

    stack: eqx.nn.Linear
    cell: eqx.nn.Linear
    head: eqx.nn.Linear

    def __init__(self, key: jax.Array) -> None:
        k1, k2, k3 = jax.random.split(key, 3)
        self.stack = eqx.filter_vmap(lambda k: eqx.nn.Linear(4, 4, key=k, dtype=F64))(jax.random.split(k1, 2))
        self.cell = eqx.nn.Linear(4, 4, key=k3, dtype=F64)
        self.head = eqx.nn.Linear(4, 3, key=k2, dtype=F64)

    def __call__(self, x: jax.Array) -> jax.Array:
        params, static = eqx.partition(self.stack, eqx.is_array)

        def body(h: jax.Array, p: eqx.nn.Linear) -> tuple:
            return jnp.tanh(eqx.combine(p, static)(h)), None

        h = jax.lax.scan(body, x, params)[0]
        h = jax.lax.scan(lambda h, _: (jnp.tanh(self.cell(h)), None), h, None, length=2)[0]
        return self.head(h)


def test_layers_stacked_for_scan_are_materialised_exactly() -> None:
    class StackOnly(Scanned):
        def __call__(self, x: jax.Array) -> jax.Array:
            params, static = eqx.partition(self.stack, eqx.is_array)
            h = jax.lax.scan(lambda h, p: (jnp.tanh(eqx.combine(p, static)(h)), None), x, params)[0]
            return self.head(h)

    loss = EquinoxLoss(StackOnly(jax.random.PRNGKey(9)), cross_entropy)
    assert_fast_exact(loss, data(7, (4,), 3, seed=9))
    methods = {u.path: u.method for u in eqx_fast._plan(loss, loss.params, data(7, (4,), 3)[0], 7)}
    assert methods[("stack", "weight")] == "array" and methods[("head",)] == "0"


class WeightDecayInside(eqx.Module):
    """A weight used outside its layer through the module's leaves (an L2 term in the forward pass)."""

    lin: eqx.nn.Linear
    head: eqx.nn.Linear

    def __init__(self, key: jax.Array) -> None:
        k1, k2 = jax.random.split(key)
        self.lin, self.head = eqx.nn.Linear(4, 5, key=k1, dtype=F64), eqx.nn.Linear(5, 3, key=k2, dtype=F64)

    def __call__(self, x: jax.Array) -> jax.Array:
        l2 = sum(jnp.sum(jnp.square(a)) for a in jax.tree.leaves(eqx.filter(self.lin, eqx.is_inexact_array)))
        return self.head(jnp.tanh(self.lin(x))).at[0].add(0.1 * l2 * x[0])  # one logit: not a softmax shift


@pytest.mark.parametrize(("model", "match"), [(Scanned, "inner trace"), (WeightDecayInside, "lin")])
def test_steps_aside_auto_falls_back_exactly_and_fast_raises(model: type, match: str) -> None:
    loss = EquinoxLoss(model(jax.random.PRNGKey(6)), cross_entropy)
    batch = data(7, (4,), 3, seed=6)
    want = loop_oracle(loss, loss.params, batch, None)
    with pytest.raises(UnsupportedModelError, match=match):
        cabs_jax.batch_stats(loss, loss.params, batch, method="fast")
    with pytest.warns(FastPathFallbackWarning, match=match):
        got = cabs_jax.batch_stats(loss, loss.params, batch)
    assert_stats_close(got, want)


class Scaled(eqx.Module):
    """A Linear and a learned scale used directly (a trainable array outside the supported layers)."""

    lin: eqx.nn.Linear
    scale: jax.Array

    def __init__(self, key: jax.Array) -> None:
        self.lin, self.scale = eqx.nn.Linear(4, 3, key=key, dtype=F64), jnp.linspace(0.5, 1.5, 3, dtype=F64)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.scale * self.lin(x)


def test_too_much_to_materialise_is_refused_naming_the_array(monkeypatch: pytest.MonkeyPatch) -> None:
    loss = EquinoxLoss(Scaled(jax.random.PRNGKey(7)), cross_entropy)
    batch = data(6, (4,), 3, seed=7)
    monkeypatch.setattr(eqx_fast, "MATERIALISE_ENTRIES", 10)  # the scale: 6 x 3 = 18 entries
    with pytest.raises(UnsupportedModelError, match="scale"):
        cabs_jax.batch_stats(loss, loss.params, batch, method="fast")
    with pytest.warns(FastPathFallbackWarning, match="scale"):
        got = cabs_jax.batch_stats(loss, loss.params, batch)
    assert_stats_close(got, loop_oracle(loss, loss.params, batch, None))


class Stack(eqx.Module):
    """Tokens -> Embedding -> a generated stack of supported layers over (T, d) -> mean -> Linear."""

    embed: eqx.nn.Embedding
    layers: tuple
    kinds: tuple = eqx.field(static=True)
    head: eqx.nn.Linear

    def __init__(self, kinds: tuple, d: int, key: jax.Array) -> None:
        k = jax.random.split(key, len(kinds) + 2)
        self.embed = eqx.nn.Embedding(7, d, key=k[0], dtype=F64)
        made = []
        for (kind, arg), ki in zip(kinds, k[2:]):
            if kind == "linear":
                made.append(eqx.nn.Linear(d, d, use_bias=arg, key=ki, dtype=F64))
            elif kind == "conv":
                made.append(eqx.nn.Conv1d(d, d, arg, padding="SAME", groups=2 if arg == 2 else 1, key=ki, dtype=F64))
            elif kind == "norm":
                made.append(eqx.nn.LayerNorm(d, use_bias=arg, dtype=F64))
            else:
                made.append(eqx.nn.MultiheadAttention(2, d, use_key_bias=arg, key=ki, dtype=F64))
        self.layers, self.kinds = tuple(made), kinds
        self.head = eqx.nn.Linear(d, 3, key=k[1], dtype=F64)

    def __call__(self, toks: jax.Array) -> jax.Array:
        h = jax.vmap(self.embed)(toks)
        for (kind, _), layer in zip(self.kinds, self.layers):
            if kind == "linear":
                h = jnp.tanh(jax.vmap(layer)(h))
            elif kind == "conv":
                h = jnp.tanh(layer(h.T).T)  # channels first
            elif kind == "norm":
                h = jax.vmap(layer)(h)
            else:
                h = h + layer(h, h, h)
        return self.head(jnp.mean(h, axis=0))


LAYER = st.one_of(st.tuples(st.just("linear"), st.booleans()), st.tuples(st.just("conv"), st.sampled_from([1, 2, 3])),
                  st.tuples(st.just("norm"), st.booleans()), st.tuples(st.just("attention"), st.booleans()))


@settings(max_examples=2, deadline=None)
@given(kinds=st.lists(LAYER, min_size=1, max_size=2).map(tuple), seq=st.integers(2, 4), seed=st.integers(0, 2**16))
def test_generated_stacks_of_supported_layers_are_exact(kinds: tuple, seq: int, seed: int) -> None:
    loss = EquinoxLoss(Stack(kinds, 4, jax.random.PRNGKey(seed)), cross_entropy)
    rng = np.random.default_rng(seed)
    batch = (jnp.asarray(rng.integers(0, 7, (5, seq))), jnp.asarray(rng.integers(0, 3, 5)))
    assert_fast_exact(loss, batch, np.array([1, 1, 0, 1, 1], np.float64))


def test_one_trainer_step_on_the_fast_path_equals_the_generic_step() -> None:
    model = eqx.nn.MLP(4, 3, 6, 2, activation=jnp.tanh, key=jax.random.PRNGKey(8), dtype=F64)
    x, y = data(64, (4,), 3, seed=8)
    results = {}
    for method in ("fast", "generic"):
        loss = EquinoxLoss(model, cross_entropy)
        ctl = CABSController(lr=0.2, c=20.0, bs_min=4, bs_max=32, bs_init=12)
        trainer = CABSTrainer(loss, ctl, (x, y), method=method, seed=3)
        state, info = trainer.step(trainer.init(model))
        results[method] = (state, info)
        assert probes_run(loss) == (1 if method == "fast" else 0)
    (fast, info_f), (generic, info_g) = results["fast"], results["generic"]
    assert info_f.batch_size == info_g.batch_size
    np.testing.assert_allclose(info_f.loss, info_g.loss, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(fast.params), jax.tree.leaves(generic.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(fast.controller.xi_avg, generic.controller.xi_avg, rtol=1e-10)
