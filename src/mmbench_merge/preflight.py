"""Checks that need no tensor data, in one place, run before any checkpoint is read.

- `check(cfg)`: one job's composed config (method hyperparameter ranges and expert count from methods/spec.py,
  evaluator.limit, shard_size_mb, runs_dir). Called first thing in a run (runner.execute).
- `PreflightCallback`: a Hydra callback (conf/config.yaml) that checks runs_dir and the job / sweep directory
  before Hydra creates them, so a runs_dir that is a file or read-only is one `error:` line, not a traceback.
- `one_line_errors()`: wraps run.py's Hydra entry point so that composition errors (unknown key, wrong type,
  unknown config group option, missing mandatory value) are one `error:` line and exit code 2, like MergeError.

Unknown keys and wrong types fail when Hydra composes the config (structured schemas in config.py).
Every failure is a `MergeError` with one line naming the key and what is wrong.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path

from . import MergeError

EXIT_BAD_INPUT = 2


def check(cfg) -> None:
    """Raise MergeError for the first bad value of a composed run config (DictConfig or dict)."""
    from omegaconf import OmegaConf

    from .methods.spec import check_method

    method_cfg = OmegaConf.to_container(cfg.method, resolve=True) if not isinstance(cfg, dict) else cfg["method"]
    model = _get(cfg, "model")
    use = model.get("use")  # model.use: the subset the merge takes
    check_method(method_cfg, n_experts=len(use) if use is not None else len(model.get("experts") or {}))
    limit = _get(cfg, "evaluator").get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise MergeError(f"evaluator.limit: needs a positive number of samples per task (or null), got {limit!r}")
    shard = cfg.get("shard_size_mb", 2000.0)
    if isinstance(shard, bool) or not isinstance(shard, (int, float)) or not math.isfinite(shard) or shard <= 0:
        raise MergeError(f"shard_size_mb: needs a positive finite size in MB, got {shard!r}")
    check_writable_dir("runs_dir", cfg.get("runs_dir") or "runs")


def _get(cfg, key):
    return cfg[key] if isinstance(cfg, dict) else cfg.get(key)


def check_writable_dir(key: str, path: str | os.PathLike) -> None:
    """`path` is a directory we can write into, or can be created: its first existing ancestor is a writable dir."""
    path = Path(os.path.expanduser(str(path)))
    probe = path
    while not probe.exists():
        if probe.is_symlink():
            raise MergeError(f"{key}: {path}: {probe} is a dangling symbolic link")
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "is a file" if probe == path else f"cannot be created: {probe} is a file"
        raise MergeError(f"{key}: {path} {what}, expected a directory")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == path else f" (cannot be created in {probe})"
        raise MergeError(f"{key}: {path} is not writable{where}")


def fail(message: str) -> None:
    """Print one `error:` line and exit with the bad-input code (outside app.main_app: callbacks, CLI)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


try:
    from hydra.experimental.callback import Callback as _Callback
except ImportError:  # pragma: no cover - hydra is a dependency; keeps `import mmbench_merge.preflight` safe
    _Callback = object


class PreflightCallback(_Callback):
    """Before Hydra creates the job (or sweep) directory: runs_dir and that directory can be written."""

    def on_run_start(self, config, **kwargs) -> None:
        self._check(config, config.hydra.run.dir)

    def on_multirun_start(self, config, **kwargs) -> None:
        self._check(config, config.hydra.sweep.dir)

    @staticmethod
    def _check(config, job_dir) -> None:
        try:
            check_writable_dir("runs_dir", config.get("runs_dir") or "runs")
            check_writable_dir("hydra output directory", str(job_dir))
        except MergeError as exc:
            fail(str(exc))


@contextlib.contextmanager
def one_line_errors():
    """Hydra composition errors as one `error:` line and exit 2 (HYDRA_FULL_ERROR=1 keeps Hydra's own report)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        yield
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing; we print the one line below
    try:
        yield
    except Exception as exc:
        line = config_error_line(exc)
        if line is None:
            raise
        fail(line)


def config_error_line(exc: BaseException) -> str | None:
    """One line for a Hydra / OmegaConf configuration error, None for any other exception."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(exc, (HydraException, OmegaConfBaseException)):
        return None
    parts = []
    for e in (exc, exc.__cause__):
        if e is None:
            continue
        text = str(e).strip()
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        first = lines[0].rstrip(".") if lines else type(e).__name__
        if "Available options" in text:  # an unknown config group option: list the known ones on the same line
            options = lines[[i for i, line in enumerate(lines) if line.startswith("Available options")][0] + 1:]
            first += f" (available: {', '.join(options)})"
        if isinstance(e, OmegaConfBaseException):
            full_key = getattr(e, "full_key", None)
            if full_key and full_key not in first:
                first = f"{full_key}: {first}"
        if first not in parts:
            parts.append(first)
    return ": ".join(parts)
