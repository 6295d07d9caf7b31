"""compile=True on convolutions, channel normalisations and max pooling (issue 20,
item 2): the compiled fast path against the float64 loop of single-example
backward passes. One compilation per test (tiny models): compiling is slow."""

from __future__ import annotations

import cabs_torch.compiled
import cabs_torch.layers
import pytest
import torch
import torch.nn.functional as F
from cabs_torch import PerExampleStats, UnsupportedModelError, per_example_stats
from torch import nn
from torch_oracles import paper_cnn


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")




def strided_grouped_cnn() -> nn.Module:
    """Stride, padding, dilation, groups, GroupNorm, eval BatchNorm, a 1x1 conv."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.GroupNorm(4, 8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4), nn.BatchNorm2d(8).eval(), nn.ReLU(),
        nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 5 * 5, 10),
    )


class Conv1dPool(nn.Module):
    """Conv1d (stride, circular "same" padding) with a functional max pooling, eval BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 6, 3, stride=2, padding=1)
        self.same = nn.Conv1d(6, 4, 4, padding="same", padding_mode="circular", groups=2)
        self.norm = nn.BatchNorm1d(4).eval()
        self.head = nn.Linear(4 * 3, 10)

    def forward(self, x):
        h = F.max_pool1d(torch.relu(self.conv(x)), 2)  # (m, 6, 6) -> (m, 6, 3)
        h = torch.tanh(self.norm(self.same(h)))
        return self.head(h.flatten(1))


class LinearMaxPool(nn.Module):
    """No convolution, but a max pooling over a Linear's sequence outputs: compiled with aot_eager too."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 6)
        self.head = nn.Linear(6 * 4, 10)

    def forward(self, x):
        h = torch.relu(self.proj(x)).transpose(1, 2)  # (m, 6, 8)
        return self.head(F.max_pool1d(h, 2).flatten(1))


def _double(model: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):  # non-trivial running statistics
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
            if isinstance(mod, (nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):  # non-trivial affine
                mod.weight.add_(0.3 * torch.randn_like(mod.weight))
                mod.bias.add_(0.3 * torch.randn_like(mod.bias))
    return model


CASES = {
    "paper_cnn": (paper_cnn, (1, 28, 28), 3),
    "strided_grouped_cnn": (strided_grouped_cnn, (3, 10, 10), 6),
    "conv1d_maxpool": (Conv1dPool, (2, 12), 6),
    "linear_maxpool": (LinearMaxPool, (8, 5), 6),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_convolutions_match_the_loop(name, oracle, check):
    """The compiled fast path (aot_eager, see cabs_torch.compiled.compile_backend)
    equals the float64 loop; padding with mask 0 changes nothing."""
    make, shape, m = CASES[name]
    torch.manual_seed(1)
    model = _double(make(), seed=2)
    x, y = torch.randn(m + 1, *shape, dtype=torch.float64), torch.randint(0, 10, (m + 1,))
    keep = torch.ones(m + 1, dtype=torch.float64)
    keep[1] = 0.0  # one padding example
    stats = PerExampleStats(model, ce, method="fast", compile=True)
    got = stats(x, y, keep)
    assert stats.plan().compiled is not None and stats.plan().compiled.backend == "aot_eager"
    check(got, oracle(model, ce, x[keep.bool()], y[keep.bool()]))


def test_backend_choice():
    """inductor where no max pooling, convolution or channel normalisation is in the graph."""
    mlp = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    layers = {"0", "2"}
    assert cabs_torch.compiled.CompiledFastStats(mlp, ce, list(mlp.parameters()), layers).backend == "inductor"
    pooled = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (2, 3)), nn.AdaptiveMaxPool1d(1), nn.Flatten())
    assert cabs_torch.compiled.CompiledFastStats(pooled, ce, list(pooled.parameters()), {"0"}).backend == "aot_eager"
    conv = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten())
    assert cabs_torch.compiled.CompiledFastStats(conv, ce, list(conv.parameters()), {"0"}).backend == "aot_eager"


class MyLinear(nn.Linear):
    pass


def test_compiled_refuses_a_layer_type_it_has_not_checked(monkeypatch):
    """A layer type with an eager rule that compile=True has not been checked on is refused, by name."""
    monkeypatch.setitem(cabs_torch.layers.RULES, MyLinear, cabs_torch.layers.linear_pieces)
    model = nn.Sequential(MyLinear(4, 3), nn.Tanh())
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    with pytest.raises(UnsupportedModelError, match=r"compile=True supports .*0 \(MyLinear\).*compile=False"):
        per_example_stats(model, ce, x, y, method="fast", compile=True)


def test_each_instance_compiles_its_own_code():
    """torch.compile's caches and seen shapes live on the code object: two instances
    must not share it (the second would recompile with dynamic shapes, minutes for
    the grouped CNN above, or run eagerly past the recompilation limit)."""
    mlp = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    a, b = (cabs_torch.compiled.CompiledFastStats(mlp, ce, list(mlp.parameters()), {"0", "2"}) for _ in range(2))
    code_a, code_b = (s._step._torchdynamo_orig_callable.__code__ for s in (a, b))
    assert code_a is not code_b and code_a.co_name != code_b.co_name
    assert code_a.co_code == cabs_torch.compiled.CompiledFastStats._step_fn.__code__.co_code
