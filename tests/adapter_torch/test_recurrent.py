"""Issue 20, item 3: nn.LSTM / nn.GRU (and nn.RNN) classifiers exact in float32
and float64 on the fast path (cabs_torch/recurrent.py), against the float64
loop over single examples (conftest.brute_force); the generic path never
crashes on them; wrong recurrent rules and uncovered configurations step aside."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from cabs_torch import FastPathFallbackWarning, PerExampleStats, UnsupportedModelError, per_example_stats, recurrent
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch_oracles import brute_force, ce

VOCAB, EMBED, HIDDEN, CLASSES = 13, 5, 6, 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread for these tiny recurrent steps: on the shared 2-core machine two threads made
    each small op wait for the other (a probe took 13.5 s with 2 threads, 0.37 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Classifier(nn.Module):
    """embedding -> recurrent layer -> the last step, the mean over steps, or the
    final hidden state -> linear."""

    def __init__(self, cell: type[nn.Module], *, batch_first: bool = True, layers: int = 1,
                 bidirectional: bool = False, pool: str = "last", **cell_kw) -> None:
        super().__init__()
        self.batch_first, self.pool = batch_first, pool
        self.emb = nn.Embedding(VOCAB, EMBED, padding_idx=0)
        self.rnn = cell(EMBED, HIDDEN, num_layers=layers, batch_first=batch_first, bidirectional=bidirectional,
                        **cell_kw)
        self.head = nn.Linear(HIDDEN * (2 if bidirectional else 1), CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.emb(tokens)
        if not self.batch_first:
            e = e.transpose(0, 1)
        out, final = self.rnn(e)
        if self.pool == "state":  # the last layer's final hidden state(s)
            h = final[0] if isinstance(final, tuple) else final
            dirs = 2 if self.rnn.bidirectional else 1
            return self.head(torch.cat(list(h[-dirs:]), 1))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(out[:, -1] if self.pool == "last" else out.mean(1))


def _data(m: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, VOCAB, (m, t), generator=g)
    x[: m // 2, t - 2 :] = 0  # padding tokens at the end of some sequences
    return x, torch.randint(0, CLASSES, (m,), generator=g)


def _oracle(model: nn.Module, x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor | None = None) -> dict:
    """The float64 loop over single examples, of a float64 copy of ``model`` (kept examples only)."""
    ref_model = copy.deepcopy(model).double()
    if keep is not None:
        x, y = x[keep.bool()], y[keep.bool()]
    return brute_force(ref_model, ce, x, y)


def _assert_matches(stats, ref: dict, dtype: torch.dtype) -> None:
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    assert float(stats.count) == ref["count"]
    assert float(stats.loss_sum) == pytest.approx(ref["loss_sum"], rel=rtol)
    assert float(stats.sq_norm_sum) == pytest.approx(ref["sq_norm_sum"], rel=rtol)
    for g, r in zip(stats.grad_sum, ref["grad_sum"], strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), r, rtol=rtol, atol=rtol * float(r.abs().max()))


CASES = {
    # name: (cell, dtype, constructor options, m, T, mask)
    "lstm_f64_last": (nn.LSTM, torch.float64, {}, 9, 5, False),
    "lstm_f32_time_major_2layer_bidir_mean": (nn.LSTM, torch.float32,
                                              {"batch_first": False, "layers": 2, "bidirectional": True,
                                               "pool": "mean"}, 9, 5, False),
    "lstm_f64_time_major_state_mask": (nn.LSTM, torch.float64, {"batch_first": False, "pool": "state"}, 8, 4,
                                       True),
    "lstm_f32_T_equals_m": (nn.LSTM, torch.float32, {"pool": "state"}, 7, 7, False),
    "gru_f64_time_major_2layer_bidir_state": (nn.GRU, torch.float64,
                                              {"batch_first": False, "layers": 2, "bidirectional": True,
                                               "pool": "state"}, 9, 5, False),
    "gru_f32_mean_mask": (nn.GRU, torch.float32, {"pool": "mean"}, 8, 6, True),
    "gru_f64_T_equals_m_no_bias": (nn.GRU, torch.float64, {"bias": False}, 6, 6, False),
    "rnn_relu_f64_bidir": (nn.RNN, torch.float64, {"bidirectional": True, "nonlinearity": "relu"}, 7, 4, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_path_matches_the_float64_loop(case):
    cell, dtype, options, m, t, masked = CASES[case]
    torch.manual_seed(len(case))
    model = Classifier(cell, **options).to(dtype)
    x, y = _data(m, t, seed=len(case))
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0][:m], dtype=torch.float64) if masked else None
    ref = _oracle(model, x, y, keep)
    engine = PerExampleStats(model, ce, method="fast" if dtype == torch.float64 else "auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathFallbackWarning)
        _assert_matches(engine(x, y, keep), ref, dtype)  # the probe, then the fast path
        _assert_matches(engine(x, y, keep), ref, dtype)  # a verified call: the fast path alone
    assert engine.resolved_method == "fast"
    assert [v.ok for v in engine.plan().verdicts.values()] == [True]  # probed and passed, not generic
    assert engine.probes == 1


class EncoderDecoder(nn.Module):
    """A GRU encoder whose final state starts an LSTM decoder (hx given, keyword arguments, time-major
    decoder): the encoder's weights get gradient through h_n, the decoder's through its own steps."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, EMBED)
        self.enc = nn.GRU(EMBED, HIDDEN, num_layers=2, batch_first=True)
        self.dec = nn.LSTM(EMBED, HIDDEN, num_layers=2)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.emb(tokens)
        _, h = self.enc(e)
        out, _ = self.dec(input=e.flip(1).transpose(0, 1), hx=(h, torch.tanh(h)))
        return self.head(out[-1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_encoder_decoder_with_initial_states(dtype):
    torch.manual_seed(8)
    model = EncoderDecoder().to(dtype)
    x, y = _data(7, 5, seed=8)
    engine = PerExampleStats(model, ce, method="fast")
    _assert_matches(engine(x, y), _oracle(model, x, y), dtype)
    assert [v.ok for v in engine.plan().verdicts.values()] == [True]


class CalledTwice(nn.Module):
    """One bidirectional LSTM on two sequences of different lengths; the second call's h_n feeds the head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, EMBED)
        self.rnn = nn.LSTM(EMBED, HIDDEN, batch_first=True, bidirectional=True)
        self.head = nn.Linear(4 * HIDDEN, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        whole, _ = self.rnn(self.emb(tokens))
        part, (h, _) = self.rnn(self.emb(tokens[:, :3]).relu())
        return self.head(torch.cat([whole.mean(1), part[:, -1] * h[0].repeat(1, 2)], 1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layer_called_twice(dtype):
    """The calls' time steps are concatenated (combine_pieces), cross terms included."""
    torch.manual_seed(10)
    model = CalledTwice().to(dtype)
    x, y = _data(8, 6, seed=10)
    engine = PerExampleStats(model, ce, method="fast")
    ref = _oracle(model, x, y)
    _assert_matches(engine(x, y), ref, dtype)
    _assert_matches(engine(x, y), ref, dtype)
    assert [v.ok for v in engine.plan().verdicts.values()] == [True]


@pytest.mark.parametrize(("cell", "dtype"), [(nn.LSTM, torch.float64), (nn.LSTM, torch.float32),
                                             (nn.GRU, torch.float64), (nn.GRU, torch.float32)])
def test_generic_path_matches_the_float64_loop(cell, dtype):
    """vmap over the cells of a non-oneDNN RNN fails (an in-place add of the batched input gates into the
    gates of h_0, a zero tensor made inside the module without the vmapped axis); the generic path loops."""
    torch.manual_seed(3)
    model = Classifier(cell, batch_first=False, layers=2, bidirectional=True, pool="mean").to(dtype)
    x, y = _data(6, 4, seed=3)
    _assert_matches(per_example_stats(model, ce, x, y, method="generic"), _oracle(model, x, y), dtype)


def test_rule_chunks_examples(monkeypatch):
    """The rule's recomputation in chunks of 2 examples (with a remainder) gives the same statistics."""
    monkeypatch.setattr(recurrent, "CHUNK_ELEMENTS", 2 * 2 * 5 * (8 * 4 * HIDDEN + 4 * 2 * HIDDEN))
    torch.manual_seed(4)
    model = Classifier(nn.LSTM, layers=2, bidirectional=False, pool="mean").double()
    x, y = _data(7, 5, seed=4)
    _assert_matches(per_example_stats(model, ce, x, y, method="fast"), _oracle(model, x, y), torch.float64)


def _steps_aside(model: nn.Module, x, y, match: str) -> None:
    """auto: one fallback warning naming the problem and the oracle's statistics; fast: raises."""
    dtype = next(model.parameters()).dtype
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        stats = per_example_stats(model, ce, x, y, method="auto")
    warned = [str(w.message) for w in seen if issubclass(w.category, FastPathFallbackWarning)]
    assert len(warned) == 1 and match in warned[0], warned
    _assert_matches(stats, _oracle(model, x, y), dtype)
    with pytest.raises(UnsupportedModelError, match=match):
        per_example_stats(model, ce, x, y, method="fast")


def test_wrong_cell_equations_are_caught(monkeypatch):
    """A wrong recomputation (z and 1 - z swapped in the GRU) fails the probe's output comparison."""
    real = recurrent._cell

    def swapped(mode, gi, gh, h, c):
        new, c = real(mode, gi, gh, h, c)
        return (new if mode != "GRU" else 2 * new - h), c

    monkeypatch.setattr(recurrent, "_cell", swapped)
    torch.manual_seed(5)
    model = Classifier(nn.GRU).double()
    x, y = _data(8, 4, seed=5)
    _steps_aside(model, x, y, "unrolled GRU recomputation")


def test_wrong_gate_gradients_are_caught(monkeypatch):
    """Pieces off by 1% (the output check passes) fail the accounting check, naming the parameter."""
    real = recurrent.RecurrentRule._pieces

    def scaled(self, mod, a, b):
        return real(self, mod, a, 1.01 * b)

    monkeypatch.setattr(recurrent.RecurrentRule, "_pieces", scaled)
    torch.manual_seed(6)
    model = Classifier(nn.LSTM).double()
    x, y = _data(8, 4, seed=6)
    _steps_aside(model, x, y, "rnn.weight_ih_l0")


def test_uncovered_configurations_use_the_generic_path():
    """proj_size > 0 and dropout between layers: no fast rule (fast raises naming why, auto is generic
    and exact); a PackedSequence input: the probe refuses it (auto warns once and is exact)."""
    torch.manual_seed(7)
    x, y = _data(6, 4, seed=7)
    for options, why in (({"proj_size": 2}, "proj_size"), ({"layers": 2, "dropout": 0.5}, "dropout")):
        model = Classifier(nn.LSTM, **options).double()
        if "proj_size" in options:
            model.head = nn.Linear(2, CLASSES).double()
        with pytest.raises(UnsupportedModelError, match=why):
            per_example_stats(model, ce, x, y, method="fast")
        model.eval()  # dropout off, so that the loop oracle sees the same function
        with warnings.catch_warnings():
            warnings.simplefilter("error", FastPathFallbackWarning)
            _assert_matches(per_example_stats(model, ce, x, y, method="auto"), _oracle(model, x, y), torch.float64)

    class Packed(Classifier):
        def forward(self, tokens):
            lengths = (tokens != 0).sum(1)
            seq = pack_padded_sequence(self.emb(tokens), lengths, batch_first=True, enforce_sorted=False)
            _, (h, _) = self.rnn(seq)
            return self.head(h[-1])

    _steps_aside(Packed(nn.LSTM).double(), x, y, "PackedSequence")


@pytest.mark.parametrize("case", ["lstm_bfloat16_model", "gru_bfloat16_autocast"])
def test_low_precision(case):
    """A bfloat16 LSTM and a float32 GRU under CPU bfloat16 autocast (the fused GRU runs in float32 there,
    the head in bfloat16): fast, verified, within test_precision's 1e-2 of the float64 loop. (A CPU LSTM
    under bfloat16 autocast fails in PyTorch itself: oneDNN "could not create a primitive descriptor".)"""
    torch.manual_seed(9)
    model = Classifier(nn.LSTM if case.startswith("lstm") else nn.GRU, layers=2, bidirectional=True, pool="mean")
    x, y = _data(9, 5, seed=9)
    ref = _oracle(model, x, y)
    engine = PerExampleStats(model.bfloat16() if case.endswith("model") else model, ce, method="fast")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.endswith("autocast")):
        stats = engine(x, y)
    assert float(stats.sq_norm_sum) == pytest.approx(ref["sq_norm_sum"], rel=1e-2)
    assert float(stats.loss_sum) == pytest.approx(ref["loss_sum"], rel=1e-2)
    assert [v.ok for v in engine.plan().verdicts.values()] == [True]
