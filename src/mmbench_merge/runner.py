"""One run: merge the model's experts with the method (or pick a reference model), evaluate, record, log.

Each step is one function so that each stays readable:
    prepare_model  -> what to evaluate (merged weights in memory / on disk, or an unchanged base or expert)
    evaluate       -> task scores from the evaluator (evaluation/)
    record         -> results.jsonl rows (results.py)
    log            -> the logger (W&B or none)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from . import MergeError
from .results import MERGE_REPORT_FILE, write_json_atomic

log = logging.getLogger("mmbench_merge")

REFERENCE_METHODS = {"base", "expert"}


@dataclass
class PreparedModel:
    """What the evaluator gets: a checkpoint directory, optionally with merged weights held in memory."""

    model_dir: Path | None  # a loadable checkpoint (the written merged/, or an unchanged base / expert dir)
    base_dir: Path | None = None  # with state_dict: the architecture and files to load the weights into
    files_dir: Path | None = None  # tokenizer / processor / chat template source
    state_dict: dict | None = None  # merged weights in memory (no checkpoint written)
    report: dict | None = None  # merge_report.json contents (None for reference rows)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Execute one configured run inside `run_dir`; returns a summary dict."""
    from .engine import resolve_device

    run_dir = Path(run_dir)
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    prepared = prepare_model(cfg, run_dir, device)
    summary = {"run_dir": str(run_dir), "model": cfg.model.name, "method": cfg.method.name, "started_at": started_at}
    if prepared.report is not None:
        summary["merge"] = prepared.report["totals"]
    summary["duration_s"] = round(time.perf_counter() - t0, 2)
    return summary


def prepare_model(cfg: DictConfig, run_dir: Path, device: str) -> PreparedModel:
    """Merge (writing merged/ when asked or when the evaluator needs a directory) or pick a reference model."""
    from .engine import merge_model

    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    method = method_cfg["name"]
    if method in REFERENCE_METHODS:
        if cfg.evaluator.name == "none":
            raise MergeError(f"method={method}: evaluates an unmerged model and needs an evaluator (got evaluator=none)")
        raise MergeError(f"method={method}: reference rows are not available yet")

    write_to_disk = cfg.save_merged
    result = merge_model(
        cfg.model,
        method_cfg,
        seed=cfg.seed,
        device=device,
        out_dir=run_dir / "merged" if write_to_disk else None,
        keep_in_memory=False,
        shard_size_mb=cfg.shard_size_mb,
        progress=True,
    )
    report = result.report.to_json()
    write_json_atomic(run_dir / MERGE_REPORT_FILE, report)
    totals = report["totals"]
    log.info(
        "merged %d of %d tensors (%d kept) in %.1fs, peak RSS %.0f MB%s",
        totals["merged"], totals["tensors"], totals["kept"], totals["seconds"], totals["peak_rss_mb"],
        f"; checkpoint at {result.merged_dir}" if result.merged_dir else "",
    )  # fmt: skip
    return PreparedModel(model_dir=result.merged_dir, state_dict=result.state_dict, report=report)
