"""W&B logging, read back from the offline run files: a job's run and the grid run.
(The default logger through a real multirun is tested in test_results.py.)"""

from __future__ import annotations

import json

import pytest

from mmbench_merge.loggers.grid import GridCallback
from mmbench_merge.loggers.wandb_run import log_run, offline_runs, read_offline_run, summary_scalars
from mmbench_merge.results import ROW_FIELDS, RunRecord
from mmbench_merge.runner import record_rows

pytest.importorskip("wandb")


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Offline W&B whose config, cache and staging live in the test's tmp dir (never the user's)."""
    env = {"WANDB_CONFIG_DIR": tmp_path / "wb_config", "WANDB_CACHE_DIR": tmp_path / "wb_cache",
           "WANDB_DATA_DIR": tmp_path / "wb_data", "WANDB_ARTIFACT_DIR": tmp_path / "wb_artifacts"}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_DIR", "WANDB_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    return {k: str(v) for k, v in env.items()}


def run_config(**method) -> dict:
    return {"model": {"name": "tiny"}, "method": {"name": "ties", "scaling": 0.5, "density": 0.2, **method},
            "suite": {"name": "mini", "tasks": []}, "evaluator": {"name": "lmms_eval"},
            "logger": {"name": "wandb", "project": "mmbench-test", "entity": None, "mode": "offline", "tags": ["t"]},
            "seed": 3, "device": "cpu", "save_merged": False, "rerun": False, "runs_dir": "runs"}  # fmt: skip


TASK_ROWS = [
    {"category": "VQA", "task": "mini_vqa", "metric": "exact_match", "value": 60.0, "n_samples": 20},
    {"category": "OCR", "task": "mini_ocr", "metric": "exact_match", "value": 40.0, "n_samples": 20},
    {"category": "OCR", "task": "mini_ocr", "metric": "anls", "value": 55.5, "n_samples": 20},
    {"category": "VQA", "task": "avg:VQA", "metric": "average", "value": 60.0, "n_samples": 20},
    {"category": "OCR", "task": "avg:OCR", "metric": "average", "value": 40.0, "n_samples": 20},
    {"category": "all", "task": "avg:all", "metric": "average", "value": 50.0, "n_samples": 40},
]


def test_job_run_holds_config_table_and_summary(tmp_path, wandb_env):
    from omegaconf import OmegaConf

    run_dir = tmp_path / "run"
    cfg = OmegaConf.create(run_config())
    record = RunRecord.start(cfg, run_dir)
    summary = {"duration_s": 3.5, "merge": {"tensors": 46, "merged": 14, "kept": 32, "seconds": 0.4}}
    record_rows(run_dir, record, TASK_ROWS, summary)
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    log_run(cfg, run_dir, record, rows, summary)

    (offline,) = offline_runs(run_dir)
    got = read_offline_run(offline)
    assert got["run"]["id"] == record.run_id and got["run"]["job_type"] == "merge"
    assert got["run"]["project"] == "mmbench-test"
    assert got["config"] == record.config  # the resolved config, whole
    table = got["tables"]["results"]
    assert table["columns"] == list(ROW_FIELDS)
    assert len(table["data"]) == len(TASK_ROWS)
    for cells, row in zip(table["data"], rows):
        cell = dict(zip(table["columns"], cells))
        assert json.loads(cell["params"]) == row["params"] == {"density": 0.2}
        assert {k: cell[k] for k in ("task", "metric", "value", "category", "run_id", "seed")} == {
            k: row[k] for k in ("task", "metric", "value", "category", "run_id", "seed")
        }
    s = got["summary"]
    assert s["task/mini_vqa/exact_match"] == 60.0 and s["task/mini_ocr/anls"] == 55.5
    assert s["category/VQA"] == 60.0 and s["category/OCR"] == 40.0 and s["average"] == 50.0
    assert s["merge/merged"] == 14 and s["duration_s"] == 3.5 and s["fingerprint"] == record.fingerprint


def test_summary_scalars_only_from_scored_rows():
    rows = TASK_ROWS + [{"category": "Chart", "task": "mini_chart", "metric": "relaxed", "value": None}]
    assert summary_scalars(rows) == {"task/mini_vqa/exact_match": 60.0, "task/mini_ocr/exact_match": 40.0,
                                     "task/mini_ocr/anls": 55.5, "category/VQA": 60.0, "category/OCR": 40.0,
                                     "average": 50.0}  # fmt: skip


def test_grid_run_gathers_every_job_including_skipped(tmp_path, wandb_env):
    """The callback Hydra calls after a multirun, on a sweep dir holding one complete and one skipped job."""
    from omegaconf import OmegaConf

    sweep = tmp_path / "runs" / "multirun" / "2026-01-01" / "10-00-00"
    done = tmp_path / "runs" / "multirun" / "2025-12-31" / "09-00-00" / "0_method=ties"
    rec = RunRecord.start(run_config(), done)
    record_rows(done, rec, TASK_ROWS[:2], {"duration_s": 1.0})
    job0 = sweep / "0_method=ties"
    RunRecord.start(run_config(), job0).finish(job0, "skipped", 0.01, same_as=str(done))
    job1 = sweep / "1_method=task_arithmetic"
    rec1 = RunRecord.start(run_config(name="task_arithmetic", density=None), job1)
    record_rows(job1, rec1, TASK_ROWS[:1], {"duration_s": 2.0})
    hydra_cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}, "overrides": {"task": ["method=a,b"]}},
                                  "logger": run_config()["logger"]})  # fmt: skip
    GridCallback().on_multirun_end(config=hydra_cfg)

    grid_rows = [json.loads(line) for line in (sweep / "grid.jsonl").read_text().splitlines()]
    assert [(r["job"], r["task"]) for r in grid_rows] == [
        ("0_method=ties", "mini_vqa"),
        ("0_method=ties", "mini_ocr"),
        ("1_method=task_arithmetic", "mini_vqa"),
    ]
    (offline,) = offline_runs(sweep)
    got = read_offline_run(offline)
    assert got["run"]["job_type"] == "grid" and got["run"]["group"] == "multirun/2026-01-01/10-00-00"
    grid = got["tables"]["grid"]
    assert grid["columns"] == ["job", *ROW_FIELDS]
    assert [dict(zip(grid["columns"], c))["method"] for c in grid["data"]] == [
        "ties",
        "ties",
        "task_arithmetic",
    ]
    jobs = got["tables"]["jobs"]
    assert [(c[0], c[1]) for c in jobs["data"]] == [("0_method=ties", "skipped"),
                                                  ("1_method=task_arithmetic", "complete")]  # fmt: skip
    assert got["summary"]["skipped"] == 1 and got["summary"]["complete"] == 1
