"""Issue 20: small random-init Hugging Face models (GPT-2 with its tied head and Conv1D layers, BERT and
DistilBERT with positions looked up from a (1, T) buffer) take cabs_torch's fast path, and its S equals
the float64 loop over single examples. Runs in the optional ``hf`` nox session (``transformers``
installed; not part of ``python3 dev.py test``). The models and the loop are those of
``benchmarks/check_hf_models.py``, which also times them."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from cabs_torch import FastPathFallbackWarning, PerExampleStats  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "check_hf_models", Path(__file__).resolve().parents[2] / "benchmarks" / "check_hf_models.py")
hf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hf)

torch.set_num_threads(1)
VOCAB, D, T, M = 64, 32, 7, 6


@pytest.mark.parametrize("name", ["GPT2LMHeadModel", "BertForSequenceClassification",
                                  "DistilBertForSequenceClassification"])
def test_fast_path_is_taken_and_exact(name):
    torch.manual_seed(0)
    model, kind = hf.models(VOCAB, D, 16)[name]
    net = hf.Wrapped(model).double().eval()
    loss = hf.token_loss if kind == "token" else hf.sequence_loss
    ids = torch.randint(0, VOCAB, (M, T))
    mask = torch.ones(M, T, dtype=torch.long)
    mask[1, T - 2:] = 0  # padding tokens in two examples
    mask[3, T - 3:] = 0
    y = torch.roll(ids, -1, 1) if kind == "token" else torch.randint(0, 3, (M,))
    engine = PerExampleStats(net, loss, method="fast")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathFallbackWarning)
        first = engine((ids, mask), y)   # the probe's call
        second = engine((ids, mask), y)  # a verified call
    ref = hf.loop_s(net, loss, ids, mask, y)
    assert engine.resolved_method == "fast" and all(v.ok for v in engine.plan().verdicts.values())
    for stats in (first, second):
        assert float(stats.sq_norm_sum) == pytest.approx(ref, rel=1e-10)
