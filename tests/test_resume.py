"""Grids that resume wherever they ran, finish whatever one point does, and compute each point once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mmbench_merge import MergeError
from mmbench_merge.results import (
    RESULTS_FILE,
    RUN_FILE,
    effective_status,
    find_completed,
    write_json_atomic,
)  # fmt: skip

REPO = Path(__file__).resolve().parents[1]


def launch(*args, cwd=REPO) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def run_py(*args) -> subprocess.CompletedProcess:
    proc = launch(*args)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def jobs_of(sweep: Path) -> list[Path]:
    return sorted((d for d in sweep.iterdir() if (d / RUN_FILE).exists()), key=lambda d: int(d.name.split("_")[0]))


def snapshot(sweep: Path) -> dict:
    """Every file of the sweep's jobs (name -> bytes), W&B and logs aside."""
    return {str(p.relative_to(sweep)): p.read_bytes() for p in sweep.rglob("*")
            if p.is_file() and "wandb" not in p.parts and p.suffix != ".log"}  # fmt: skip


def test_relaunch_into_the_same_sweep_dir_touches_nothing(tiny_conf, tmp_path):
    """The cluster case: a sweep relaunched with a fixed hydra.sweep.dir finds its points done in their own
    directories, merges nothing and rewrites nothing; it prints the finished scores."""
    sweep = tmp_path / "sweep"
    grid = ["-m", "--config-dir", str(tiny_conf), "model=tiny_qwen2_vl", f"runs_dir={tmp_path / 'runs'}",
            f"hydra.sweep.dir={sweep}", "logger=none", "evaluator=none", "suite=none",
            "method=task_arithmetic,ties", "method.scaling=0.5,1.0"]  # fmt: skip
    first = run_py(*grid)
    assert first.returncode == 0, first.stderr[-3000:]
    jobs = jobs_of(sweep)
    assert len(jobs) == 4 and all(json.loads((j / RUN_FILE).read_text())["status"] == "complete" for j in jobs)
    before = snapshot(sweep)
    again = run_py(*grid)
    assert again.returncode == 0, again.stderr[-3000:]
    after = snapshot(sweep)
    changed = {k for k in before if before[k] != after.get(k)} - {"grid.jsonl"}
    assert not changed, f"a finished point was rewritten: {sorted(changed)}"
    assert again.stdout.count("complete (earlier run)") == 4
    assert "merging tensors" not in again.stderr


def test_a_bad_point_fails_alone_and_the_sweep_exits_2_at_the_end(tiny_conf, tmp_path):
    """scaling=0.5,nan,1.0: the nan point fails with its error line and is recorded failed; the third point
    still runs; the grid table is written; the multirun exits 2. A relaunch re-runs only the failed point."""
    sweep = tmp_path / "sweep"
    grid = ["-m", "--config-dir", str(tiny_conf), "model=tiny_qwen2_vl", f"runs_dir={tmp_path / 'runs'}",
            f"hydra.sweep.dir={sweep}", "logger=none", "evaluator=none", "suite=none",
            "method=task_arithmetic", "method.scaling=0.5,nan,1.0"]  # fmt: skip
    proc = run_py(*grid)
    assert proc.returncode == 2, proc.stderr[-3000:]
    records = [json.loads((j / RUN_FILE).read_text()) for j in jobs_of(sweep)]
    assert [r["status"] for r in records] == ["complete", "failed", "complete"]
    assert "scaling" in records[1]["error"]
    assert (sweep / "grid.jsonl").exists() and "3 jobs" in proc.stdout
    assert "error: 1 of 3 grid points did not complete" in proc.stderr
    again = run_py(*grid)
    assert again.returncode == 2
    assert again.stdout.count("complete (earlier run)") == 2


def test_two_identical_grids_at_once_compute_each_point_once(tiny_conf, tmp_path):
    """Two launches of one grid in the same second share a sweep directory: each point is computed by one of
    them (a lock per point), the other finds it complete; no run.json is overwritten by a half-done run."""
    sweep = tmp_path / "runs" / "multirun" / "same-second"
    grid = ["-m", "--config-dir", str(tiny_conf), "model=tiny_qwen2_vl", f"runs_dir={tmp_path / 'runs'}",
            f"hydra.sweep.dir={sweep}", "logger=none", "evaluator=none", "suite=none", "method=ties",
            "method.scaling=0.3,0.5"]  # fmt: skip
    procs = [launch(*grid), launch(*grid)]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        outputs.append(out)
    records = [json.loads((j / RUN_FILE).read_text()) for j in jobs_of(sweep)]
    assert [r["status"] for r in records] == ["complete", "complete"]
    assert all((j / RESULTS_FILE).exists() for j in jobs_of(sweep))
    assert sum(out.count("complete (earlier run)") for out in outputs) == 2  # each point computed once


def test_a_killed_run_reads_as_killed_and_is_not_done(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir = tmp_path / "runs" / "x"
    run_dir.mkdir(parents=True)
    record = {"fingerprint": "f", "status": "running", "host": socket.gethostname(), "pid": dead.pid}
    write_json_atomic(run_dir / RUN_FILE, record)
    assert effective_status(record) == "killed"
    assert effective_status({**record, "pid": os.getpid()}) == "running"
    assert effective_status({**record, "host": "another-host"}) == "running"  # cannot tell: not killed
    assert find_completed("f", tmp_path / "runs") is None


def test_a_reused_job_dir_drops_another_configs_results(tiny_conf, tmp_path):
    """A job directory holding results of another config: they are removed before this run starts, so a
    crash of this run can never leave them beside its record."""
    job = tmp_path / "job"
    job.mkdir()
    (job / RESULTS_FILE).write_text('{"task": "stale"}\n')
    write_json_atomic(job / RUN_FILE, {"fingerprint": "another", "status": "complete"})
    proc = run_py("--config-dir", str(tiny_conf), "model=tiny_qwen2_vl", f"runs_dir={tmp_path / 'runs'}",
                  f"hydra.run.dir={job}", "logger=none", "evaluator=none", "suite=none", "method=ties",
                  f"model.base={tmp_path / 'missing'}")  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1
    assert not (job / RESULTS_FILE).exists()
    assert json.loads((job / RUN_FILE).read_text())["status"] == "failed"


# ------------------------------------------------------------------------------------------ model.use
def _model_cfg(tiny_root: Path, **extra):
    from omegaconf import OmegaConf

    from mmbench_merge.config import ModelConfig

    loaded = OmegaConf.load(tiny_root / "conf" / "model" / "tiny_internvl.yaml")
    loaded.pop("defaults", None)
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), loaded)
    for key, value in extra.items():
        cfg[key] = value
    return cfg


def test_model_use_merges_exactly_the_named_experts(tiny_root):
    import torch

    from mmbench_merge.engine import merge_model

    method = {"name": "task_arithmetic", "scaling": 1.0}
    full = _model_cfg(tiny_root)
    keys = list(full.experts)
    subset = _model_cfg(tiny_root, use=[keys[1], keys[0]])
    only = _model_cfg(tiny_root)
    only.experts = {keys[1]: full.experts[keys[1]], keys[0]: full.experts[keys[0]]}
    got = merge_model(subset, method, device="cpu", keep_in_memory=True)
    want = merge_model(only, method, device="cpu", keep_in_memory=True)
    every = merge_model(full, method, device="cpu", keep_in_memory=True)
    assert got.report.experts == {keys[1]: "full", keys[0]: "full"}
    assert all(torch.equal(got.state_dict[n], want.state_dict[n]) for n in want.state_dict)
    assert any(not torch.equal(got.state_dict[n], every.state_dict[n]) for n in every.state_dict)


@pytest.mark.parametrize(("use", "message"), [
    (["nope"], "model.use: 'nope' is not an expert of model tiny_internvl"),
    ([], "model.use: empty list"),
])  # fmt: skip
def test_model_use_names_a_bad_subset(tiny_root, use, message):
    from mmbench_merge.engine import merge_model

    with pytest.raises(MergeError, match=message.replace("(", r"\(")):
        merge_model(_model_cfg(tiny_root, use=use), {"name": "task_arithmetic", "scaling": 1.0}, device="cpu")


def test_model_use_is_in_the_fingerprint():
    from mmbench_merge.results import config_fingerprint

    cfg = {"model": {"name": "m", "experts": {"a": "/a", "b": "/b"}, "use": None}, "method": {"name": "ties"}}
    subset = {**cfg, "model": {**cfg["model"], "use": ["a"]}}
    assert config_fingerprint(cfg) != config_fingerprint(subset)


def test_a_failed_evaluation_keeps_the_merge_and_the_rerun_does_not_merge(tiny_conf, tmp_path):
    """The evaluation fails after a merge: one error line says the merge cache holds it; the next run of the
    same merge (here merge-only) reads tau_m from the cache and opens no expert."""
    runs = tmp_path / "runs"
    common = ["--config-dir", str(tiny_conf), "model=tiny_qwen2_vl", f"runs_dir={runs}", "logger=none",
              "method=ties", "method.scaling=0.5"]  # fmt: skip
    failed = run_py(*common, "suite=minibench", "evaluator.limit=1", "evaluator.backend=no_such_backend",
                    f"hydra.run.dir={tmp_path / 'a'}")  # fmt: skip
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert failed.returncode == 2 and len(errors) == 1, failed.stderr[-3000:]
    assert "no_such_backend" in errors[0] and "the merge is kept in the merge cache" in errors[0]
    record = json.loads((tmp_path / "a" / RUN_FILE).read_text())
    assert record["status"] == "failed" and not (tmp_path / "a" / RESULTS_FILE).exists()
    first = json.loads((tmp_path / "a" / "merge_report.json").read_text())
    assert first["cache"]["status"] == "stored"
    again = run_py(*common, "suite=none", "evaluator=none", f"hydra.run.dir={tmp_path / 'b'}")
    assert again.returncode == 0, again.stderr[-3000:]
    report = json.loads((tmp_path / "b" / "merge_report.json").read_text())
    assert report["cache"]["status"] == "hit" and report["cache"]["key"] == first["cache"]["key"]
