"""Shared fixtures: tiny random checkpoints of the real architectures, built once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Never reach for a hub, never log to a real W&B account from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# W&B keeps state outside the run directory (config, cache, artifacts): keep tests out of the user's folders.
_wandb_home = Path(tempfile.mkdtemp(prefix="mmbench-wandb-"))
for _var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
    os.environ[_var] = str(_wandb_home / _var.lower())


def pytest_sessionfinish(session, exitstatus):
    """Leave no W&B state behind in /tmp."""
    import shutil

    shutil.rmtree(_wandb_home, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """Fixture families: qwen2_vl (its ocr expert a LoRA adapter, sharded files), internvl (all full
    fine-tunes, as in the paper), llava (ocr expert a LoRA adapter)."""
    from mmbench_merge import fixtures

    root = tmp_path_factory.mktemp("tiny")
    for arch, shard, lora in (("qwen2_vl", "60KB", "ocr"), ("internvl", None, None), ("llava", None, "ocr")):
        paths = fixtures.make_family(root / arch, arch, max_shard_size=shard, lora_expert=lora)
        fixtures.write_model_yaml(root / "conf", f"tiny_{arch}", arch, paths)
        if lora is None:
            continue
        # The same family with the LoRA expert given as full weights (adapter merged in).
        full = {"base": paths["base"], "experts": {**paths["experts"], "ocr": paths["experts"]["ocr_merged"]}}
        fixtures.write_model_yaml(root / "conf", f"tiny_{arch}_full", arch, full)
    return root


@pytest.fixture(scope="session")
def tiny_conf(tiny_root) -> Path:
    return tiny_root / "conf"


def run_cli(*args: str, cwd: Path = ROOT, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python run.py ARGS` in a subprocess, as a user would."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"run.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
