"""Time every merge method on one square tensor with five experts (the per-tensor cost the engine pays).

    PYTHONPATH=src python bench/methods_speed.py --threads 1        # 3584 x 3584 (Qwen2-VL-7B's hidden size), CPU
    PYTHONPATH=src python bench/methods_speed.py --device cuda --iters 300 --methods wudi optmerge

WUDI and OptMerge are timed in two parts: the setup (SVDs, the gradient's fixed pieces) and `--iters` optimizer
steps; the time for the configured 300 steps is extrapolated from those (steps cost the same each), and the
table says so. Each method runs once: on a shared machine, treat the numbers as +-20%.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from mmbench_merge.methods import PRESETS, get_method, list_methods, optimize

CONFIGURED_ITERS = 300


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class StepTimer:
    """Wraps optimize.minimise to measure the optimizer loop apart from the setup."""

    def __init__(self, device: str):
        self.device = device
        self.seconds = 0.0
        self._inner = optimize.minimise

    def __call__(self, loss, **kwargs):
        _sync(self.device)
        started = time.perf_counter()
        out = self._inner(loss, **kwargs)
        _sync(self.device)
        self.seconds += time.perf_counter() - started
        return out


def run(size: int, n_experts: int, device: str, iters: int, only: list[str] | None = None) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    shared = torch.randn(size, size, generator=gen, device=device)
    task_vectors = [1e-3 * (0.5 * shared + torch.randn(size, size, generator=gen, device=device))
                    for _ in range(n_experts)]  # fmt: skip
    del shared
    variants = [(name, {}) for name in list_methods() if name not in ("optmerge", "wudi")]
    variants += [("wudi", {"iters": iters})]
    for finetune in ("full", "lora"):
        preset = {k: v for k, v in PRESETS["optmerge"][finetune].items() if k != "scaling"}
        variants.append((f"optmerge ({finetune})", {**preset, "iters": iters}))

    if only:
        variants = [(label, kwargs) for label, kwargs in variants if label.split()[0] in only]
    rows = []
    for label, kwargs in variants:
        fn = get_method(label.split()[0])
        # Pay one-time costs (lazy imports on torch.optim's first step, kernel selection) outside the timing.
        fn([torch.randn(8, 8, device=device) for _ in range(n_experts)], **kwargs)
        timer = StepTimer(device)
        optimize.minimise = timer
        try:
            _sync(device)
            started = time.perf_counter()
            out = fn(task_vectors, generator=torch.Generator(device=device).manual_seed(0), **kwargs)
            _sync(device)
            total = time.perf_counter() - started
        finally:
            optimize.minimise = timer._inner
        assert torch.isfinite(out).all(), label
        row = {"method": label, "seconds": total}
        if "iters" in kwargs:
            per_step = timer.seconds / iters
            setup = total - timer.seconds
            row.update(setup=setup, per_step=per_step, seconds=setup + CONFIGURED_ITERS * per_step,
                       extrapolated=iters != CONFIGURED_ITERS)  # fmt: skip
        rows.append(row)
        print(_format(row), flush=True)
    if ARGS.reference and (not only or "wudi" in only):
        per_step = reference_wudi_step(task_vectors, device, iters)
        print(f"| wudi, reference autograd loop (for comparison) | {CONFIGURED_ITERS * per_step:.1f} |"
              f" 300 x {per_step * 1e3:.0f} ms, setup not counted (extrapolated from {iters} steps) |")  # fmt: skip
    return rows


def reference_wudi_step(task_vectors: list[torch.Tensor], device: str, steps: int) -> float:
    """Seconds per step of the reference-style loop (autograd through the T loss terms, then Adam), to compare."""
    tau = torch.nn.Parameter(sum(task_vectors))
    opt = torch.optim.Adam([tau], lr=1e-5)
    norms = [float(t.pow(2).sum()) for t in task_vectors]
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(((tau - t) @ t.T).pow(2).sum() / n for t, n in zip(task_vectors, norms))
        loss.backward()
        opt.step()
    _sync(device)
    return (time.perf_counter() - started) / steps


def _format(row: dict) -> str:
    text = f"| {row['method']} | {row['seconds']:.1f} |"
    if "per_step" in row:
        how = f"extrapolated from {ARGS.iters} steps" if row["extrapolated"] else "measured"
        text += f" setup {row['setup']:.1f} s + 300 x {row['per_step'] * 1e3:.0f} ms ({how}) |"
    else:
        text += " measured |"
    return text


def main() -> None:
    global ARGS
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=3584)
    parser.add_argument("--experts", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--iters", type=int, default=5, help="optimizer steps actually run for WUDI / OptMerge"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--methods", nargs="*", default=None, help="only these (e.g. tsv optmerge)")
    parser.add_argument("--reference", action="store_true", help="also time WUDI's reference autograd step")
    ARGS = parser.parse_args()
    if ARGS.threads:
        torch.set_num_threads(ARGS.threads)
    cpu = platform.processor() or platform.machine()
    print(f"{ARGS.size} x {ARGS.size} float32, {ARGS.experts} experts, device {ARGS.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}")  # fmt: skip
    print("| method | seconds per tensor | how |\n| --- | --- | --- |")
    started = time.perf_counter()
    run(ARGS.size, ARGS.experts, ARGS.device, ARGS.iters, ARGS.methods)
    print(f"total wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
