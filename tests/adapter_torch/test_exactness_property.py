"""Issue 12's property: on randomly generated small models built from the fast
path's layers, with random reshapes, transposes, broadcasts, ties, repeated
calls and batch sizes (including sizes equal to another dimension), the
statistics equal the float64 loop oracle, or the path stepped aside
(``fast``: UnsupportedModelError; ``auto``: a FastPathFallbackWarning and the
exact generic result). Never a wrong S."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from cabs_torch import UnsupportedModelError, per_example_stats
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch_oracles import assert_stats_match, brute_force, ce

D, VOCAB, T_MAX = 3, 5, 6

#: what an op does to h (m, T, D); the layer it uses is new unless the op is "repeat"
OPS = ["linear", "repeat", "norm", "conv1d", "fold", "time_major", "unsqueeze", "pos", "buffer", "halves",
       "weight_outside"]
HEADS = ["plain", "tied", "functional_tied"]


class Generated(nn.Module):
    """A model from a spec: tokens -> Embedding (or floats), the ops, a head on the mean over T."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.spec = spec
        self.emb = nn.Embedding(VOCAB, D) if spec["tokens"] else None
        self.layers = nn.ModuleList()
        for op in spec["ops"]:
            if op == "norm":
                self.layers.append(nn.LayerNorm(D))
            elif op == "conv1d":
                self.layers.append(nn.Conv1d(D, D, 3, padding=1))
            elif op == "pos":
                self.layers.append(nn.Embedding(T_MAX, D))
            else:
                self.layers.append(nn.Linear(D, D))
        self.register_buffer("table", torch.randn(spec["buffer_rows"], D))
        head = spec["head"] if spec["tokens"] else "plain"
        self.head = nn.Linear(D, VOCAB, bias=head == "plain")
        if head == "tied":
            self.head.weight = self.emb.weight

    def forward(self, x):
        h = self.emb(x) if self.emb is not None else x
        first_linear = next((layer for layer in self.layers if type(layer) is nn.Linear), None)
        for op, layer in zip(self.spec["ops"], self.layers):
            m, t = h.shape[:2]
            if op == "repeat" and first_linear is not None:
                layer = first_linear
            if op in ("linear", "repeat", "norm"):
                h = torch.tanh(layer(h))
            elif op == "conv1d":
                h = torch.tanh(layer(h.transpose(1, 2))).transpose(1, 2)
            elif op == "fold":
                h = torch.tanh(layer(h.reshape(m * t, D))).reshape(m, t, D)
            elif op == "time_major":
                h = torch.tanh(layer(h.transpose(0, 1))).transpose(0, 1)
            elif op == "unsqueeze":
                h = torch.tanh(layer(h.unsqueeze(0)))[0]
            elif op == "pos":
                h = h + layer(torch.arange(t, device=h.device))
            elif op == "buffer":
                h = h + layer(self.table).mean(0)
            elif op == "halves":
                k = m // 2
                h = torch.tanh(torch.cat([layer(h[:k]), layer(h[k:])]))
            elif op == "weight_outside":
                h = torch.tanh(layer(h) + 0.5 * F.linear(h, layer.weight))
        pooled = h.mean(1)
        if self.spec["tokens"] and self.spec["head"] == "functional_tied":
            return self.head(pooled) + F.linear(pooled, self.emb.weight)
        return self.head(pooled)


@st.composite
def specs(draw: Any) -> dict[str, Any]:
    t = draw(st.integers(2, T_MAX))
    m = draw(st.sampled_from([2, 3, 4, 5, 6, 7, 8, 9, 11, t, D, VOCAB]))  # sizes equal to other dimensions too
    m = max(m, 2)
    return {
        "m": m,
        "t": t,
        "tokens": draw(st.booleans()),
        "ops": draw(st.lists(st.sampled_from(OPS), min_size=1, max_size=3)),
        "head": draw(st.sampled_from(HEADS)),
        "buffer_rows": draw(st.sampled_from([m, t, 4])),
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(max_examples=40, deadline=None)
@given(spec=specs())
def test_generated_models_are_exact_or_step_aside(spec):
    torch.manual_seed(spec["seed"])
    model = Generated(spec).double()
    m, t = spec["m"], spec["t"]
    x = torch.randint(0, VOCAB, (m, t)) if spec["tokens"] else torch.randn(m, t, D, dtype=torch.float64)
    y = torch.randint(0, VOCAB, (m,))
    ref = brute_force(model, ce, x, y)
    try:
        fast = per_example_stats(model, ce, x, y, method="fast")
    except UnsupportedModelError:
        pass  # stepped aside
    else:
        assert_stats_match(fast, ref, rtol=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fallback warning is allowed; the value must be exact
        auto = per_example_stats(model, ce, x, y, method="auto")
    assert_stats_match(auto, ref, rtol=1e-9)
