"""GPU check, part 1: every merge method on device=cuda against the CPU result, on InternVL2.5-1B's real shapes.

    PYTHONPATH=src python bench/gpu_check.py --layers 1 --out bench/results/gpu_check.json

Builds a synthetic base + 5 experts in InternVL2.5-1B's original layout (float32, so that the comparison is
not blurred by bf16 rounding of the output; names and shapes of
`--layers` LLM layers plus the projector mlp1, i.e. what the paper's selection merges: q/k/v/o 896x896 and
128x896, gate/up 4864x896, down 896x4864, mlp1.1 896x4096, mlp1.3 896x896, mlp1.0 4096), then merges it with
every method through the engine on cuda and on cpu, timing both, and compares tensor by tensor. Deterministic
methods must agree within float32 tolerance (relative Frobenius error of the merged update below 1e-3; 1e-2
for the optimisation methods, whose 300 steps accumulate rounding differences); DARE draws its masks from the device's
generator, so CPU and CUDA masks differ by design and only the norms of the merged updates are compared.
Exits 1 if any method disagrees. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, KV, MLP, VIT = 896, 128, 4864, 4096
OPTIMISATION = {"wudi", "optmerge"}
RANDOM = {"dare_ta", "dare_ties"}


def layout(layers: int) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for i in range(layers):
        p = f"language_model.model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (KV, HIDDEN),
                       p + "self_attn.v_proj.weight": (KV, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                       p + "mlp.gate_proj.weight": (MLP, HIDDEN), p + "mlp.up_proj.weight": (MLP, HIDDEN),
                       p + "mlp.down_proj.weight": (HIDDEN, MLP), p + "input_layernorm.weight": (HIDDEN,)})  # fmt: skip
    shapes.update({"mlp1.0.weight": (VIT,), "mlp1.0.bias": (VIT,), "mlp1.1.weight": (HIDDEN, VIT),
                   "mlp1.3.weight": (HIDDEN, HIDDEN)})  # fmt: skip
    return shapes


def build(root: Path, layers: int) -> dict:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    base = {n: 0.02 * torch.randn(s, generator=gen) for n, s in layout(layers).items()}
    paths = {}
    for key in ("base", "vqa", "geometry", "chart", "ocr", "grounding"):
        state = base if key == "base" else {
            n: t + 0.002 * torch.randn(t.shape, generator=gen) for n, t in base.items()}
        (root / key).mkdir()
        save_file(state, str(root / key / "model.safetensors"), metadata={"format": "pt"})
        (root / key / "config.json").write_text("{}")
        paths[key] = str(root / key)
    return paths


def model_cfg(paths: dict):
    from omegaconf import OmegaConf

    from mmbench_merge.config import ModelConfig

    repo = Path(__file__).resolve().parents[1]
    loaded = OmegaConf.load(repo / "conf" / "model" / "internvl2_5.yaml")
    loaded.pop("defaults")
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), loaded)
    cfg.base = paths["base"]
    cfg.experts = {k: v for k, v in paths.items() if k != "base"}
    return cfg


def merge(cfg, method: str, device: str):
    import torch

    from mmbench_merge.engine import merge_model

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = merge_model(cfg, {"name": method}, device=device, keep_in_memory=True)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return result.state_dict, seconds, peak, result.report.to_json()["totals"]["merged"]


def compare(method: str, base: dict, cpu: dict, gpu: dict) -> tuple[float, bool]:
    """The worst relative error of the merged update (merged - base) between devices, and whether it passes."""
    worst = 0.0
    for name, b in base.items():
        du, dg = cpu[name].float() - b.float(), gpu[name].float() - b.float()
        if not du.abs().sum():
            continue
        if method in RANDOM:
            err = abs(dg.norm().item() - du.norm().item()) / du.norm().item()
        else:
            err = ((dg - du).norm() / du.norm()).item()
        worst = max(worst, err)
    limit = 0.05 if method in RANDOM else 1e-2 if method in OPTIMISATION else 1e-3
    return worst, worst <= limit


def main() -> int:
    import torch

    from mmbench_merge.checkpoints import SafetensorsCheckpoint
    from mmbench_merge.methods import list_methods

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available() and args.device.startswith("cuda"):
        print("gpu_check: torch sees no CUDA device", file=sys.stderr)
        return 2
    methods = args.methods or list_methods()
    rows, ok = [], True
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        paths = build(Path(tmp), args.layers)
        cfg = model_cfg(paths)
        base_ckpt = SafetensorsCheckpoint(Path(paths["base"]))
        base = {n: base_ckpt.get(n) for n in base_ckpt.keys()}
        merge(cfg, "weight_average", args.device)  # warm-up: CUDA context, kernels
        for method in methods:
            gpu, gpu_s, peak, n_merged = merge(cfg, method, args.device)
            cpu, cpu_s, _, _ = merge(cfg, method, "cpu")
            err, passed = compare(method, base, cpu, gpu)
            ok &= passed
            row = {"method": method, "tensors_merged": n_merged, "gpu_s": round(gpu_s, 2), "cpu_s": round(cpu_s, 2),
                   "gpu_peak_mb": round(peak, 1) if peak else None, "rel_err": err, "pass": passed,
                   "compared": "update norms (device RNG)" if method in RANDOM else "elementwise"}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "layers": args.layers, "rows": rows}  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print("gpu_check merge:", "PASS" if ok else "FAIL", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
