"""What the merged MiniBench models answer: for each task, the share of answers that are well-formed for that task,
the accuracy, and the most frequent answer. It tells a merge that lost a skill (well-formed, wrong) from one whose
answer format was taken over by another expert's (e.g. a letter where a colour was asked).

    PYTHONPATH=src python bench/minibench_answers.py --families qwen2_vl --limit 100

Reads the best scaling of every method from bench/results/minibench_tables.json (run bench/minibench_tables.py
first), merges each again through the real path and generates greedily as minibench.score does. Well-formed:
OCR 2-3 glyphs of the generator's alphabet, Grounding a parseable box, the other tasks an answer that occurs in the
task's train split.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from minibench_tables import MODELS, add_to_json, compose  # noqa: E402


def answer_space(data_root: Path) -> dict:
    """task -> predicate: is this prediction a well-formed answer to the task (right or wrong)?"""
    import datasets

    from mmbench_merge.minibench.score import normalise, parse_box
    from mmbench_merge.minibench.tasks import GLYPHS, TASKS

    def seen(task):
        answers = {normalise(a) for a in datasets.load_from_disk(str(data_root / task / "train"))["answer"]}
        return lambda p: normalise(p) in answers

    space = {t: seen(t) for t in TASKS if t not in ("ocr", "grounding")}
    space["ocr"] = lambda p: re.fullmatch(f"[{GLYPHS.lower()}]{{2,3}}", normalise(p)) is not None  # as scored
    space["grounding"] = lambda p: parse_box(p) is not None
    return space


def describe(model_dir: Path, family: str, data_root: Path, space: dict, limit: int) -> dict:
    from mmbench_merge.minibench.score import accuracy, predict

    out = {}
    for task, (docs, predictions) in predict(model_dir, family, data_root, limit=limit).items():
        top, count = Counter(predictions).most_common(1)[0]
        out[task] = {"well_formed": 100.0 * sum(map(space[task], predictions)) / len(docs),
                     "accuracy": accuracy(task, predictions, docs),
                     "top": top, "top_share": 100.0 * count / len(docs)}  # fmt: skip
    return out


def markdown(rows: dict, title: str) -> str:
    from mmbench_merge.minibench.tasks import TASKS

    lines = [f"| {title}: well-formed % / accuracy % / most frequent answer (share) | " + " | ".join(TASKS) + " |",
             "|---|" + "---|" * len(TASKS)]  # fmt: skip
    for name, tasks in rows.items():
        cells = [f"{s['well_formed']:.0f} / {s['accuracy']:.0f} / `{s['top'][:24]}` ({s['top_share']:.0f})"
                 for s in tasks.values()]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import torch

    from mmbench_merge.engine import merge_model
    from mmbench_merge.minibench import ensure_built
    from mmbench_merge.minibench.score import model_dirs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--limit", type=int, default=100, help="test samples per task")
    parser.add_argument("--tables", type=Path, default=REPO / "bench" / "results" / "minibench_tables.json")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "minibench_answers.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    root = ensure_built("default")
    space = answer_space(root / "data")
    tables = json.loads(args.tables.read_text())
    results = {}
    for family in args.families:
        model = MODELS[family]
        rows = {name: describe(path, family, root / "data", space, args.limit)
                for name, path in model_dirs(root, family).items()}  # fmt: skip
        for row in tables[model]["rows"]:
            match = re.fullmatch(r"(\w+) \(scaling ([\d.]+)\)", row)
            if not match:
                continue
            cfg = compose(model, match[1], float(match[2]))
            with tempfile.TemporaryDirectory() as tmp:
                merge_model(cfg.model, dict(cfg.method), out_dir=Path(tmp) / "merged", device="cpu")
                rows[row] = describe(Path(tmp) / "merged", family, root / "data", space, args.limit)
            print(f"{family} {row}: {rows[row]}", flush=True)
        results[model] = rows
        print("\n" + markdown(rows, model) + "\n", flush=True)
    add_to_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
