"""Run records: the files a run directory holds, written atomically.

A run directory holds .hydra/ (the composed config), run.json (the run record: resolved config, fingerprint,
git commit, seed, times, status), merge_report.json (merge runs), results.jsonl (one row per task metric,
schema below; written last) and optionally merged/ and wandb/. These files alone rebuild every table later.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

RESULTS_FILE = "results.jsonl"
# Methods that evaluate a model unchanged (reference rows: no merge, no scaling); everything else is a merge.
REFERENCE_METHODS = frozenset({"base", "expert"})
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
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)  # fmt: skip
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------------------------------ run records
# run.json: who ran what. Written when a run starts (status "running"), rewritten when it ends ("complete") or
# when it is skipped ("skipped", with `same_as` naming the completed run). A run is complete when its
# results.jsonl exists: that file is written last and atomically, so a crashed run is never taken as done.
RUN_FILE = "run.json"

# Keys that cannot change a run's results: left out of the fingerprint that decides skip-on-rerun.
VOLATILE_KEYS = ("rerun", "device", "logger", "shard_size_mb", "runs_dir", "hydra", "merge_cache")

# Directories a run writes that never hold other runs: not descended into when looking for completed runs.
_NOT_RUN_DIRS = {"merged", "wandb", ".hydra", ".submitit", "__pycache__", ".locks"}


def resolved_config(cfg) -> dict:
    """The resolved job config as a plain dict (a DictConfig or a dict)."""
    if isinstance(cfg, dict):
        return json.loads(json.dumps(cfg, default=str))
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def config_fingerprint(config: dict) -> str:
    """sha256 of the resolved config minus VOLATILE_KEYS: equal fingerprints mean the same results."""
    stable = {k: v for k, v in config.items() if k not in VOLATILE_KEYS}
    return hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class RunRecord:
    """The contents of run.json."""

    run_id: str
    fingerprint: str
    config: dict
    git_commit: str | None
    seed: int
    started_at: str
    status: str = "running"  # running | complete | skipped | failed; a dead pid's "running" reads as killed
    finished_at: str | None = None
    duration_s: float | None = None
    same_as: str | None = None  # for a skipped run: the directory holding the completed run's results
    error: str | None = None  # for a failed run: the exception, one line
    summary: dict = field(default_factory=dict)
    host: str = field(default_factory=socket.gethostname)  # with pid: tells a killed run from a running one
    pid: int = field(default_factory=os.getpid)

    @classmethod
    def create(cls, cfg) -> "RunRecord":
        """The record of a run about to start; written by `write` (run.json), not here."""
        config = resolved_config(cfg)
        now = datetime.now(timezone.utc)
        fingerprint = config_fingerprint(config)
        run_id = f"{now:%Y%m%d-%H%M%S}-{fingerprint[:8]}-{secrets.token_hex(2)}"
        return cls(run_id, fingerprint, config, git_commit(), int(config.get("seed", 0)),
                   now.isoformat(timespec="seconds"))  # fmt: skip

    @classmethod
    def start(cls, cfg, run_dir: Path) -> "RunRecord":
        record = cls.create(cfg)
        record.write(run_dir)
        return record

    def finish(self, run_dir: Path, status: str, duration_s: float, **extra) -> None:
        self.status = status
        self.finished_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.duration_s = round(duration_s, 3)
        for key, value in extra.items():
            setattr(self, key, value)
        self.write(run_dir)

    def write(self, run_dir: Path) -> None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(run_dir) / RUN_FILE, asdict(self))

    def row_fields(self) -> dict:
        """The run-level fields of every results row of this run (the task-level ones come from the evaluator)."""
        method = dict(self.config.get("method") or {})
        scaling = method.pop("scaling", None)
        name = method.pop("name", None)
        return {
            "run_id": self.run_id, "model": (self.config.get("model") or {}).get("name"), "method": name,
            "params": method, "scaling": scaling, "suite": (self.config.get("suite") or {}).get("name"),
            "seed": self.seed, "git_commit": self.git_commit, "started_at": self.started_at,
        }  # fmt: skip


def read_record(run_dir: Path) -> dict | None:
    """run.json of `run_dir` as a dict, or None when there is none or it cannot be read."""
    path = Path(run_dir) / RUN_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_complete(run_dir: Path) -> bool:
    return (Path(run_dir) / RESULTS_FILE).is_file()


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine with this pid exists (temp dirs and records carry their writer's pid)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def process_alive(host: str | None, pid: int | None) -> bool:
    """Whether the process that wrote a record still runs; True when that cannot be told (another host)."""
    if not pid or host != socket.gethostname():
        return True
    return pid_alive(pid)


def effective_status(record: dict | None) -> str | None:
    """The record's status, with "killed" for a "running" record whose process is gone (same host)."""
    if record is None:
        return None
    status = record.get("status")
    if status == "running" and not process_alive(record.get("host"), record.get("pid")):
        return "killed"
    return status


def completed_here(run_dir: Path, fingerprint: str) -> bool:
    """`run_dir` itself holds complete results of this fingerprint (a relaunch into the same directory)."""
    record = read_record(run_dir)
    return bool(record and record.get("fingerprint") == fingerprint and is_complete(run_dir))


def iter_run_dirs(root: Path):
    """Every directory under `root` (itself included) holding run.json or results.jsonl, in sorted order."""
    root = Path(root)
    if not root.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _NOT_RUN_DIRS)
        if RUN_FILE in filenames or RESULTS_FILE in filenames:
            yield Path(dirpath)


def find_completed(fingerprint: str, root: Path, exclude: Path | None = None) -> Path | None:
    """The most recently finished complete run under `root` with this fingerprint, or None."""
    exclude = Path(exclude).resolve() if exclude else None
    best: tuple[str, Path] | None = None
    for run_dir in iter_run_dirs(root):
        if exclude is not None and run_dir.resolve() == exclude:
            continue
        record = read_record(run_dir)
        if not record or record.get("fingerprint") != fingerprint or not is_complete(run_dir):
            continue
        key = (record.get("finished_at") or "", run_dir)
        if best is None or key > best:
            best = key
    return best[1] if best else None


def rows_of(run_dir: Path) -> list[dict]:
    """The results rows of a run directory; a skipped run's are those of the run it points to."""
    run_dir = Path(run_dir)
    if is_complete(run_dir):
        return read_rows(run_dir / RESULTS_FILE)
    record = read_record(run_dir)
    if record and record.get("status") == "skipped" and record.get("same_as"):
        target = Path(record["same_as"])
        if is_complete(target):
            return read_rows(target / RESULTS_FILE)
    return []


@dataclass
class RecordedRun:
    """One complete run found on disk: its rows and, when present, its run.json."""

    run_dir: Path
    rows: list[dict]
    record: dict | None


def collect_runs(paths) -> list[RecordedRun]:
    """Every complete run under the given directories, each once. A path may also be a rows file (any name,
    JSON lines in the results schema), read as one run without a record."""
    seen, runs = set(), []
    for path in map(Path, paths):
        if path.is_file() and path.name != RESULTS_FILE:
            runs.append(RecordedRun(path.parent, read_rows(path), None))
            continue
        run_dirs = [path.parent] if path.is_file() else [d for d in iter_run_dirs(path) if is_complete(d)]
        for run_dir in run_dirs:
            if run_dir.resolve() not in seen:
                seen.add(run_dir.resolve())
                runs.append(RecordedRun(run_dir, read_rows(run_dir / RESULTS_FILE), read_record(run_dir)))
    return runs


# ------------------------------------------------------------------------------------------ console summary
def format_table(header: list[str], body: list[list]) -> str:
    """A plain-text table with aligned columns."""
    cells = [[str(c) for c in header]] + [["" if c is None else str(c) for c in row] for row in body]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_summary(record: RunRecord, rows: list[dict], summary: dict, resolved: dict | None = None) -> str:
    """The short table a run prints when it ends: what ran (with the values the merge used), the merge totals,
    each score and the averages."""
    fields = {**record.row_fields(), **(resolved or {})}
    params = ", ".join(f"{k}={v}" for k, v in fields["params"].items())
    reference = fields["method"] in REFERENCE_METHODS  # evaluated unchanged: no scaling applies
    scaling = f"scaling={fields['scaling']}" if fields["scaling"] is not None and not reference else ""
    what = ", ".join(p for p in (scaling, params) if p)
    lines = [f"== {fields['model']} / {fields['method']}" + (f" ({what})" if what else "")
             + f": {summary.get('status', record.status)} in {summary.get('duration_s', 0):.1f}s"]  # fmt: skip
    merge = summary.get("merge")
    if merge:
        lines.append(f"   merged {merge['merged']} of {merge['tensors']} tensors ({merge['kept']} kept) in "
                     f"{merge['seconds']:.1f}s, peak RSS {merge['peak_rss_mb']:.0f} MB")  # fmt: skip
    scores = [r for r in rows if r.get("value") is not None]
    if scores:
        body = [[r["task"], r.get("category"), r.get("metric"), f"{float(r['value']):.2f}"] for r in scores]
        lines.append(format_table(["task", "category", "metric", "value"], body))
    else:
        lines.append("   no task scores (evaluator=none): results.jsonl holds no rows")
    lines.append(f"   run directory: {summary.get('run_dir')}")
    return "\n".join(lines)
