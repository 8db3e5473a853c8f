"""One run: merge the model's experts with the method (or pick a reference model), evaluate, record, log.

Each step is one function so that each stays readable:
    prepare_model  -> what to evaluate (merged weights in memory / on disk, or an unchanged base or expert)
    evaluate       -> task scores from the evaluator (evaluation/)
    record_rows    -> run.json, then results.jsonl (results.py), written last: its presence marks the run done
    log_step       -> the logger (W&B or none), then a summary table on stdout
A run whose resolved config (minus VOLATILE_KEYS) already has complete results (its own directory, the sweep
directory, runs_dir) is not run again (`finished_here`, `already_done` / `skip`); rerun=true runs it again.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from . import MergeError
from .results import (
    MERGE_REPORT_FILE,
    REFERENCE_METHODS,
    RESULTS_FILE,
    RunRecord,
    completed_here,
    find_completed,
    format_summary,
    read_record,
    read_rows,
    write_json_atomic,
    write_rows,
)

log = logging.getLogger("mmbench_merge")



@dataclass
class PreparedModel:
    """What the evaluator gets: a checkpoint directory, optionally with merged weights held in memory."""

    model_dir: Path | None  # a loadable checkpoint (the written merged/, or an unchanged base / expert dir)
    base_dir: Path | None = None  # with state_dict: the architecture and files to load the weights into
    files_dir: Path | None = None  # tokenizer / processor / chat template source
    state_dict: dict | None = None  # merged weights in memory (no checkpoint written)
    report: dict | None = None  # merge_report.json contents (None for reference rows)


def run(cfg: DictConfig, run_dir: Path, sweep_dir: Path | None = None) -> dict:
    """Execute one configured run inside `run_dir` (a job of the sweep in `sweep_dir`); returns a summary dict.

    A run whose complete results already exist is not run again (rerun=true forces it): in its own directory
    (a relaunch into the same sweep directory) nothing is touched; elsewhere (the sweep directory, runs_dir) the
    job records where they are. One lock per resolved config makes two launches compute a point once.
    """
    from . import preflight
    from .loggers import check_logger

    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    check_logger(cfg)
    record = RunRecord.create(cfg)
    try:
        preflight.check(cfg)  # every check that needs no tensor data (runs_dir included), before anything else
    except MergeError as exc:
        record.finish(run_dir, "failed", time.perf_counter() - t0, error=str(exc))
        raise
    rerun = bool(cfg.get("rerun", False))
    if not rerun and completed_here(run_dir, record.fingerprint):
        return finished_here(run_dir, record)
    with point_lock(Path(cfg.get("runs_dir") or "runs"), record.fingerprint):
        if not rerun and completed_here(run_dir, record.fingerprint):  # a launch into the same directory did it
            return finished_here(run_dir, record)
        done = None if rerun else already_done(cfg, run_dir, record, sweep_dir)
        (run_dir / RESULTS_FILE).unlink(missing_ok=True)  # a reused directory: another config's or a rerun's
        record.write(run_dir)
        if done is not None:
            return skip(run_dir, record, done, t0)
        try:
            return execute(cfg, run_dir, record, t0)
        except BaseException as exc:  # recorded, then raised as before
            if not (run_dir / RESULTS_FILE).exists():  # results on disk: the run is done whatever failed after
                record.finish(run_dir, "failed", time.perf_counter() - t0, error=_one_line(exc))
            raise


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


@contextmanager
def point_lock(runs_root: Path, fingerprint: str):
    """An exclusive lock per resolved config under <runs_dir>/.locks: a second launch of the same point waits,
    then finds it complete. flock is released by the kernel when a process dies, so a kill leaves no lock."""
    import fcntl

    lock_dir = runs_root / ".locks"
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
        handle = open(lock_dir / f"{fingerprint}.lock", "a")
    except OSError as exc:
        raise MergeError(f"runs_dir: cannot create the lock file in {lock_dir} ({exc.strerror or exc})") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def execute(cfg: DictConfig, run_dir: Path, record: RunRecord, t0: float) -> dict:
    """Merge (or pick the reference model), evaluate, record, log."""
    from .engine import resolve_device

    device = resolve_device(cfg.device)
    check_evaluator(cfg, device)
    prepared = prepare_model(cfg, run_dir, device)
    try:
        rows = evaluate(cfg, prepared, device, run_dir=run_dir)
    except Exception as exc:
        # One line naming the evaluator and the cause, and where the merge survives (nothing is merged twice).
        kept = merge_kept_at(cfg, prepared, run_dir)
        what = str(exc).strip() if isinstance(exc, MergeError) else f"evaluator={cfg.evaluator.name} failed: {_one_line(exc)}"
        raise MergeError(what + (f"; {kept}" if kept else "")) from exc
    summary = {"run_dir": str(run_dir), "run_id": record.run_id, "model": cfg.model.name,
               "method": cfg.method.name, "started_at": record.started_at, "status": "complete"}  # fmt: skip
    if prepared.report is not None:
        summary["merge"] = prepared.report["totals"]
    summary["duration_s"] = round(time.perf_counter() - t0, 2)
    # Rows carry the values the merge used (OptMerge's preset fills nulls of the composed config).
    resolved = {"scaling": prepared.report["scaling"], "params": prepared.report["params"]} if prepared.report else {}
    record_rows(run_dir, record, rows, summary, resolved)
    log_step(cfg, run_dir, record, rows, summary)
    print(format_summary(record, rows, summary, resolved), flush=True)
    return summary


# ------------------------------------------------------------------------------------------ skip on rerun
def already_done(cfg: DictConfig, run_dir: Path, record: RunRecord, sweep_dir: Path | None = None) -> Path | None:
    """A complete run of the same resolved config: in the sweep directory this job writes to, then anywhere
    under runs_dir (None when there is none)."""
    roots = [Path(sweep_dir)] if sweep_dir is not None else []
    roots.append(Path(cfg.get("runs_dir") or "runs"))
    for root in roots:
        found = find_completed(record.fingerprint, root, exclude=run_dir)
        if found is not None:
            return found
    return None


def finished_here(run_dir: Path, record: RunRecord) -> dict:
    """This job's own directory already holds its complete results: touch nothing, show them."""
    done = read_record(run_dir) or {}
    log.info("already complete in %s: nothing to do (rerun=true runs it again)", run_dir)
    _print_finished(run_dir, done)
    return {"run_dir": str(run_dir), "run_id": done.get("run_id"), "status": "complete", "already_complete": True}


def skip(run_dir: Path, record: RunRecord, done: Path, t0: float) -> dict:
    """Record in this job's run.json that the results live in `done`; write no results.jsonl of its own."""
    log.info("skipping: results for the same config already exist in %s (rerun=true runs it again)", done)
    record.finish(run_dir, "skipped", time.perf_counter() - t0, same_as=str(done))
    _print_finished(done, read_record(done) or {})
    return {"run_dir": str(run_dir), "run_id": record.run_id, "status": "skipped", "same_as": str(done)}


def _print_finished(done: Path, done_record: dict) -> None:
    """The finished run's table, as it printed when it ran."""
    if not done_record:
        return
    finished = RunRecord(**{k: v for k, v in done_record.items() if k in RunRecord.__dataclass_fields__})
    summary = {**(done_record.get("summary") or {}), "run_dir": str(done), "status": "complete (earlier run)"}
    summary.setdefault("duration_s", done_record.get("duration_s") or 0)
    rows = [r for r in read_rows(Path(done) / RESULTS_FILE) if r.get("task")]
    resolved = {k: rows[0][k] for k in ("scaling", "params") if rows and k in rows[0]}
    print(format_summary(finished, rows, summary, resolved), flush=True)


# ------------------------------------------------------------------------------------------ evaluate / record
def record_rows(run_dir: Path, record: RunRecord, rows: list[dict], summary: dict, resolved: dict | None = None) -> None:
    """run.json (complete), then results.jsonl last and atomically: its presence marks the run done.

    An evaluator=none run writes an empty results.jsonl: complete, with no task rows.
    """
    run_fields = {**record.row_fields(), **(resolved or {}), "duration_s": summary["duration_s"]}
    rows = [{**run_fields, **{k: v for k, v in row.items() if v is not None or k not in run_fields}}
            for row in rows]  # fmt: skip
    record.finish(run_dir, "complete", summary["duration_s"], summary=summary)
    write_rows(run_dir / RESULTS_FILE, rows)


# ------------------------------------------------------------------------------------------ log
def log_step(cfg: DictConfig, run_dir: Path, record: RunRecord, rows: list[dict], summary: dict) -> None:
    """Hand the run to the configured logger; a logging failure is reported but does not undo the results."""
    from .loggers import log_run

    try:
        log_run(cfg, run_dir, record, read_rows(run_dir / RESULTS_FILE), summary)
    except Exception as exc:  # the results are on disk; W&B can be synced or re-logged later
        log.error("logger=%s failed: %s: %s", cfg.logger.name, type(exc).__name__, exc)


def prepare_model(cfg: DictConfig, run_dir: Path, device: str) -> PreparedModel:
    """Merge (writing merged/ when asked or when the evaluator needs a directory) or pick a reference model."""
    from .engine import merge_model

    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    method = method_cfg["name"]
    if cfg.model.get("family") == "omni":  # modality merging: its own checkpoint format (modality/)
        from .modality.run import prepare_omni

        return prepare_omni(cfg, method_cfg, run_dir, device)
    if method in REFERENCE_METHODS:
        if cfg.evaluator.name == "none":
            raise MergeError(f"method={method}: evaluates an unmerged model and needs an evaluator (got evaluator=none)")
        return reference_model(cfg, method_cfg, run_dir, device)

    write_to_disk = needs_checkpoint(cfg)
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
        cache=cfg.get("merge_cache"),  # tau_m per merge: scaling sweeps and reruns after a failure merge once
        runs_dir=cfg.get("runs_dir"),
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


def merge_kept_at(cfg: DictConfig, prepared: PreparedModel, run_dir: Path) -> str | None:
    """After a failed evaluation: where the merge is kept, as the error line says it. The merge cache holds it when
    it is on (a rerun reads tau_m back and merges nothing); else it is written to <run dir>/merged/."""
    if prepared.report is None or cfg.model.family == "omni":
        return None  # a reference row (nothing merged), or an omni adapter (save_merged=true writes it)
    cache = prepared.report.get("cache") or {}
    if cache.get("status") in ("hit", "stored"):
        return f"the merge is kept in the merge cache ({cache['dir']}): a rerun evaluates it without merging again"
    if prepared.model_dir is not None:
        return f"the merged checkpoint is in {prepared.model_dir}"
    kept = keep_merge(cfg, prepared, run_dir)
    return f"the merged weights are kept in {kept}" if kept else None


def keep_merge(cfg: DictConfig, prepared: PreparedModel, run_dir: Path) -> Path | None:
    """An evaluation that failed before it took the merged weights (e.g. the backend could not load the model):
    write them to <run dir>/merged/ (the layout save_merged would give) instead of losing the merge."""
    from .checkpoints import _safetensors_dtype
    from .engine import drop_stale_chat_template, merged_writer, writes_native

    state = prepared.state_dict
    if not state or (run_dir / "merged").exists():
        return None
    layout = [(name, _safetensors_dtype(t), tuple(t.shape)) for name, t in state.items()]
    writer = merged_writer(cfg.model, run_dir / "merged", layout, cfg.shard_size_mb)
    try:
        for name, tensor in state.items():
            writer.write(name, tensor)
        sources = [p for p in (prepared.base_dir, prepared.files_dir) if p is not None]
        out = writer.commit(extra_files_from=list(dict.fromkeys(sources)))
        if prepared.files_dir is not None and not writes_native(cfg.model):
            drop_stale_chat_template(out, prepared.files_dir)
    except Exception as exc:  # noqa: BLE001 (the evaluation error is the one to report)
        writer.abort()
        log.error("the merged weights could not be kept (%s: %s)", type(exc).__name__, exc)
        return None
    return out  # the run's error line says where (merge_kept_at)


def needs_checkpoint(cfg: DictConfig) -> bool:
    """vLLM loads from disk; lmms-eval in this process takes the merged weights in memory unless asked to save."""
    return cfg.save_merged or cfg.evaluator.name == "vllm"


def model_sources(model_cfg) -> tuple[Path, Path]:
    """The base's directory and the directory tokenizer / processor / chat template come from (files_from)."""
    from .checkpoints import resolve
    from .engine import files_source

    base_dir = resolve(model_cfg.base, model_cfg.revision)
    key = model_cfg.files_from
    expert_paths = {key: resolve(model_cfg.experts[key], model_cfg.revision)} if key in model_cfg.experts else {}
    return base_dir, files_source(model_cfg, base_dir, expert_paths)


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
    one_expert.use = None  # the reference row of any expert, whatever subset model.use merges
    if one_expert.files_from not in ("base", key):
        one_expert.files_from = "base"  # only for a written checkpoint; in memory, files_dir is used below
    write_to_disk = needs_checkpoint(cfg)
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

    if cfg.evaluator.name == "none":
        return []  # merge-only run: complete, with no task rows
    scores = evaluate_suite(cfg, prepared, device)
    if run_dir is not None and any(s.samples for s in scores):
        lines = [json.dumps({"task": s.task, **sample}, default=str) for s in scores for sample in s.samples]
        write_text_atomic(Path(run_dir) / "samples.jsonl", "\n".join(lines) + "\n")
    return score_rows(scores)
