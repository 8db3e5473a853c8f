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
    check_evaluator(cfg, device)
    prepared = prepare_model(cfg, run_dir, device)
    rows = evaluate(cfg, prepared, device, run_dir=run_dir)
    summary = {"run_dir": str(run_dir), "model": cfg.model.name, "method": cfg.method.name, "started_at": started_at}
    if prepared.report is not None:
        summary["merge"] = prepared.report["totals"]
    summary["duration_s"] = round(time.perf_counter() - t0, 2)
    record(cfg, run_dir, rows, started_at, summary["duration_s"])
    for row in rows:
        log.info("%-28s %-12s %-10s %8.2f  (n=%d)", row["task"], row["category"], row["metric"], row["value"],
                 row["n_samples"])  # fmt: skip
    return summary


def prepare_model(cfg: DictConfig, run_dir: Path, device: str) -> PreparedModel:
    """Merge (writing merged/ when asked or when the evaluator needs a directory) or pick a reference model."""
    from .engine import merge_model

    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    method = method_cfg["name"]
    if method in REFERENCE_METHODS:
        if cfg.evaluator.name == "none":
            raise MergeError(f"method={method}: evaluates an unmerged model and needs an evaluator (got evaluator=none)")
        return reference_model(cfg, method_cfg, run_dir, device)

    # vLLM loads from disk; lmms-eval in this process takes the merged weights in memory unless asked to save.
    write_to_disk = cfg.save_merged or cfg.evaluator.name == "vllm"
    keep_in_memory = cfg.evaluator.name == "lmms_eval" and not write_to_disk
    result = merge_model(
        cfg.model,
        method_cfg,
        seed=cfg.seed,
        device=device,
        out_dir=run_dir / "merged" if write_to_disk else None,
        keep_in_memory=keep_in_memory,
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
    base_dir, files_dir = model_sources(cfg.model)
    return PreparedModel(model_dir=result.merged_dir, base_dir=base_dir, files_dir=files_dir,
                         state_dict=result.state_dict, report=report)  # fmt: skip


def model_sources(model_cfg) -> tuple[Path, Path]:
    """The base's directory and the directory tokenizer / processor / chat template come from (files_from)."""
    from .checkpoints import resolve

    base_dir = resolve(model_cfg.base, model_cfg.revision)
    if model_cfg.files_from == "base":
        return base_dir, base_dir
    if model_cfg.files_from not in model_cfg.experts:
        raise MergeError(
            f"model.files_from: {model_cfg.files_from!r} is neither 'base' nor an expert ({', '.join(model_cfg.experts)})"
        )
    return base_dir, resolve(model_cfg.experts[model_cfg.files_from], model_cfg.revision)


def reference_model(cfg: DictConfig, method_cfg: dict, run_dir: Path, device: str) -> PreparedModel:
    """method=base: the base unchanged; method=expert: one expert unchanged (same evaluation path as a merge).

    The base is evaluated with the files of model.files_from (Qwen2-VL's base has no usable chat template).
    A full expert is evaluated from its own directory; a LoRA adapter expert as base + its adapter, formed
    by the engine (a one-expert weight average is theta_0 + tau_i) and kept in memory.
    """
    from .checkpoints import is_adapter_dir, resolve
    from .engine import merge_model

    base_dir, files_dir = model_sources(cfg.model)
    if method_cfg["name"] == "base":
        log.info("reference row: the base %s unchanged", base_dir)
        return PreparedModel(model_dir=base_dir, base_dir=base_dir, files_dir=files_dir)
    key = method_cfg.get("expert")
    if key not in cfg.model.experts:
        raise MergeError(f"method.expert: {key!r} is not an expert of model {cfg.model.name} ({', '.join(cfg.model.experts)})")
    expert_dir = resolve(cfg.model.experts[key], cfg.model.revision)
    if not is_adapter_dir(expert_dir):
        log.info("reference row: expert %s (%s) unchanged", key, expert_dir)
        return PreparedModel(model_dir=expert_dir, base_dir=base_dir, files_dir=expert_dir)
    log.info("reference row: expert %s = base + its LoRA adapter (%s)", key, expert_dir)
    one_expert = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))
    one_expert.experts = {key: cfg.model.experts[key]}
    if one_expert.files_from not in ("base", key):
        one_expert.files_from = "base"  # only for a written checkpoint; in memory, files_dir is used below
    write_to_disk = cfg.save_merged or cfg.evaluator.name == "vllm"
    result = merge_model(
        one_expert, {"name": "weight_average", "scaling": 1.0}, seed=cfg.seed, device=device,
        out_dir=run_dir / "merged" if write_to_disk else None, keep_in_memory=not write_to_disk,
        shard_size_mb=cfg.shard_size_mb,
    )  # fmt: skip
    return PreparedModel(model_dir=result.merged_dir, base_dir=base_dir, files_dir=files_dir,
                         state_dict=result.state_dict)  # fmt: skip


# ------------------------------------------------------------------------------------------ evaluate / record
def check_evaluator(cfg: DictConfig, device: str) -> None:
    """Before merging: the evaluator can run here (e.g. vLLM needs a GPU) and the suite has tasks."""
    from .evaluation import check

    check(cfg, device)


def evaluate(cfg: DictConfig, prepared: PreparedModel, device: str, run_dir: Path | None = None) -> list[dict]:
    """Task-level row fields (category, task, metric, value, n_samples) of every task, then the avg: rows.

    With evaluator.log_samples and a run_dir, every model answer also goes to <run_dir>/samples.jsonl.
    """
    import json

    from .evaluation import evaluate as evaluate_suite
    from .evaluation.rows import score_rows
    from .results import write_text_atomic

    scores = evaluate_suite(cfg, prepared, device)
    if run_dir is not None and any(s.samples for s in scores):
        lines = [json.dumps({"task": s.task, **sample}, default=str) for s in scores for sample in s.samples]
        write_text_atomic(Path(run_dir) / "samples.jsonl", "\n".join(lines) + "\n")
    return score_rows(scores)


def record(cfg: DictConfig, run_dir: Path, rows: list[dict], started_at: str, duration_s: float) -> None:
    """results.jsonl: the task-level fields plus this run's fields, written atomically and last."""
    import secrets

    from .results import RESULTS_FILE, git_commit, write_rows

    method = OmegaConf.to_container(cfg.method, resolve=True)
    name, scaling = method.pop("name"), method.pop("scaling", None)
    run_id = f"{started_at.replace(':', '').replace('-', '')[:15]}-{secrets.token_hex(3)}"
    run_fields = {
        "run_id": run_id, "model": cfg.model.name, "method": name, "params": method, "scaling": scaling,
        "suite": cfg.suite.name, "seed": cfg.seed, "git_commit": git_commit(), "started_at": started_at,
        "duration_s": duration_s,
    }  # fmt: skip
    write_rows(run_dir / RESULTS_FILE, [{**run_fields, **row} for row in rows])
