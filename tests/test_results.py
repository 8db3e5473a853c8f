"""Run records: what a run writes, the config fingerprint, and which runs count as done (skip-on-rerun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmbench_merge.results import (
    RESULTS_FILE,
    ROW_FIELDS,
    RUN_FILE,
    RunRecord,
    collect_runs,
    config_fingerprint,
    find_completed,
    read_rows,
    rows_of,
)  # fmt: skip
from mmbench_merge.runner import record_rows

REPO = Path(__file__).resolve().parents[1]


def tiny_config(**overrides) -> dict:
    cfg = {"model": {"name": "tiny", "base": "/m/base", "experts": {"vqa": "/m/vqa"}},
           "method": {"name": "ties", "scaling": 0.5, "density": 0.2}, "suite": {"name": "none", "tasks": []},
           "evaluator": {"name": "none"}, "logger": {"name": "none"}, "seed": 0, "device": "auto",
           "save_merged": False, "rerun": False, "runs_dir": "runs", "shard_size_mb": 2000}  # fmt: skip
    for key, value in overrides.items():
        _set(cfg, key, value)
    return cfg


def _set(cfg: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for key in path:
        cfg = cfg[key]
    cfg[last] = value


def test_fingerprint_ignores_volatile_keys_only():
    fp = config_fingerprint(tiny_config())
    for key, value in [("rerun", True), ("device", "cpu"), ("logger.name", "wandb"), ("shard_size_mb", 10),
                       ("runs_dir", "/elsewhere")]:  # fmt: skip
        assert config_fingerprint(tiny_config(**{key: value})) == fp, key
    for key, value in [
        ("method.scaling", 0.7),
        ("method.density", 0.3),
        ("seed", 1),
        ("model.base", "/x"),
        ("method.name", "dare_ties"),
        ("save_merged", True),
        ("evaluator.name", "lmms_eval"),
    ]:
        assert config_fingerprint(tiny_config(**{key: value})) != fp, key


def test_crashed_or_foreign_runs_are_never_taken_as_done(tmp_path):
    cfg = tiny_config()
    crashed = tmp_path / "runs" / "a"
    record = RunRecord.start(cfg, crashed)  # started, never wrote results.jsonl
    assert find_completed(record.fingerprint, tmp_path / "runs") is None
    other = tmp_path / "runs" / "b"
    RunRecord.start(tiny_config(**{"method.scaling": 0.9}), other)
    (other / RESULTS_FILE).write_text("")  # complete, but another config
    assert find_completed(record.fingerprint, tmp_path / "runs") is None
    done = tmp_path / "runs" / "multirun" / "d" / "t" / "0_x"
    record_done = RunRecord.start(cfg, done)
    record_rows(done, record_done, [], {"duration_s": 1.0})
    assert find_completed(record.fingerprint, tmp_path / "runs") == done
    assert find_completed(record.fingerprint, tmp_path / "runs", exclude=done) is None
    # A stray temporary file of an interrupted write is not results.jsonl.
    (crashed / f".{RESULTS_FILE}.tmp-123").write_text("{}\n")
    assert find_completed(record.fingerprint, tmp_path / "runs", exclude=done) is None


def test_record_rows_completes_evaluator_rows_with_run_fields(tmp_path):
    cfg = tiny_config()
    record = RunRecord.start(cfg, tmp_path)
    task_rows = [
        {"category": "VQA", "task": "mini_vqa", "metric": "exact_match", "value": 61.5, "n_samples": 40},
        {"category": "VQA", "task": "avg:VQA", "metric": "average", "value": 61.5, "n_samples": 40},
    ]
    record_rows(tmp_path, record, task_rows, {"duration_s": 12.5})
    rows = read_rows(tmp_path / RESULTS_FILE)
    assert [r["task"] for r in rows] == ["mini_vqa", "avg:VQA"]
    for row in rows:
        assert set(ROW_FIELDS) <= set(row)
        assert row["run_id"] == record.run_id and row["model"] == "tiny" and row["method"] == "ties"
        assert row["params"] == {"density": 0.2} and row["scaling"] == 0.5 and row["suite"] == "none"
        assert row["duration_s"] == 12.5 and row["seed"] == 0
    saved = json.loads((tmp_path / RUN_FILE).read_text())
    assert saved["status"] == "complete" and saved["fingerprint"] == record.fingerprint
    assert saved["config"] == cfg and saved["finished_at"] and saved["duration_s"] == 12.5


# ------------------------------------------------------------------------------------------ through run.py
def run_py(*args, env_extra=None, cwd=REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src"), **(env_extra or {})}
    env = {k: v for k, v in env.items() if v is not None}
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def wandb_env(tmp_path: Path) -> dict:
    """Offline W&B (the default logger) with its config, cache and staging in tmp, never the user's."""
    env = {k: str(tmp_path / k.lower()) for k in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR",
                                                  "WANDB_ARTIFACT_DIR")}  # fmt: skip
    return {**env, "WANDB_MODE": None, "WANDB_PROJECT": None, "WANDB_ENTITY": None}  # None: unset


def test_grid_runs_once_then_is_skipped_then_rerun_forces(tiny_conf, tmp_path):
    """The 2 x 2 grid with the default logger: four result sets, four offline W&B runs and the grid's run;
    the same command again skips all four; rerun=true runs a point again."""
    pytest.importorskip("wandb")
    from mmbench_merge.loggers.wandb_run import offline_runs, read_offline_run

    runs = tmp_path / "runs"
    env = wandb_env(tmp_path)
    grid = ["-m", "--config-dir", str(tiny_conf), "model=tiny_qwen2_vl", f"runs_dir={runs}",
            "method=ties,task_arithmetic", "method.scaling=0.3,0.5"]  # fmt: skip
    first = run_py(*grid, env_extra=env)
    (sweep,) = (runs / "multirun").glob("*/*")
    jobs = sorted(d for d in sweep.iterdir() if d.is_dir() and (d / RUN_FILE).exists())
    assert [j.name.split("_")[0] for j in jobs] == ["0", "1", "2", "3"]
    fingerprints = set()
    for job in jobs:
        record = json.loads((job / RUN_FILE).read_text())
        assert record["status"] == "complete" and record["duration_s"] > 0
        assert record["git_commit"] and record["seed"] == 0 and record["started_at"] <= record["finished_at"]
        assert record["config"]["method"]["name"] in ("ties", "task_arithmetic")
        assert record["config"]["method"]["scaling"] in (0.3, 0.5)
        report = json.loads((job / "merge_report.json").read_text())
        assert report["totals"]["merged"] > 0 and report["method"] == record["config"]["method"]["name"]
        assert (job / RESULTS_FILE).read_text() == ""  # evaluator=none: complete, no task rows
        fingerprints.add(record["fingerprint"])
        (wb,) = offline_runs(job)
        got = read_offline_run(wb)
        assert got["run"]["id"] == record["run_id"] and got["run"]["group"] == "/".join(sweep.parts[-3:])
        assert got["run"]["name"] == job.name and got["run"]["job_type"] == "merge"
        assert got["config"] == record["config"]
        assert got["tables"]["results"]["data"] == []  # evaluator=none: an empty results table
        assert got["summary"]["merge/merged"] == report["totals"]["merged"]
    assert len(fingerprints) == 4
    assert "no task scores (evaluator=none)" in first.stdout  # the end-of-run summary
    assert (sweep / "grid.jsonl").exists() and "4 jobs" in first.stdout
    (grid_run,) = offline_runs(sweep)
    assert read_offline_run(grid_run)["run"]["job_type"] == "grid"

    again = run_py(*grid, env_extra=env)
    sweeps = sorted((runs / "multirun").glob("*/*"))
    assert len(sweeps) == 2
    relaunch = next(s for s in sweeps if s != sweep)
    for job in sorted(d for d in relaunch.iterdir() if d.is_dir() and (d / RUN_FILE).exists()):
        record = json.loads((job / RUN_FILE).read_text())
        assert record["status"] == "skipped", job
        assert Path(record["same_as"]).parent == sweep and record["fingerprint"] in fingerprints
        assert not (job / RESULTS_FILE).exists() and not (job / "merge_report.json").exists()
        assert rows_of(job) == read_rows(Path(record["same_as"]) / RESULTS_FILE)
        assert offline_runs(job) == []  # a skipped job logs no W&B run of its own
    (grid_run,) = offline_runs(relaunch)  # ... but the relaunch's grid run reports the whole grid
    assert [c[1] for c in read_offline_run(grid_run)["tables"]["jobs"]["data"]] == ["skipped"] * 4
    assert again.stdout.count("skipping: results for the same config already exist") == 4
    assert "merging tensors" not in again.stderr  # nothing was merged again
    # The leaderboard's reader sees each complete run once: the skipped jobs add nothing.
    assert len(collect_runs([runs])) == 4

    run_py("--config-dir", str(tiny_conf), "model=tiny_qwen2_vl", f"runs_dir={runs}", "logger=none", "method=ties",
           "method.scaling=0.3", "rerun=true")  # fmt: skip
    single = list((runs / "tiny_qwen2_vl" / "ties").glob("*"))
    assert len(single) == 1 and json.loads((single[0] / RUN_FILE).read_text())["status"] == "complete"


def test_a_failed_run_says_so_and_is_not_done(tiny_conf, tmp_path):
    runs = tmp_path / "runs"
    args = ["--config-dir", str(tiny_conf), "model=tiny_qwen2_vl", "method=ties", f"runs_dir={runs}", "logger=none",
            f"model.base={tmp_path / 'missing'}"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "error:" in proc.stderr
    (run_dir,) = (runs / "tiny_qwen2_vl" / "ties").glob("*")
    record = json.loads((run_dir / RUN_FILE).read_text())
    assert record["status"] == "failed" and "missing" in record["error"]
    assert not (run_dir / RESULTS_FILE).exists()
    assert find_completed(record["fingerprint"], runs) is None
