"""Run records: the files a run directory holds, written atomically.

A run directory holds .hydra/ (the composed config), merge_report.json, results.jsonl (one row per task
metric, schema below) and optionally merged/. These files alone rebuild every table later.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

RESULTS_FILE = "results.jsonl"
MERGE_REPORT_FILE = "merge_report.json"

ROW_FIELDS = (
    "run_id", "model", "method", "params", "scaling", "suite", "category", "task", "metric", "value",
    "n_samples", "seed", "git_commit", "started_at", "duration_s",
)  # fmt: skip


def write_json_atomic(path: Path, data) -> None:
    """Write to a temporary name and rename: a reader never sees half a file."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_rows(path: Path, rows: list[dict]) -> None:
    for row in rows:
        missing = [k for k in ROW_FIELDS if k not in row]
        if missing:
            raise ValueError(f"results row for task {row.get('task')!r} lacks {missing}")
    write_text_atomic(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))


def read_rows(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise ValueError(f"{path}:{i}: not a JSON line ({exc})") from None
    return rows


def git_commit() -> str | None:
    """The commit of the code that ran (with -dirty when the tree has changes), or None outside git."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)  # fmt: skip
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None
