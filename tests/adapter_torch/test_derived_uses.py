"""Issue 20: parameters reaching the examples through tensors computed from them, in the patterns of
timm's vision transformers (written here, so that CI covers them without timm): BEiT's qkv bias
``cat(q_bias, zeros, v_bias)`` passed to ``F.linear`` (the product recorded as a Linear use, the
computed bias as a broadcast), a LoRA weight ``W + A @ B`` in ``F.linear`` and a parameter on the left
of a product (``W @ x``), both replayed per example (the operation VJP rule), and Swin's explicit
``scores + relative_position_bias`` on attention scores whose axis 0 folds the examples with their
windows (a broadcast on a folded axis), and a norm weight ``1 + w`` (replayed). Float64, against
the loop over single examples, the fast path taken (``assert_fast_taken``); a second batch of another
size with padding goes through the same engine."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from cabs_torch import PerExampleStats
from test_transformers import assert_fast_taken
from torch import nn
from torch_oracles import assert_stats_match, brute_force, ce

D, HEADS, WIN = 8, 2, 4


class BeitAttention(nn.Module):
    """qkv with a bias computed from parameters: ``cat(q_bias, zeros, v_bias)``, as timm's BEiT."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, D)
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(D) * 0.3), nn.Parameter(torch.randn(D) * 0.3)
        self.register_buffer("k_bias", torch.zeros(D), persistent=False)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        m, t, _ = h.shape
        qkv = F.linear(h, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.view(m, t, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(m, t, D)
        return self.head(att.mean(1))


class LoraLinear(nn.Module):
    """``F.linear(x, W + A @ B, bias)`` (a low-rank adapter merged into the weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, D)
        self.w = nn.Parameter(torch.randn(5, D) * 0.3)
        self.a, self.b = nn.Parameter(torch.randn(5, 2) * 0.3), nn.Parameter(torch.randn(2, D) * 0.3)
        self.bias = nn.Parameter(torch.randn(5) * 0.1)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.head(torch.tanh(F.linear(h, self.w + self.a @ self.b, self.bias)).mean(1))


class LeftProduct(nn.Module):
    """A parameter on the left of a product: ``W @ x`` with x (m, D, T), token mixing as in MLP-Mixer."""

    def __init__(self, t: int) -> None:
        super().__init__()
        self.inp = nn.Linear(3, D)
        self.mix = nn.Parameter(torch.randn(t, t) * 0.3)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))  # (m, T, D)
        return self.head(torch.tanh(self.mix @ h).mean(1))


class OffsetNorm(nn.Module):
    """``F.layer_norm(x, (D,), 1 + w, b)``: a norm weight computed from a parameter (Gemma's scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, D)
        self.w, self.b = nn.Parameter(torch.randn(D) * 0.3), nn.Parameter(torch.randn(D) * 0.3)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        return self.head(F.layer_norm(torch.tanh(self.inp(x)), (D,), 1 + self.w, self.b).mean(1))


class SwinWindows(nn.Module):
    """Window attention with an explicit ``scores + bias``: the windows of every example folded into
    axis 0 (m * windows, heads, N, N), the bias gathered from a table by relative position."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, D)
        self.qkv = nn.Linear(D, 3 * D)
        self.table = nn.Parameter(torch.randn(2 * WIN - 1, HEADS) * 0.3)
        pos = torch.arange(WIN)
        self.register_buffer("index", (pos[:, None] - pos[None, :] + WIN - 1).reshape(-1), persistent=False)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        m, t, _ = h.shape
        w = h.reshape(m * (t // WIN), WIN, D)  # example-major windows
        q, k, v = self.qkv(w).view(-1, WIN, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        bias = self.table[self.index].view(WIN, WIN, HEADS).permute(2, 0, 1)
        scores = (q @ k.transpose(-2, -1)) * (D // HEADS) ** -0.5 + bias.unsqueeze(0)
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(m, t, D)
        return self.head(out.mean(1))


def _check(model: nn.Module, t: int) -> None:
    torch.manual_seed(2)
    x, y = torch.randn(6, t, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    assert_fast_taken(model, x, y)
    engine = PerExampleStats(model, ce, method="fast")  # then another batch size, padded, same engine
    engine(x, y)
    x2, y2 = torch.randn(5, t, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    mask = torch.tensor([1, 1, 0, 1, 1], dtype=torch.float64)
    assert_stats_match(engine(x2, y2, mask), brute_force(model, ce, x2[mask.bool()], y2[mask.bool()]))


def test_beit_qkv_bias_computed_from_parameters():
    torch.manual_seed(0)
    _check(BeitAttention().double(), 5)


def test_lora_weight_in_linear():
    torch.manual_seed(0)
    _check(LoraLinear().double(), 4)


def test_norm_weight_computed_from_a_parameter():
    torch.manual_seed(0)
    _check(OffsetNorm().double(), 4)


def test_parameter_on_the_left_of_a_product():
    torch.manual_seed(0)
    _check(LeftProduct(7).double(), 7)


def test_swin_bias_on_windows_folded_with_the_examples():
    torch.manual_seed(0)
    _check(SwinWindows().double(), 3 * WIN)
