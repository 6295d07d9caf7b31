"""Issue 12: the fast path never returns a wrong S. Every pattern of the issue's
table, in float64 against the loop oracle (conftest.brute_force): exact, or
the path steps aside (``auto``: one FastPathFallbackWarning and the exact
generic result; ``fast``: UnsupportedModelError naming the layer)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from cabs_torch import CABSTrainer, FastPathFallbackWarning, PerExampleStats, UnsupportedModelError, per_example_stats
from torch import nn
from torch_oracles import assert_stats_match, brute_force, ce

from cabs_core import CABSController


def run(model: nn.Module, x, y, method: str, loss=ce, **kw):
    """(stats, fallback warnings) of one call."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        stats = per_example_stats(model, loss, x, y, method=method, **kw)
    return stats, [w for w in seen if issubclass(w.category, FastPathFallbackWarning)]


def assert_steps_aside(model: nn.Module, x, y, layer: str, loss=ce, **kw) -> None:
    """auto: exactly one fallback warning naming ``layer`` and the oracle's
    statistics; fast: UnsupportedModelError naming ``layer``."""
    ref = brute_force(model, loss, x, y)
    stats, warned = run(model, x, y, "auto", loss, **kw)
    assert len(warned) == 1 and layer in str(warned[0].message), [str(w.message) for w in warned]
    assert_stats_match(stats, ref)
    with pytest.raises(UnsupportedModelError, match=layer) as err:
        per_example_stats(model, loss, x, y, method="fast", **kw)
    assert err.value.reason


def assert_exact_fast(model: nn.Module, x, y, loss=ce, **kw) -> None:
    """fast and auto: the oracle's statistics, no warning, from the verified fast path."""
    ref = brute_force(model, loss, x, y)
    for method in ("fast", "auto"):
        engine = PerExampleStats(model, loss, method=method, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FastPathFallbackWarning)
            assert_stats_match(engine(x, y), ref)
        assert [v.ok for v in engine.plan().verdicts.values()] == [True]  # probed and passed, not generic


def seeded(seed: int) -> None:
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- a weight used outside its layer


class FunctionalTied(nn.Module):
    """Output projection F.linear(h, emb.weight): a use the module hooks cannot see,
    the operation-level capture does (issue 20)."""

    def __init__(self, vocab: int = 7, d: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)

    def forward(self, t):
        h = torch.tanh(self.mix(self.emb(t))).mean(1)
        return F.linear(h, self.emb.weight)


class ModuleTied(nn.Module):
    """The standard LM layout: the head nn.Linear's weight IS the embedding table;
    per-token losses summed per example, the head on (m, T, d)."""

    def __init__(self, vocab: int = 7, d: int = 4, padding_idx: int | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.norm = nn.LayerNorm(d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, t):
        return self.head(torch.tanh(self.mix(self.norm(self.emb(t)))))


def token_loss(logits, t):
    """Next-token style loss per example: cross entropy summed over positions."""
    return F.cross_entropy(logits.transpose(1, 2), t, reduction="none").sum(1)


def test_functional_tied_projection_is_exact():
    seeded(0)
    model = FunctionalTied().double()
    x, y = torch.randint(0, 7, (6, 5)), torch.randint(0, 7, (6,))
    assert_exact_fast(model, x, y)


def assert_exact_compiled(model: nn.Module, x, y, monkeypatch, loss=ce) -> None:
    """compile=True, method fast: the oracle's statistics from the graph-captured compiled path (issue 20;
    compiled with aot_eager to keep the test short, inductor: tests/adapter_torch/test_compiled_transformers.py)."""
    from cabs_torch.compiled_graph import GraphFastStats
    monkeypatch.setattr(GraphFastStats, "_backend", staticmethod(lambda graph: "aot_eager"))
    engine = PerExampleStats(model, loss, method="fast", compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathFallbackWarning)
        stats = engine(x, y)
    assert [g for g in engine.plan().graphs.values() if isinstance(g, GraphFastStats)]  # compiled, not eager
    assert_stats_match(stats, brute_force(model, loss, x, y))


def test_functional_tied_projection_is_exact_compiled(monkeypatch):
    """compile=True sees the functional use too (issue 20: before, the accounting check refused it)."""
    seeded(0)
    model = FunctionalTied().double()
    x, y = torch.randint(0, 7, (6, 5)), torch.randint(0, 7, (6,))
    assert_exact_compiled(model, x, y, monkeypatch)


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_module_level_tie_is_exact_on_the_fast_path(padding_idx):
    seeded(1)
    model = ModuleTied(padding_idx=padding_idx).double()
    x = torch.randint(0, 7, (6, 5))
    x[:, 1] = x[:, 0]  # repeated ids in each example
    assert_exact_fast(model, x, torch.roll(x, 1, 1), loss=token_loss)


def test_module_level_tie_is_exact_compiled():
    seeded(2)
    model = ModuleTied().double()
    x = torch.randint(0, 7, (6, 5))
    engine = PerExampleStats(model, token_loss, method="fast", compile=True)
    assert_stats_match(engine(x, torch.roll(x, 1, 1)), brute_force(model, token_loss, x, torch.roll(x, 1, 1)))


# ----------------------------------------------------------------------------- the example axis


class Folded(nn.Module):
    """A layer applied with the examples folded into the leading axis, example-major (OPT's blocks)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.layer = {"linear": nn.Linear(3, 3), "conv2d": nn.Conv2d(2, 2, 3, padding=1),
                      "layernorm": nn.LayerNorm(3), "embedding": nn.Embedding(7, 3)}[kind]
        self.head = nn.Linear(3 if kind != "conv2d" else 2, 4)

    def forward(self, x):
        m, t = x.shape[:2]
        h = self.layer(x.reshape(m * t, *x.shape[2:]))
        h = h.reshape(m, t, *h.shape[1:])
        if self.kind == "conv2d":
            h = h.mean((3, 4))
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("kind", ["linear", "conv2d", "layernorm", "embedding"])
def test_examples_folded_into_the_leading_axis(kind):
    seeded(3)
    model = Folded(kind).double()
    m, t = 5, 4
    if kind == "embedding":
        x = torch.randint(0, 7, (m, t))
    elif kind == "conv2d":
        x = torch.randn(m, t, 2, 4, 4, dtype=torch.float64)
    else:
        x = torch.randn(m, t, 3, dtype=torch.float64)
    if kind == "conv2d":  # a convolution's rule needs the examples on axis 0, unfolded
        assert_steps_aside(model, x, torch.randint(0, 4, (m,)), "layer")
    else:  # a position-wise layer: the probe places the examples in the rows, checked against single examples
        assert_exact_fast(model, x, torch.randint(0, 4, (m,)))


class TimeMajor(nn.Module):
    """(m, T, d) -> (T, m, d) before a Linear; or x.unsqueeze(0)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.lin = nn.Linear(3, 3)
        self.head = nn.Linear(3, 4)

    def forward(self, x):
        if self.how == "time_major":
            h = self.lin(x.transpose(0, 1)).transpose(0, 1)
        else:
            h = self.lin(x.unsqueeze(0))[0]
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("how", ["time_major", "unsqueeze"])
@pytest.mark.parametrize("t", [4, 6])  # T == m == 6: the coincidence
def test_time_major_and_unsqueeze(how, t):
    """The probe finds the examples' axis (its k differs from every other dimension):
    exact on the fast path since issue 20, T == m included."""
    seeded(4)
    model = TimeMajor(how).double()
    x, y = torch.randn(6, t, 3, dtype=torch.float64), torch.randint(0, 4, (6,))
    assert_exact_fast(model, x, y)


class MHAModel(nn.Module):
    """nn.MultiheadAttention in its default (T, m, d) layout between Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.attn = nn.MultiheadAttention(4, 2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.inp(x).transpose(0, 1)
        h, _ = self.attn(h, h, h)
        return self.head(h.transpose(0, 1).mean(1))


def test_multihead_attention_time_major_is_exact():
    seeded(5)
    model = MHAModel().double()
    x, y = torch.randn(5, 5, 3, dtype=torch.float64), torch.randint(0, 3, (5,))  # T == m
    assert_exact_fast(model, x, y)  # issue 20: F.multi_head_attention_forward's F.linear calls, op by op


class Positional(nn.Module):
    """GPT pattern: token embedding + Embedding(arange(T)) broadcast over the batch."""

    def __init__(self, vocab: int = 7, d: int = 4, t_max: int = 8) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(t_max, d)
        self.head = nn.Linear(d, 3)

    def forward(self, t):
        h = self.tok(t) + self.pos(torch.arange(t.shape[1], device=t.device))
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize(("t", "compile"), [(5, False), (6, False), (6, True)])  # T == m == 6: the coincidence
def test_positional_embedding_broadcast_over_the_batch(t, compile, monkeypatch):
    """Exact on the eager fast path since issue 20 (the broadcast add is seen), and with compile=True."""
    seeded(6)
    model = Positional().double()
    x, y = torch.randint(0, 7, (6, t)), torch.randint(0, 3, (6,))
    if compile:
        assert_exact_compiled(model, x, y, monkeypatch)
    else:
        assert_exact_fast(model, x, y)


class OnBuffer(nn.Module):
    """A layer applied to a buffer without the example axis (length n rows)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("table", torch.randn(n, 3))
        self.lin = nn.Linear(3, 3)
        self.head = nn.Linear(3, 4)

    def forward(self, x):
        return self.head(torch.tanh(x + self.lin(self.table).mean(0)))


@pytest.mark.parametrize("n", [4, 6])  # 6 == m: a buffer of length m
def test_layer_applied_to_a_buffer(n):
    """lin(table).mean(0) is example-free: its broadcast add reaches lin's parameters
    through a batched vector-Jacobian product (issue 20), exact, n == m included."""
    seeded(7)
    model = OnBuffer(n).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 4, (6,))
    assert_exact_fast(model, x, y)


class Halves(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.head = nn.Linear(3, 4)

    def forward(self, x):
        h = x.shape[0] // 2
        return self.head(torch.tanh(torch.cat([self.lin(x[:h]), self.lin(x[h:])])))


def test_one_layer_on_two_halves_of_the_batch():
    seeded(8)
    model = Halves().double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 4, (8,))
    assert_steps_aside(model, x, y, "lin")


# ----------------------------------------------------------------------------- crashes that became results


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(4, 24, batch_first=True)
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        h, _ = self.rnn(x)
        return self.head(h[:, -1])


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lstm_gru_generic_is_exact(cell, dtype):
    """vmap cannot batch nn.LSTM/nn.GRU (it raised "output with shape [1, 24]
    doesn't match the broadcast shape [6, 1, 24]"): the generic path loops. The
    fast path has a recurrent rule since issue 20 (tests/adapter_torch/test_recurrent.py)."""
    seeded(9)
    model = Recurrent(cell).to(dtype)
    x, y = torch.randn(6, 5, 4, dtype=dtype), torch.randint(0, 3, (6,))
    ref = brute_force(model.double(), ce, x.double(), y)
    model = model.to(dtype)
    for method in ("auto", "generic", "fast"):
        stats = per_example_stats(model, ce, x, y, method=method)
        rtol = 1e-10 if dtype == torch.float64 else 1e-4
        assert float(stats.sq_norm_sum) == pytest.approx(ref["sq_norm_sum"], rel=rtol)
        assert float(stats.loss_sum) == pytest.approx(ref["loss_sum"], rel=rtol)


# ----------------------------------------------------------------------------- schedule, warnings, structure


class Switch(nn.Module):
    """Uses its embedding table functionally as well once ``tied`` is set: a
    change of control flow invisible in the layer calls."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 7)
        self.tied = False

    def forward(self, t):
        h = torch.tanh(self.emb(t)).mean(1)
        out = self.head(h)
        # an einsum with the examples on axis 1 of its output: no rule (the operation VJP rule needs axis 0)
        return out + torch.einsum("bd,vd->vb", h, self.emb.weight).T if self.tied else out


def test_verify_every_catches_a_later_change():
    seeded(10)
    model = Switch().double()
    x, y = torch.randint(0, 7, (6, 5)), torch.randint(0, 7, (6,))
    engine = PerExampleStats(model, ce, verify_every=3)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        engine(x, y)
        engine(x, y)
        model.tied = True
        engine(x, y)  # call 2: not due, the change is not seen (the documented window)
        stats = engine(x, y)  # call 3: due, the probe's accounting check fails
        again = engine(x, y)  # the signature stays generic, no second warning
    warned = [w for w in seen if issubclass(w.category, FastPathFallbackWarning)]
    assert len(warned) == 1 and "emb.weight" in str(warned[0].message)
    ref = brute_force(model, ce, x, y)
    assert_stats_match(stats, ref)
    assert_stats_match(again, ref)
    assert engine.probes == 2


def test_trainer_takes_verify_every():
    seeded(11)
    model = Switch().double()
    x, y = torch.randint(0, 7, (6, 5)), torch.randint(0, 7, (6,))
    opt = CABSTrainer(model, ce, CABSController(lr=0.1, bs_min=2, bs_max=64), verify_every=2)
    assert opt.stats_fn.verify_every == 2
    opt.step(x, y)
    opt.step(x, y)
    model.tied = True
    with pytest.warns(FastPathFallbackWarning, match="emb.weight"):
        opt.step(x, y)
    with pytest.raises(ValueError, match="verify_every"):
        CABSTrainer(model, ce, CABSController(lr=0.1), verify_every=-1)


class Toggle(nn.Module):
    """Switches to a time-major call between steps: the layer calls differ from the probed ones."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.head = nn.Linear(3, 4)
        self.time_major = False

    def forward(self, x):
        h = self.lin(x.transpose(0, 1)).transpose(0, 1) if self.time_major else self.lin(x)
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("method", ["auto", "fast"])
def test_changed_layer_calls_are_caught_on_every_call(method):
    """Between probes each call compares its layer calls with the probed ones
    (T != m here; with T == m the shapes coincide and the next probe decides)."""
    seeded(12)
    model = Toggle().double()
    x, y = torch.randn(6, 4, 3, dtype=torch.float64), torch.randint(0, 4, (6,))
    engine = PerExampleStats(model, ce, method=method, verify_every=None)
    assert_stats_match(engine(x, y), brute_force(model, ce, x, y))
    model.time_major = True
    if method == "fast":
        with pytest.raises(UnsupportedModelError, match="lin"):
            engine(x, y)
        return
    with pytest.warns(FastPathFallbackWarning, match="lin"):
        stats = engine(x, y)
    assert_stats_match(stats, brute_force(model, ce, x, y))


def test_dropout_models_stay_on_the_fast_path():
    """The probe runs in eval mode, so dropout does not make the two paths differ."""
    seeded(13)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3)).double()
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    engine = PerExampleStats(model, ce)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathFallbackWarning)
        engine(x, y)
    assert model.training and model[1].training and engine.probes == 1
    model.eval()
    assert_stats_match(engine(x, y), brute_force(model, ce, x, y))


def test_nonfinite_probe_decides_nothing():
    seeded(14)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    x[0, 0] = float("nan")
    engine = PerExampleStats(model, ce, method="fast")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathFallbackWarning)
        assert torch.isnan(engine(x, y).sq_norm_sum)
    assert not engine.plan().verdicts  # the next call probes again
    x[0, 0] = 0.0
    assert_stats_match(engine(x, y), brute_force(model, ce, x, y))
    assert len(engine.plan().verdicts) == 1


class FixedSlice(nn.Module):
    """A layer on the first 6 examples only (the others skip it): at a probe of 5
    examples (3 and 4 are the layers' sizes) every capture has the probe's rows
    and the probe passes; on the full batch the layer has 6 rows, not m, which
    the per-call check refuses (conservatively: rows 0-5 are examples 0-5)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.head = nn.Linear(3, 4)

    def forward(self, x):
        return self.head(torch.cat([torch.tanh(self.lin(x[:6])), x[6:]]))


def test_rows_that_pass_the_probe_but_not_the_full_batch():
    seeded(15)
    model = FixedSlice().double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 4, (10,))
    with pytest.raises(UnsupportedModelError, match="differently on a batch of 10") as err:
        per_example_stats(model, ce, x, y, method="fast")
    assert err.value.layer == "lin"
    with pytest.warns(FastPathFallbackWarning, match="lin"):
        stats = per_example_stats(model, ce, x, y, method="auto")
    assert_stats_match(stats, brute_force(model, ce, x, y))
