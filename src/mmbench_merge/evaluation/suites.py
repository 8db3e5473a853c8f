"""Where a suite's lmms-eval tasks come from, and the TaskManager that indexes them.

`suite.packaged` names a task directory shipped in this package (evaluation/tasks/<name>/); `include_path`
adds a user directory; `lmms_eval_tasks` also indexes lmms-eval's own tasks (suite=general), which is slow
and noisy, so the packaged suites leave it off. The MiniBench tasks read datasets that live in the MiniBench
cache, whose path is known only at run time: they are rendered into a temporary directory with that path.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path

from .. import MergeError
from . import TASKS_DIR

MINIBENCH_ROOT_PLACEHOLDER = "@MINIBENCH_ROOT@"


def include_paths(suite_cfg, stack: ExitStack) -> list[str]:
    paths = []
    if suite_cfg.packaged:
        packaged = TASKS_DIR / suite_cfg.packaged
        if not packaged.is_dir():
            known = sorted(p.name for p in TASKS_DIR.iterdir() if p.is_dir() and not p.name.startswith("_"))
            raise MergeError(f"suite.packaged: no task directory {suite_cfg.packaged!r}; known: {', '.join(known)}")
        if suite_cfg.packaged == "minibench":
            packaged = render_minibench_tasks(suite_cfg, stack)
        paths.append(str(packaged))
    if suite_cfg.include_path:
        path = Path(suite_cfg.include_path).expanduser()
        if not path.is_dir():
            raise MergeError(f"suite.include_path: {path} is not a directory")
        paths.append(str(path))
    return paths


def task_manager_for(cfg, family, stack: ExitStack):
    """A TaskManager over the suite's tasks; prompts are selected by the family's lmms-eval backend name."""
    from lmms_eval.tasks import TaskManager

    suite = cfg.suite
    paths = include_paths(suite, stack)
    manager = TaskManager(
        "WARNING", include_path=paths or None, include_defaults=bool(suite.lmms_eval_tasks),
        model_name=family.lmms_backend,
    )  # fmt: skip
    missing = [t.name for t in suite.tasks if t.name not in manager.all_tasks]
    if missing:
        where = ", ".join(paths) if paths else "lmms-eval's own tasks"
        raise MergeError(f"suite={suite.name}: task {missing[0]} not found in {where}")
    return manager


def render_minibench_tasks(suite_cfg, stack: ExitStack) -> Path:
    """Copy the packaged MiniBench task directory with the built MiniBench's data root filled in."""
    from ..minibench import ensure_built

    root = Path(ensure_built(suite_cfg.profile or "default"))
    out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mmbench-minibench-tasks-")))
    source = TASKS_DIR / "minibench"
    for path in source.iterdir():
        if path.name == "__pycache__":
            continue
        if path.suffix == ".yaml" or path.name.endswith("_yaml"):
            (out / path.name).write_text(path.read_text().replace(MINIBENCH_ROOT_PLACEHOLDER, str(root)))
        elif path.is_file():
            shutil.copy2(path, out / path.name)
    return out
