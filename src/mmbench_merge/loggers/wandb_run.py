"""W&B logging: one W&B run per job, one for a whole grid, one for a leaderboard.

Each W&B run lives in `<dir>/wandb/` (dir = the run directory, the sweep directory or the leaderboard's output
directory). The mode is WANDB_MODE when set, else `logger.mode` (offline by default), so it works with no
network and no account; `wandb sync <dir>/wandb/offline-run-*` uploads offline runs later. A run's W&B id is
its run_id, its config the resolved Hydra config, its group the sweep it belongs to.

Tables (`wandb.Table`) hold results rows; `params` is JSON text because a table cell holds one value.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..results import REFERENCE_METHODS, ROW_FIELDS

log = logging.getLogger("mmbench_merge")



def mode_of(logger_cfg) -> str:
    """WANDB_MODE wins over the config, as W&B users expect."""
    return os.environ.get("WANDB_MODE") or logger_cfg.get("mode") or "offline"


def init(logger_cfg, directory: Path, **kwargs):
    """wandb.init with the logger config's project/entity/tags, files under `directory`/wandb/."""
    import wandb

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=logger_cfg.get("project") or "mmbench-merge",
        entity=logger_cfg.get("entity") or None,
        tags=list(logger_cfg.get("tags") or []) or None,
        dir=str(directory),
        mode=mode_of(logger_cfg),
        settings=wandb.Settings(console="off", silent=True),
        **kwargs,
    )


def finish(run) -> None:
    """Finish the run and wait until W&B's service has written every file: its writes continue after
    run.finish() returns, and the run directory must be complete when the job ends."""
    import wandb

    run.finish()
    wandb.teardown()


def rows_table(rows: list[dict], extra_columns: tuple[str, ...] = ()):
    """A wandb.Table with the results-row columns (plus `extra_columns` first); params as JSON text."""
    import wandb

    columns = [*extra_columns, *ROW_FIELDS]
    data = []
    for row in rows:
        cells = []
        for col in columns:
            value = row.get(col)
            cells.append(json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value)
        data.append(cells)
    return wandb.Table(columns=columns, data=data)


def summary_scalars(rows: list[dict]) -> dict:
    """task/<task>/<metric> for each task row, category/<Category> for each avg:<Category> row, average."""
    out = {}
    for row in rows:
        if row.get("value") is None:
            continue
        task = str(row["task"])
        if task == "avg:all":
            out["average"] = row["value"]
        elif task.startswith("avg:"):
            out[f"category/{task[4:]}"] = row["value"]
        else:
            out[f"task/{task}/{row['metric']}"] = row["value"]
    return out


def job_context() -> dict:
    """group (the sweep directory) and name (the job's subdirectory) when running under Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return {}
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return {"group": sweep_group(hc.sweep.dir), "name": Path(hc.runtime.output_dir).name}
        return {"name": Path(hc.runtime.output_dir).name}
    except Exception:  # outside Hydra (a test calling runner.run directly): no group
        return {}


def sweep_group(sweep_dir) -> str:
    """A W&B group name for a sweep directory: its path below runs/ (e.g. multirun/2026-11-22/10-00-00)."""
    parts = Path(sweep_dir).parts
    return "/".join(parts[-3:])


def log_run(cfg, run_dir: Path, record, rows: list[dict], summary: dict) -> None:
    """One W&B run for one job: config, a results table, summary scalars."""
    job_type = "eval" if record.config["method"]["name"] in REFERENCE_METHODS else "merge"
    context = job_context()
    run = init(cfg.logger, run_dir, id=record.run_id, config=record.config, job_type=job_type,
               group=context.get("group"), name=context.get("name") or record.run_id)  # fmt: skip
    try:
        run.log({"results": rows_table(rows)})
        scalars = summary_scalars(rows)
        merge = summary.get("merge") or {}
        scalars.update({f"merge/{k}": v for k, v in merge.items()})
        scalars.update({"duration_s": summary.get("duration_s"), "fingerprint": record.fingerprint,
                        "git_commit": record.git_commit or "", "run_dir": str(run_dir)})  # fmt: skip
        run.summary.update(scalars)
    finally:
        finish(run)
    log.info("W&B run %s logged (%s) under %s/wandb", record.run_id, mode_of(cfg.logger), run_dir)


def log_grid(logger_cfg, sweep_dir: Path, jobs: list[dict], overrides: list[str]) -> None:
    """One W&B run for a whole multirun: every job's rows in one table, and one line per job."""
    import wandb

    sweep_dir = Path(sweep_dir)
    config = {"sweep_dir": str(sweep_dir), "overrides": overrides, "jobs": len(jobs)}
    run = init(
        logger_cfg, sweep_dir, config=config, job_type="grid", group=sweep_group(sweep_dir), name="grid"
    )
    try:
        rows = [{"job": job["job"], **row} for job in jobs for row in job["rows"]]
        run.log({"grid": rows_table(rows, extra_columns=("job",))})
        columns = ["job", "status", "run_id", "same_as", "average", "duration_s"]
        run.log({"jobs": wandb.Table(columns=columns, data=[[job.get(c) for c in columns] for job in jobs])})
        run.summary.update({"jobs": len(jobs), "complete": sum(j["status"] == "complete" for j in jobs),
                            "skipped": sum(j["status"] == "skipped" for j in jobs)})  # fmt: skip
    finally:
        finish(run)


def log_leaderboard(tables: list[dict], out_dir: Path, logger_cfg: dict | None = None) -> None:
    """One W&B run (job_type=leaderboard) with each leaderboard table as a wandb.Table."""
    import wandb

    run = init(logger_cfg or {}, out_dir, job_type="leaderboard", name="leaderboard",
               config={"tables": [t["title"] for t in tables]})  # fmt: skip
    try:
        for table in tables:
            key = table["key"]
            run.log({key: wandb.Table(columns=table["columns"], data=table["data"])})
    finally:
        finish(run)


# ------------------------------------------------------------------------------------------ reading back
def offline_runs(directory: Path) -> list[Path]:
    """The offline W&B run directories under `directory`/wandb/ (what `wandb sync` uploads)."""
    return sorted((Path(directory) / "wandb").glob("offline-run-*"))


def read_offline_run(run_path: Path) -> dict:
    """What an offline W&B run holds, read back from its files: run (id, group, job_type, name, project),
    config, summary, and tables {key: {"columns", "data"}} (the table files under files/media/table/)."""
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal.datastore import DataStore

    run_path = Path(run_path)
    (log_file,) = run_path.glob("run-*.wandb")
    store = DataStore()
    store.open_for_scan(str(log_file))
    out = {"run": {}, "config": {}, "summary": {}, "tables": {}}
    while (data := store.scan_data()) is not None:
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            out["run"] = {"id": r.run_id, "project": r.project, "group": r.run_group, "job_type": r.job_type,
                          "name": r.display_name}  # fmt: skip
            out["config"].update({u.key: json.loads(u.value_json) for u in r.config.update})
        elif kind == "config":
            out["config"].update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "summary":
            for u in record.summary.update:
                key = u.key or "/".join(u.nested_key)
                if not key.startswith("_"):
                    out["summary"][key] = json.loads(u.value_json)
    out["config"].pop("_wandb", None)
    for path in sorted((run_path / "files" / "media" / "table").glob("*.table.json")):
        key = path.name.rsplit("_", 2)[0]
        out["tables"][key] = json.loads(path.read_text())
    # A logged table also leaves its file metadata in the summary (<key>/path, <key>/sha256, ...): drop it.
    out["summary"] = {k: v for k, v in out["summary"].items() if k.split("/", 1)[0] not in out["tables"]}
    return out
