"""Issue 12: the fast path returns S only where it has established its decomposition.

Every pattern of the issue's table that Flax linen can express, against the
float64 loop over single examples: exact, or the path steps aside
(``method="auto"``: one FastPathFallbackWarning and the exact generic result;
``method="fast"``: UnsupportedModelError naming the layer), never wrong.
Then a hypothesis property test over randomly built small models.
"""

from __future__ import annotations

import dataclasses
import warnings

import cabs_jax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cabs_jax import CABSTrainer, FlaxLoss
from cabs_jax.verify import probes_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax_test_models import MLP, assert_stats_close, cross_entropy, init_f64, loop_oracle

from cabs_core import CABSController, FastPathFallbackWarning, UnsupportedModelError


class TiedHidden(nn.Module):
    """The embedding table reused as the output projection through the attribute: an unseen use."""

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(7, 4, name="embed")
        h = jnp.tanh(nn.Dense(4)(embed(tokens)))
        return jnp.mean(h, axis=1) @ embed.embedding.T


class TiedAttend(nn.Module):
    """The same tie through ``Embed.attend``, per position: exact on the fast path."""

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(7, 4, name="embed")
        h = jnp.tanh(nn.Dense(4)(embed(tokens)))
        return jnp.mean(embed.attend(h), axis=1)


class TimeMajor(nn.Module):
    """A Dense applied to the time-major layout (T, m, d)."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4, name="mid")(jnp.transpose(x, (1, 0, 2)))
        return nn.Dense(3)(jnp.mean(jnp.tanh(jnp.transpose(h, (1, 0, 2))), axis=1))


class Positional(nn.Module):
    """GPT-style positional embedding of arange(T), broadcast over the batch."""

    @nn.compact
    def __call__(self, tokens):
        t = tokens.shape[1]
        h = nn.Embed(7, 4)(tokens) + nn.Embed(8, 4, name="pos")(jnp.arange(t))[None]
        return nn.Dense(3)(jnp.mean(jnp.tanh(h), axis=1))


class Buffer(nn.Module):
    """A Dense applied to a buffer (T, d) without the example axis."""

    @nn.compact
    def __call__(self, x):
        t, d = x.shape[1], x.shape[2]
        buf = jnp.reshape(jnp.arange(t * d, dtype=x.dtype), (t, d)) / (t * d)
        h = x + nn.Dense(d, name="buf")(buf)[None]
        return nn.Dense(3)(jnp.mean(jnp.tanh(h), axis=1))


class Folded(nn.Module):
    """Examples folded into the leading axis before a Dense: x.reshape(m*T, d)."""

    @nn.compact
    def __call__(self, x):
        m, t, d = x.shape
        h = nn.Dense(4, name="mid")(x.reshape(m * t, d)).reshape(m, t, 4)
        return nn.Dense(3)(jnp.mean(jnp.tanh(h), axis=1))


class Halves(nn.Module):
    """One Dense called on two halves of the batch."""

    @nn.compact
    def __call__(self, x):
        d, half = nn.Dense(4, name="mid"), x.shape[0] // 2
        h = jnp.concatenate([d(x[:half]), d(x[half:])], axis=0)
        return nn.Dense(3)(jnp.mean(jnp.tanh(h), axis=1))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(4)(x))


class Remat(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.mean(nn.remat(Block)()(x), axis=1))


class VmapLifted(nn.Module):
    """A Dense lifted with nn.vmap over the position axis (one weight per position)."""

    @nn.compact
    def __call__(self, x):
        dense = nn.vmap(
            nn.Dense, in_axes=1, out_axes=1, variable_axes={"params": 0}, split_rngs={"params": True}
        )(4)
        return nn.Dense(3)(jnp.mean(jnp.tanh(dense(x)), axis=1))


def _batch(kind: str, m: int, t: int, seed: int = 0, classes: int = 3):
    rng = np.random.default_rng(seed)
    y = jnp.asarray(rng.integers(0, classes, size=m))
    if kind == "tokens":
        return jnp.asarray(rng.integers(0, 5, size=(m, t))), y  # repeated ids within an example
    return jnp.asarray(rng.normal(size=(m, t, 2))), y


# (module, input kind, m, T, outcome: "exact" on the fast path or the layer named when it steps aside)
TABLE = {
    "tied_attribute": (TiedHidden(), "tokens", 5, 3, "embed"),
    "tied_attend": (TiedAttend(), "tokens", 5, 3, "exact"),
    "time_major_T_eq_m": (TimeMajor(), "float", 6, 6, "mid"),
    "time_major_T_ne_m": (TimeMajor(), "float", 5, 3, "mid"),
    "positional_T_eq_m": (Positional(), "tokens", 6, 6, "pos"),
    "positional_T_ne_m": (Positional(), "tokens", 5, 3, "pos"),
    "buffer_T_eq_m": (Buffer(), "float", 6, 6, "buf"),
    "folded": (Folded(), "float", 4, 3, "mid"),
    "halves": (Halves(), "float", 6, 3, "mid"),
    "remat": (Remat(), "float", 5, 3, "exact"),  # nn.remat: exact on the fast path (test_lifted.py)
    "vmap_lifted": (VmapLifted(), "float", 5, 3, "lifted transformation|VmapDense"),
}


JITTED = ("tied_attribute", "tied_attend", "time_major_T_eq_m", "positional_T_eq_m", "buffer_T_eq_m", "remat")


@pytest.mark.parametrize("case", TABLE)
def test_issue_table_exact_or_steps_aside(case: str) -> None:
    module, kind, m, t, outcome = TABLE[case]
    classes = 7 if case.startswith("tied") else 3
    floss, batch = FlaxLoss(module, cross_entropy), _batch(kind, m, t, classes=classes)
    params = init_f64(module, batch[0][:1])
    want = loop_oracle(floss, params, batch)
    if outcome == "exact":
        with warnings.catch_warnings():
            warnings.simplefilter("error", FastPathFallbackWarning)
            assert_stats_close(cabs_jax.batch_stats(floss, params, batch, method="fast"), want)
            assert_stats_close(cabs_jax.batch_stats(floss, params, batch), want)
    else:
        with pytest.raises(UnsupportedModelError, match=outcome) as err:
            cabs_jax.batch_stats(floss, params, batch, method="fast")
        assert err.value.reason
        with pytest.warns(FastPathFallbackWarning, match=outcome):
            assert_stats_close(cabs_jax.batch_stats(floss, params, batch), want)
        with warnings.catch_warnings():  # one warning per signature, not one per call
            warnings.simplefilter("error", FastPathFallbackWarning)
            assert_stats_close(cabs_jax.batch_stats(floss, params, batch), want)
    if case not in JITTED:
        return
    # inside the caller's jit (the probe runs at trace time on values of the same shapes): the same outcome
    floss2 = FlaxLoss(module, cross_entropy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FastPathFallbackWarning)
        got = jax.jit(lambda p, b: cabs_jax.batch_stats(floss2, p, b))(params, batch)
    assert_stats_close(got, want)


def test_verdict_is_cached_per_signature_and_a_new_shape_is_probed() -> None:
    floss = FlaxLoss(TimeMajor(), cross_entropy)
    b53 = _batch("float", 5, 3)
    params = init_f64(TimeMajor(), b53[0][:1])
    with pytest.raises(UnsupportedModelError):
        cabs_jax.batch_stats(floss, params, b53, method="fast")
    before = probes_run(floss)
    with pytest.raises(UnsupportedModelError):
        cabs_jax.batch_stats(floss, params, _batch("float", 7, 3), method="fast")  # same signature: cached
    assert probes_run(floss) == before
    with pytest.warns(FastPathFallbackWarning):
        b66 = _batch("float", 6, 6)  # T = 6: a new signature, probed; T == m is no proof
        assert_stats_close(cabs_jax.batch_stats(floss, params, b66), loop_oracle(floss, params, b66))
    assert probes_run(floss) == before + 1


def test_probe_rows_are_the_first_real_examples_and_the_full_batch_is_not_planned_twice(monkeypatch) -> None:
    from cabs_jax import verify

    x = np.arange(24.0).reshape(6, 4)
    w = np.array([0, 1, 0, 1, 1, 1])
    for batch in [(x, x[:, 0]), (jnp.asarray(x), jnp.asarray(x[:, 0]))]:
        rows = verify._probe_rows(batch, w, 3)
        np.testing.assert_array_equal(rows[0], x[[1, 3, 4]])
        np.testing.assert_array_equal(rows[1], x[[1, 3, 4], 0])
        np.testing.assert_array_equal(verify._probe_rows(batch, np.array([0, 0, 0, 0, 0, 1]), 3)[0], x[[5, 0, 1]])
        np.testing.assert_array_equal(verify._probe_rows(batch, None, 3)[0], x[:3])
    floss = FlaxLoss(MLP(), cross_entropy)
    rng = np.random.default_rng(1)
    batch = (jnp.asarray(rng.normal(size=(9, 4))), jnp.asarray(rng.integers(0, 3, size=9)))
    params = init_f64(MLP(), batch[0][:1])
    plans = []
    plan = verify._plan
    monkeypatch.setattr(verify, "_plan", lambda f, p, xx, m: plans.append(m) or plan(f, p, xx, m))
    assert verify.resolve(floss, params, batch, None, "fast") == "fast"
    k = verify._probe_size(params, batch[0], 9)
    assert plans == [k, 9]  # the probe's structure at k and m; the full-batch check reuses the latter
    got = cabs_jax.batch_stats(floss, params, batch, method="fast")
    assert_stats_close(got, loop_oracle(floss, params, batch))


def test_trainer_probes_every_verify_every_steps_and_falls_back_exactly() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(120, 4)), rng.integers(0, 3, size=120)
    floss = FlaxLoss(MLP(), cross_entropy)
    controller = CABSController(lr=0.05, bs_min=8, bs_max=16)
    trainer = CABSTrainer(floss, controller, (x, y), method="fast", verify_every=3)
    state = trainer.init(init_f64(MLP(), x[:1]))
    for _ in range(7):
        state = state._replace(controller=dataclasses.replace(state.controller, batch_size=8))
        state, _ = trainer.step(state)
    assert probes_run(floss) == 3  # steps 0, 3, 6
    assert trainer.traces == 1  # the probe is not part of the compiled step
    with pytest.raises(ValueError, match="verify_every"):
        CABSTrainer(floss, controller, (x, y), verify_every=-1)
    # a model the fast path cannot establish: auto trains on the exact generic path, with one warning
    tokens, yt = rng.integers(0, 5, size=(40, 3)), rng.integers(0, 7, size=40)
    tied = FlaxLoss(TiedHidden(), cross_entropy)
    params = init_f64(TiedHidden(), tokens[:1])
    trainer = CABSTrainer(tied, CABSController(lr=0.05, bs_min=5, bs_max=16, bs_init=5), (tokens, yt))
    with pytest.warns(FastPathFallbackWarning, match="embed"):
        state, info = trainer.step(trainer.init(params))
    idx = cabs_core_first_batch(40, 5)
    want = loop_oracle(tied, params, (jnp.asarray(tokens[idx]), jnp.asarray(yt[idx])))
    np.testing.assert_allclose(info.loss, float(want.loss_sum) / 5, rtol=1e-12)
    with pytest.raises(UnsupportedModelError, match="embed"):
        CABSTrainer(tied, controller, (tokens, yt), method="fast").step(trainer.init(params))


def cabs_core_first_batch(n: int, b: int) -> np.ndarray:
    from cabs_core import SamplerState, next_batch

    return next_batch(SamplerState(n), b)[0]


# ---------------------------------------------------------------------------------------------
# property test: random small models from the supported layers with random layouts, broadcasts,
# ties and repeated calls; random batch sizes, often equal to another dimension


@dataclasses.dataclass(frozen=True)
class Spec:
    tokens: bool  # an Embed lookup first (else a Dense on float inputs)
    extra: str  # "none", "pos" (Embed(arange(T)) broadcast), "buffer" (Dense on a (T, d) buffer)
    layout: str  # how the middle Dense sees h: "plain", "time_major", "fold", "unsqueeze", "mix", "halves"
    layernorm: bool
    repeat: bool  # the middle Dense called twice
    head: str  # "dense", "attend" (tied, visible), "attribute" (tied, through embedding.T)
    per_position_head: bool


class Random(nn.Module):
    spec: Spec
    dim: int = 3
    vocab: int = 5

    @nn.compact
    def __call__(self, x):
        s, d = self.spec, self.dim
        embed = nn.Embed(self.vocab, d, name="embed") if s.tokens else None
        h = embed(x) if embed is not None else nn.Dense(d, name="inp")(x)
        m, t = h.shape[0], h.shape[1]
        if s.extra == "pos":
            h = h + nn.Embed(8, d, name="pos")(jnp.arange(t))[None]
        elif s.extra == "buffer":
            h = h + nn.Dense(d, name="buf")(jnp.reshape(jnp.arange(t * d, dtype=h.dtype), (t, d)) / (t * d))[None]
        mid = nn.Dense(d, name="mid")
        for _ in range(2 if s.repeat else 1):
            if s.layout == "time_major":
                h = jnp.transpose(mid(jnp.transpose(h, (1, 0, 2))), (1, 0, 2))
            elif s.layout == "fold":
                h = mid(h.reshape(m * t, d)).reshape(m, t, d)
            elif s.layout == "unsqueeze":
                h = mid(h[None])[0]
            elif s.layout == "mix":  # rows of mid's input mix examples; its output is unmixed again
                h = jnp.transpose(mid(jnp.transpose(h, (1, 0, 2)).reshape(m, t, d)).reshape(t, m, d), (1, 0, 2))
            elif s.layout == "halves":
                h = jnp.concatenate([mid(h[: m // 2]), mid(h[m // 2 :])], axis=0)
            else:
                h = mid(h)
            h = jnp.tanh(h)
        if s.layernorm:
            h = nn.LayerNorm()(h)
        if not s.per_position_head:
            h = jnp.mean(h, axis=1)
        if s.head == "attend" and embed is not None:
            out = embed.attend(h)
        elif s.head == "attribute" and embed is not None:
            out = h @ embed.embedding.T
        else:
            out = nn.Dense(self.vocab, name="head")(h)
        return jnp.mean(out, axis=1) if s.per_position_head else out


SPECS = st.builds(
    Spec,
    tokens=st.booleans(),
    extra=st.sampled_from(["none", "pos", "buffer"]),
    layout=st.sampled_from(["plain", "time_major", "fold", "unsqueeze", "mix", "halves"]),
    layernorm=st.booleans(),
    repeat=st.booleans(),
    head=st.sampled_from(["dense", "attend", "attribute"]),
    per_position_head=st.booleans(),
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=SPECS, t=st.integers(2, 6), m_choice=st.sampled_from(["T", "dim", "other"]), seed=st.integers(0, 99))
def test_property_random_models_exact_or_step_aside(spec: Spec, t: int, m_choice: str, seed: int) -> None:
    module = Random(spec)
    m = {"T": t, "dim": module.dim, "other": 5 + seed % 3}[m_choice]  # sizes equal to another dimension too
    rng = np.random.default_rng(seed)
    y = jnp.asarray(rng.integers(0, module.vocab, size=m))
    x = rng.integers(0, module.vocab, size=(m, t)) if spec.tokens else rng.normal(size=(m, t, 2))
    batch = (jnp.asarray(x), y)
    floss = FlaxLoss(module, cross_entropy)
    params = init_f64(module, batch[0][:1], seed)
    want = loop_oracle(floss, params, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FastPathFallbackWarning)
        assert_stats_close(cabs_jax.batch_stats(floss, params, batch), want, rtol=1e-9)  # auto: never wrong
    try:
        fast = cabs_jax.batch_stats(floss, params, batch, method="fast")
    except UnsupportedModelError:
        return  # stepped aside
    assert_stats_close(fast, want, rtol=1e-9)
