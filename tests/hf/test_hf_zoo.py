"""Held-out Hugging Face architectures (small random-init configurations, no weights downloaded) through
``PerExampleStats(method="auto")``: whichever path each takes, S equals the float64 loop over single
examples, on the probing call and on a verified call; the path taken is the one recorded here for the
pinned ``transformers`` (``constraints.txt``), so a change of reach in either direction shows up. A model
the fast path cannot account for must step aside loudly (a ``FastPathFallbackWarning``), never return a
plausible wrong S. Runs in the ``hf`` nox session."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

tr = pytest.importorskip("transformers")
from cabs_torch import FastPathFallbackWarning, PerExampleStats  # noqa: E402

torch.set_num_threads(1)
V, D, T, M = 61, 32, 6, 5
BLOCKS = dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=D, intermediate_size=2 * D)
TEXT = dict(BLOCKS, max_position_embeddings=32, vocab_size=V)
IMAGE = dict(BLOCKS, image_size=8, patch_size=4, num_channels=3, num_labels=3)


def _lm(config: Callable[..., object], **kw: object) -> Callable[[], nn.Module]:
    return lambda: tr.AutoModelForCausalLM.from_config(config(**kw))


def _cls(config: Callable[..., object], **kw: object) -> Callable[[], nn.Module]:
    return lambda: tr.AutoModelForSequenceClassification.from_config(config(num_labels=3, **kw))


# name: (kind, builder, the path auto takes with transformers 5.24.0); a comment says why where it matters
ZOO: dict[str, tuple[str, Callable[[], nn.Module], str]] = {
    "llama": ("lm", _lm(tr.LlamaConfig, num_key_value_heads=1, **TEXT), "fast"),
    "mistral": ("lm", _lm(tr.MistralConfig, num_key_value_heads=1, **TEXT), "fast"),
    "qwen2": ("lm", _lm(tr.Qwen2Config, num_key_value_heads=2, **TEXT), "fast"),
    # RMSNorm scales by (1 + weight): a weight computed from a parameter, caught by the accounting check
    "gemma": ("lm", _lm(tr.GemmaConfig, num_key_value_heads=1, head_dim=16, **TEXT), "generic"),
    "phi": ("lm", _lm(tr.PhiConfig, **TEXT), "fast"),
    # its blocks' LayerNorm and Linear modules see (m * T, d): the examples folded into the rows
    "opt": ("lm", _lm(tr.OPTConfig, vocab_size=V, num_hidden_layers=2, num_attention_heads=2, hidden_size=D,
                      ffn_dim=2 * D, max_position_embeddings=32, word_embed_proj_dim=D), "fast"),
    "gpt_neo": ("lm", _lm(tr.GPTNeoConfig, vocab_size=V, num_layers=2, num_heads=2, hidden_size=D,
                          max_position_embeddings=32, attention_types=[[["global", "local"], 1]], window_size=4),
                "fast"),
    "bloom": ("lm", _lm(tr.BloomConfig, vocab_size=V, n_layer=2, n_head=2, hidden_size=D), "fast"),
    # its linear layers compute x @ W.T
    "falcon": ("lm", _lm(tr.FalconConfig, vocab_size=V, num_hidden_layers=2, num_attention_heads=2, hidden_size=D),
               "fast"),
    "gpt_bigcode": ("lm", _lm(tr.GPTBigCodeConfig, vocab_size=V, n_layer=2, n_head=2, n_embd=D, n_positions=32),
                    "fast"),
    "gptj": ("lm", _lm(tr.GPTJConfig, vocab_size=V, n_layer=2, n_head=2, n_embd=D, n_positions=32, rotary_dim=8),
             "fast"),
    "roberta": ("cls", _cls(tr.RobertaConfig, **TEXT), "fast"),
    "albert": ("cls", _cls(tr.AlbertConfig, embedding_size=16, **TEXT), "fast"),  # one layer's weights shared
    "electra": ("cls", _cls(tr.ElectraConfig, embedding_size=16, **TEXT), "fast"),
    "deberta_v2": ("cls", _cls(tr.DebertaV2Config, **TEXT), "fast"),
    "xlm_roberta": ("cls", _cls(tr.XLMRobertaConfig, **TEXT), "fast"),
    "convbert": ("cls", _cls(tr.ConvBertConfig, embedding_size=D, **TEXT), "fast"),
    # a relative-position bias expanded over the examples, made contiguous, added to the scores
    "mpnet": ("cls", _cls(tr.MPNetConfig, **TEXT), "fast"),
    # its relative-position bias meets the examples in torch.where: an operation VJP use (replayed per example)
    "t5": ("cls", _cls(tr.T5Config, vocab_size=V, d_model=D, d_kv=8, d_ff=2 * D, num_layers=1, num_decoder_layers=1,
                       num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=2), "fast"),
    # positions: arange(T).expand(m, -1) + offset
    "bart": ("cls", _cls(tr.BartConfig, vocab_size=V, d_model=D, encoder_layers=1, decoder_layers=1,
                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=2 * D,
                         decoder_ffn_dim=2 * D, max_position_embeddings=32, eos_token_id=2, pad_token_id=1,
                         bos_token_id=0), "fast"),
    # relative-position einsum with a parameter: an operation VJP use
    "funnel": ("cls", _cls(tr.FunnelConfig, vocab_size=V, block_sizes=[1, 1], d_model=D, n_head=2, d_head=8,
                           d_inner=2 * D), "fast"),
    "vit": ("img8", lambda: tr.ViTForImageClassification(tr.ViTConfig(**IMAGE)), "fast"),
    "deit": ("img8", lambda: tr.DeiTForImageClassification(tr.DeiTConfig(**IMAGE)), "fast"),
    "convnext": ("img16", lambda: tr.ConvNextForImageClassification(tr.ConvNextConfig(
        num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3, image_size=16)), "fast"),
    # its relative-position bias table meets the examples in scaled_dot_product_attention (attn_mask), the
    # examples folded with the windows into (m * windows, heads, N, d): an operation VJP use
    "swin": ("img16", lambda: tr.SwinForImageClassification(tr.SwinConfig(
        image_size=16, patch_size=2, num_channels=3, embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=4,
        num_labels=3)), "fast"),
    "resnet_eval_bn": ("img16", lambda: tr.ResNetForImageClassification(tr.ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)), "fast"),
    "mobilevit": ("img16", lambda: tr.MobileViTForImageClassification(tr.MobileViTConfig(
        num_channels=3, image_size=16, patch_size=2, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8] * 6 + [16],
        num_labels=3)), "fast"),  # patches fold the examples into the rows of its transformer layers
}


class Logits(nn.Module):
    def __init__(self, model: nn.Module, image: bool) -> None:
        super().__init__()
        self.model, self.image = model, image

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.image:
            return self.model(pixel_values=x).logits
        return self.model(input_ids=x, attention_mask=mask).logits


def _token_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").sum(1)


def _loop(net: nn.Module, loss: Callable, inputs: tuple[torch.Tensor, ...], y: torch.Tensor) -> float:
    params = [p for p in net.parameters() if p.requires_grad]
    s = 0.0
    for i in range(y.shape[0]):
        loss_i = loss(net(*(t[i : i + 1] for t in inputs)), y[i : i + 1])[0]
        s += sum(float(g.double().pow(2).sum()) for g in torch.autograd.grad(loss_i, params, allow_unused=True)
                 if g is not None)
    return s


@pytest.mark.parametrize("name", sorted(ZOO))
def test_auto_is_exact_on_held_out_architectures(name):
    kind, build, expected = ZOO[name]
    torch.manual_seed(0)
    net = Logits(build(), kind.startswith("img")).double().eval()
    torch.manual_seed(1)
    if kind.startswith("img"):
        side = int(kind[3:])
        inputs, y, loss = (torch.randn(M, 3, side, side, dtype=torch.float64),), torch.randint(0, 3, (M,)), \
            lambda lo, t: F.cross_entropy(lo, t, reduction="none")
    else:
        ids = torch.randint(3, V, (M, T))
        ids[:, -1] = 2  # an end-of-sequence token (BART and T5 classify from it)
        mask = torch.ones(M, T, dtype=torch.long)
        mask[1, T - 2:] = 0  # padding in two examples
        mask[3, T - 3:] = 0
        inputs = (ids, mask)
        y = torch.roll(ids, -1, 1) if kind == "lm" else torch.randint(0, 3, (M,))
        loss = _token_loss if kind == "lm" else (lambda lo, t: F.cross_entropy(lo, t, reduction="none"))
    engine = PerExampleStats(net, loss, method="auto")
    x = inputs if len(inputs) > 1 else inputs[0]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        first, second = engine(x, y), engine(x, y)
    fell = [w for w in seen if issubclass(w.category, FastPathFallbackWarning)]
    ref = _loop(net, loss, inputs, y)
    for stats in (first, second):
        assert float(stats.sq_norm_sum) == pytest.approx(ref, rel=1e-10)
    taken = "fast" if engine.resolved_method == "fast" and not fell else "generic"
    assert taken == expected, [str(w.message)[:300] for w in fell]
    if taken == "generic":
        assert len(fell) == 1  # loudly, once per signature
