"""Issue 20: the operation VJP rule of the eager fast path (``cabs_torch.ops.VjpSite``). An op without
a rule of its own in which example-free operands computed from parameters meet the examples (on axis 0,
or folded example-major into it) is replayed per example by a vmapped ``torch.func.vjp``; checked in
float64 against the loop over single examples with the fast path TAKEN (``assert_fast_taken``):
``torch.einsum`` with a parameter (several subscripts), ``torch.where`` with a parameter-derived branch,
``F.scaled_dot_product_attention`` with a relative-position bias gathered from a table as ``attn_mask``
(also Swin-like, the examples folded with the windows), a gathered bias ``masked_fill``-ed by the
examples' padding, padding weights, and a hypothesis-generated family mixing these with supported ops.
The replay one example at a time (where vmap fails) is exact too. The traps step aside: an op that
couples the examples (the probe's checks), an in-place op on an example-free tensor, a use over
``OP_VJP_MAX_ELEMENTS`` (``fast`` raises naming the parameter), an op drawing random numbers (attention
dropout); the compiled path refuses the rule cleanly (``auto``: the eager fast path)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from cabs_torch import FastPathFallbackWarning, PerExampleStats, UnsupportedModelError
from cabs_torch import ops as cabs_ops
from hypothesis import given, settings
from hypothesis import strategies as st
from test_transformers import assert_fast_taken
from torch import nn
from torch_oracles import assert_stats_match, brute_force, ce

D, HEADS, VOCAB = 8, 2, 11


def _sites(engine: PerExampleStats) -> list[str]:
    """Labels of the operation VJP uses the engine recorded."""
    return [rec.name for rec in engine.plan().op_records.values() if rec.rule is cabs_ops.op_vjp_pieces]


def assert_op_vjp_taken(model: nn.Module, x, y, mask: torch.Tensor | None = None, loss=ce) -> None:
    """The fast path taken and exact (``assert_fast_taken``), through at least one operation VJP use."""
    assert_fast_taken(model, x, y, loss=loss, mask=mask)
    engine = PerExampleStats(model, loss, method="fast")
    engine(x, y, mask)
    assert _sites(engine)


# ----------------------------------------------------------------------------- einsum


class EinsumModel(nn.Module):
    """(m, T, 3) -> Linear -> an einsum with a parameter (or a tensor computed from one) -> head."""

    def __init__(self, kind: str, t: int) -> None:
        super().__init__()
        self.kind = kind
        self.inp = nn.Linear(3, D)
        shapes = {"bte": (D, 5), "bt": (D,), "bht": (HEADS, D // HEADS), "bde": (t, 5), "derived": (D, 5)}
        self.w = nn.Parameter(torch.randn(shapes[kind]) * 0.5)
        self.head = nn.Linear({"bte": 5, "bt": 1, "bht": HEADS, "bde": 5, "derived": 5}[kind], 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        m, t = h.shape[:2]
        if self.kind == "bte":
            z = torch.einsum("btd,de->bte", h, self.w)
        elif self.kind == "bt":
            z = torch.einsum("btd,d->bt", h, self.w).unsqueeze(-1)
        elif self.kind == "bht":
            z = torch.einsum("bhtd,hd->bth", h.view(m, t, HEADS, -1).transpose(1, 2), self.w)
        elif self.kind == "bde":  # a weight per position, summed over the positions
            z = torch.einsum("btd,te->bde", h, self.w)
        else:  # a weight computed from the parameter
            z = torch.einsum("btd,de->bte", h, torch.tanh(self.w) * 2)
        return self.head(torch.tanh(z).mean(1))


@pytest.mark.parametrize("kind", ["bte", "bt", "bht", "bde", "derived"])
def test_einsum_with_a_parameter(kind):
    torch.manual_seed(1)
    t = 4
    model = EinsumModel(kind, t).double()
    x, y = torch.randn(6, t, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    assert_op_vjp_taken(model, x, y)


# ----------------------------------------------------------------------------- where


class WhereBranch(nn.Module):
    """torch.where(h > 0, h, f(fill)): a parameter-derived branch selected by the examples."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, D)
        self.fill = nn.Parameter(torch.randn(D))
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.head(torch.where(h > 0, h, torch.tanh(self.fill) * 2).mean(1))


def test_where_with_a_parameter_derived_branch_and_padding_weights():
    torch.manual_seed(2)
    model = WhereBranch().double()
    x, y = torch.randn(7, 4, 3, dtype=torch.float64), torch.randint(0, 3, (7,))
    assert_op_vjp_taken(model, x, y)
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    assert_op_vjp_taken(model, x, y, mask=mask)


# ----------------------------------------------------------------------------- attention biases


def relative_index(n: int) -> torch.Tensor:
    """(n, n) indices into a (2n - 1)-row table of relative positions."""
    pos = torch.arange(n)
    return pos[:, None] - pos[None, :] + n - 1


class RelBiasAttention(nn.Module):
    """Self-attention with a learned relative-position bias gathered from a table (a buffer of indices,
    like Swin's) as the ``attn_mask`` of F.scaled_dot_product_attention. ``windows``: the examples'
    (m, windows * n, D) tokens folded into (m * windows, n, D) around the attention, as Swin does."""

    def __init__(self, n: int, windows: int = 1) -> None:
        super().__init__()
        self.n, self.windows = n, windows
        self.inp = nn.Linear(3, D)
        self.qkv = nn.Linear(D, 3 * D)
        self.table = nn.Parameter(torch.randn(2 * n - 1, HEADS) * 0.5)
        self.register_buffer("index", relative_index(n))
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        h = self.inp(x)
        m = h.shape[0]
        h = h.reshape(m * self.windows, self.n, D)
        q, k, v = self.qkv(h).view(h.shape[0], self.n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        bias = self.table[self.index.reshape(-1)].view(self.n, self.n, HEADS).permute(2, 0, 1).unsqueeze(0)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        a = a.transpose(1, 2).reshape(m, self.windows * self.n, D)
        return self.head(torch.tanh(a).mean(1))


@pytest.mark.parametrize("windows", [1, 3])
def test_sdpa_with_a_relative_position_bias_table(windows):
    torch.manual_seed(3)
    n = 4
    model = RelBiasAttention(n, windows).double()
    x, y = torch.randn(6, windows * n, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    assert_op_vjp_taken(model, x, y)


class MaskedBias(nn.Module):
    """Tokens with padding id 0: a bias gathered by index from a table, masked_fill-ed at the padded
    keys of each example, added to the attention scores."""

    def __init__(self, t: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.table = nn.Parameter(torch.randn(2 * t - 1) * 0.5)
        self.register_buffer("index", relative_index(t))
        self.head = nn.Linear(D, 3)

    def forward(self, ids):
        h = self.emb(ids)
        bias = self.table[self.index]  # (T, T), example-free
        bias = bias.masked_fill((ids == 0)[:, None, :], -30.0)  # (m, T, T): meets the examples
        scores = h @ h.transpose(1, 2) / D**0.5 + bias
        return self.head(torch.tanh(torch.softmax(scores, -1) @ h).mean(1))


def test_gathered_bias_masked_fill():
    torch.manual_seed(4)
    t = 5
    model = MaskedBias(t).double()
    ids = torch.randint(1, VOCAB, (6, t))
    ids[1, 3:] = 0
    ids[4, 2:] = 0
    y = torch.randint(0, 3, (6,))
    assert_op_vjp_taken(model, ids, y)
    assert_op_vjp_taken(model, ids, y, mask=torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64))


# ----------------------------------------------------------------------------- a generated family

PIECES = ["einsum", "where", "rel_sdpa", "masked_bias", "linear", "pos_add", "layer_norm"]


class Family(nn.Module):
    """tokens (m, T) -> embedding -> a list of pieces (operation VJP uses mixed with supported ops) -> head."""

    def __init__(self, ops: list[str], t: int) -> None:
        super().__init__()
        self.ops, self.t = ops, t
        self.emb = nn.Embedding(VOCAB, D)
        self.register_buffer("index", relative_index(t))
        self.params = nn.ParameterList()
        for op in ops:
            shape = {"einsum": (D, D), "where": (D,), "rel_sdpa": (2 * t - 1, HEADS), "masked_bias": (2 * t - 1,),
                     "linear": (D, D), "pos_add": (t, D), "layer_norm": (D,)}[op]
            self.params.append(nn.Parameter(torch.randn(shape) * 0.5 + (1.0 if op == "layer_norm" else 0.0)))
        self.head = nn.Linear(D, 3)

    def forward(self, ids):
        h = self.emb(ids)
        m, t = ids.shape
        for op, p in zip(self.ops, self.params):
            if op == "einsum":
                h = torch.tanh(torch.einsum("btd,de->bte", h, p))
            elif op == "where":
                h = torch.where(h > 0, h, p * 0.5)
            elif op == "rel_sdpa":
                q = h.view(m, t, HEADS, D // HEADS).transpose(1, 2)
                bias = p[self.index].permute(2, 0, 1).unsqueeze(0)
                h = h + F.scaled_dot_product_attention(q, q, q, attn_mask=bias).transpose(1, 2).reshape(m, t, D)
            elif op == "masked_bias":
                bias = p[self.index].masked_fill((ids == 0)[:, None, :], -30.0)
                h = torch.softmax(h @ h.transpose(1, 2) / D**0.5 + bias, -1) @ h
            elif op == "linear":
                h = torch.tanh(F.linear(h, p))
            elif op == "pos_add":
                h = h + p
            else:
                h = F.layer_norm(h, (D,), p)
        return self.head(h.mean(1))


@settings(max_examples=30, deadline=None)
@given(ops=st.lists(st.sampled_from(PIECES), min_size=1, max_size=4), t=st.integers(2, 4),
       m=st.integers(5, 7), seed=st.integers(0, 2**16))
def test_generated_models_take_the_fast_path_exactly(ops, t, m, seed):
    torch.manual_seed(seed)
    model = Family(ops, t).double()
    ids = torch.randint(0, VOCAB, (m, t))
    ids[:, 0] = 1  # every example keeps a key
    y = torch.randint(0, 3, (m,))
    assert_fast_taken(model, ids, y)
    keep = torch.ones(m, dtype=torch.float64)
    keep[1] = 0.0
    assert_fast_taken(model, ids, y, mask=keep)


# ----------------------------------------------------------------------------- traps


def assert_steps_aside(model: nn.Module, x, y, match: str) -> None:
    """``fast`` raises naming ``match``; ``auto`` warns once and is exact (the generic path)."""
    with pytest.raises(UnsupportedModelError, match=match):
        PerExampleStats(model, ce, method="fast")(x, y)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        stats = PerExampleStats(model, ce, method="auto")(x, y)
    assert len([w for w in seen if issubclass(w.category, FastPathFallbackWarning)]) == 1
    assert_stats_match(stats, brute_force(model, ce, x, y))


class Coupled(nn.Module):
    """einsum("bi,ci,ij->bj", h, h, W): every example's output depends on the other examples; replayed
    per example it gives other values (same shapes), which the probe's checks must catch."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, D)
        self.w = nn.Parameter(torch.randn(D, D) * 0.5)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.head(torch.tanh(torch.einsum("bi,ci,ij->bj", h, h, self.w) / 4))


class InPlaceFree(nn.Module):
    """An example-free tensor computed from a parameter, changed in place by the examples."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, D)
        self.gate = nn.Parameter(torch.randn(D))
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        h = self.inp(x)
        g = (self.gate * 2).expand(h.shape).clone()
        g.masked_fill_(h > 0, 0.0)
        return self.head(torch.tanh(h + g))


def test_an_op_coupling_the_examples_steps_aside():
    torch.manual_seed(5)
    model = Coupled().double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    assert_steps_aside(model, x, y, r"'w' rebuilt|S on a probe")


def test_an_in_place_op_on_an_example_free_tensor_steps_aside():
    torch.manual_seed(6)
    model = InPlaceFree().double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    assert_steps_aside(model, x, y, r"gate.*masked_fill_")


def test_a_use_over_the_cap_is_refused_by_name(monkeypatch):
    torch.manual_seed(7)
    model = EinsumModel("derived", 4).double()  # per example: tanh(w) * 2 and w, 2 * 40 elements
    x, y = torch.randn(6, 4, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    monkeypatch.setattr(cabs_ops, "OP_VJP_MAX_ELEMENTS", 79)
    assert_steps_aside(model, x, y, r"parameter w meets the examples in einsum.*80 gradient elements per example.*"
                                    r"OP_VJP_MAX_ELEMENTS = 79")
    monkeypatch.setattr(cabs_ops, "OP_VJP_MAX_ELEMENTS", 80)  # at the cap: taken
    assert_op_vjp_taken(model, x, y)


def test_the_compiled_path_refuses_an_operation_vjp_use_cleanly():
    """compile=True does not cover the rule: ``auto`` warns once and answers with the eager fast path
    (exact), ``fast`` raises naming the parameter and the op."""
    torch.manual_seed(8)
    model = WhereBranch().double()
    x, y = torch.randn(6, 4, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    ref = brute_force(model, ce, x, y)
    engine = PerExampleStats(model, ce, method="auto", compile=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        stats = [engine(x, y), engine(x, y)]
    fell = [str(w.message) for w in seen if issubclass(w.category, FastPathFallbackWarning)]
    assert len(fell) == 1 and "eager fast path" in fell[0] and "fill" in fell[0]
    assert [v.ok for v in engine.plan().verdicts.values()] == [True]  # the eager fast path answered
    for s in stats:
        assert_stats_match(s, ref)
    with pytest.raises(UnsupportedModelError, match=r"fill.*where"):
        PerExampleStats(model, ce, method="fast", compile=True)(x, y)


@pytest.mark.parametrize("model_kind", ["einsum", "sdpa_windows"])
def test_the_one_example_at_a_time_replay_is_exact(monkeypatch, model_kind):
    """Where vmap has no batching rule for the replay, the examples are replayed one at a time."""
    def no_vmap(*args, **kwargs):
        raise RuntimeError("no batching rule (test)")

    monkeypatch.setattr(cabs_ops, "_vmap", no_vmap)
    torch.manual_seed(9)
    if model_kind == "einsum":
        model, x = EinsumModel("derived", 4).double(), torch.randn(6, 4, 3, dtype=torch.float64)
    else:
        model, x = RelBiasAttention(4, 3).double(), torch.randn(6, 12, 3, dtype=torch.float64)
    assert_op_vjp_taken(model, x, torch.randint(0, 3, (6,)))


class DropoutRelBias(RelBiasAttention):
    """Attention dropout in training mode: the op draws random numbers, so a replay would differ."""

    def forward(self, x):
        h = self.inp(x)
        m = h.shape[0]
        q, k, v = self.qkv(h).view(m, self.n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        bias = self.table[self.index].permute(2, 0, 1).unsqueeze(0)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.5 if self.training else 0.0)
        return self.head(torch.tanh(a.transpose(1, 2).reshape(m, self.n, D)).mean(1))


def test_an_op_drawing_random_numbers_is_refused():
    torch.manual_seed(10)
    model = DropoutRelBias(4).double()
    x, y = torch.randn(6, 4, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    assert_op_vjp_taken(model.eval(), x, y)  # the probes run in eval mode: no dropout, taken
    model.train()
    with pytest.raises(UnsupportedModelError, match=r"table meets the examples in scaled_dot_product_attention"):
        PerExampleStats(model, ce, method="fast")(x, y)
