"""Held-out timm architectures (issue 20), small random-init configurations (no weights downloaded),
through ``PerExampleStats(method="auto")``: whichever path each takes, S equals the float64 loop over
single examples, on the probing call and on a verified call; the path taken is the one recorded here
for the pinned ``timm``, so a change of reach in either direction shows up. A model the fast path cannot
account for must step aside loudly (one ``FastPathFallbackWarning``), never return a plausible wrong S.

timm imports torchvision, whose PyPI wheel does not import beside the pinned CPU torch 2.13; the
``timm`` nox session (optional) therefore runs these tests on torch 2.14.1 with torchvision 0.29.1."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

timm = pytest.importorskip("timm")
from cabs_torch import FastPathFallbackWarning, PerExampleStats  # noqa: E402
from timm.models import mlp_mixer  # noqa: E402

torch.set_num_threads(1)
M, SIDE, CLASSES = 5, 16, 3
SMALL_VIT = dict(img_size=SIDE, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                 num_classes=CLASSES)


def _create(name: str, **kw: object) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, **kw)


# name: (builder, the path auto takes with the pinned timm); a comment says what the model exercises
ZOO: dict[str, tuple[Callable[[], nn.Module], str]] = {
    # cls token by expand + cat, pos_embed, LayerScale (init_values), timm's LayerNorm, fused qkv
    "vit": (_create("vit_tiny_patch16_224", init_values=1e-5, **SMALL_VIT), "fast"),
    # register tokens, positions without the class token, average pooling
    "vit_reg": (_create("vit_tiny_patch16_224", reg_tokens=2, no_embed_class=True, global_pool="avg",
                        **SMALL_VIT), "fast"),
    # a distillation token beside the class token, two heads
    "deit_distilled": (_create("deit_tiny_distilled_patch16_224", **SMALL_VIT), "fast"),
    # class attention and talking heads (Linear layers across the heads), LayerScale
    "cait": (_create("cait_xxs24_224", depth_token_only=1, init_values=1e-5, **SMALL_VIT), "fast"),
    # relative-position bias table gathered per layer, LayerScale gamma
    "beit": (_create("beit_base_patch16_224", use_rel_pos_bias=True, init_values=0.1, **SMALL_VIT), "fast"),
    # shifted windows, relative-position bias table (attn_mask of the attention)
    "swin": (_create("swin_tiny_patch4_window7_224", img_size=SIDE, patch_size=2, embed_dim=8, depths=(1, 1),
                     num_heads=(2, 2), window_size=4, num_classes=CLASSES), "fast"),
    # depthwise convolutions, LayerNorm2d, LayerScale gamma on channels-last
    "convnext": (_create("convnext_atto", depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), ls_init_value=1e-6,
                         num_classes=CLASSES), "fast"),
    # token- and channel-mixing MLPs
    "mixer": (lambda: mlp_mixer.MlpMixer(img_size=SIDE, patch_size=4, num_blocks=2, embed_dim=16,
                                         num_classes=CLASSES), "fast"),
    # Affine normalisation (alpha * x + beta) and LayerScale of ResMLP
    "resmlp": (lambda: mlp_mixer.MlpMixer(img_size=SIDE, patch_size=4, num_blocks=2, embed_dim=16, mlp_ratio=4,
                                          block_layer=mlp_mixer.ResBlock, norm_layer=mlp_mixer.Affine,
                                          num_classes=CLASSES), "fast"),
    # eval-mode BatchNorm, squeeze-excitation, depthwise convolutions
    "efficientnet": (_create("efficientnet_b0", num_classes=CLASSES), "fast"),
}


def _loop(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    params = [p for p in net.parameters() if p.requires_grad]
    s = 0.0
    for i in range(y.shape[0]):
        loss_i = F.cross_entropy(net(x[i : i + 1]), y[i : i + 1])
        s += sum(float(g.double().pow(2).sum()) for g in torch.autograd.grad(loss_i, params, allow_unused=True)
                 if g is not None)
    return s


@pytest.mark.parametrize("name", sorted(ZOO))
def test_auto_is_exact_on_timm_architectures(name):
    build, expected = ZOO[name]
    torch.manual_seed(0)
    net = build().double().eval()
    torch.manual_seed(1)
    side = 32 if name == "convnext" else SIDE  # its four stages downsample 32 times
    x, y = torch.randn(M, 3, side, side, dtype=torch.float64), torch.randint(0, CLASSES, (M,))
    engine = PerExampleStats(net, lambda out, t: F.cross_entropy(out, t, reduction="none"), method="auto")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        first, second = engine(x, y), engine(x, y)
    fell = [w for w in seen if issubclass(w.category, FastPathFallbackWarning)]
    ref = _loop(net, x, y)
    for stats in (first, second):
        assert float(stats.sq_norm_sum) == pytest.approx(ref, rel=1e-10)
    taken = "fast" if engine.resolved_method == "fast" and not fell else "generic"
    assert taken == expected, [str(w.message)[:300] for w in fell]
    if taken == "generic":
        assert len(fell) == 1  # loudly, once per signature
