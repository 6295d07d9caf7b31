"""How cheap can exact S = sum_i ||g_i||^2 be on the MLP in eager PyTorch?

A companion of ``bench_torch_stats.py``: the MLP 784-512-512-10 written out
with ``F.linear`` (no library code), and the least a step must do
for the rank-one formula ||g_i||^2 = (||a_i||^2 + 1) ||b_i||^2 of each Linear
layer (input a, output gradient b). Methods, timed in one process in
alternating blocks of steps (minimum and 10th percentile over all steps):

- ``plain``: ``F.cross_entropy(model(x), y).backward()`` with the model as an
  ``nn.Sequential``, the reference (as in ``bench_torch_stats.py``).
- ``plain_F``: the same written with ``F.linear``, without the modules' call
  overhead; ``edges``, ``minimal`` and ``compiled`` are written this way too.
- ``edges``: the layers' output gradients returned by the same
  ``autograd.grad`` call as the parameters' (what the fast path captures),
  no sums: the cost of capturing alone.
- ``minimal``: ``edges`` plus the six row sums of squares, three dot
  products and one float64 sum: the least work of the exact statistic.
- ``cabs_torch``: ``cabs_torch.PerExampleStats(method="fast")`` on the same
  model as an ``nn.Sequential``: what the library adds to ``minimal``.
- ``compiled`` (``--compile``): ``minimal`` written with
  ``torch.func.grad_and_value`` and compiled by ``torch.compile``, which could
  fuse the sums into the kernels that produce a and b (needs a C++ compiler;
  compiling takes a while).

    python benchmarks/bench_torch_floor.py                # batch 128
    python benchmarks/bench_torch_floor.py --batch 512 --compile [--dynamic]

Not a test: nothing here asserts a timing. If ``minimal`` is above a target,
no eager implementation of the rank-one formula can meet it on that machine.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--blocks", type=int, default=40, help="blocks of 10 timed steps per method")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile'd step")
    ap.add_argument("--dynamic", action="store_true", help="compile with a symbolic batch size")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from torch.autograd.graph import GradientEdge

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sizes = [(784, 512), (512, 512), (512, 10)]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
    params = list(model.parameters())  # the functions below use these tensors directly
    x = torch.randn(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))

    def forward(x):
        """Logits and, per Linear layer, its input and its output."""
        a, ins, outs = x.flatten(1), [], []
        for k in range(3):
            ins.append(a)
            z = F.linear(a, params[2 * k], params[2 * k + 1])
            outs.append(z)
            a = torch.relu(z) if k < 2 else z
        return a, ins, outs

    def plain():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def plain_functional():
        for p in params:
            p.grad = None
        F.cross_entropy(forward(x)[0], y).backward()

    def edges():
        out, ins, outs = forward(x)
        losses = F.cross_entropy(out, y, reduction="none")
        grads = torch.autograd.grad(losses.sum(), [*params, *(GradientEdge(z.grad_fn, z.output_nr) for z in outs)])
        return ins, grads

    def minimal():
        ins, grads = edges()
        with torch.no_grad():
            totals = [torch.dot(torch.linalg.vecdot(a, a).add_(1), torch.linalg.vecdot(b, b))
                      for a, b in zip(ins, grads[len(params):])]
            return torch.stack(totals).sum(dtype=torch.float64)

    from cabs_torch import PerExampleStats

    engine = PerExampleStats(model, lambda out, t: F.cross_entropy(out, t, reduction="none"), method="fast")
    methods = {"plain": plain, "plain_F": plain_functional, "edges": edges, "minimal": minimal,
               "cabs_torch": lambda: engine(x, y)}
    if args.compile:
        from torch.func import grad_and_value

        def loss_and_norms(ps, perturbations, x, y):
            a, asq = x.flatten(1), []
            for k in range(3):
                asq.append(torch.linalg.vecdot(a, a) + 1)
                z = F.linear(a, ps[2 * k], ps[2 * k + 1]) + perturbations[k]
                a = torch.relu(z) if k < 2 else z
            losses = F.cross_entropy(a, y, reduction="none")
            return losses.sum(), asq

        def step(ps, x, y):
            zeros = [x.new_zeros(x.shape[0], q) for _, q in sizes]
            (gp, gb), (_, asq) = grad_and_value(loss_and_norms, argnums=(0, 1), has_aux=True)(ps, zeros, x, y)
            return gp, sum(torch.dot(f, torch.linalg.vecdot(g, g)) for f, g in zip(asq, gb))

        detached = [p.detach() for p in params]
        compiled = torch.compile(step, dynamic=args.dynamic)
        t = time.perf_counter()
        ref = minimal()
        got = compiled(detached, x, y)[1]
        print(f"compiled in {time.perf_counter() - t:.1f} s; S relative difference "
              f"{abs(float(got) / float(ref) - 1):.1e}")
        methods["compiled"] = lambda: compiled(detached, x, y)

    ref = float(minimal())
    assert abs(float(engine(x, y).sq_norm_sum) / ref - 1) < 1e-5, "cabs_torch and minimal disagree"
    for f in methods.values():  # warm-up
        for _ in range(10):
            f()
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(args.blocks):
        for name, f in methods.items():
            for _ in range(2):
                f()
            for _ in range(10):
                t = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, float32, "
          f"{args.blocks} x 10 steps per method (S = {ref:.6g})")
    base = sorted(times["plain"])
    print(f"{'method':<10}{'min ms':>9}{'ratio':>8}{'p10 ms':>9}{'ratio':>8}")
    for name, ts in times.items():
        ts.sort()
        p10, b10 = ts[len(ts) // 10], base[len(base) // 10]
        print(f"{name:<10}{ts[0] * 1e3:>9.3f}{ts[0] / base[0]:>7.2f}x{p10 * 1e3:>9.3f}{p10 / b10:>7.2f}x")


if __name__ == "__main__":
    main()
