"""Every merge method through the real Hydra app: one `run.py -m` over all ten methods on the tiny fixtures of
both model families, and `run.py method=X --cfg job` showing each method's defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from mmbench_merge.config import METHOD_SCHEMAS
from mmbench_merge.methods import list_methods

REPO = Path(__file__).resolve().parents[1]
ALL_METHODS = ["weight_average", "task_arithmetic", "ties", "dare_ta", "dare_ties",
               "tsv", "iso_c", "iso_cts", "wudi", "optmerge"]  # fmt: skip


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", ""),
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
        MMBENCH_CACHE=str(tmp_path / "cache"),
        WANDB_MODE="disabled",
        OMP_NUM_THREADS="1",  # tiny tensors: threads only add contention on a shared machine
    )
    return env


def test_registry_lists_the_ten_methods_in_table_order():
    assert list_methods() == ALL_METHODS


@pytest.fixture(scope="module")
def fixture_conf(tiny_root, tmp_path_factory) -> Path:
    """Model YAMLs for the session's tiny families: Qwen2-VL under the LoRA preset (its ocr expert is a PEFT
    adapter), InternVL under the full fine-tuning preset, as in the paper."""
    from mmbench_merge.fixtures import write_model_yaml

    conf = tmp_path_factory.mktemp("methods_conf")
    for arch, finetune in (("qwen2_vl", "lora"), ("internvl", "full")):
        paths = json.loads((tiny_root / arch / "family.json").read_text())
        write_model_yaml(conf, f"tiny_{arch}", arch, paths, finetune=finetune)
    return conf


def test_all_ten_methods_merge_both_families_in_one_multirun(fixture_conf, tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "run.py", "-m", "--config-dir", str(fixture_conf),
           "model=tiny_qwen2_vl,tiny_internvl", "method=" + ",".join(ALL_METHODS),
           "evaluator=none", "logger=none", "suite=none", "save_merged=false", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    proc = subprocess.run(
        cmd, check=False, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    reports = {}
    for job_dir in sweep.iterdir():
        if not job_dir.is_dir():
            continue
        overrides = dict(kv.split("=", 1) for kv in (job_dir / ".hydra" / "overrides.yaml").read_text()
                         .replace("- ", "").split())  # fmt: skip
        report_path = job_dir / "merge_report.json"
        assert report_path.is_file(), f"{job_dir.name}: no merge_report.json"
        reports[(overrides["model"], overrides["method"])] = json.loads(report_path.read_text())
    assert set(reports) == {(m, x) for m in ("tiny_qwen2_vl", "tiny_internvl") for x in ALL_METHODS}

    for (model, method), report in reports.items():
        assert report["method"] == method
        totals = report["totals"]
        assert totals["merged"] > 0 and totals["kept"] > 0, (model, method, totals)
        # Only the language model's linear weights (and InternVL's projector) are merged: all 2-D.
        assert all(len(t["shape"]) == 2 for t in report["tensors"] if t["merged"])
    # OptMerge's null scaling came from the preset of each family's fine-tuning regime.
    assert reports[("tiny_qwen2_vl", "optmerge")]["scaling"] == 1.0
    assert reports[("tiny_internvl", "optmerge")]["scaling"] == 0.1


def test_cfg_job_shows_each_methods_defaults(tmp_path):
    def cfg_job(method):
        cmd = [sys.executable, "run.py", "model=qwen2vl", f"method={method}", "--cfg", "job"]
        return subprocess.Popen(cmd, cwd=REPO, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip

    procs = {method: cfg_job(method) for method in ALL_METHODS}
    shown = {}
    for method, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        shown[method] = yaml.safe_load(out)["method"]
        # Every hyperparameter of the schema is printed, with the value the YAML gives it.
        assert set(shown[method]) == {f.name for f in fields(METHOD_SCHEMAS[method])}, method
    # The defaults the issue states.
    assert shown["tsv"] == {"name": "tsv", "scaling": 1.0, "rank_fraction": None}
    assert shown["iso_c"] == {"name": "iso_c", "scaling": 1.0}
    assert shown["iso_cts"] == {"name": "iso_cts", "scaling": 1.0, "common_fraction": 0.8}
    assert shown["wudi"] == {"name": "wudi", "scaling": 1.0, "iters": 300, "lr": 1e-5, "optimizer": "adam",
                             "init": "sum", "momentum": 0.9}  # fmt: skip
    assert shown["optmerge"] == {"name": "optmerge", "scaling": None, "rank_fraction": None, "center": None,
                                 "init": None, "optimizer": None, "lr": None, "momentum": None,
                                 "iters": 300, "projector": None, "solver": None}  # fmt: skip
    assert shown["ties"] == {"name": "ties", "scaling": 1.0, "density": 0.2, "trim_scope": None}
    assert shown["dare_ties"] == {"name": "dare_ties", "scaling": 1.0, "drop_rate": 0.2, "density": 0.2,
                                  "trim_scope": None}
    assert shown["dare_ta"] == {"name": "dare_ta", "scaling": 0.3, "drop_rate": 0.2}
    assert shown["task_arithmetic"] == {"name": "task_arithmetic", "scaling": 0.3}
    assert shown["weight_average"] == {"name": "weight_average", "scaling": 1.0}


def test_default_method_is_optmerge():
    conf = yaml.safe_load((REPO / "conf" / "config.yaml").read_text())
    assert {"method": "optmerge"} in conf["defaults"]
