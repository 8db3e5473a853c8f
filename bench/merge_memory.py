"""Peak memory of the streaming merge: does it follow the largest tensor, or the model size?

Builds synthetic bf16 checkpoints (base + 5 experts) whose tensors all have one shape, at several model sizes,
then merges each in a fresh process and reads that process's peak resident set. The engine should hold
(experts + 2) float32 copies of one tensor plus a fixed overhead, whatever the model size.

    .venv/bin/python bench/merge_memory.py                      # 0.5, 1 and 2.5 GB models, 64 MB tensors
    .venv/bin/python bench/merge_memory.py --sizes-gb 2.5 --method ties
    .venv/bin/python bench/merge_memory.py --sizes-gb 1 --method ties --param trim_scope=model   # two-pass TIES

Needs about 7 x the largest size of free disk under --workdir (default .bench/, git-ignored).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def build_checkpoint(path: Path, n_tensors: int, shape: tuple[int, int], seed: int, noise_of: Path | None = None):
    """A bf16 checkpoint of `n_tensors` tensors, written tensor by tensor (never whole in memory)."""
    import torch

    from mmbench_merge.checkpoints import SafetensorsCheckpoint, ShardedWriter

    if (path / "done").exists():
        return
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(n_tensors)]
    layout = [(name, "BF16", shape) for name in names]
    writer = ShardedWriter(path, layout, max_shard_bytes=1 << 30)
    gen = torch.Generator().manual_seed(seed)
    base = SafetensorsCheckpoint(noise_of) if noise_of else None
    for name in names:
        if base is None:
            t = torch.randn(shape, generator=gen).to(torch.bfloat16)
        else:
            t = (base.get(name).float() + 0.01 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
        writer.write(name, t)
        del t
    writer.commit()
    (path / "config.json").write_text("{}")
    (path / "done").write_text("ok")


MERGE_SNIPPET = r"""
import json, sys, time, resource
from pathlib import Path
sys.path.insert(0, {src!r})
from omegaconf import OmegaConf
from mmbench_merge.engine import merge_model
cfg = OmegaConf.create({{"name": "bench", "family": "llava", "finetune": "full", "base": {base!r},
    "experts": {experts!r}, "merge": {{"include": [], "exclude": []}}, "files_from": "base", "dtype": "bfloat16",
    "revision": None}})
t = time.perf_counter()
result = merge_model(cfg, {method!r}, device="cpu", out_dir=Path({out!r}) if {write!r} else None)
report = result.report.to_json()["totals"]
report["wall_s"] = time.perf_counter() - t
report["prepass_s"] = (result.report.prepass or {{}}).get("seconds")
report["vm_hwm_kb"] = int([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
report["ru_maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RESULT", json.dumps(report))
"""


def measure(base: Path, experts: dict[str, str], method: dict, out: Path | None) -> dict:
    code = MERGE_SNIPPET.format(src=str(ROOT / "src"), base=str(base), experts=experts, method=method,
                                out=str(out) if out else "", write=bool(out))  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def baseline_rss_kb() -> int:
    """Peak RSS of a process that imports what the merge imports and does nothing: the fixed overhead."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'src')!r}); import torch, safetensors, psutil, tqdm;"
            "import mmbench_merge.engine, mmbench_merge.methods.ties;"
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")  # fmt: skip
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[0.5, 1.0, 2.5])
    parser.add_argument("--shape", type=int, nargs=2, default=[4096, 8192], help="every tensor's shape (bf16)")
    parser.add_argument("--method", default="ties")
    parser.add_argument("--experts", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".bench" / "merge_memory")
    parser.add_argument("--write", action="store_true", help="also write the merged checkpoint to disk")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a method hyperparameter (repeatable), e.g. trim_scope=model; YAML-typed")
    args = parser.parse_args()

    shape = tuple(args.shape)
    tensor_mb = shape[0] * shape[1] * 2 / 2**20
    method = {"name": args.method, "scaling": 1.0}
    for item in args.param:
        import yaml

        key, _, value = item.partition("=")
        method[key] = yaml.safe_load(value)
    rows = []
    base_kb = baseline_rss_kb()
    for size_gb in args.sizes_gb:
        n = max(1, round(size_gb * 2**30 / (tensor_mb * 2**20)))
        root = args.workdir / f"{n}x{shape[0]}x{shape[1]}"
        t = time.perf_counter()
        build_checkpoint(root / "base", n, shape, seed=0)
        experts = {}
        for i in range(args.experts):
            build_checkpoint(root / f"expert{i}", n, shape, seed=i + 1, noise_of=root / "base")
            experts[f"e{i}"] = str(root / f"expert{i}")
        print(f"built {n} x {shape} bf16 ({n * tensor_mb / 1024:.2f} GB per checkpoint) in {time.perf_counter() - t:.0f}s",
              file=sys.stderr)  # fmt: skip
        out = root / "merged" if args.write else None
        r = measure(root / "base", experts, method, out)
        rows.append((n * tensor_mb / 1024, r))
    fp32_tensor_mb = tensor_mb * 2
    bound_mb = (args.experts + 2) * fp32_tensor_mb
    params = "".join(f", {k}={v}" for k, v in method.items() if k not in ("name", "scaling"))
    print(f"\nmethod={args.method}{params}, {args.experts} experts, tensor {shape[0]}x{shape[1]} bf16 = {tensor_mb:.0f} MB "
          f"({fp32_tensor_mb:.0f} MB in float32); fixed overhead (imports) {base_kb / 1024:.0f} MB; "
          f"(experts + 2) x float32 tensor = {bound_mb:.0f} MB\n")  # fmt: skip
    print("| model size (GB) | tensors | peak RSS (MB) | peak RSS - overhead (MB) | merge time (s) | of which first pass (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for size, r in rows:
        peak = r["vm_hwm_kb"] / 1024
        first = f"{r['prepass_s']:.1f}" if r.get("prepass_s") is not None else "-"
        print(f"| {size:.2f} | {r['tensors']} | {peak:.0f} | {peak - base_kb / 1024:.0f} | {r['wall_s']:.1f} | {first} |")


if __name__ == "__main__":
    main()
