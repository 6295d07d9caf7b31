"""Adversarial tests of the operation VJP rule of the eager fast path (issue 20, ``cabs_torch.ops.VjpSite``).

A hypothesis family of small float64 models mixes ops the rule now takes (``torch.maximum``/``where``/
``lerp``/``atan2``/``masked_fill`` with a parameter, ``gather``/``index_select``/``__getitem__`` of a
parameter table by the examples' ids, ``einsum`` on rows folded example-major, ``F.conv1d`` and
``F.scaled_dot_product_attention`` with a parameter operand, an ``einsum`` tied with a Linear, a
parameter used by two such ops and a broadcast) with traps (a reduction over the examples, an
expanded operand, rows selected by a boolean mask). Several batches of sizes 1..7 (padding weights on
some) go through ONE engine, so that calls after the probe are checked too: each equals the float64 loop
over single examples, and a fallback is loud (``fast`` raises UnsupportedModelError).

The explicit regression tests below are the cases the search found: rows selected by a boolean mask
(``h[mask]``, packed sequences of data-dependent length) were taken as examples folded example-major, so
a later batch whose lengths differed gave a wrong S (same row total) or crashed (another total)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from cabs_torch import FastPathFallbackWarning, PerExampleStats, UnsupportedModelError
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch_oracles import brute_force, ce

D, VOCAB, T, TABLE = 4, 6, 4, 9

#: pieces the rule takes: the fast path must stay exact (checked against the loop)
PIECES = ["maximum", "where", "lerp", "atan2", "masked_fill", "gather", "index_select", "getitem", "fold_einsum",
          "conv1d", "sdpa_mask", "einsum_tie", "twice", "op_and_bcast", "expand_where", "expand_as_where",
          "bmm_expand", "fold_expand", "diff_prepend", "setitem_free", "eos_view", "mix_left",
          "keep_mask", "detached", "no_grad", "detached_bcast",
          "type_as"]
#: traps: exact or a loud fallback
TRAPS = ["sum0", "packed", "packed_lin", "stack_dim0", "select_param", "mix_t", "polar", "trim", "trim_lin"]


class OpVjpModel(nn.Module):
    """tokens (m, T), 0 the padding id -> embedding -> tanh -> the pieces -> sum over T -> a head."""

    def __init__(self, ops: list[str]) -> None:
        super().__init__()
        self.ops = ops
        self.emb = nn.Embedding(VOCAB, D)
        self.head = nn.Linear(D, 3)
        self.lin = nn.Linear(D, D)
        self.p = nn.Parameter(torch.randn(D) * 0.5)
        self.W = nn.Parameter(torch.randn(D, D) * 0.5)
        self.tab = nn.Parameter(torch.randn(TABLE, D) * 0.5)
        self.row = nn.Parameter(torch.randn(1, D) * 0.5)
        self.mix = nn.Parameter(torch.randn(T, T) * 0.5)
        self.register_buffer("keep", torch.tensor([True, False, True, True]))
        self.mutate = False  # changes an operand of an operation VJP use in place after the call

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.emb(tok))
        m = tok.shape[0]
        ids = (tok * 2 + 1) % TABLE
        for op in self.ops:
            if op == "maximum":
                h = torch.maximum(h, self.p)
            elif op == "where":
                x = h + 0
                h = torch.where(x > 0, torch.tanh(self.p) * 2, x)
                if self.mutate:  # torch.where saves only its condition for backward
                    x.mul_(1.5)
            elif op == "lerp":
                h = torch.lerp(h, self.row, torch.sigmoid(h))
            elif op == "atan2":
                h = torch.atan2(h, self.p * self.p + 1)
            elif op == "masked_fill":
                h = h * self.p.masked_fill(h > 0.3, 0.5)
            elif op == "gather":
                h = h * torch.gather(self.tab, 0, ids.reshape(-1, 1).expand(-1, D)).view(m, T, D)
            elif op == "index_select":
                h = h + torch.index_select(self.tab, 0, ids.reshape(-1)).view(m, T, D)
            elif op == "getitem":
                h = h * self.tab[ids]
            elif op == "fold_einsum":
                h = torch.tanh(torch.einsum("nd,de->ne", h.reshape(m * T, D), self.W)).view(m, T, D)
            elif op == "conv1d":
                h = F.conv1d(h.transpose(1, 2), self.W[:, :, None].repeat(1, 1, 2), padding=1)[..., :T].transpose(1, 2)
            elif op == "sdpa_mask":
                q = h.view(m, T, 2, D // 2).transpose(1, 2)
                h = F.scaled_dot_product_attention(q, q, q, attn_mask=self.tab[:T, :T]).transpose(1, 2).reshape(h.shape)
            elif op == "einsum_tie":
                h = torch.tanh(self.lin(h) + torch.einsum("btd,ed->bte", h, self.lin.weight))
            elif op == "twice":
                h = torch.maximum(torch.maximum(h, self.p), h * 0.5 + self.p)
            elif op == "op_and_bcast":
                h = torch.maximum(h, self.p) * self.p
            elif op == "sum0":  # couples the examples (visible on a probe batch, unlike a mean over identical ones)
                h = h + torch.maximum(h, self.p).sum(0, keepdim=True)
            elif op == "expand_where":  # an operand expanded along the examples
                h = torch.where(h > 0, self.row.expand(m, T, D), h)
            elif op == "expand_as_where":  # BEiT-like mask token
                h = torch.where(tok[..., None] == 1, torch.tanh(self.row).expand_as(h), h)
            elif op == "bmm_expand":  # a weight expanded over the batch
                h = torch.tanh(torch.bmm(h, self.W.expand(m, D, D)))
            elif op == "fold_expand":  # expanded over the rows folded example-major
                h = torch.maximum(h.reshape(m * T, D), self.p.expand(m * T, D)).view(m, T, D)
            elif op == "diff_prepend":  # an expanded parameter as the first row of each example
                h = torch.diff(h, dim=1, prepend=self.row[None].expand(m, 1, D))
            elif op == "mix_left":  # token mixing (MLP-Mixer): a parameter as the LEFT operand of a matmul
                h = torch.tanh(self.mix @ h)
            elif op == "mix_t":  # the rows of all examples as the columns of the right operand
                h = torch.tanh((self.W @ h.reshape(m * T, D).T).T).view(m, T, D)
            elif op == "keep_mask":  # positions kept by an example-free mask: the same rows for every example
                h = h * torch.maximum(h[:, self.keep], self.p).sum(1, keepdim=True)
            elif op == "detached":  # no gradient reaches p through p.detach()
                h = torch.where(h > 0, self.p.detach() * 2, h) + torch.maximum(h, self.p)
            elif op == "no_grad":
                with torch.no_grad():
                    w = self.W * 2
                h = torch.tanh(torch.einsum("btd,de->bte", h, w))
            elif op == "detached_bcast":
                h = h * torch.tanh(self.row.detach()) + torch.lerp(h, self.row, 0.5)
            elif op == "type_as":  # only the examples' dtype, device or shape is read
                h = h * self.p.type_as(h) + torch.maximum(h, self.p.to(h)) + self.W.view_as(h[0]).sum(0)
            elif op == "polar":  # a complex output: refused by name
                h = torch.view_as_real(torch.polar(self.p.abs() + 0.1, h)).sum(-1)
            elif op in ("trim", "trim_lin"):  # positions cut to the batch's longest example: n read from the data
                n = max(1, int((tok != 0).sum(1).max()))
                rows = h[:, :n].reshape(m * n, D)  # the same n rows per example, folded example-major
                rows = torch.maximum(rows, self.p) if op == "trim" else self.lin(rows)
                rows = rows * (tok[:, :n] != 0).reshape(m * n, 1)  # padding rows out: each example on its own
                h = h + F.pad(rows.view(m, n, D), (0, 0, 0, T - n))
            elif op == "stack_dim0":  # the examples on axis 1 of the output
                h = torch.stack([h, self.p.expand_as(h)], 0).sum(0)
            elif op in ("packed", "packed_lin"):  # the non-padding tokens' rows: (N, D), N depends on the data
                mask = tok != 0
                sel = h[mask]
                sel = torch.maximum(sel, self.p) if op == "packed" else self.lin(sel)
                h = torch.zeros_like(h).masked_scatter(mask[..., None], sel)
            elif op == "eos_view":  # BART's head: the rows of a mask laid out as (examples, ...) by the model
                eos = (tok >= 0) & (torch.arange(T) >= T - 2)  # two per example, as BART checks
                h = h + self.lin(h[eos].view(m, -1, D)[:, -1])[:, None]
            elif op == "select_param":  # a parameter's entries selected by the examples' mask, scattered back
                sel = tok == 1
                z = torch.masked_select(self.tab[:T, 0], sel)
                h = h * torch.zeros(m, T, dtype=h.dtype).masked_scatter(sel, z)[..., None]
            elif op == "setitem_free":  # the examples written into a tensor made by a factory
                buf = torch.zeros(m, T, D, dtype=h.dtype)
                buf[:, :] = h
                h = torch.maximum(buf, self.p)
        return self.head(h.sum(1))


def _batch(m: int, lengths: list[int] | None = None) -> torch.Tensor:
    tok = torch.randint(1, VOCAB, (m, T))
    if lengths is not None:  # padding after each example's length
        tok = tok * (torch.arange(T)[None] < torch.tensor(lengths)[:, None])
    return tok


def _reference(model: nn.Module, tok: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> dict:
    keep = slice(None) if mask is None else mask.bool()
    return brute_force(model, ce, tok[keep], y[keep])


def run_batches(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
                method: str = "auto") -> list[bool]:
    """All batches through one engine; each result equals the loop over single examples (relative 1e-9).
    Returns, per call, whether it warned of a fallback."""
    engine = PerExampleStats(model, ce, method=method)
    warned = []
    for tok, y, mask in batches:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stats = engine(tok, y, mask)
        warned.append(any(issubclass(w.category, FastPathFallbackWarning) for w in caught))
        ref = _reference(model, tok, y, mask)
        assert float(stats.sq_norm_sum) == pytest.approx(ref["sq_norm_sum"], rel=1e-9)
        for g, r in zip(stats.grad_sum, ref["grad_sum"]):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
    return warned


def assert_exact_or_loud(model: nn.Module, batches: list) -> list[bool]:
    """``auto`` exact on every batch; where it fell back, ``fast`` raises on the same batches."""
    warned = run_batches(model, batches)
    if any(warned):
        with pytest.raises(UnsupportedModelError):
            run_batches(model, batches, method="fast")
    return warned


# ----------------------------------------------------------------------------- the regressions


def _packed_batches() -> list:
    """Probe batch: every example 2 tokens long (the rows fold as blocks of 2); then a batch of the same row
    total with other lengths (a wrong S before the fix), then one of another total (a crash before it)."""
    y = torch.randint(0, 3, (5,))
    return [(_batch(5, [2, 2, 2, 2, 2]), y, None), (_batch(5, [1, 3, 2, 2, 2]), y, None),
            (_batch(5, [1, 3, 2, 2, 4]), y, None)]


@pytest.mark.parametrize("op", ["packed", "packed_lin"])
def test_rows_selected_by_a_boolean_mask_are_refused(op):
    """h[mask] has data-dependent rows: an op-VJP use (torch.maximum with a parameter) or a Linear module on
    them is refused at the probe (loud), and every batch is exact."""
    torch.manual_seed(0)
    model = OpVjpModel([op]).double()
    batches = _packed_batches()
    assert assert_exact_or_loud(model, batches)[0]
    engine = PerExampleStats(model, ce, method="fast")
    with pytest.raises(UnsupportedModelError, match="rows depend on the data"):
        engine(*batches[0][:2])


@pytest.mark.parametrize("op", ["trim", "trim_lin"])
def test_folded_rows_of_another_length_after_the_probe_fall_back(op):
    """Positions cut to the batch's longest example (n from the data, the same n for every example): a later
    batch of another n folds n' rows per example, which the probe's layout (n rows) does not place; the call
    falls back with a warning (``fast`` raises) instead of crashing in the unflatten of the captured rows."""
    torch.manual_seed(0)
    model = OpVjpModel([op]).double()
    y = torch.randint(0, 3, (5,))
    batches = [(_batch(5, [2, 1, 2, 2, 1]), y, None), (_batch(5, [3, 1, 2, 2, 1]), y, None)]
    assert assert_exact_or_loud(model, batches) == [False, True]


def test_factory_tensor_written_with_examples_carries_them():
    """buf = torch.zeros(...); buf[:, :] = h: buf carries the examples from then on, so torch.maximum(buf, p)
    is an operation VJP use (the fast path taken, exact), not an example-free computation."""
    torch.manual_seed(0)
    model = OpVjpModel(["setitem_free"]).double()
    y = torch.randint(0, 3, (5,))
    assert run_batches(model, [(_batch(5), y, None), (_batch(5), y, None)]) == [False, False]
    engine = PerExampleStats(model, ce, method="fast")
    engine(_batch(5), y)
    assert engine.plan().verdicts and all(v.ok for v in engine.plan().verdicts.values())


@pytest.mark.parametrize("op", ["expand_where", "expand_as_where", "bmm_expand", "fold_expand", "diff_prepend",
                                "mix_left", "keep_mask"])
def test_operand_expanded_along_the_examples_is_taken(op):
    """An example-free operand expanded along the rows (``W.expand(m, d, d)`` in a bmm, a mask token
    ``expand_as(h)`` in a where) is replayed as its source expanded to one example's rows, and a parameter
    as the left operand of a matmul (``P @ h``, token mixing) is an operation VJP use: the fast path is
    taken (both fell back before: the replay broadcast the whole batch's expansion against one example;
    ``P @ h`` was refused as a matmul whose left operand carries no examples), exact on batches of other
    sizes and with padding weights through the same engine. Positions kept by an example-free boolean mask
    (``h[:, keep]``) are the same rows for every example, not rows that depend on the data."""
    torch.manual_seed(0)
    model = OpVjpModel([op]).double()
    y = torch.randint(0, 3, (7,))
    batches = [(_batch(5), y[:5], None), (_batch(7), y, None), (_batch(6), y[:6], torch.tensor([1., 0, 1, 1, 0, 1]))]
    assert run_batches(model, batches) == [False, False, False]
    assert run_batches(model, batches, method="fast") == [False, False, False]


def test_rows_laid_out_per_example_by_the_model_are_taken():
    """h[eos].view(m, -1, d) (BART's and T5's classification heads, with as many eos rows per example): the
    model lays the selected rows out with the examples on axis 0, so the head on them is taken."""
    torch.manual_seed(0)
    model = OpVjpModel(["eos_view", "maximum"]).double()
    y = torch.randint(0, 3, (7,))
    batches = [(_batch(5), y[:5], None), (_batch(7), y, None)]
    assert run_batches(model, batches, method="fast") == [False, False]


def test_a_parameter_selected_by_the_examples_mask_is_refused():
    """torch.masked_select(p, mask): the output's rows of one example depend on the data, so the operation
    VJP rule refuses it at the probe (before: taken when the total happened to equal the probe's size, then
    a later batch crashed in the replay)."""
    torch.manual_seed(0)
    model = OpVjpModel(["select_param"]).double()
    y = torch.randint(0, 3, (5,))
    one_each = torch.tensor([[1, 2, 3, 4], [2, 1, 2, 2], [3, 3, 1, 5], [1, 4, 4, 4], [5, 5, 5, 1]])
    uneven = torch.tensor([[1, 1, 3, 4], [2, 3, 2, 2], [3, 3, 1, 5], [1, 4, 4, 4], [5, 5, 5, 1]])  # also 5 in all
    assert assert_exact_or_loud(model, [(one_each, y, None), (uneven, y, None)])[0]


def test_an_operation_with_a_complex_output_is_refused_by_name():
    """torch.polar(|p|, h): a complex output, refused as an operation without a rule (before: not captured,
    and the accounting check refused it as 'no use of it was seen')."""
    torch.manual_seed(0)
    model = OpVjpModel(["polar"]).double()
    y = torch.randint(0, 3, (5,))
    assert assert_exact_or_loud(model, [(_batch(5), y, None)]) == [True]
    with pytest.raises(UnsupportedModelError, match="meets the examples in .*polar"):
        PerExampleStats(model, ce, method="fast")(_batch(5), y)


def test_an_operand_changed_in_place_after_the_probe_falls_back():
    """A replay that finds an operand changed in place on a call after the probe (control flow: the
    verify_every caveat) falls back with a warning under ``auto`` (it raised before) and raises under ``fast``."""
    torch.manual_seed(0)
    y = torch.randint(0, 3, (5,))
    for method in ("auto", "fast"):
        model = OpVjpModel(["where"]).double()
        engine = PerExampleStats(model, ce, method=method)
        engine(_batch(5), y)
        model.mutate = True
        tok = _batch(5)
        if method == "fast":
            with pytest.raises(UnsupportedModelError, match="changed in place"):
                engine(tok, y, verify=False)
            continue
        with pytest.warns(FastPathFallbackWarning, match="changed in place"):
            stats = engine(tok, y, verify=False)
        assert float(stats.sq_norm_sum) == pytest.approx(brute_force(model, ce, tok, y)["sq_norm_sum"], rel=1e-9)


@pytest.mark.parametrize("op", ["detached", "no_grad", "detached_bcast",
          "type_as"])
def test_tensors_detached_from_the_parameters_are_constants(op):
    """p.detach() * 2 in a torch.where, W * 2 computed under torch.no_grad in an einsum, a detached row in a
    broadcast: no gradient reaches the parameter through them, so they are constants of the pass (the
    statistics crashed before: the batched VJP of their graph found no graph). p.type_as(h), p.to(h),
    W.view_as(h[0]) read only the examples' dtype or shape: example-free (they fell back before)."""
    torch.manual_seed(0)
    model = OpVjpModel([op]).double()
    y = torch.randint(0, 3, (7,))
    batches = [(_batch(5), y[:5], None), (_batch(7), y, torch.tensor([1., 0, 1, 1, 0, 1, 1]))]
    assert run_batches(model, batches, method="fast") == [False, False]


# ----------------------------------------------------------------------------- the property


@st.composite
def specs(draw):
    ops = draw(st.lists(st.sampled_from(PIECES + TRAPS), min_size=1, max_size=3))
    calls = []
    for _ in range(draw(st.integers(2, 3))):
        m = draw(st.integers(1, 7))
        # no empty example: a probe batch of identical all-padding examples can hide a coupling trap (sum0
        # before a saturated where): the probe cannot see what does not change its batch's values
        lengths = draw(st.lists(st.integers(1, T), min_size=m, max_size=m)) if draw(st.booleans()) else None
        masked = m > 1 and draw(st.booleans())
        calls.append((m, lengths, masked))
    return ops, calls, draw(st.integers(0, 2**16))


@settings(max_examples=150, deadline=None)
@given(specs())
def test_op_vjp_models_are_exact_or_loud_across_batches(spec):
    """Exact or loud on every batch; a model of pieces the rule takes never falls back (a silent loss of
    coverage is noticed)."""
    ops, calls, seed = spec
    torch.manual_seed(seed)
    model = OpVjpModel(ops).double()
    batches = []
    for m, lengths, masked in calls:
        mask = (torch.arange(m) % 3 != 1).double() if masked else None
        batches.append((_batch(m, lengths), torch.randint(0, 3, (m,)), mask))
    warned = assert_exact_or_loud(model, batches)
    if all(op in PIECES for op in ops):
        assert not any(warned), f"a model of pieces the rule takes fell back: {ops}"
