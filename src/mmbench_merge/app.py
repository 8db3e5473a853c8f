"""What @hydra.main calls: run one job in Hydra's output directory and turn bad input into one clear line.

A single run that fails exits 2 after its `error:` line. A job of a multirun that fails prints the same line,
is recorded as failed (run.json) and returns, so the sweep goes on to its other points; the grid callback
(loggers/grid.py) then lists the failed points and exits 2 once the whole grid is done.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig

from . import MergeError

log = logging.getLogger("mmbench_merge")


def main_app(cfg: DictConfig) -> dict | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .runner import run

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    sweep_dir = Path(hydra_cfg.sweep.dir) if multirun else None
    try:
        return run(cfg, run_dir, sweep_dir)
    except MergeError as exc:
        # One line naming the file / tensor / key and what is wrong, then a non-zero exit.
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr, flush=True)
        if multirun:
            return {"run_dir": str(run_dir), "status": "failed", "error": str(exc)}
        sys.exit(2)
    except Exception as exc:
        if not multirun:
            raise
        # A bug or a crash in one grid point: its traceback goes to the job's log, the sweep goes on.
        log.exception("grid point %s failed", run_dir.name)
        print(f"error: {run_dir.name}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return {"run_dir": str(run_dir), "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
