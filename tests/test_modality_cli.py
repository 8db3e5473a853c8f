"""The omni model through the real Hydra app and lmms-eval: `run.py -m` over all ten methods on the tiny omni
fixture and the tiny modality suite (the mmbench_omni backend end to end), and a reference row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ALL_METHODS = ["weight_average", "task_arithmetic", "ties", "dare_ta", "dare_ties",
               "tsv", "iso_c", "iso_cts", "wudi", "optmerge"]  # fmt: skip


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"), HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"),
               MMBENCH_CACHE=str(tmp_path / "cache"), WANDB_MODE="disabled", OMP_NUM_THREADS="1")  # fmt: skip
    return env


@pytest.fixture(scope="module")
def omni_conf(tmp_path_factory) -> Path:
    pytest.importorskip("lmms_eval")
    from mmbench_merge.modality.fixtures import make_omni, write_yamls

    root = tmp_path_factory.mktemp("omni_cli")
    write_yamls(root / "conf", make_omni(root / "fixture"))
    return root / "conf"


def _rows(job_dir: Path) -> dict:
    rows = [json.loads(line) for line in (job_dir / "results.jsonl").read_text().splitlines() if line.strip()]
    return {r["task"]: r for r in rows}


def test_all_ten_methods_run_through_lmms_eval_in_one_multirun(omni_conf, tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "run.py", "-m", "--config-dir", str(omni_conf), "model=tiny_omni",
           "method=" + ",".join(ALL_METHODS), "suite=tiny_modality", "evaluator=lmms_eval", "evaluator.limit=2",
           "evaluator.max_new_tokens=4", "evaluator.log_samples=true", "logger=none", "device=cpu",
           "seed=0", f"runs_dir={tmp_path / 'runs'}", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = {}
    for job_dir in sorted(p for p in sweep.iterdir() if p.is_dir()):
        report = json.loads((job_dir / "merge_report.json").read_text())
        rows = _rows(job_dir)
        assert {"modality_music_avqa", "modality_avqa", "avg:all"} <= set(rows), job_dir.name
        assert rows["modality_avqa"]["n_samples"] == 2 and rows["modality_music_avqa"]["metric"] == "exact_match"
        samples = (job_dir / "samples.jsonl").read_text().splitlines()
        assert len(samples) == 4
        assert report["totals"]["merged"] == 28 and report["totals"]["kept"] == 66
        assert report["params"]["merge_space"] == "factor"
        assert not (job_dir / "merged").exists()  # evaluated in memory
        seen[report["method"]] = report
    assert sorted(seen) == sorted(ALL_METHODS)
    # OptMerge's null values came from the modality preset
    assert seen["optmerge"]["scaling"] == 1.0
    assert seen["optmerge"]["params"]["lr"] == 5e-2 and seen["optmerge"]["params"]["projector"] == "full"


def test_expert_reference_row_from_a_written_folder(omni_conf, tmp_path):
    cmd = [sys.executable, "run.py", "--config-dir", str(omni_conf), "model=tiny_omni", "method=expert",
           "method.expert=video", "suite=tiny_modality", "evaluator=lmms_eval", "evaluator.limit=1",
           "evaluator.max_new_tokens=4", "logger=none", "device=cpu", "save_merged=true",
           f"runs_dir={tmp_path / 'runs'}", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "run"
    assert _rows(run)["modality_avqa"]["params"]["expert"] == "video"
    cfg = json.loads((run / "merged" / "omni_config.json").read_text())
    assert set(cfg["modalities"]) == {"video"}  # one modality's LoRA alone, only its encoder


def test_bad_omni_input_is_one_error_line(omni_conf, tmp_path):
    cmd = [sys.executable, "run.py", "--config-dir", str(omni_conf), "model=tiny_omni", "method=ties",
           "model.merge_space=sideways", "suite=none", "evaluator=none", "logger=none",
           f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "error: model.merge_space: 'sideways' is not one of factor, product_dense, product_svd" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_vicuna_omni_and_suite_modality_compose(tmp_path):
    cmd = [sys.executable, "run.py", "model=vicuna_omni", "method=optmerge", "suite=modality", "--cfg", "job"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import yaml

    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["family"] == "omni" and cfg["model"]["finetune"] == "modality"
    assert cfg["model"]["base"] == "lmsys/vicuna-7b-v1.5"
    assert cfg["model"]["experts"]["audio"] == "Adu2021/ModelCompose/multimodal-vicuna-7b-v1.5-audio-naivemc"
    assert set(cfg["model"]["encoders"]) == {"vision", "audio", "video"}
    assert [t["label"] for t in cfg["suite"]["tasks"]] == ["MUSIC-AVQA", "AVQA"]
