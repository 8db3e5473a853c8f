"""Per-matrix cost of the optimisation methods' steps, old path against new, interleaved, one thread.

    PYTHONPATH=src python bench/optimize_speed.py --steps 10 --repeats 3

- WUDI on down_proj (896 x 4864, 5 task vectors): a gradient step with the n x n Gram (now used) against the
  per-expert factors (what the old memory guard chose).
- OptMerge's LoRA preset (SGD, momentum 0.9, lr 1e-4, 300 steps) on 4864 x 896 and 896 x 4864: the loop
  (`--steps` timed, extrapolated to 300) against solver=eigen (whole), and their relative difference.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmbench_merge.methods.optimize import QuadraticLoss, minimise, minimise_eigen


def _taus(shape, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [0.01 * torch.randn(shape, generator=g) for _ in range(n)]


def wudi_step(shape, gram: bool, steps: int) -> float:
    taus = _taus(shape)
    loss = QuadraticLoss(sum(taus), rows=len(taus) * shape[0], n_terms=len(taus))
    if not gram:
        loss.gram = None
    for tau in taus:
        loss.add(tau, tau, 1.0 / float(tau.pow(2).sum()))
    tau = loss.start.clone()
    started = time.perf_counter()
    for _ in range(steps):
        loss.gradient(tau)
    return (time.perf_counter() - started) / steps


def optmerge_lora(shape, solver: str, steps: int) -> tuple[float, torch.Tensor]:
    from mmbench_merge.methods._matrix import mean_of, rank_of, top_singular

    taus = _taus(shape)
    k = rank_of(1 / len(taus), shape)
    loss = QuadraticLoss(mean_of(taus), rows=len(taus) * k, n_terms=len(taus))
    for tau in taus:
        u, s, vh = top_singular(tau, k)
        loss.add((u * s) @ vh, s[:, None] * vh, 1.0 / float(tau.pow(2).sum()))
    started = time.perf_counter()
    if solver == "eigen":
        out = minimise_eigen(loss, lr=1e-4, momentum=0.9, iters=300)
        return time.perf_counter() - started, out
    out = minimise(loss, optimizer="sgd", lr=1e-4, momentum=0.9, iters=steps)
    seconds = (time.perf_counter() - started) * 300 / steps
    return seconds, minimise(loss, optimizer="sgd", lr=1e-4, momentum=0.9, iters=300) if steps == 300 else out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check", action="store_true", help="also run the loop's 300 steps to compare results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = {"gram": [], "factors": []}
    for _ in range(args.repeats):
        for kind in rows:
            rows[kind].append(wudi_step((896, 4864), kind == "gram", args.steps))
    ratio = statistics.median(f / g for g, f in zip(rows["gram"], rows["factors"]))
    print(f"WUDI 896x4864 step: Gram {statistics.median(rows['gram']):.3f} s, factors "
          f"{statistics.median(rows['factors']):.3f} s (median); factors / Gram {ratio:.2f}")  # fmt: skip
    for shape in [(4864, 896), (896, 4864)]:
        loops, eigens = [], []
        for _ in range(args.repeats):
            loops.append(optmerge_lora(shape, "loop", args.steps)[0])
            eigens.append(optmerge_lora(shape, "eigen", args.steps)[0])
        speedup = statistics.median(a / b for a, b in zip(loops, eigens))
        line = (f"OptMerge LoRA {shape[0]}x{shape[1]}, 300 SGD steps: loop {statistics.median(loops):.2f} s "
                f"(from {args.steps} steps), eigen {statistics.median(eigens):.3f} s; loop / eigen {speedup:.1f}")
        if args.check:
            _, loop = optmerge_lora(shape, "loop", 300)
            _, eigen = optmerge_lora(shape, "eigen", 300)
            line += f"; relative difference {float((eigen - loop).norm() / (loop - _start(shape)).norm()):.2e} of the step"
        print(line)


def _start(shape):
    from mmbench_merge.methods._matrix import mean_of

    return mean_of(_taus(shape))


if __name__ == "__main__":
    main()
