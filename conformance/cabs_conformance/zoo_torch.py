"""The conformance zoo in PyTorch, from portable parameters, through ``cabs_torch``.

Layout conversions (see ``zoo.py``): dense kernels (in, out) -> ``Linear.weight``
(out, in); conv kernels HWIO -> ``Conv2d.weight`` OIHW; the models take NHWC
images and permute them to NCHW; before flattening they permute back to NHWC
so that the first dense kernel keeps the portable row order; SAME max pooling
pads (with -inf) at the end only, as TensorFlow does.
"""

from __future__ import annotations

import cabs_torch
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cabs_core import CABSController

from .zoo import LN_EPS, MODELS

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


class _Net(nn.Module):
    def __init__(self, model: str) -> None:
        super().__init__()
        self.model = model
        if model == "mlp":
            self.dense1, self.dense2, self.dense3 = nn.Linear(784, 512), nn.Linear(512, 512), nn.Linear(512, 10)
        elif model in ("mnist_cnn", "cifar_cnn"):
            width = 32 if model == "mnist_cnn" else 64
            cin = MODELS[model].input_shape[-1]
            self.conv1, self.conv2 = nn.Conv2d(cin, width, 5, padding=2), nn.Conv2d(width, 64, 5, padding=2)
            self.pool = 2 if model == "mnist_cnn" else 3
            if model == "mnist_cnn":
                self.dense1, self.dense2 = nn.Linear(7 * 7 * 64, 1024), nn.Linear(1024, 10)
            else:
                self.dense1, self.dense2, self.dense3 = (
                    nn.Linear(8 * 8 * 64, 384),
                    nn.Linear(384, 192),
                    nn.Linear(192, 10),
                )
        else:
            self.embed, self.norm = nn.Embedding(MODELS[model].vocab, 16), nn.LayerNorm(16, eps=LN_EPS)
            self.dense1, self.dense2 = nn.Linear(16, 32), nn.Linear(32, 10)

    def _same_pool(self, x: torch.Tensor) -> torch.Tensor:
        k, n = self.pool, x.shape[-1]
        pad = max((-(-n // 2) - 1) * 2 + k - n, 0)  # TF SAME: total padding, the extra at the end
        x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), value=-torch.inf)
        return F.max_pool2d(x, k, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.model == "mlp":
            return self.dense3(F.relu(self.dense2(F.relu(self.dense1(x)))))
        if self.model == "embed_ln":
            h = F.relu(self.dense1(self.norm(self.embed(x))))
            return self.dense2(h.mean(dim=1))
        x = x.permute(0, 3, 1, 2)  # NHWC -> NCHW
        x = self._same_pool(F.relu(self.conv1(x)))
        x = self._same_pool(F.relu(self.conv2(x)))
        x = x.permute(0, 2, 3, 1).flatten(1)  # flatten in NHWC order
        x = F.relu(self.dense1(x))
        if self.model == "mnist_cnn":
            return self.dense2(x)
        return self.dense3(F.relu(self.dense2(x)))


def _to_torch(name: str, a: np.ndarray) -> np.ndarray:
    if name.endswith("/kernel"):
        return a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
    return a


def _from_torch(name: str, a: np.ndarray) -> np.ndarray:
    if name.endswith("/kernel"):
        return a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T
    return a


def _portable_name(torch_name: str) -> str:
    """``dense1.weight`` -> ``dense1/kernel``, ``norm.weight`` -> ``norm/scale``, ..."""
    layer, leaf = torch_name.split(".")
    if leaf == "weight":
        leaf = {"embed": "embedding", "norm": "scale"}.get(layer, "kernel")
    return f"{layer}/{leaf}"


def build(model: str, params: dict[str, np.ndarray], dtype: str = "float64") -> nn.Module:
    """The torch module for ``model`` holding a copy of ``params`` (portable layout)."""
    net = _Net(model).to(_DTYPES[dtype])
    with torch.no_grad():
        for name, p in net.named_parameters():
            key = _portable_name(name)
            p.copy_(torch.from_numpy(np.ascontiguousarray(_to_torch(key, params[key]))))
    return net


def export(net: nn.Module) -> dict[str, np.ndarray]:
    """Parameters in the portable layout (float64 NumPy)."""
    return {
        _portable_name(n): _from_torch(_portable_name(n), p.detach().double().numpy())
        for n, p in net.named_parameters()
    }


def per_example_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def _inputs(x: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(x)
    return t if x.dtype.kind == "i" else t.to(_DTYPES[dtype])


def statistics(
    model: str,
    params: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    mask: np.ndarray | None,
    dtype: str,
    method: str = "auto",
) -> dict:
    """The step's statistics through ``cabs_torch.PerExampleStats``; grad_sum in the portable layout."""
    net = build(model, params, dtype)
    stats_fn = cabs_torch.PerExampleStats(net, per_example_loss, method=method)
    keep = None if mask is None else torch.from_numpy(mask).to(_DTYPES[dtype])
    s = stats_fn(_inputs(x, dtype), torch.from_numpy(y), mask=keep)
    names = [n for n, _ in net.named_parameters()]
    return {
        "method": stats_fn.resolved_method,
        "count": float(s.count),
        "loss_sum": float(s.loss_sum),
        "sq_norm_sum": float(s.sq_norm_sum),
        "grad_sum": {
            _portable_name(n): _from_torch(_portable_name(n), g.double().numpy()) for n, g in zip(names, s.grad_sum)
        },
    }


def train(
    model: str,
    params: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    controller: CABSController,
    steps: int,
    seed: int,
    dtype: str = "float64",
) -> tuple[list[int], dict[str, np.ndarray]]:
    """``steps`` CABS steps with ``cabs_torch.CABSTrainer`` and its batch sampler; returns the
    batch sizes used (the first is bs_init) and the final parameters."""
    net = build(model, params, dtype)
    opt = cabs_torch.CABSTrainer(net, per_example_loss, controller, seed=seed)
    sampler = opt.batch_sampler(len(x))
    sizes = []
    for _ in range(steps):
        idx = sampler.next_indices()
        sizes.append(len(idx))
        opt.step(_inputs(x[idx], dtype), torch.from_numpy(y[idx]))
    return sizes, export(net)


class _BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense, self.bn, self.out = nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.bn(self.dense(x))))


def refusal() -> str:
    """The adapter's answer to a model it cannot handle exactly (BatchNorm in
    training mode couples the examples): the error message. Returning
    statistics instead is a failure."""
    net = _BatchNormNet().double().train()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    try:
        cabs_torch.PerExampleStats(net, per_example_loss)(x, y)
    except ValueError as e:
        return f"{type(e).__name__}: {e}"
    raise AssertionError("cabs_torch returned statistics for a model with BatchNorm in training mode")
