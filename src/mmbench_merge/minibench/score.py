"""A quick greedy-generation scorer for MiniBench models, with the evaluation's metrics.

It encodes prompts exactly as lmms-eval's backends do (train.encode_prompts), loads the model in the backend's
dtype (qwen2_vl: the checkpoint's dtype; internvl_hf: bfloat16), generates greedily and decodes with
skip_special_tokens=True up to the first end-of-turn token. Metrics: normalised exact match (VQA, Geometry,
Chart, OCR) and IoU >= 0.5 on the 0-1000 grid (Grounding). The lead's numbers come from lmms-eval itself.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from .tasks import TASKS

BACKEND_DTYPE = {"qwen2_vl": "auto", "internvl": "bfloat16"}


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .")


def parse_box(text: str):
    numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", text)]
    return numbers[:4] if len(numbers) >= 4 else None


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def correct(task: str, prediction: str, doc: dict) -> bool:
    if task == "grounding":
        box = parse_box(prediction)
        return box is not None and iou(box, doc["bbox"]) >= 0.5
    return normalise(prediction) == normalise(doc["answer"])


def load_model(model_dir: Path, family: str):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = BACKEND_DTYPE[family]
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype if dtype == "auto" else
                                                        getattr(torch, dtype)).eval()  # fmt: skip
    return model, AutoProcessor.from_pretrained(model_dir)


def generate(model, processor, family: str, task: str, docs: list[dict], batch_size: int = 50,
             max_new_tokens: int = 24) -> list[str]:
    import torch

    from .train import encode_prompts

    tok = processor.tokenizer
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    answers = []
    for start in range(0, len(docs), batch_size):
        chunk = docs[start : start + batch_size]
        inputs = encode_prompts(family, processor, [task] * len(chunk), chunk, padding_side="left")
        if family == "internvl":
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eot,
                                 pad_token_id=tok.pad_token_id)  # fmt: skip
        for row in out[:, inputs["input_ids"].shape[1] :]:
            ids = row.tolist()
            ids = ids[: ids.index(eot)] if eot in ids else ids
            answers.append(tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip())
    return answers


def load_test_docs(data_root: Path, task: str, limit: int | None = None) -> list[dict]:
    """The first `limit` (default: all) samples of `task`'s test split."""
    import datasets

    ds = datasets.load_from_disk(str(data_root / task / "test"))
    return [ds[i] for i in range(len(ds) if limit is None else min(limit, len(ds)))]


def accuracy(task: str, predictions: list[str], docs: list[dict]) -> float:
    return 100.0 * sum(correct(task, p, d) for p, d in zip(predictions, docs)) / len(docs)


def predict(model_dir: Path, family: str, data_root: Path, tasks=TASKS, limit: int | None = None) -> dict:
    """task -> (test docs, the model's greedy answers to them)."""
    model, processor = load_model(model_dir, family)
    out = {}
    for task in tasks:
        docs = load_test_docs(data_root, task, limit)
        out[task] = (docs, generate(model, processor, family, task, docs))
    return out


def score_model(model_dir: Path, family: str, data_root: Path, tasks=TASKS, limit: int | None = None) -> dict:
    return {task: accuracy(task, predictions, docs)
            for task, (docs, predictions) in predict(model_dir, family, data_root, tasks, limit).items()}  # fmt: skip


def model_dirs(root: Path, family: str) -> dict[str, Path]:
    suffix = "_full" if family == "qwen2_vl" else ""
    return {"base": root / family / "base", **{t: root / family / f"{t}{suffix}" for t in TASKS}}


def markdown_table(rows: dict[str, dict], title: str) -> str:
    head = f"| {title} | " + " | ".join(TASKS) + " | avg |\n|---|" + "---:|" * (len(TASKS) + 1)
    lines = [head]
    for name, s in rows.items():
        avg = sum(s[t] for t in TASKS) / len(TASKS)
        lines.append(f"| {name} | " + " | ".join(f"{s[t]:.1f}" for t in TASKS) + f" | {avg:.1f} |")
    return "\n".join(lines)


def score_table(root: Path, families=("qwen2_vl", "internvl"), limit: int | None = None) -> dict:
    """Score base + five experts of each family on every task; write scores.json and print markdown tables."""
    import torch

    torch.set_num_threads(1)
    result = {}
    for family in families:
        started = time.perf_counter()
        rows = {name: score_model(path, family, root / "data", limit=limit)
                for name, path in model_dirs(root, family).items()}  # fmt: skip
        result[family] = rows
        print(markdown_table(rows, family))
        print(f"({family}: {time.perf_counter() - started:.0f} s)\n", flush=True)
    out = root / "scores.json"
    try:
        previous = json.loads(out.read_text()) if out.exists() else {}
        out.write_text(json.dumps({**previous, **result}, indent=2) + "\n")
    except OSError:
        pass  # a read-only root (the shipped copy in a read-only checkout): the printed tables are the output
    return result
