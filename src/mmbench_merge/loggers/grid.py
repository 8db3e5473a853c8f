"""The end of a multirun: gather every job of the sweep into one table (grid.jsonl, the console, W&B).

Registered in conf/config.yaml as a Hydra callback. Hydra calls `on_multirun_end` in the launching process once
every job has returned: after the basic launcher's sequential jobs, and after submitit's jobs (local or SLURM),
whose launcher waits for the whole array. A job that was skipped (its results already existed) contributes the
rows of the run it points to, so a relaunched sweep still reports the whole grid.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ..results import effective_status, format_table, read_record, rows_of, write_text_atomic

log = logging.getLogger("mmbench_merge")

GRID_FILE = "grid.jsonl"


def grid_jobs(sweep_dir: Path) -> list[dict]:
    """One entry per job directory of the sweep (those holding run.json), in job-number order."""
    jobs = []
    for job_dir in Path(sweep_dir).iterdir():
        record = read_record(job_dir) if job_dir.is_dir() else None
        if record is None:
            continue
        rows = rows_of(job_dir)
        average = next((r["value"] for r in rows if r.get("task") == "avg:all"), None)
        jobs.append({"job": job_dir.name, "status": effective_status(record), "run_id": record.get("run_id"),
                     "same_as": record.get("same_as"), "average": average, "duration_s": record.get("duration_s"),
                     "error": record.get("error"), "rows": rows})  # fmt: skip
    return sorted(jobs, key=lambda j: (_job_num(j["job"]), j["job"]))


def _job_num(name: str) -> int:
    head = name.split("_", 1)[0]
    return int(head) if head.isdigit() else 1 << 30


def format_grid(jobs: list[dict]) -> str:
    body = [[j["job"], j["status"], "" if j["average"] is None else f"{j['average']:.2f}", len(j["rows"]),
             "" if j["duration_s"] is None else f"{j['duration_s']:.1f}"] for j in jobs]  # fmt: skip
    return format_table(["job", "status", "average", "rows", "seconds"], body)


FAILED_STATUSES = ("failed", "killed", "running")  # "running" after the sweep: a job that never finished


class GridCallback(Callback):
    """Hydra callback: after a multirun, write <sweep dir>/grid.jsonl, print the grid, log it to W&B, and exit 2
    when a point failed (after everything else, so one bad point costs the grid nothing)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        jobs = grid_jobs(sweep_dir)
        lines = [json.dumps({"job": j["job"], **row}, default=str) + "\n" for j in jobs for row in j["rows"]]
        write_text_atomic(sweep_dir / GRID_FILE, "".join(lines))
        print(f"== grid of {len(jobs)} jobs in {sweep_dir}\n{format_grid(jobs)}", flush=True)
        if OmegaConf.select(config, "logger.name", default="none") == "wandb":
            self._log_wandb(config, sweep_dir, jobs)
        failed = [j for j in jobs if j["status"] in FAILED_STATUSES]
        if failed:
            for job in failed:
                print(f"  {job['status']}: {job['job']}" + (f": {job['error']}" if job.get("error") else ""),
                      file=sys.stderr)  # fmt: skip
            print(f"error: {len(failed)} of {len(jobs)} grid points did not complete (relaunch the same command "
                  f"to run them again; complete points are skipped)", file=sys.stderr, flush=True)  # fmt: skip
            sys.exit(2)

    @staticmethod
    def _log_wandb(config: DictConfig, sweep_dir: Path, jobs: list[dict]) -> None:
        from .wandb_run import log_grid

        logger_cfg = OmegaConf.to_container(config.logger, resolve=True)
        overrides = list(OmegaConf.select(config, "hydra.overrides.task", default=[]) or [])
        try:
            log_grid(logger_cfg, sweep_dir, jobs, overrides)
        except Exception as exc:  # every job's results are on disk already
            log.error("W&B grid run failed: %s: %s", type(exc).__name__, exc)
