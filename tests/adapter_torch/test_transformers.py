"""Issue 20, item 1: every parameter of the standard PyTorch transformers on the
exact fast path, checked in float64 against the loop over single examples
(conftest.brute_force), with the fast path TAKEN (the probe passed, no fallback
warning): a nanoGPT-style GPT (tied head F.linear(h, wte.weight), learned
positions from torch.arange(T) and from a (1, T) buffer,
F.scaled_dot_product_attention around nn.Linear projections), an HF-GPT-2-style
model (Conv1D = torch.addmm with a parameter), a BERT-style encoder (position ids
and token types from (1, T) buffers, nn.TransformerEncoderLayer),
nn.TransformerEncoderLayer in both layouts, nn.MultiheadAttention with a
key-padding mask, a ViT-style model (cls_token by expand + cat, pos_embed add,
LayerScale gamma, a timm-style LayerNorm subclass), padding weights, T == m; and
the registration API (a registered rule is used; a wrong one is caught)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from cabs_torch import RULES, FastPathFallbackWarning, PerExampleStats, UnsupportedModelError, register_rule
from torch import nn
from torch_oracles import assert_stats_match, brute_force, ce

VOCAB, D, HEADS, T_MAX = 11, 8, 2, 9


def assert_fast_taken(model: nn.Module, x, y, loss=ce, mask: torch.Tensor | None = None) -> None:
    """fast and auto: the probe passed (no fallback warning, a verified signature) and the
    statistics equal the float64 loop over single examples (of the kept rows under a mask)."""
    keep = slice(None) if mask is None else mask.bool()
    xs = tuple(t[keep] for t in x) if isinstance(x, tuple) else x[keep]
    ref = brute_force(model, loss, xs, y[keep])
    for method in ("fast", "auto"):
        engine = PerExampleStats(model, loss, method=method)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FastPathFallbackWarning)
            stats = engine(x, y, mask)
        assert engine.resolved_method == "fast"
        assert [v.ok for v in engine.plan().verdicts.values()] == [True]  # probed and passed, not generic
        assert_stats_match(stats, ref)


def token_loss(logits, t):
    """Next-token loss per example: cross entropy summed over positions."""
    return F.cross_entropy(logits.transpose(1, 2), t, reduction="none").sum(1)


# ----------------------------------------------------------------------------- nanoGPT


class CausalSelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_attn = nn.Linear(D, 3 * D)
        self.c_proj = nn.Linear(D, D)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)
        q, k, v = (z.view(b, t, HEADS, c // HEADS).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(D), CausalSelfAttention(), nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's layout: wte + wpe(positions), blocks, ln_f, logits = F.linear(h, wte.weight)."""

    def __init__(self, positions: str) -> None:
        super().__init__()
        self.positions = positions
        self.wte, self.wpe = nn.Embedding(VOCAB, D), nn.Embedding(T_MAX, D)
        self.h = nn.ModuleList([Block(), Block()])
        self.ln_f = nn.LayerNorm(D)
        self.register_buffer("position_ids", torch.arange(T_MAX).unsqueeze(0))

    def forward(self, idx):
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device) if self.positions == "arange" else self.position_ids[:, :t]
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)


@pytest.mark.parametrize(("positions", "m", "t"), [("arange", 6, 5), ("buffer", 6, 6)])  # T == m: the coincidence
def test_nanogpt(positions, m, t):
    torch.manual_seed(0)
    model = NanoGPT(positions).double()
    idx = torch.randint(0, VOCAB, (m, t))
    idx[:, 1] = idx[:, 0]  # repeated ids in each example
    assert_fast_taken(model, idx, torch.roll(idx, -1, 1), loss=token_loss)


# ----------------------------------------------------------------------------- Hugging Face GPT-2 style


class Conv1D(nn.Module):
    """Hugging Face's Conv1D: a linear layer with the weight transposed, through torch.addmm."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class HFStyleGPT2(nn.Module):
    """GPT-2 as Hugging Face writes it: Conv1D projections, positions from arange(T).unsqueeze(0),
    an nn.Linear lm_head whose weight IS wte's (a module-level tie)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, D), nn.Embedding(T_MAX, D)
        self.ln_1, self.ln_f = nn.LayerNorm(D), nn.LayerNorm(D)
        self.c_attn, self.c_proj, self.c_fc = Conv1D(3 * D, D), Conv1D(D, D), Conv1D(2 * D, D)
        self.c_out = Conv1D(D, 2 * D)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        b, t = idx.shape
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device).unsqueeze(0)
        x = self.wte(idx) + self.wpe(pos)
        q, k, v = self.c_attn(self.ln_1(x)).split(D, dim=2)
        q, k, v = (z.view(b, t, HEADS, D // HEADS).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, D)
        x = x + self.c_proj(a)
        x = x + self.c_out(F.gelu(self.c_fc(x)))
        return self.lm_head(self.ln_f(x))


@pytest.mark.parametrize(("m", "t"), [(5, 4), (4, 4)])
def test_hf_style_gpt2_conv1d(m, t):
    torch.manual_seed(2)
    model = HFStyleGPT2().double()
    idx = torch.randint(0, VOCAB, (m, t))
    assert_fast_taken(model, idx, torch.roll(idx, -1, 1), loss=token_loss)


def test_gpt_with_padding_weights():
    torch.manual_seed(1)
    model = HFStyleGPT2().double()
    idx = torch.randint(0, VOCAB, (7, 4))
    mask = torch.tensor([1, 1, 0, 1, 1, 0, 1], dtype=torch.float64)
    assert_fast_taken(model, idx, torch.roll(idx, -1, 1), loss=token_loss, mask=mask)


# ----------------------------------------------------------------------------- BERT style


class BertStyle(nn.Module):
    """BERT's embeddings (word + token type, then += positions from a (1, T) buffer; default token
    types from a (1, T) zero buffer expanded over the batch, as Hugging Face does), LayerNorm,
    a batch-first nn.TransformerEncoderLayer with the padding mask, pooler and classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.word, self.position, self.token_type = nn.Embedding(VOCAB, D), nn.Embedding(T_MAX, D), \
            nn.Embedding(2, D)
        self.register_buffer("position_ids", torch.arange(T_MAX).expand((1, -1)))
        self.register_buffer("token_type_ids", torch.zeros((1, T_MAX), dtype=torch.long))
        self.norm = nn.LayerNorm(D)
        self.encoder = nn.TransformerEncoderLayer(D, HEADS, 2 * D, dropout=0.0, batch_first=True)
        self.pooler, self.classifier = nn.Linear(D, D), nn.Linear(D, 3)

    def forward(self, ids, attention_mask, token_types=None):
        b, t = ids.shape
        if token_types is None:
            token_types = self.token_type_ids[:, :t].expand(b, t)
        e = self.word(ids) + self.token_type(token_types)
        e += self.position(self.position_ids[:, :t])
        h = self.encoder(self.norm(e), src_key_padding_mask=attention_mask == 0)
        return self.classifier(torch.tanh(self.pooler(h[:, 0])))


@pytest.mark.parametrize("token_types", ["default", "given"])
def test_bert_style(token_types):
    torch.manual_seed(3)
    model = BertStyle().double()
    m, t = 6, 5
    ids = torch.randint(0, VOCAB, (m, t))
    attention = torch.ones(m, t, dtype=torch.long)
    attention[1, 3:] = 0
    attention[4, 2:] = 0
    x = (ids, attention) if token_types == "default" else (ids, attention, torch.randint(0, 2, (m, t)))
    assert_fast_taken(model, x, torch.randint(0, 3, (m,)))


class SeparateProjections(nn.Module):
    """Hugging Face BERT's self-attention: separate query/key/value nn.Linear layers with biases.
    The key bias's gradient is zero up to rounding (softmax ignores a shift shared by all keys)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.query, self.key, self.value = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.head = nn.Linear(D, 3)

    def forward(self, ids):
        h = self.emb(ids)
        b, t, _ = h.shape
        q, k, v = (lin(h).view(b, t, HEADS, D // HEADS).transpose(1, 2) for lin in (self.query, self.key, self.value))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, D)
        return self.head(a.mean(1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_key_bias_that_cancels_stays_on_the_fast_path(dtype):
    """The accounting check compares a gradient that cancels to about zero with the size of
    its terms (before issue 20 the key bias's rounding noise made BERT fall back)."""
    torch.manual_seed(10)
    model = SeparateProjections().to(dtype)
    ids, y = torch.randint(0, VOCAB, (6, 5)), torch.randint(0, 3, (6,))
    if dtype == torch.float64:
        assert_fast_taken(model, ids, y)
        return
    engine = PerExampleStats(model, ce, method="fast")
    stats = engine(ids, y)
    assert [v.ok for v in engine.plan().verdicts.values()] == [True]
    ref = brute_force(model.double(), ce, ids, y)
    assert float(stats.sq_norm_sum) == pytest.approx(ref["sq_norm_sum"], rel=1e-4)


class TimeMajorPositions(nn.Module):
    """A learned (T, 1, d) position table added to a time-major (T, m, d) tensor: a broadcast whose
    output does not have the examples on axis 0, which the broadcast rule does not cover."""

    def __init__(self, t: int) -> None:
        super().__init__()
        self.inp = nn.Linear(3, D)
        self.pos = nn.Parameter(torch.randn(t, 1, D))
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        h = self.inp(x).transpose(0, 1) + self.pos
        return self.head(torch.tanh(h).mean(0))


class WhereGate(nn.Module):
    """torch.where(mask, x, P) with the examples on axis 1 of every operand (time-major): an op
    without a rule of its own that the operation VJP rule cannot replay per example (it needs them
    on axis 0; tests/adapter_torch/test_op_vjp.py has the batch-major form, on the fast path)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, D)
        self.fill = nn.Parameter(torch.randn(D))
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        h = self.inp(x).transpose(0, 1)
        return self.head(torch.where(h > 0, h, self.fill).mean(0))


@pytest.mark.parametrize(("model", "name"), [(TimeMajorPositions(4), "pos"), (WhereGate(), "fill")])
def test_uses_without_a_rule_step_aside(model, name):
    torch.manual_seed(11)
    model = model.double()
    x, y = torch.randn(6, 4, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(UnsupportedModelError, match=name):
        PerExampleStats(model, ce, method="fast")(x, y)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        stats = PerExampleStats(model, ce, method="auto")(x, y)
    assert len([w for w in seen if issubclass(w.category, FastPathFallbackWarning)]) == 1
    assert_stats_match(stats, brute_force(model, ce, x, y))


# ----------------------------------------------------------------------------- torch.nn transformer layers


class EncoderModel(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(3, D)
        self.layer = nn.TransformerEncoderLayer(D, HEADS, 2 * D, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        h = self.inp(x)
        if self.batch_first:
            return self.head(self.layer(h).mean(1))
        return self.head(self.layer(h.transpose(0, 1)).mean(0))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("t", [4, 5])  # T == m == 5: the coincidence
def test_transformer_encoder_layer(batch_first, t):
    torch.manual_seed(4)
    model = EncoderModel(batch_first).double()
    x, y = torch.randn(5, t, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    assert_fast_taken(model, x, y)


class PaddedAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, D)
        self.attn = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.head = nn.Linear(D, 3)

    def forward(self, x, pad):
        h = self.inp(x)
        h, _ = self.attn(h, h, h, key_padding_mask=pad)
        return self.head(h.masked_fill(pad.unsqueeze(-1), 0.0).sum(1))


def padded_attention_batch() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]:
    """PaddedAttention, its inputs (x, key-padding mask of two examples), targets, padding weights."""
    torch.manual_seed(5)
    model = PaddedAttention().double()
    m, t = 7, 4
    x = torch.randn(m, t, 3, dtype=torch.float64)
    pad = torch.zeros(m, t, dtype=torch.bool)
    pad[0, 2:] = True
    pad[3, 1:] = True
    mask = torch.tensor([1, 0, 1, 1, 1, 1, 0], dtype=torch.float64)
    return model, (x, pad), torch.randint(0, 3, (m,)), mask


def test_multihead_attention_key_padding_mask_and_padding_weights():
    model, x, y, mask = padded_attention_batch()
    assert_fast_taken(model, x, y, mask=mask)


# ----------------------------------------------------------------------------- ViT style


class TimmLayerNorm(nn.LayerNorm):
    """timm's pattern: a LayerNorm subclass whose forward calls F.layer_norm (no module rule)."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class ViTBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = TimmLayerNorm(D), TimmLayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.gamma1 = nn.Parameter(torch.full((D,), 0.5) + 0.1 * torch.randn(D))  # LayerScale
        self.gamma2 = nn.Parameter(torch.full((D,), 0.5) + 0.1 * torch.randn(D))

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(a) * self.gamma1
        return x + self.gamma2 * self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViTStyle(nn.Module):
    def __init__(self, patch: int = 2, image: int = 4, channels: int = 2) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(channels, D, patch, stride=patch)
        n = (image // patch) ** 2
        self.cls_token = nn.Parameter(0.1 * torch.randn(1, 1, D))
        self.pos_embed = nn.Parameter(0.1 * torch.randn(1, n + 1, D))
        self.blocks = nn.Sequential(ViTBlock(), ViTBlock())
        self.norm = TimmLayerNorm(D)
        self.head = nn.Linear(D, 3)

    def forward(self, img):
        x = self.patch_embed(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


@pytest.mark.parametrize("m", [6, 5])  # 5 == the sequence (4 patches + cls): the coincidence
def test_vit_style(m):
    torch.manual_seed(6)
    model = ViTStyle().double()
    img, y = torch.randn(m, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (m,))
    assert_fast_taken(model, img, y)


# ----------------------------------------------------------------------------- registration


class EinsumLinear(nn.Module):
    """A custom layer computing through torch.einsum: no module rule (its einsum is an operation VJP use)."""

    def __init__(self, p: int, q: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(p, q) / math.sqrt(p))

    def forward(self, x):
        return torch.einsum("btp,pq->btq", x, self.w)


class WithEinsum(nn.Module):
    def __init__(self, layer_type: type[nn.Module]) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.custom = layer_type(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.custom(torch.tanh(self.inp(x)))).mean(1))


def einsum_linear_rule(mod, a, b):
    """x @ w with w (p, q): g_i = sum_t a_it^T b_it, in w's layout."""
    n = a.shape[0]
    return {"w": ("lin", b.reshape(n, -1, b.shape[-1]), a.reshape(n, -1, a.shape[-1]))}


def test_registered_module_rule_is_used():
    torch.manual_seed(7)

    class Custom(EinsumLinear):
        pass

    model = WithEinsum(Custom).double()
    x, y = torch.randn(6, 4, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    # before: the einsum is an operation VJP use (ops.VjpSite); once registered, the module's rule
    calls = []

    def counted(mod, a, b):
        calls.append(mod)
        return einsum_linear_rule(mod, a, b)

    register_rule(Custom, counted)
    try:
        assert_fast_taken(model, x, y)
    finally:
        RULES.pop(Custom)
    assert calls and all(mod is model.custom for mod in calls)


def test_wrong_registered_rule_is_caught():
    torch.manual_seed(8)

    class Custom(EinsumLinear):
        pass

    def wrong(mod, a, b):  # per-example gradients twice too large
        pieces = einsum_linear_rule(mod, a, b)
        kind, bb, aa = pieces["w"]
        return {"w": (kind, 2 * bb, aa)}

    model = WithEinsum(Custom).double()
    x, y = torch.randn(6, 4, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    register_rule(Custom, wrong)
    try:
        with pytest.raises(UnsupportedModelError, match="custom"):
            PerExampleStats(model, ce, method="fast")(x, y)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            stats = PerExampleStats(model, ce, method="auto")(x, y)
        assert [w for w in seen if issubclass(w.category, FastPathFallbackWarning)]
        assert_stats_match(stats, brute_force(model, ce, x, y))
    finally:
        RULES.pop(Custom)


def scaled_matmul(x, w, scale: float):
    """A user's functional op: (x @ w) * scale."""
    return torch.matmul(x, w) * scale


def test_registered_function_rule():
    torch.manual_seed(9)

    def rule(site, a, b):
        n, scale = a.shape[0], site.args[2]
        return {"weight": ("lin", scale * b.reshape(n, -1, b.shape[-1]), a.reshape(n, -1, a.shape[-1]))}

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4))
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(torch.tanh(wrapped(x, self.w, 0.5)).mean(1))

    from torch.overrides import handle_torch_function, has_torch_function

    def wrapped(x, w, scale):
        if has_torch_function((x, w)):
            return handle_torch_function(wrapped, (x, w), x, w, scale)
        return scaled_matmul(x, w, scale)

    from cabs_torch.ops import FUNCTION_RULES
    register_rule(wrapped, rule, input_arg=0, param_args={"weight": 1})
    try:
        model = Functional().double()
        x, y = torch.randn(6, 4, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
        assert_fast_taken(model, x, y)
    finally:
        FUNCTION_RULES.pop(wrapped)


# ----------------------------------------------------------------------------- layouts of held-out models
# (tests/hf/test_hf_zoo.py runs the real ones: OPT, BART, MPNet, Falcon)


class FlatFeedForward(nn.Module):
    """OPT's layout: the blocks' LayerNorm and Linear modules see (m * T, d), the examples folded
    into the rows (example-major), and the result is viewed back as (m, T, d)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(D), nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.head = nn.Linear(D, 3)

    def forward(self, ids):
        h = self.emb(ids)
        m, t, d = h.shape
        flat = h.reshape(-1, d)
        flat = flat + self.fc2(torch.relu(self.fc1(self.norm(flat))))
        return self.head(flat.view(m, t, d).mean(1))


class TimeMajorFold(nn.Module):
    """The examples folded time-major, (T * m, d), into a Linear module: not the example-major
    fold the probe assumes first; whatever path is taken, S must be exact."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mid, self.head = nn.Linear(3, D), nn.Linear(D, D), nn.Linear(D, 3)

    def forward(self, x):
        h = self.inp(x)                                      # (m, T, d)
        m, t, d = h.shape
        flat = h.transpose(0, 1).reshape(t * m, d)           # time-major rows
        h = torch.tanh(self.mid(flat)).view(t, m, d).transpose(0, 1)
        return self.head((h * torch.arange(1, t + 1, dtype=h.dtype).view(1, t, 1)).mean(1))


class OffsetPositions(nn.Module):
    """BART's learned positions: arange(T).expand(m, -1) + offset, looked up, added to the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, D), nn.Embedding(T_MAX + 2, D)
        self.head = nn.Linear(D, 3)

    def forward(self, ids):
        m, t = ids.shape
        pos = torch.arange(t).expand(m, -1) + 2
        return self.head(torch.tanh(self.tok(ids) + self.pos(pos)).mean(1))


class RelativeBias(nn.Module):
    """MPNet's relative attention bias: a (T, T) bucket table looked up, permuted to heads,
    expanded over the examples and made contiguous, added to every example's scores."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.qk = nn.Embedding(VOCAB, D), nn.Linear(D, 2 * D)
        self.rel = nn.Embedding(5, HEADS)
        self.head = nn.Linear(HEADS, 3)

    def forward(self, ids):
        m, t = ids.shape
        q, k = self.qk(self.tok(ids)).view(m, t, 2, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        r = torch.arange(t)
        buckets = (r[None, :] - r[:, None]).clamp(-2, 2) + 2
        bias = self.rel(buckets).permute(2, 0, 1).unsqueeze(0).expand(m, -1, -1, -1).contiguous()
        scores = q @ k.transpose(-1, -2) + bias              # (m, heads, T, T)
        return self.head(torch.softmax(scores, -1).mean((2, 3)))


class WrittenPositions(nn.Module):
    """Expanded positions copied and then written in place: no longer an expansion of arange."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, D), nn.Embedding(T_MAX, D)
        self.head = nn.Linear(D, 3)

    def forward(self, ids):
        m, t = ids.shape
        pos = torch.arange(t).expand(m, -1).clone()
        pos[0] = 0  # the first example's positions differ from the others'
        return self.head(torch.tanh(self.tok(ids) + self.pos(pos)).mean(1))


class TransposedLinear(nn.Linear):
    """Falcon's linear layer: nn.Linear's parameters, forward written as x @ W.T + b."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class FalconStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.qkv, self.out = TransposedLinear(D, 3 * D), nn.Linear(D, D, bias=False)
        self.head = nn.Linear(D, 3)

    def forward(self, ids):
        h = self.qkv(self.tok(ids))
        q, k, v = h.split(D, -1)
        a = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        return self.head(torch.tanh(torch.matmul(a, self.out.weight.t())).mean(1))


@pytest.mark.parametrize("model_cls", [FlatFeedForward, OffsetPositions, RelativeBias, FalconStyle])
def test_held_out_layouts_take_the_fast_path(model_cls):
    torch.manual_seed(5)
    model = model_cls().double()
    ids, y = torch.randint(0, VOCAB, (6, 5)), torch.randint(0, 3, (6,))
    assert_fast_taken(model, ids, y)


@pytest.mark.parametrize("model_cls", [TimeMajorFold, WrittenPositions])
def test_folds_and_writes_the_probe_cannot_place_stay_exact(model_cls):
    torch.manual_seed(6)
    model = model_cls().double()
    if model_cls is TimeMajorFold:
        x = torch.randn(6, 5, 3, dtype=torch.float64)
    else:
        x = torch.randint(0, VOCAB, (6, 5))
    y = torch.randint(0, 3, (6,))
    ref = brute_force(model, ce, x, y)
    engine = PerExampleStats(model, ce, method="auto")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        stats = [engine(x, y), engine(x, y)]
    assert len([w for w in seen if issubclass(w.category, FastPathFallbackWarning)]) == 1  # stepped aside, loudly
    for s in stats:
        assert_stats_match(s, ref)
