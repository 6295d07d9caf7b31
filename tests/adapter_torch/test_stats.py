"""Exact per-example statistics: fast and generic paths against a brute-force
loop of single-example backward passes, in float64."""

from __future__ import annotations

import cabs_torch
import cabs_torch.layers
import cabs_torch.stats
import pytest
import torch
import torch.nn.functional as F
from cabs_torch import (
    BatchNormTrainingError,
    CABSTrainer,
    PerExampleStats,
    UnsupportedModelError,
    per_example_stats,
    resolve_method,
)
from torch import nn
from torch_oracles import paper_cnn

from cabs_core import CABSController, two_pass_variance, within_batch_variance

M = 5  # examples per test batch
METHODS = ["fast", "generic"]


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def seeded(seed: int = 0) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class Head(nn.Module):
    """A layer under test followed by a flatten and a linear head to 3 classes."""

    def __init__(self, layer: nn.Module, out_features: int) -> None:
        super().__init__()
        self.layer = layer
        self.head = nn.Linear(out_features, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.layer(x)).flatten(1))


def _layer_cases():
    f = torch.randn
    return {
        "linear": (nn.Linear(6, 4), lambda: f(M, 6), 4),
        "linear_nobias": (nn.Linear(6, 4, bias=False), lambda: f(M, 6), 4),
        "linear_seq": (nn.Linear(6, 4), lambda: f(M, 7, 6), 28),
        "linear_seq4d": (nn.Linear(3, 4), lambda: f(M, 2, 5, 3), 40),
        "conv1d": (nn.Conv1d(3, 4, 3), lambda: f(M, 3, 11), 36),
        "conv1d_stride_pad": (nn.Conv1d(3, 4, 3, stride=2, padding=2), lambda: f(M, 3, 11), 28),
        "conv1d_dil_groups": (nn.Conv1d(4, 6, 3, dilation=2, groups=2), lambda: f(M, 4, 11), 42),
        "conv1d_same_circular": (nn.Conv1d(2, 4, 4, padding="same", padding_mode="circular"),
                                 lambda: f(M, 2, 9), 36),
        "conv2d": (nn.Conv2d(2, 3, 3), lambda: f(M, 2, 6, 6), 48),
        "conv2d_stride_pad": (nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 2)), lambda: f(M, 2, 7, 6),
                              4 * 4 * 9),
        "conv2d_dilation": (nn.Conv2d(2, 3, 3, dilation=2, padding=1), lambda: f(M, 2, 8, 8), 3 * 6 * 6),
        "conv2d_groups": (nn.Conv2d(4, 6, 3, groups=2, padding=1), lambda: f(M, 4, 5, 5), 150),
        "conv2d_depthwise": (nn.Conv2d(3, 3, 3, groups=3), lambda: f(M, 3, 5, 5), 27),
        "conv2d_same_reflect": (nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect"),
                                lambda: f(M, 2, 5, 5), 75),
        "conv2d_valid_nobias": (nn.Conv2d(2, 3, 2, padding="valid", bias=False), lambda: f(M, 2, 5, 5), 48),
        "embedding": (nn.Embedding(7, 4), lambda: torch.randint(0, 7, (M, 6)), 24),
        "embedding_1d": (nn.Embedding(7, 4), lambda: torch.randint(0, 7, (M,)), 4),
        "embedding_padding_idx": (nn.Embedding(5, 4, padding_idx=1), lambda: torch.randint(0, 5, (M, 8)), 32),
        "layernorm": (nn.LayerNorm(6), lambda: f(M, 4, 6), 24),
        "layernorm_2d_shape": (nn.LayerNorm((3, 4)), lambda: f(M, 2, 3, 4), 24),
        "groupnorm": (nn.GroupNorm(2, 4), lambda: f(M, 4, 3, 3), 36),
        "groupnorm_1d": (nn.GroupNorm(2, 4), lambda: f(M, 4, 5), 20),
        "rmsnorm": (nn.RMSNorm(6), lambda: f(M, 3, 6), 18),
        "batchnorm2d_eval": (nn.BatchNorm2d(3).eval(), lambda: f(M, 3, 4, 4), 48),
        "batchnorm1d_eval": (nn.BatchNorm1d(5).eval(), lambda: f(M, 5), 5),
    }


LAYER_CASES = sorted(_layer_cases())


def _layer_model(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    seeded(LAYER_CASES.index(name))
    layer, make_x, features = _layer_cases()[name]
    model = Head(layer, features).double()
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        layer.running_mean.uniform_(-0.5, 0.5)
        layer.running_var.uniform_(0.5, 2.0)
    for p in layer.parameters():  # non-trivial affine parameters
        with torch.no_grad():
            p.add_(0.3 * torch.randn_like(p))
    x = make_x()
    x = x.double() if x.is_floating_point() else x
    y = torch.randint(0, 3, (M,))
    return model, x, y


@pytest.mark.parametrize("name", LAYER_CASES)
@pytest.mark.parametrize("method", METHODS)
def test_each_layer_type_matches_brute_force(name, method, oracle, check):
    model, x, y = _layer_model(name)
    assert resolve_method(model, "auto") == "fast"
    check(per_example_stats(model, ce, x, y, method=method), oracle(model, ce, x, y))


@pytest.mark.parametrize("name", [n for n in LAYER_CASES if n.startswith("conv")])
@pytest.mark.parametrize("gram", [True, False])
def test_conv_both_formulas(name, gram, monkeypatch, oracle, check):
    """Gram form (unfold) and per-example weight gradients (grouped convolution)."""
    monkeypatch.setattr(cabs_torch.layers, "gram_is_cheaper", lambda t, p, q: gram)
    model, x, y = _layer_model(name)
    check(per_example_stats(model, ce, x, y, method="fast"), oracle(model, ce, x, y))


def test_frozen_weight_trainable_bias(oracle, check):
    model, x, y = _layer_model("conv2d_groups")
    model.layer.weight.requires_grad_(False)
    model.head.bias.requires_grad_(False)
    stats = per_example_stats(model, ce, x, y, method="fast")
    assert len(stats.grad_sum) == 2
    check(stats, oracle(model, ce, x, y))


# ----------------------------------------------------------------------------- models


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))




def groups_dilation_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.GroupNorm(4, 8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4), nn.ReLU(),
        nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 5 * 5, 10),
    )


class SeqModel(nn.Module):
    """Embedding + LayerNorm sequence model; one Linear is applied twice."""

    def __init__(self, vocab: int = 13, d: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.norm = nn.LayerNorm(d)
        self.mix = nn.Linear(d, d)
        self.out = nn.Linear(d, 10)

    def forward(self, tokens):
        h = self.norm(self.emb(tokens))
        h = self.mix(torch.tanh(self.mix(h)))
        return self.out(h.mean(1))


MODELS = {
    "mlp": (mlp, lambda m: torch.randn(m, 64)),
    "paper_cnn": (paper_cnn, lambda m: torch.randn(m, 1, 28, 28)),
    "groups_dilation_cnn": (groups_dilation_cnn, lambda m: torch.randn(m, 3, 10, 10)),
    "seq": (SeqModel, lambda m: torch.randint(0, 13, (m, 9))),
}


def _model(name: str, m: int = 4, seed: int = 0):
    seeded(seed)
    make, make_x = MODELS[name]
    model = make().double()
    x = make_x(m)
    return model, (x.double() if x.is_floating_point() else x), torch.randint(0, 10, (m,))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_auto_fast_generic_agree_with_brute_force(name, oracle, check):
    model, x, y = _model(name, m=3 if name == "paper_cnn" else 6)
    ref = oracle(model, ce, x, y)
    assert resolve_method(model, "auto") == "fast"
    for method in ("auto", "fast", "generic"):
        check(per_example_stats(model, ce, x, y, method=method), ref)


@pytest.mark.parametrize("name", ["mlp", "groups_dilation_cnn", "seq"])
@pytest.mark.parametrize("method", METHODS)
def test_masked_equals_unmasked(name, method, check):
    """Padding examples with weight 0 change none of the sums."""
    model, x, y = _model(name, m=7, seed=1)
    keep = torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.float64)
    real = keep.bool()
    masked = per_example_stats(model, ce, x, y, mask=keep, method=method)
    plain = per_example_stats(model, ce, x[real], y[real], method=method)
    ref = {"count": 4, "loss_sum": float(plain.loss_sum), "grad_sum": list(plain.grad_sum),
           "sq_norm_sum": float(plain.sq_norm_sum)}
    check(masked, ref, rtol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "seq"])
def test_generic_chunked_equals_unchunked(name, check):
    model, x, y = _model(name, m=7, seed=2)
    whole = per_example_stats(model, ce, x, y, method="generic", chunk_size=7)
    ref = {"count": 7, "loss_sum": float(whole.loss_sum), "grad_sum": list(whole.grad_sum),
           "sq_norm_sum": float(whole.sq_norm_sum)}
    for chunk in (1, 3):
        check(per_example_stats(model, ce, x, y, method="generic", chunk_size=chunk), ref, rtol=1e-12)


@pytest.mark.parametrize("name", ["groups_dilation_cnn", "seq", "paper_cnn"])
def test_fast_chunked_equals_unchunked(name, monkeypatch, check):
    """The fast path's per-layer work in chunks of examples gives the same sums."""
    model, x, y = _model(name, m=5, seed=3)
    whole = per_example_stats(model, ce, x, y, method="fast")
    ref = {"count": 5, "loss_sum": float(whole.loss_sum), "grad_sum": list(whole.grad_sum),
           "sq_norm_sum": float(whole.sq_norm_sum)}
    monkeypatch.setattr(cabs_torch.stats, "FAST_CHUNK_ELEMENTS", 1)  # one example per chunk
    check(per_example_stats(model, ce, x, y, method="fast"), ref, rtol=1e-12)


def test_float32_close_to_float64(oracle):
    model, x, y = _model("groups_dilation_cnn", m=8, seed=4)
    ref = oracle(model, ce, x, y)
    model32 = model.float()
    stats = per_example_stats(model32, ce, x.float(), y, method="fast")
    assert stats.sq_norm_sum.dtype == torch.float64
    assert float(stats.sq_norm_sum) == pytest.approx(ref["sq_norm_sum"], rel=1e-5)


def test_variance_matches_two_pass_definition(oracle):
    """xi from the sums equals 1/(m-1) sum_i ||g_i - g_bar||^2 from per-example gradients."""
    model, x, y = _model("seq", m=6, seed=5)
    ref = oracle(model, ce, x, y)
    stats = per_example_stats(model, ce, x, y)
    xi = within_batch_variance(stats, ddof=1)
    assert float(xi) == pytest.approx(float(two_pass_variance(ref["per_example"], ddof=1)), rel=1e-9)
    state, info = CABSController(lr=0.1).update(CABSController(lr=0.1).init(), stats)
    assert info.variance == pytest.approx(float(xi), rel=1e-12)


def test_params_grad_untouched():
    model, x, y = _model("mlp")
    per_example_stats(model, ce, x, y, method="fast")
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- refusals and method choice


@pytest.mark.parametrize("method", ["auto", "fast", "generic"])
@pytest.mark.parametrize("bn", ["train", "no_running_stats"])
def test_batchnorm_with_batch_statistics_is_refused(method, bn):
    layer = nn.BatchNorm2d(4) if bn == "train" else nn.BatchNorm2d(4, track_running_stats=False).eval()
    model = nn.Sequential(nn.Conv2d(1, 4, 3), layer, nn.Flatten(), nn.Linear(4 * 16, 3))
    x, y = torch.randn(4, 1, 6, 6), torch.randint(0, 3, (4,))
    with pytest.raises(BatchNormTrainingError, match=r"'1'.*eval mode.*GroupNorm.*micro_batch"):
        per_example_stats(model, ce, x, y, method=method)
    if bn == "train":  # switching to eval mode makes the same engine work
        engine = PerExampleStats(model, ce, method=method)
        model.eval()
        assert float(engine(x, y).count) == 4


class Scaled(nn.Module):
    """A module with its own parameter and no fast rule."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.tensor([1.5, -0.5, 2.0]))

    def forward(self, x):
        return self.lin(x) * self.scale


def test_unsupported_module_auto_uses_generic(oracle, check):
    """A module without a module rule: refused by the compiled path's static check
    (ops=False); the eager fast path sees its parameter op by op (x * scale, issue 20)."""
    seeded(6)
    model = Scaled().double()
    x, y = torch.randn(5, 5, dtype=torch.float64), torch.randint(0, 3, (5,))
    with pytest.raises(UnsupportedModelError, match=r"Scaled.*no fast rule.*generic"):
        resolve_method(model, "fast", ops=False)
    assert resolve_method(model, "auto", ops=False) == "generic"
    assert resolve_method(model, "auto") == "fast"
    for method in ("auto", "fast"):
        check(per_example_stats(model, ce, x, y, method=method), oracle(model, ce, x, y))


def test_module_level_tied_weights_exact_on_the_fast_path(oracle, check):
    """An nn.Linear whose weight is an nn.Embedding's (the LM head): exact with
    the cross terms between the lookup and the projection (until issue 12 the
    fast path refused such ties as "parameter shared")."""
    seeded(7)

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(6, 4)
            self.out = nn.Linear(4, 6, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, t):
            return self.out(self.emb(t).mean(1))

    model = Tied().double()
    x, y = torch.randint(0, 6, (5, 3)), torch.randint(0, 6, (5,))
    assert resolve_method(model, "auto") == "fast"
    ref = oracle(model, ce, x, y)
    for method in ("fast", "auto"):
        check(per_example_stats(model, ce, x, y, method=method), ref)


def test_functional_use_of_a_layer_weight_is_detected():
    class Sneaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 3)

        def forward(self, x):
            return self.b(torch.einsum("bi,oi->ob", x, self.a.weight).T + self.a.bias)

    x, y = torch.randn(3, 4), torch.randint(0, 3, (3,))
    # F.linear(x, self.a.weight) is seen op by op since issue 20; an op without a rule is replayed per
    # example where the examples lie on axis 0 (ops.VjpSite); here they are on axis 1 of its output: named
    with pytest.raises(UnsupportedModelError, match=r"a\.weight.*einsum.*axis 0"):
        per_example_stats(Sneaky(), ce, x, y, method="fast")


def test_bad_arguments_are_named():
    model, x, y = _model("mlp")
    with pytest.raises(ValueError, match="method"):
        per_example_stats(model, ce, x, y, method="quick")
    with pytest.raises(ValueError, match=r"shape \(4,\).*reduction='none'"):
        per_example_stats(model, lambda o, t: F.cross_entropy(o, t), x, y)
    with pytest.raises(ValueError, match="mask must have shape"):
        per_example_stats(model, ce, x, y, mask=torch.ones(3))
    with pytest.raises(ValueError, match="chunk_size"):
        PerExampleStats(model, ce, chunk_size=0)


def test_plan_follows_requires_grad_changes(oracle, check):
    model, x, y = _model("mlp", m=4, seed=8)
    engine = PerExampleStats(model, ce)
    assert len(engine(x, y).grad_sum) == 6
    model[1].weight.requires_grad_(False)
    stats = engine(x, y)
    assert len(stats.grad_sum) == 5
    check(stats, oracle(model, ce, x, y))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fast_path_has_no_host_sync():
    model, x, y = _model("groups_dilation_cnn", m=8)
    model, x, y = model.float().cuda(), x.float().cuda(), y.cuda()
    engine = PerExampleStats(model, ce, method="fast")
    engine(x, y)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = engine(x, y, torch.ones(8, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stats.sq_norm_sum.device.type == "cuda"


class TwiceConv(nn.Module):
    """One convolution applied twice (its per-example gradient sums both calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3 * 5 * 5, 4)

    def forward(self, x):
        return self.head(self.conv(torch.tanh(self.conv(x))).flatten(1))


@pytest.mark.parametrize("gram", [True, False])
def test_layer_called_twice(gram, monkeypatch, oracle, check):
    monkeypatch.setattr(cabs_torch.layers, "gram_is_cheaper", lambda t, p, q: gram)
    seeded(9)
    model = TwiceConv().double()
    x, y = torch.randn(5, 3, 5, 5, dtype=torch.float64), torch.randint(0, 4, (5,))
    check(per_example_stats(model, ce, x, y, method="fast"), oracle(model, ce, x, y))


def test_an_error_leaves_no_hooks_behind(oracle, check):
    """A failing loss must not leave hooks or captured tensors on the model."""
    model, x, y = _model("groups_dilation_cnn", m=3)
    engine = PerExampleStats(model, ce, method="fast")

    def broken(out, t):
        raise RuntimeError("loss failed")

    engine.loss_fn = broken
    with pytest.raises(RuntimeError, match="loss failed"):
        engine(x, y)
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    engine.loss_fn = ce
    check(engine(x, y), oracle(model, ce, x, y))


def _inplace_cases():
    relu = nn.ReLU(inplace=True)
    return {
        "linear": (nn.Sequential(nn.Linear(6, 5), relu, nn.Linear(5, 3)), lambda: torch.randn(M, 6)),
        "linear_seq": (nn.Sequential(nn.Linear(6, 5), relu, nn.Flatten(), nn.Linear(20, 3)),
                       lambda: torch.randn(M, 4, 6)),
        "linear_seq4d": (nn.Sequential(nn.Linear(3, 4), relu, nn.Flatten(), nn.Linear(40, 3)),
                         lambda: torch.randn(M, 2, 5, 3)),
        "conv2d": (nn.Sequential(nn.Conv2d(2, 3, 3), relu, nn.Flatten(), nn.Linear(27, 3)),
                   lambda: torch.randn(M, 2, 5, 5)),
        "conv1d": (nn.Sequential(nn.Conv1d(2, 3, 3), relu, nn.Flatten(), nn.Linear(15, 3)),
                   lambda: torch.randn(M, 2, 7)),
        "embedding": (nn.Sequential(nn.Embedding(7, 4), relu, nn.Flatten(), nn.Linear(24, 3)),
                      lambda: torch.randint(0, 7, (M, 6))),
        "layernorm": (nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4), relu, nn.Flatten(), nn.Linear(12, 3)),
                      lambda: torch.randn(M, 3, 6)),
        "groupnorm": (nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), relu, nn.Flatten(), nn.Linear(36, 3)),
                      lambda: torch.randn(M, 2, 5, 5)),
    }


@pytest.mark.parametrize("name", sorted(_inplace_cases()))
def test_output_modified_in_place(name, oracle, check):
    """nn.ReLU(inplace=True) after a layer: the statistics use the gradient of
    the layer's own output (for an N-d Linear, a view, hooks on the output get
    the gradient after the ReLU instead, which was wrong before)."""
    seeded(3)
    model, make_x = _inplace_cases()[name]
    model = model.double()
    x = make_x()
    x = x.double() if x.is_floating_point() else x
    y = torch.randint(0, 3, (M,))
    assert resolve_method(model, "auto") == "fast"
    check(per_example_stats(model, ce, x, y, method="fast"), oracle(model, ce, x, y))


class TwiceLinear(nn.Module):
    """One Linear applied to a (m, p) input and again to a (m, T, p) input, and
    another applied twice to (m, p) inputs, one output unused."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.twice = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.shared(x[:, 0]))  # 2-D call: the rank-one path on its own
        seq = torch.tanh(self.shared(x[:, 1:]))  # 3-D call of the same layer
        self.twice(h)  # output unused: no gradient reaches it
        h = self.twice(h + seq.mean(1))
        return self.head(h)


def test_linear_called_on_2d_and_3d_inputs(oracle, check):
    """A Linear's 2-D calls take their output gradient from autograd.grad; with a
    second call the layer's calls are combined (cross terms included)."""
    seeded(11)
    model = TwiceLinear().double()
    x, y = torch.randn(M, 3, 4, dtype=torch.float64), torch.randint(0, 3, (M,))
    check(per_example_stats(model, ce, x, y, method="fast"), oracle(model, ce, x, y))


# ----------------------------------------------------------------------------- compile=True
# PerExampleStats(..., compile=True): the fast path as one torch.compile'd function.


def norms_model() -> nn.Module:
    """A Linear without bias on sequences, RMSNorm, and a Linear head."""
    return nn.Sequential(nn.Linear(6, 5, bias=False), nn.RMSNorm(5), nn.Tanh(), nn.Flatten(), nn.Linear(20, 3))


@pytest.mark.parametrize("name", ["mlp", "seq", "norms", "inplace_relu"])
def test_compiled_matches_brute_force(name, oracle, check):
    """MLP (rank-one Linear), Embedding with padding_idx + LayerNorm + a Linear
    applied twice to sequences, RMSNorm after a bias-free sequence Linear, and
    an in-place ReLU after a sequence Linear."""
    if name == "norms":
        seeded(4)
        model, x, y = norms_model().double(), torch.randn(6, 4, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    elif name == "inplace_relu":
        seeded(5)
        model, make_x = _inplace_cases()["linear_seq"]
        model, x, y = model.double(), make_x().double(), torch.randint(0, 3, (M,))
    else:
        model, x, y = _model(name, m=6)
    stats = PerExampleStats(model, ce, method="fast", compile=True)
    check(stats(x, y), oracle(model, ce, x, y))
    assert stats.plan().compiled is not None  # the compiled function ran, not the eager path


def test_compiled_masked_and_other_batch_sizes(oracle, check):
    """Padding with weight 0 changes nothing; new batch sizes recompile and stay exact."""
    model, x, y = _model("mlp", m=7, seed=1)
    stats = PerExampleStats(model, ce, compile=True)
    keep = torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.float64)
    check(stats(x, y, keep), oracle(model, ce, x[keep.bool()], y[keep.bool()]))
    for m in (3, 11):
        model2, x2, y2 = _model("mlp", m=m, seed=m)
        model.load_state_dict(model2.state_dict())
        check(stats(x2, y2), oracle(model, ce, x2, y2))


class BranchOnWeights(nn.Module):
    """Control flow on a parameter's value: the same for every example (the probe accepts it), but
    neither torch.fx nor TorchDynamo (fullgraph) can capture it as one graph."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) if self.fc.weight.sum() > -1e9 else -self.fc(x)


def test_compiled_needs_a_model_without_data_dependent_control_flow(oracle, check):
    """Neither torch.fx nor TorchDynamo (fullgraph) captures it: fast raises, auto warns and takes the
    eager fast path."""
    torch.manual_seed(0)
    model = BranchOnWeights().double()
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    with pytest.raises(UnsupportedModelError, match="torch.compile"):
        per_example_stats(model, ce, x, y, method="fast", compile=True)
    with pytest.warns(cabs_torch.FastPathFallbackWarning, match="eager fast path"):
        stats = per_example_stats(model, ce, x, y, compile=True)
    check(stats, oracle(model, ce, x, y))


def test_trainer_compiled_equals_eager():
    """Two CABS steps with compile=True make the same decisions and parameters as eager."""
    results = []
    for compile in (False, True):
        model, x, y = _model("mlp", m=8, seed=5)
        opt = CABSTrainer(model, ce, CABSController(lr=0.1, bs_min=4, bs_max=64), compile=compile)
        sizes = [opt.step(x, y).batch_size for _ in range(2)]
        results.append((sizes, [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["auto", "generic"])
def test_numpy_batches_are_accepted(method, oracle, check):
    """Issue 14, item 5: users feed NumPy batches; they become tensors on the model's device."""
    import numpy as np

    torch.manual_seed(0)
    model = mlp().double()
    x = np.random.default_rng(1).normal(size=(6, 8, 8))
    y = np.arange(6) % 10
    got = per_example_stats(model, ce, x, y, mask=np.ones(6), method=method)
    check(got, oracle(model, ce, torch.as_tensor(x), torch.as_tensor(y)))


@pytest.mark.parametrize("method", ["auto", "fast", "generic"])
def test_empty_batch_is_a_skipped_step(method):
    """Issue 14, item 4: an empty batch gives count 0 on every path, and the controller skips it."""
    model = mlp().double()
    st = per_example_stats(model, ce, torch.zeros(0, 8, 8, dtype=torch.float64), torch.zeros(0, dtype=torch.long),
                           method=method)
    assert (float(st.count), float(st.loss_sum), float(st.sq_norm_sum)) == (0.0, 0.0, 0.0)
    assert [g.shape for g in st.grad_sum] == [p.shape for p in model.parameters()]
    ctl = CABSController(lr=0.1)
    state, info = ctl.update(ctl.init(), st)
    assert info.skipped and info.reason == "count" and state.batch_size == 16


@pytest.mark.parametrize("method", ["auto", "generic"])
def test_nan_and_inf_in_padding_rows_change_nothing(method, oracle, check):
    """Issue 14, item 3: masked (weight 0) rows are selected away, not multiplied by 0 (0 * inf = nan)."""
    torch.manual_seed(0)
    model = mlp().double()
    x = torch.randn(7, 8, 8, dtype=torch.float64)
    y = torch.arange(7) % 10
    w = torch.tensor([1, 0, 1, 1, 0, 1, 1], dtype=torch.float64)
    x[1, 0, 0], x[4, 3, 2] = float("nan"), float("inf")
    got = per_example_stats(model, ce, x, y, mask=w, method=method)
    keep = w.bool()
    check(got, oracle(model, ce, x[keep], y[keep]))
