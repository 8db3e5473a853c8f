"""How a MiniBench expert's own-task score grows with its training steps (one task, one family, from the shipped base).

    PYTHONPATH=src python bench/minibench_expert_steps.py --task grounding --steps 800 1600 3000

Trains the expert as `minibench.build` does (Qwen2-VL: LoRA on the language model with the profile's rank and LoRA
learning rate; InternVL: full fine-tune), each step count from the same base with the same seed, on the built train
split, then scores it on the first `--limit` test samples with `minibench.score`. Nothing is written to the built
root; loss curves go to bench/results/expert_steps/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train_expert(root: Path, family: str, task: str, steps: int, log_path: Path):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmbench_merge.minibench import build

    profile = build.get_profile("default")
    base = AutoModelForImageTextToText.from_pretrained(root / family / "base", dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(root / family / "base")
    torch.manual_seed(build.expert_seed(profile, task))  # the seed the build uses for this expert
    expert = build.train_expert(base, family, processor, build._task_batches(root, task, profile), profile, steps,
                                log_path, f"{family} {task} {steps}")  # fmt: skip
    return (expert.merge_and_unload() if family == "qwen2_vl" else expert), processor


def main(argv=None) -> int:
    import torch

    from mmbench_merge.minibench import ensure_built
    from mmbench_merge.minibench.score import accuracy, generate, load_test_docs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen2_vl", choices=["qwen2_vl", "internvl"])
    parser.add_argument("--task", default="grounding")
    parser.add_argument("--steps", type=int, nargs="+", default=[800, 1600, 3000])
    parser.add_argument("--limit", type=int, default=100, help="test samples scored")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    root = ensure_built("default")
    docs = load_test_docs(root / "data", args.task, args.limit)
    out_dir = REPO / "bench" / "results" / "expert_steps"
    results = {}
    for steps in args.steps:
        started = time.perf_counter()
        log_path = out_dir / f"{args.family}_{args.task}_{steps}.jsonl"
        model, processor = train_expert(root, args.family, args.task, steps, log_path)
        if args.family == "internvl":  # scored as internvl_hf loads it
            model = model.to(torch.bfloat16)
        answers = generate(model.eval(), processor, args.family, args.task, docs)
        results[steps] = accuracy(args.task, answers, docs)
        print(f"{args.family} {args.task} {steps} steps: {results[steps]:.1f} on {len(docs)} test samples "
              f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    summary = out_dir / f"{args.family}_{args.task}.json"
    summary.write_text(json.dumps({"limit": len(docs), "scores": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
