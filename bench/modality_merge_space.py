"""Factor-space vs product-space merge time for one Vicuna-7B layer of three modality LoRAs (r 128, alpha 256).

    PYTHONPATH=src nice -n 10 python bench/modality_merge_space.py --methods task_arithmetic ties
    PYTHONPATH=src python bench/modality_merge_space.py --methods tsv optmerge --spaces factor --device cuda

Writes three ModelCompose-layout folders holding one decoder layer's LoRA (q/k/v/o 4096 -> 4096, gate/up
4096 -> 11008, down 11008 -> 4096; random bf16 factors) and a tiny projector each, then times
`modality.merge.merge_omni` per merge space (the method's per-tensor time from the merge report; reading the
files is not counted). Results: bench/results/modality_merge_space.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mmbench_merge.modality import fixtures as fx
from mmbench_merge.modality.merge import merge_omni

H, INTER, R, ALPHA = 4096, 11008, 128, 256
MODULES = [("self_attn", p, H, H) for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
    ("mlp", "gate_proj", H, INTER), ("mlp", "up_proj", H, INTER), ("mlp", "down_proj", INTER, H)]  # fmt: skip


def write_layer(root: Path) -> dict:
    experts = {}
    for i, modality in enumerate(("vision", "audio", "video")):
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for block, name, n_in, n_out in MODULES:
            p = f"model.layers.0.{block}.{name}"
            tensors[f"{p}.lora_A.default.weight"] = (torch.randn(R, n_in, generator=g) * 0.01).bfloat16()
            tensors[f"{p}.lora_B.default.weight"] = (torch.randn(n_out, R, generator=g) * 0.001).bfloat16()
        tensors[f"model.modal_projectors.{modality}.0.weight"] = torch.zeros(8, 8, dtype=torch.bfloat16)
        folder = root / f"multimodal-bench-{modality}-naivemc"
        folder.mkdir(parents=True)
        from safetensors.torch import save_file

        save_file(tensors, str(folder / "adapter_model.safetensors"))
        cfg = fx.modality_config(modality, "encoder")
        cfg.update(lora_r=R, lora_alpha=ALPHA)
        (folder / "config.json").write_text(json.dumps(cfg))
        experts[modality] = str(folder)
    return experts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"])
    ap.add_argument("--spaces", nargs="+", default=["factor", "product_dense", "product_svd"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "modality_merge_space.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-omni-") as tmp:
        experts = write_layer(Path(tmp))
        for method in args.methods:
            for space in args.spaces:
                cfg = OmegaConf.create({"name": "bench", "family": "omni", "finetune": "modality", "base": "none",
                                        "experts": experts, "encoders": {}, "merge_space": space, "revision": None})  # fmt: skip
                mcfg = {"name": method, "scaling": 1.0}
                if method == "optmerge":
                    mcfg["scaling"] = None
                started = time.perf_counter()
                merge = merge_omni(cfg, mcfg, device=args.device)
                wall = time.perf_counter() - started
                totals = merge.report["totals"]
                results.append({"method": method, "space": space, "merge_s": totals["merge_seconds"],
                                "wall_s": round(wall, 2), "tensors": totals["merged"],
                                "peak_rss_mb": totals["peak_rss_mb"]})  # fmt: skip
                print(results[-1], flush=True)
                del merge
    meta = {"machine": platform.processor() or platform.machine(), "device": args.device,
            "torch_threads": torch.get_num_threads(), "layer": "Vicuna-7B, 7 LoRA modules, r 128, 3 experts"}  # fmt: skip
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print("\n| method | space | merge s / layer | x 32 layers | peak RSS MB |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['space']} | {r['merge_s']:.2f} | {32 * r['merge_s']:.0f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
