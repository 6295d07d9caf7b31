"""CABS on a least-squares problem, NumPy only: the batch size grows as the loss
falls, with a constant learning rate, and beats SGD with a fixed batch.

    python examples/least_squares.py [--epochs 4] [--lr 0.1] [--mode paper|reference]

The problem: estimate the mean of N points z_i in R^d (noise sigma). Per-example
loss l_i(theta) = ||theta - z_i||^2 / 2 - sigma^2 d / 2, so that min L is about
0, as the CABS rule assumes; gradient g_i = theta - z_i, so tr(Sigma) = sigma^2 d
stays put while L falls, and m = lr tr(Sigma) / L must grow.

Each step: draw the decided number of examples with the core's sampler, take an
SGD step with the mini-batch mean gradient, give the batch's statistics to the
controller, which decides the next batch size.
"""

from __future__ import annotations

import argparse

import numpy as np

from cabs_core import CABSController, SamplerState, batch_stats_from_per_example, next_batch


def run(z: np.ndarray, sigma: float, lr: float, epochs: float, ctl: CABSController | None, seed: int):
    """SGD from theta = 3 (all ones); the batch size from ``ctl`` (None: always bs 16).
    Returns the full-data loss and the batch sizes used."""
    n, d = z.shape
    theta = np.full(d, 3.0)
    state = ctl.init() if ctl else None
    sampler = SamplerState(n, seed=seed)
    sizes: list[int] = []
    while sampler.epoch < epochs:
        idx, sampler = next_batch(sampler, state.batch_size if state else 16)
        grads = theta - z[idx]  # per-example gradients g_i
        losses = 0.5 * np.sum(grads * grads, axis=1) - 0.5 * sigma**2 * d
        theta = theta - lr * grads.mean(axis=0)  # SGD with this batch's mean gradient
        sizes.append(len(idx))
        if ctl:
            state, info = ctl.update(state, batch_stats_from_per_example(losses, [grads]))
            if state.step % 40 == 1:
                print(
                    f"{state.step:>5} {sampler.epoch:>6.2f} {len(idx):>6} {info.loss:>9.4f} "
                    f"{info.variance:>9.2f} {info.batch_size:>6}"
                )
    loss = 0.5 * np.mean(np.sum((theta - z) ** 2, axis=1)) - 0.5 * sigma**2 * d
    return loss, sizes


def run_lengths(sizes: list[int]) -> str:
    runs: list[list[int]] = []
    for b in sizes:
        if runs and runs[-1][0] == b:
            runs[-1][1] += 1
        else:
            runs.append([b, 1])
    return " ".join(f"{b}x{k}" if k > 1 else str(b) for b, k in runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=float, default=4.0)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--mode", choices=("paper", "reference"), default="paper")
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--d", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    sigma = 1.0
    z = np.random.default_rng(args.seed).normal(scale=sigma, size=(args.n, args.d))
    ctl = CABSController(lr=args.lr, bs_min=16, bs_max=2048, mode=args.mode)
    print(
        f"mean estimation (least squares), N={args.n}, d={args.d}, lr={args.lr}, mode={args.mode}, {args.epochs} epochs"
    )
    print(f"{'step':>5} {'epoch':>6} {'batch':>6} {'loss':>9} {'variance':>9} {'next':>6}")
    cabs_loss, sizes = run(z, sigma, args.lr, args.epochs, ctl, args.seed)
    fixed_loss, fixed = run(z, sigma, args.lr, args.epochs, None, args.seed)
    print(f"\nCABS:          {len(sizes):>6} steps, final loss {cabs_loss:.5f}")
    print(f"SGD, batch 16: {len(fixed):>6} steps, final loss {fixed_loss:.5f}  (same lr, same examples seen)")
    print("CABS batch sizes (size x steps):", run_lengths(sizes))


if __name__ == "__main__":
    main()
