"""The grid through hydra-submitit-launcher for real: submitit's local executor, one process per grid point,
the same launcher code path as hydra/launcher=slurm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmbench_merge.results import RESULTS_FILE, RUN_FILE

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
REPO = Path(__file__).resolve().parents[1]


def test_slurm_launcher_config_composes():
    """hydra/launcher=slurm resolves to submitit's SLURM launcher with our resources."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, str(REPO / "run.py"), "--cfg", "hydra", "--package", "hydra.launcher",
           "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "model=qwen2vl"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SlurmLauncher" in proc.stdout and "partition: gpu" in proc.stdout
    for key in ("gpus_per_node: 1", "timeout_min: 240", "mem_gb: 64", "array_parallelism: 16", "setup:"):
        assert key in proc.stdout, key


def test_grid_through_submitit_local(tiny_conf, tmp_path):
    runs = tmp_path / "runs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [
        sys.executable,
        str(REPO / "run.py"),
        "-m",
        "--config-dir",
        str(tiny_conf),
        "hydra/launcher=local",
        "model=tiny_qwen2_vl",
        f"runs_dir={runs}",
        "logger=none",
        "method=ties,task_arithmetic",
        "method.scaling=0.5",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sweep,) = (runs / "multirun").glob("*/*")
    jobs = sorted(d for d in sweep.iterdir() if (d / RUN_FILE).exists())
    assert [j.name for j in jobs] == [
        "0_logger=none,method.scaling=0.5,method=ties,model=tiny_qwen2_vl",
        "1_logger=none,method.scaling=0.5,method=task_arithmetic,model=tiny_qwen2_vl",
    ]
    pids = set()
    for job in jobs:
        record = json.loads((job / RUN_FILE).read_text())
        assert record["status"] == "complete" and (job / RESULTS_FILE).exists()
        assert (job / "merge_report.json").exists()
        log = (job / "run.log").read_text()
        assert "merged" in log
    # submitit ran each job in its own process and kept its logs under the sweep.
    submitit_logs = list((sweep / ".submitit").rglob("*_log.out"))
    assert len(submitit_logs) >= 2
    for out in submitit_logs:
        pids.add(out.name.split("_")[0])
    assert len(pids) >= 2
    # The end-of-multirun callback ran in the launching process after the array finished.
    assert (sweep / "grid.jsonl").exists() and "grid of 2 jobs" in proc.stdout
