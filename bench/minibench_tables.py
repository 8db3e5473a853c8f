"""MiniBench tables: base + experts (6 x 5) and every merge method at its best scaling, for both families.

    PYTHONPATH=src python bench/minibench_tables.py                      # both families, every method, 200 / task
    PYTHONPATH=src python bench/minibench_tables.py --limit 100 --methods task_arithmetic ties
    PYTHONPATH=src python bench/minibench_tables.py --methods wudi --set method.lr=1e-3 --skip-reference \
        --out bench/results/minibench_lr.json       # a family's entry in --out is replaced: keep experiments apart

Merges go through the real path (Hydra-composed conf/model/mini_*.yaml and conf/method/*.yaml ->
engine.merge_model -> a checkpoint on disk); scoring is minibench.score (greedy generation encoded as lmms-eval's
backends encode it; exact match, IoU >= 0.5). Writes a JSON of every score next to the printed markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = {"qwen2_vl": "mini_qwen2vl", "internvl": "mini_internvl"}
GRID = {  # scaling grids (a dict: per model.finetune); the paper searches {0.1, 0.3, 0.5, 0.7, 1.0, 1.5}
    "weight_average": [1.0],
    "task_arithmetic": [0.3, 0.5, 1.0],
    "ties": [0.5, 1.0, 1.5],
    "dare_ta": [0.3, 0.5, 1.0],
    "dare_ties": [0.5, 1.0, 1.5],
    "tsv": [0.5, 1.0, 1.5],
    "iso_c": [0.5, 1.0, 1.5],
    "iso_cts": [0.5, 1.0, 1.5],
    "wudi": [0.5, 1.0, 1.5],
    "optmerge": {"full": [0.1, 0.3, 0.5], "lora": [0.5, 1.0, 1.5]},
}


def compose(model: str, method: str, scaling: float | None, extra: tuple[str, ...] = ()):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from mmbench_merge.config import register_configs

    register_configs()
    overrides = [f"model={model}", f"method={method}", *extra]
    overrides += [f"method.scaling={scaling}"] if scaling is not None else []
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def grid_for(method: str, model: str) -> list[float]:
    cfg = compose(model, method, None)
    grid = GRID.get(method)
    if isinstance(grid, dict):
        return grid[cfg.model.finetune]
    if grid:
        return grid
    default = float(cfg.method.scaling if cfg.method.scaling is not None else 1.0)  # a method added later
    return sorted({round(default * f, 3) for f in (0.5, 1.0, 1.5)})


def main(argv=None) -> int:
    import torch

    from mmbench_merge.engine import merge_model
    from mmbench_merge.methods import list_methods
    from mmbench_merge.minibench import ensure_built
    from mmbench_merge.minibench.score import TASKS, markdown_table, model_dirs, score_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    parser.add_argument("--limit", type=int, default=None, help="test samples per task (default: all)")
    parser.add_argument("--qwen2vl-model", default="mini_qwen2vl", choices=["mini_qwen2vl", "mini_qwen2vl_full"],
                        help="Qwen2-VL experts as LoRA adapters or merged into full weights")  # fmt: skip
    parser.add_argument("--skip-reference", action="store_true", help="no base / expert rows")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="extra Hydra overrides for every merge, e.g. method.lr=1e-3")  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "minibench_tables.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    root = ensure_built("default")
    methods = args.methods or list_methods()
    results = {}
    for family in args.families:
        model = args.qwen2vl_model if family == "qwen2_vl" else MODELS[family]
        rows, sweep = {}, {}
        for name, path in ({} if args.skip_reference else model_dirs(root, family)).items():
            rows[name] = score_model(path, family, root / "data", limit=args.limit)
            print(f"{family} {name}: {rows[name]}", flush=True)
        for method in methods:
            best = None
            for scaling in grid_for(method, model):
                cfg = compose(model, method, scaling, tuple(args.set))
                started = time.perf_counter()
                with tempfile.TemporaryDirectory() as tmp:
                    merge_model(cfg.model, dict(cfg.method), out_dir=Path(tmp) / "merged", device="cpu")
                    scores = score_model(Path(tmp) / "merged", family, root / "data", limit=args.limit)
                avg = sum(scores[t] for t in TASKS) / len(TASKS)
                sweep[f"{method}@{scaling}"] = scores
                print(f"{family} {method} scaling={scaling}: avg {avg:.1f} {scores} "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
                if best is None or avg > best[0]:
                    best = (avg, scaling, scores)
            rows[f"{method} (scaling {best[1]})"] = best[2]
        results[model] = {"rows": rows, "sweep": sweep, "limit": args.limit}
        print("\n" + markdown_table(rows, family) + "\n", flush=True)
    add_to_json(args.out, results)
    return 0


def add_to_json(path: Path, results: dict) -> None:
    """Add `results` (one entry per model) to the JSON at `path`, read again just before writing: two runs, one per
    family side by side, add to the same file. Written through a temporary file, so a crash leaves the old one."""
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(merged, indent=2) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
