"""Cost of CABS's per-example statistics on transformers in PyTorch (issue 20), relative to a plain step.

Models (random init, random data, float32):

- ``gpt``: a nanoGPT-style language model: 4 layers, d_model 256, 4 heads,
  vocabulary 8192, learned positions (``nn.Embedding`` of ``arange(T)``), causal
  ``F.scaled_dot_product_attention``, GELU MLP 4x, pre-LayerNorm, output head
  tied to the token embedding; loss: per-example mean token cross-entropy over
  ``--seq`` tokens.
- ``vit``: a ViT-tiny: patch embedding ``Conv2d(3, 192, 4, stride=4)`` on
  32x32 images (64 patches), root ``cls_token`` and ``pos_embed`` parameters,
  12 layers d 192, 3 heads, MLP 4x, pre-LayerNorm, 10 classes from the cls token
  (``--seq`` does not apply).

Methods, side by side in one process per model (each step includes an SGD update):

- ``plain``: forward + backward of the mean loss + SGD update
- ``plain_compiled``: the same step with forward and backward compiled by ``torch.compile``
  (``torch.func.grad`` of the mean loss, inductor): what compilation alone gives the plain step,
  the reference for the compiled statistics (not in the default methods: one more compilation)
- ``fast``: ``PerExampleStats(method="fast")``; where it refuses the model or the
  input signature (``UnsupportedModelError``), ``method="auto"`` would take the
  generic path: the row says why and shows the generic row's time
- ``compiled``: ``PerExampleStats(method="fast", compile=True)``, likewise
- ``generic``: ``PerExampleStats(method="generic")``
- ``opacus_ghost``: Opacus ghost-clipping per-sample norms, when ``opacus`` imports

The column "path taken" says what actually ran: ``fast``, ``compiled
(<backend>)`` (the fx-traced path of module layers), ``compiled graph (<backend>)`` (the
graph-captured path of transformers, ``cabs_torch.compiled_graph``), ``fast (compile
refused: ...)``, or ``generic`` with the layer and the reason the fast path refused (the
``UnsupportedModelError``'s ``layer`` and ``reason``). Times are the minimum over
``--reps`` steps after one warm-up step (which compiles and probes); methods
take turns within each repetition. Not a test: nothing here asserts a timing.

    python benchmarks/bench_torch_transformers.py                      # gpt, vit at batch 16, 64
    python benchmarks/bench_torch_transformers.py --batches 16 --reps 3 --seq 64
    python benchmarks/bench_torch_transformers.py --device cuda --models gpt
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

METHODS = ["plain", "plain_compiled", "fast", "compiled", "generic", "opacus_ghost"]
MODELS = ["gpt", "vit"]


class Block(nn.Module):
    """Pre-LayerNorm transformer block: attention (fused qkv projection, SDPA) and a GELU MLP."""

    def __init__(self, d: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        m, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.reshape(m, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.proj(att.transpose(1, 2).reshape(m, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int = 8192, seq: int = 128, d: int = 256, heads: int = 4, layers: int = 4) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.Sequential(*(Block(d, heads, causal=True) for _ in range(layers)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.head(self.ln(self.blocks(self.tok(ids) + self.pos(pos))))


class ViT(nn.Module):
    def __init__(self, image: int = 32, patch: int = 4, d: int = 192, heads: int = 3, layers: int = 12,
                 classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2 + 1, d))
        self.blocks = nn.Sequential(*(Block(d, heads, causal=False) for _ in range(layers)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + self.pos_embed
        return self.head(self.ln(self.blocks(h))[:, 0])


def token_loss(out: Tensor, y: Tensor) -> Tensor:
    """Per-example mean token cross-entropy, shape (m,)."""
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)


def class_loss(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y, reduction="none")


def build(name: str, m: int, seq: int, device: str) -> tuple[nn.Module, Callable, Tensor, Tensor]:
    torch.manual_seed(0)
    if name == "gpt":
        model = GPT(seq=seq)
        x = torch.randint(0, 8192, (m, seq))
        y = torch.randint(0, 8192, (m, seq))
        loss = token_loss
    else:
        model = ViT()
        x, y = torch.randn(m, 3, 32, 32), torch.randint(0, 10, (m,))
        loss = class_loss
    return model.to(device), loss, x.to(device), y.to(device)


def sgd(params: list[Tensor], grads: Any, scale: float) -> None:
    with torch.no_grad():
        torch._foreach_add_(params, list(grads), alpha=-scale)


def make_step(method: str, model: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor,
              lr: float = 1e-4) -> tuple[Callable[[], Any], str]:
    """A closure doing one training step with ``method`` and the path it takes
    (resolved during one warm-up step)."""
    m = x.shape[0]
    if method == "plain":
        params = [p for p in model.parameters() if p.requires_grad]

        def plain() -> None:
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), y).mean().backward()
            sgd(params, [p.grad for p in params], lr)
        plain()
        return plain, "plain"
    if method == "plain_compiled":
        from torch.func import functional_call, grad

        train = {n: p for n, p in model.named_parameters() if p.requires_grad}
        compiled_grad = torch.compile(grad(lambda ps: loss_fn(functional_call(model, ps, (x,)), y).mean()))

        def plain_compiled() -> None:
            g = compiled_grad({n: p.detach() for n, p in train.items()})
            sgd(list(train.values()), [g[n] for n in train], lr)
        plain_compiled()
        return plain_compiled, "plain, compiled (inductor)"
    if method == "opacus_ghost":
        return opacus_step(model, loss_fn, x, y, lr)
    from cabs_torch import FastPathFallbackWarning, PerExampleStats, UnsupportedModelError

    how = "generic" if method == "generic" else "fast"
    stats = PerExampleStats(model, loss_fn, method=how, compile=method == "compiled")  # type: ignore[arg-type]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", FastPathFallbackWarning)
            stats(x, y)  # warm-up: probes, compiles
    except UnsupportedModelError as err:  # method="auto" would take the generic path: timed in its row
        layer, reason = getattr(err, "layer", None), getattr(err, "reason", None)
        where = f"{layer}: {reason}" if layer and reason else str(err).split("for this model: ", 1)[-1]
        return None, f"generic (fast refused: {_short(where)})"
    fell_back = [w for w in caught if issubclass(w.category, FastPathFallbackWarning)]
    plan = stats.plan()
    if fell_back and "eager fast path" in str(fell_back[0].message):  # compile=True refused: eager fast
        path = f"fast (compile refused: {_short(fell_back[0].message)})"
    elif fell_back or plan.how == "generic":
        path = "generic" + (f" (fallback: {_short(fell_back[0].message)})" if fell_back else "")
    else:
        graphs = [g for g in plan.graphs.values() if g is not False]  # the graph-captured compiled path
        if graphs:
            path = f"compiled graph ({graphs[0].backend})"
        elif plan.compiled is not None and not plan.graphs:
            path = f"compiled ({plan.compiled.backend})"
        else:
            path = "fast"

    def step() -> None:
        s = stats(x, y)
        sgd(stats.params, s.grad_sum, lr / m)
    return step, path


def _short(msg: Any, limit: int = 110) -> str:
    text = " ".join(str(msg).split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def opacus_step(model: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor,
                lr: float) -> tuple[Callable[[], Any] | None, str]:
    """Opacus ghost clipping's per-sample norms and clipped step, or None with the reason."""
    try:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
    except ImportError as err:
        return None, f"skipped: opacus not importable ({err}); it is in the `bench` extra (noxfile.py)"
    try:
        gs = GradSampleModuleFastGradientClipping(model, max_grad_norm=1e9, use_ghost_clipping=True)
        opt = DPOptimizerFastGradientClipping(torch.optim.SGD(gs.parameters(), lr=lr), noise_multiplier=0.0,
                                              max_grad_norm=1e9, expected_batch_size=x.shape[0])
        criterion = DPLossFastGradientClipping(gs, opt, lambda out, t: loss_fn(out, t), loss_reduction="mean")

        def step() -> None:
            opt.zero_grad()
            criterion(gs(x), y).backward()
            opt.step()
        step()
    except Exception as err:  # opacus refuses modules it has no ghost rule for
        return None, f"skipped: opacus failed ({_short(err)})"
    return step, "opacus ghost clipping"


def run(name: str, m: int, args: argparse.Namespace) -> list[tuple[str, str, float | None]]:
    steps: dict[str, tuple[Callable[[], Any] | None, str]] = {}
    for method in args.methods:
        model, loss_fn, x, y = build(name, m, args.seq, args.device)  # a fresh model per method
        t0 = time.perf_counter()
        steps[method] = make_step(method, model, loss_fn, x, y)
        print(f"  {name} b{m} {method}: warm-up {time.perf_counter() - t0:.1f} s, path: {steps[method][1]}",
              flush=True)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.reps):
        for method, (step, _) in steps.items():
            if step is None:
                continue
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[method].append(time.perf_counter() - t0)
    best = {method: min(t) if t else None for method, t in times.items()}
    rows = []
    for method, (_, path) in steps.items():
        if best[method] is None and path.startswith("generic (fast refused") and best.get("generic"):
            best[method], path = best["generic"], path + ", time of the generic row"
        rows.append((method, path, best[method]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--reps", type=int, default=5, help="timed steps per method (minimum reported)")
    ap.add_argument("--models", default="gpt,vit", help=f"comma-separated, of {MODELS}")
    ap.add_argument("--batches", default="16,64", help="comma-separated batch sizes")
    ap.add_argument("--seq", type=int, default=128, help="GPT sequence length")
    ap.add_argument("--methods", default=",".join(m for m in METHODS if m != "plain_compiled"),
                    help=f"comma-separated, of {METHODS}")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    if "plain" not in args.methods:
        args.methods.insert(0, "plain")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*(TF32|Opacus|Secure RNG|batching rule).*")
    rows = []
    for name in args.models.split(","):
        for m in (int(b) for b in args.batches.split(",")):
            results = run(name, m, args)
            plain = next(t for method, _, t in results if method == "plain")
            for method, path, t in results:
                ratio = f"{t / plain:.2f}x" if t is not None and plain else "n/a"
                ms = f"{1e3 * t:.0f}" if t is not None else "n/a"
                rows.append(f"| {name} | {m} | {method} | {path} | {ms} | {ratio} |")
    print(f"\ntorch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"GPT seq {args.seq}, reps {args.reps} (minimum)\n")
    print("| model | batch | method | path taken | ms / step | vs plain |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
