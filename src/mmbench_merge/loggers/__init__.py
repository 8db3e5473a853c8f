"""Loggers: where a run's results go besides its run directory.

`logger=wandb` (the default) logs each run to Weights & Biases, offline unless the environment says otherwise
(wandb_run.py); `logger=none` logs nothing. At the end of a multirun, grid.GridCallback gathers the whole grid.
Nothing here imports wandb until a run is logged.
"""

from __future__ import annotations

import importlib.util

from .. import MergeError

LOGGERS = ("none", "wandb")


def check_logger(cfg) -> None:
    """Fail before any work when the configured logger cannot run."""
    name = cfg.logger.name
    if name not in LOGGERS:
        raise MergeError(f"logger.name: unknown logger {name!r}; known: {', '.join(LOGGERS)}")
    if name == "wandb" and importlib.util.find_spec("wandb") is None:
        raise MergeError("logger=wandb: the wandb package is not installed (pip install 'mmbench-merge[wandb]'), "
                         "or run with logger=none")  # fmt: skip


def log_run(cfg, run_dir, record, rows: list[dict], summary: dict) -> None:
    """Log one finished run with the configured logger."""
    if cfg.logger.name == "wandb":
        from .wandb_run import log_run as log_wandb

        log_wandb(cfg, run_dir, record, rows, summary)
