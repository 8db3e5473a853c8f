"""One run: merge the model's experts with the method, evaluate, record, log."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from . import MergeError
from .results import MERGE_REPORT_FILE, write_json_atomic

log = logging.getLogger("mmbench_merge")

REFERENCE_METHODS = {"base", "expert"}


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Execute one configured run inside `run_dir`; returns a summary dict."""
    from .engine import merge_model, resolve_device

    run_dir = Path(run_dir)
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    method = method_cfg["name"]
    summary = {"run_dir": str(run_dir), "model": cfg.model.name, "method": method, "started_at": started_at}

    if method in REFERENCE_METHODS:
        # Reference rows evaluate an unmerged model: without an evaluator there is nothing to do.
        raise MergeError(f"method={method}: evaluates an unmerged model and needs an evaluator (got evaluator=none)")

    needs_disk = cfg.save_merged
    result = merge_model(
        cfg.model,
        method_cfg,
        seed=cfg.seed,
        device=device,
        out_dir=run_dir / "merged" if needs_disk else None,
        keep_in_memory=False,
        shard_size_mb=cfg.shard_size_mb,
        progress=True,
    )
    report = result.report.to_json()
    report["started_at"] = started_at
    write_json_atomic(run_dir / MERGE_REPORT_FILE, report)
    totals = report["totals"]
    log.info(
        "merged %d of %d tensors (%d kept) in %.1fs, peak RSS %.0f MB%s",
        totals["merged"], totals["tensors"], totals["kept"], totals["seconds"], totals["peak_rss_mb"],
        f"; checkpoint at {result.merged_dir}" if result.merged_dir else "",
    )  # fmt: skip
    summary["duration_s"] = round(time.perf_counter() - t0, 2)
    return summary
