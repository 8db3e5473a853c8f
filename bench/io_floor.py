"""The I/O floor as the yardstick: TA and TIES of this project and of mergekit against reading every input once.

A random bf16 checkpoint with the language-model shapes of InternVL2.5-1B (Qwen2.5-0.5B: hidden 896, MLP 4864,
14 heads / 2 KV heads; `--shapes qwen2vl7b`: hidden 3584, MLP 18944, 4 KV heads), `--layers` decoder layers,
`--vocab` rows of embed_tokens and lm_head (151674 for the real model), base + `--experts` experts
(base + noise), written under `--dir` (default /dev/shm: in RAM, so the disk's throttling is out of it).
Every tensor is merged (no selection), so all runs read the same bytes. Each variant runs as its own process,
interleaved (floor, ours-ta, mergekit-ta, ...) `--repeats` times; wall and CPU seconds and peak RSS are the
kernel's accounting of the finished child (wait4). Ratios to the floor are taken per repetition, then medians.

    PYTHONPATH=src python bench/io_floor.py --layers 4 --vocab 16384 --repeats 3 \\
        --mergekit /tmp/mk/bin/mergekit-yaml          # mergekit 0.1.5 in its own venv

Variants: floor (read every input file once, write one output of the base's size, import torch as every merge
does), ours-ta / ours-ties (engine.merge_model, written to disk, no merge cache), mergekit-ta / mergekit-ties
(mergekit-yaml on the same files, float32 compute, bf16 output).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "internvl2_5_1b": {"hidden": 896, "mlp": 4864, "heads": 14, "kv_heads": 2},
    "qwen2vl7b": {"hidden": 3584, "mlp": 18944, "heads": 28, "kv_heads": 4},
}
EXPERT_NAMES = ["vqa", "geometry", "chart", "ocr", "grounding", "e5", "e6", "e7"]


def layout(shapes: str, layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    s = SHAPES[shapes]
    h, m = s["hidden"], s["mlp"]
    kv = s["kv_heads"] * (h // s["heads"])
    names: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        names |= {
            p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h), p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h), p + "mlp.down_proj.weight": (h, m),
        }  # fmt: skip
    names |= {"model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    return names


def make(root: Path, shapes: str, layers: int, vocab: int, experts: int) -> None:
    import torch
    from safetensors.torch import save_file

    s = SHAPES[shapes]
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": s["hidden"],
        "intermediate_size": s["mlp"], "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"],
        "num_hidden_layers": layers, "vocab_size": vocab, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "hidden_act": "silu",
    }  # fmt: skip
    g = torch.Generator().manual_seed(0)
    base = {n: (0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16) for n, shape in layout(shapes, layers, vocab).items()}
    for name in ["base", *EXPERT_NAMES[:experts]]:
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        tensors = base if name == "base" else {
            n: (v.float() + 0.002 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for n, v in base.items()}
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(config))


def floor(root: Path, out: Path, experts: int) -> None:
    """Read every input file once, write one output of the base's size (its bytes)."""
    import torch  # noqa: F401  (the fixed cost every merge pays)

    out.mkdir(parents=True, exist_ok=True)
    chunk = bytearray(64 * 2**20)
    view = memoryview(chunk)
    with open(out / "model.safetensors", "wb") as sink:
        for name in ["base", *EXPERT_NAMES[:experts]]:
            with open(root / name / "model.safetensors", "rb", buffering=0) as f:
                while n := f.readinto(chunk):
                    if name == "base":
                        sink.write(view[:n])


def ours(root: Path, out: Path, experts: int, method: str) -> None:
    from omegaconf import OmegaConf

    from mmbench_merge.engine import merge_model

    model = OmegaConf.create({
        "name": "bench", "family": "qwen2_vl", "finetune": "full", "base": str(root / "base"),
        "experts": {k: str(root / k) for k in EXPERT_NAMES[:experts]}, "merge": {"include": [], "exclude": []},
        "files_from": "base", "revision": None,
    })  # fmt: skip
    cfg = {"name": "task_arithmetic", "scaling": 1.0} if method == "ta" else {"name": "ties", "density": 0.2, "scaling": 1.0}
    result = merge_model(model, cfg, device="cpu", out_dir=out, shard_size_mb=100_000, cache=None)
    print(json.dumps({"peak_rss_mb_report": round(result.report.peak_rss_bytes / 2**20, 1)}))


def mergekit_config(root: Path, experts: int, method: str) -> str:
    models = "\n".join(f"  - model: {root / k}\n    parameters: {{weight: 1.0"
                       + ("" if method == "ta" else ", density: 0.2") + "}" for k in EXPERT_NAMES[:experts])  # fmt: skip
    name = "task_arithmetic" if method == "ta" else "ties"
    extra = "parameters: {normalize: false}\n" if method == "ta" else "parameters: {normalize: true}\n"
    return f"merge_method: {name}\nbase_model: {root / 'base'}\nmodels:\n{models}\n{extra}dtype: float32\nout_dtype: bfloat16\n"


def run_variant(cmd: list[str], env: dict) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MB) of one child process, from the kernel (wait4)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", choices=list(SHAPES), default="internvl2_5_1b")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=151674)
    parser.add_argument("--experts", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm/mmbench-io-floor"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+",
                        default=["startup", "floor", "ours-ta", "mergekit-ta", "ours-ties", "mergekit-ties"])
    parser.add_argument("--mergekit", default="/tmp/mk/bin/mergekit-yaml", help="mergekit-yaml of mergekit's venv")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--_one", nargs=2, metavar=("VARIANT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = args.dir
    if args._one:
        variant, out = args._one
        if variant == "startup":
            import safetensors.torch  # noqa: F401
            import torch  # noqa: F401
        elif variant == "floor":
            floor(root, Path(out), args.experts)
        else:
            ours(root, Path(out), args.experts, variant.split("-")[1])
        return

    shutil.rmtree(root, ignore_errors=True)
    make(root, args.shapes, args.layers, args.vocab, args.experts)
    n_params = sum(_numel(s) for s in layout(args.shapes, args.layers, args.vocab).values())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    commands = {}
    for variant in args.variants:
        out = root / f"out-{variant}"
        if variant.startswith("mergekit"):
            if not Path(args.mergekit).exists():
                print(f"skipping {variant}: {args.mergekit} not found", file=sys.stderr)
                continue
            cfg = root / f"{variant}.yaml"
            cfg.write_text(mergekit_config(root, args.experts, variant.split("-")[1]))
            commands[variant] = [args.mergekit, str(cfg), str(out), "--no-copy-tokenizer", "--lazy-unpickle",
                                 "--out-shard-size", "100B", "--allow-crimes"]  # fmt: skip
        else:
            commands[variant] = [sys.executable, __file__, "--dir", str(root), "--experts", str(args.experts),
                                 "--_one", variant, str(out)]  # fmt: skip
    times: dict[str, list[tuple[float, float, float]]] = {v: [] for v in commands}
    for _ in range(args.repeats):
        for variant, cmd in commands.items():
            shutil.rmtree(root / f"out-{variant}", ignore_errors=True)
            times[variant].append(run_variant(cmd, env))
    check = _compare(root, commands)
    load = os.getloadavg()
    print(f"{args.shapes}, {args.layers} layers, vocab {args.vocab}: {n_params / 1e6:.0f}M parameters, base + "
          f"{args.experts} experts in {root}; {args.repeats} interleaved repetitions; load {load[0]:.1f} on "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    print("\n| run | wall s | CPU s | peak RSS MB | wall / floor | (wall - startup) / (floor - startup) |")
    print("| --- | --- | --- | --- | --- | --- |")
    nan = float("nan")
    for variant, rows in times.items():
        wall = statistics.median(r[0] for r in rows)
        floors = times.get("floor", [(nan,)] * len(rows))
        starts = times.get("startup", [(0.0,)] * len(rows))
        ratio = statistics.median(r[0] / f[0] for r, f in zip(rows, floors))
        net = statistics.median((r[0] - s[0]) / (f[0] - s[0]) for r, f, s in zip(rows, floors, starts))
        print(f"| {variant} | {wall:.2f} | {statistics.median(r[1] for r in rows):.2f} | "
              f"{statistics.median(r[2] for r in rows):.0f} | {ratio:.2f} | {net:.2f} |")  # fmt: skip
    print("(medians over the repetitions; ratios per repetition, then their median; startup = python importing torch)")
    for line in check:
        print(line)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


def _compare(root: Path, commands: dict) -> list[str]:
    """Whether mergekit's output equals ours, per method (max abs difference in units of the bf16 values)."""
    lines = []
    for method in ("ta", "ties"):
        a, b = root / f"out-ours-{method}", root / f"out-mergekit-{method}"
        if f"ours-{method}" not in commands or f"mergekit-{method}" not in commands:
            continue
        import torch
        from safetensors.torch import load_file

        def load(d):
            out = {}
            for f in sorted(d.glob("*.safetensors")):
                out |= load_file(str(f))
            return out

        x, y = load(a), load(b)
        same = sum(torch.equal(x[n], y[n]) for n in x if n in y)
        worst = max(float((x[n].float() - y[n].float()).abs().max()) for n in x if n in y)
        lines.append(f"{method}: {same} of {len(x)} tensors bit-identical to mergekit's, max |difference| {worst:.3g}")
    return lines


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    main()
