"""Issue 20: small random-init Hugging Face models on cabs_torch's fast path,
against the float64 loop over single examples (needs ``transformers``: the optional
nox session ``hf`` installs it and asserts the same check, ``tests/hf``; this script
also times the models, e.g. ``.nox/hf/bin/python benchmarks/check_hf_models.py``).

For each model: which path was taken (fast, or a FastPathFallbackWarning with
its reason), S from cabs_torch and from the loop, their relative difference,
and a fast step's time against a plain step (float32, batch 16)."""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
from cabs_torch import FastPathFallbackWarning, PerExampleStats
from torch import nn


class Wrapped(nn.Module):
    """model(input_ids=..., attention_mask=...).logits, with positional arguments."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=attention_mask).logits


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").sum(1)


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets, reduction="none")


def models(vocab: int, d: int, t_max: int) -> dict[str, tuple[nn.Module, str]]:
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
    )
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=t_max, n_embd=d, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    bert = BertForSequenceClassification(BertConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=2 * d,
                                                    max_position_embeddings=t_max, num_labels=3,
                                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    distil = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=vocab, dim=d, n_layers=2, n_heads=2,
                                                                  hidden_dim=2 * d, max_position_embeddings=t_max,
                                                                  num_labels=3, dropout=0.0, attention_dropout=0.0,
                                                                  seq_classif_dropout=0.0))
    return {"GPT2LMHeadModel": (gpt2, "token"), "BertForSequenceClassification": (bert, "sequence"),
            "DistilBertForSequenceClassification": (distil, "sequence")}


def loop_s(model: nn.Module, loss, ids, mask, y) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    s = 0.0
    for i in range(ids.shape[0]):
        loss_i = loss(model(ids[i : i + 1], mask[i : i + 1]), y[i : i + 1])[0]
        for g in torch.autograd.grad(loss_i, params, allow_unused=True):
            if g is not None:
                s += float(g.double().pow(2).sum())
    return s


def median_time(f, n: int = 5) -> float:
    f()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[n // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--t", type=int, default=7)
    ap.add_argument("--batch", type=int, default=6)
    ap.add_argument("--time-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for name, (model, kind) in models(args.vocab, args.d, max(16, args.t)).items():
        torch.manual_seed(0)
        net = Wrapped(model).double().eval()  # eval: dropout off (its rates are 0 anyway)
        loss = token_loss if kind == "token" else sequence_loss
        m, t = args.batch, args.t
        ids = torch.randint(0, args.vocab, (m, t))
        mask = torch.ones(m, t, dtype=torch.long)
        mask[1, t - 2 :] = 0  # padding tokens in two examples
        mask[3, t - 3 :] = 0
        y = torch.roll(ids, -1, 1) if kind == "token" else torch.randint(0, 3, (m,))
        engine = PerExampleStats(net, loss, method="auto")
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            s = float(engine((ids, mask), y).sq_norm_sum)
        fell = [str(w.message) for w in seen if issubclass(w.category, FastPathFallbackWarning)]
        ref = loop_s(net, loss, ids, mask, y)
        path = "fast" if engine.resolved_method == "fast" and not fell else "generic"
        print(f"{name}: path {path}; S {s:.12g}, loop {ref:.12g}, relative difference {abs(s - ref) / ref:.2e}")
        for msg in fell:
            print(f"  fallback: {msg[:400]}")
        # timing, float32
        net = net.float().train()
        b = args.time_batch
        ids = torch.randint(0, args.vocab, (b, t))
        mask = torch.ones(b, t, dtype=torch.long)
        y = torch.roll(ids, -1, 1) if kind == "token" else torch.randint(0, 3, (b,))
        tp, tf, how = time_steps(net, loss, (ids, mask), y)
        print(f"  float32 batch {b}, sequence {t}: plain step {tp * 1e3:.1f} ms, cabs_torch {tf * 1e3:.1f} ms "
              f"({tf / tp:.2f}x, {how})")


def time_steps(net: nn.Module, loss, inputs: tuple[torch.Tensor, ...], y: torch.Tensor) -> tuple[float, float, str]:
    """(plain step, cabs_torch step, its method), median seconds."""
    params = [p for p in net.parameters() if p.requires_grad]
    fast = PerExampleStats(net, loss, method="auto", verify_every=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FastPathFallbackWarning)
        fast(inputs, y)
        tf = median_time(lambda: fast(inputs, y))
    tp = median_time(lambda: torch.autograd.grad(loss(net(*inputs), y).sum(), params))
    verified = fast.resolved_method == "fast" and all(v.ok for v in fast.plan().verdicts.values())
    return tp, tf, "fast" if verified else "generic"

if __name__ == "__main__":
    main()
