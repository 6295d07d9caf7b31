"""Low precision (issue 14, item 2): a bfloat16/float16 model, and float32 models under
``torch.autocast`` (bfloat16, float16), give count, loss sum and S accumulated in
float64, with the per-example squares formed in >= float32, on every path.

The oracle is a loop of single-example backward passes of the same model with its
weights cast to float64. A low-precision forward and backward pass carries ~3
significant digits, so the documented tolerance (docs/torch.md, "Mixed
precision") is ``RTOL_LOW`` relative on the loss sum and S, ``RTOL_GRAD`` on
sum g; the count is exact.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from cabs_torch import PerExampleStats
from torch import nn

from cabs_core import BatchStats, CABSController, FastPathFallbackWarning

#: documented tolerances (docs/torch.md): low-precision statistics vs the float64 model, on the
#: loss sum and S (observed: <= 1e-3), and on grad_sum, the model's own low-precision backward
#: pass summed over the examples (observed: ~2e-2 for bfloat16)
RTOL_LOW, RTOL_GRAD = 1e-2, 5e-2


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.float(), y, reduction="none")


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


def cnn() -> nn.Module:
    """Conv2d (its per-example norms from the chunked rule) and a Linear head."""
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))


def data(kind: str, m: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (m, 5) if kind == "mlp" else (m, 1, 6, 6)
    return scale * torch.randn(shape, generator=g), torch.randint(0, 3, (m,), generator=g)


def oracle(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> BatchStats:
    """count, loss sum, grad_sum and S from single examples of the model cast to float64."""
    m64 = copy.deepcopy(model).double()
    params = [p for p in m64.parameters() if p.requires_grad]
    loss_sum, s = 0.0, 0.0
    grad_sum = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        li = F.cross_entropy(m64(x[i : i + 1].double()), y[i : i + 1], reduction="none")[0]
        gs = torch.autograd.grad(li, params)
        loss_sum += float(li.detach())
        s += sum(float((g * g).sum()) for g in gs)
        for acc, g in zip(grad_sum, gs):
            acc += g
    n = torch.tensor(float(x.shape[0]), dtype=torch.float64)
    return BatchStats(n, torch.tensor(loss_sum, dtype=torch.float64), tuple(grad_sum),
                      torch.tensor(s, dtype=torch.float64))


def assert_close_to_oracle(got: BatchStats, want: BatchStats) -> None:
    assert float(got.count) == float(want.count)  # exact
    for name in ("count", "loss_sum", "sq_norm_sum"):
        assert getattr(got, name).dtype == torch.float64, name
    for name in ("loss_sum", "sq_norm_sum"):
        g, w = float(getattr(got, name)), float(getattr(want, name))
        assert abs(g - w) <= RTOL_LOW * abs(w), (name, g, w)
    g = torch.cat([t.double().reshape(-1) for t in got.grad_sum])
    w = torch.cat([t.reshape(-1) for t in want.grad_sum])
    assert float(torch.linalg.vector_norm(g - w)) <= RTOL_GRAD * float(torch.linalg.vector_norm(w))


def run(model: nn.Module, method: str, x: torch.Tensor, y: torch.Tensor, autocast: torch.dtype | None,
        compile: bool = False) -> BatchStats:
    """The statistics, with FastPathFallbackWarning an error (auto must not fall back here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathFallbackWarning)
        engine = PerExampleStats(model, ce, method=method, compile=compile)
        if autocast is None:
            return engine(x, y)
        with torch.autocast("cpu", dtype=autocast):
            return engine(x, y)


METHODS = ("fast", "generic", "auto")


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_float16_model_sums_beyond_float16_range(kind: str) -> None:
    """model.half(): S (> 1e5) exceeds float16's largest number 65504 while every example's
    ||g_i||^2 fits; on every path it comes out finite, in float64, close to the float64
    model, and grad_sum stays in float16 (it feeds the update)."""
    torch.manual_seed(0)
    model = (mlp() if kind == "mlp" else cnn()).half()
    x, y = data(kind, 67, scale=32.0 if kind == "mlp" else 16.0)
    want = oracle(model, x, y)
    assert float(want.sq_norm_sum) > 2 * 65504  # the case float16 sums cannot hold
    for method in METHODS:
        got = run(model, method, x.half(), y, None)
        assert all(g.dtype == torch.float16 for g in got.grad_sum), method
        assert_close_to_oracle(got, want)


def test_bfloat16_model() -> None:
    """model.to(torch.bfloat16) on a batch of 257: exact count, float64 sums, bf16 grad_sum."""
    torch.manual_seed(0)
    model = mlp().to(torch.bfloat16)
    x, y = data("mlp", 257)
    want = oracle(model, x, y)
    for method in METHODS:
        got = run(model, method, x.to(torch.bfloat16), y, None)
        assert all(g.dtype == torch.bfloat16 for g in got.grad_sum), method
        assert_close_to_oracle(got, want)
        ctl = CABSController(lr=0.1, bs_min=16, bs_max=4096)
        assert not ctl.update(ctl.init(), got)[1].skipped


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast(kind: str, dtype: torch.dtype) -> None:
    """float32 parameters under torch.autocast("cpu", dtype): the probe checks at the autocast
    dtype's tolerance (the fast path is established, no fallback), grad_sum is float32."""
    torch.manual_seed(0)
    model = mlp() if kind == "mlp" else cnn()
    x, y = data(kind, 67)
    want = oracle(model, x, y)
    for method in METHODS:
        got = run(model, method, x, y, dtype)
        assert all(g.dtype == torch.float32 for g in got.grad_sum), method
        assert_close_to_oracle(got, want)
