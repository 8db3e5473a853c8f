"""What @hydra.main calls: run one job in Hydra's output directory and turn bad input into one clear line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig

from . import MergeError

log = logging.getLogger("mmbench_merge")


def main_app(cfg: DictConfig) -> dict | None:
    from hydra.core.hydra_config import HydraConfig

    from .runner import run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        return run(cfg, run_dir)
    except MergeError as exc:
        # One line naming the file / tensor / key and what is wrong, then a non-zero exit.
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
