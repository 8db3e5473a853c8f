"""Where a suite's lmms-eval tasks come from, and the TaskManager that indexes them.

`suite.packaged` names a task directory shipped in this package (evaluation/tasks/<name>/); `include_path`
adds a user directory; `lmms_eval_tasks` also indexes lmms-eval's own tasks (suite=general), which is slow
and noisy, so the packaged suites leave it off. The MiniBench tasks read datasets that live in the MiniBench
cache, whose path is known only at run time: they are rendered into a temporary directory with that path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path

from .. import MergeError
from . import TASKS_DIR

MINIBENCH_DATA_PLACEHOLDER = "@MINIBENCH_DATA@"


def include_paths(suite_cfg, stack: ExitStack) -> list[str]:
    paths = []
    if suite_cfg.packaged:
        packaged = TASKS_DIR / suite_cfg.packaged
        if not packaged.is_dir():
            known = sorted(p.name for p in TASKS_DIR.iterdir() if p.is_dir() and not p.name.startswith("_"))
            raise MergeError(f"suite.packaged: no task directory {suite_cfg.packaged!r}; known: {', '.join(known)}")
        if suite_cfg.packaged == "minibench":
            packaged = render_minibench_tasks(suite_cfg, stack)
        if suite_cfg.packaged == "modality":
            from ..modality.tasks import render_modality_tasks

            packaged = render_modality_tasks(suite_cfg, stack)
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


def minibench_profile(suite_cfg) -> str:
    """suite.profile, else the profile the ${minibench:...} model paths use (MMBENCH_MINIBENCH_PROFILE)."""
    from ..minibench import PROFILE_ENV

    return suite_cfg.profile or os.environ.get(PROFILE_ENV) or "default"


def render_minibench_tasks(suite_cfg, stack: ExitStack, root: Path | None = None) -> Path:
    """The packaged MiniBench task directory with the built MiniBench's data filled in, in a temporary dir.

    The build writes one `Dataset.save_to_disk` per split (data/<task>/<split>/); lmms-eval's
    `load_from_disk` reads a DatasetDict, so each task gets a DatasetDict view: a dataset_dict.json next to
    symlinks to the split directories (nothing is copied, the cache is not written to).
    """
    from ..minibench import ensure_built

    root = Path(root) if root is not None else Path(ensure_built(minibench_profile(suite_cfg)))
    out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mmbench-minibench-tasks-")))
    data = out / "data"
    for task_dir in sorted((root / "data").iterdir()):
        splits = sorted(p.name for p in task_dir.iterdir() if (p / "state.json").is_file())
        if not splits:
            continue
        view = data / task_dir.name
        view.mkdir(parents=True)
        for split in splits:
            (view / split).symlink_to((task_dir / split).resolve(), target_is_directory=True)
        (view / "dataset_dict.json").write_text(json.dumps({"splits": splits}))
    tasks = out / "tasks"
    tasks.mkdir()
    for path in (TASKS_DIR / "minibench").iterdir():
        if path.suffix == ".yaml" or path.name.endswith("_yaml"):
            (tasks / path.name).write_text(path.read_text().replace(MINIBENCH_DATA_PLACEHOLDER, str(data)))
        elif path.is_file():
            shutil.copy2(path, tasks / path.name)
    return tasks
