"""The streaming engine through the real CLI: formulas, selection, adapters, shards, errors, atomicity."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmbench_merge import MergeError
from mmbench_merge.checkpoints import SafetensorsCheckpoint
from mmbench_merge.engine import Selection, tensor_seed
from mmbench_merge.fixtures import SELECTION, TASKS

from .conftest import ROOT, run_cli
from .test_methods_basic import _ties_reference


def _merge(tiny_conf, out, *overrides):
    return run_cli("--config-dir", str(tiny_conf), "evaluator=none", "logger=none", "suite=none",
                   f"hydra.run.dir={out}", *overrides)  # fmt: skip


def _expert_dirs(tiny_root, arch):
    return {t: tiny_root / arch / t for t in TASKS}


def test_ties_merge_writes_a_loadable_checkpoint_equal_to_the_formula(tiny_root, tiny_conf, tmp_path):
    out = tmp_path / "run"
    _merge(tiny_conf, out, "model=tiny_internvl", "method=ties", "method.trim_scope=tensor", "method.scaling=0.7",
           "save_merged=true")
    merged_dir = out / "merged"
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(merged_dir)
    assert type(model).__name__ == "InternVLForConditionalGeneration"

    base = SafetensorsCheckpoint(tiny_root / "internvl" / "base")
    merged = SafetensorsCheckpoint(merged_dir)
    experts = {t: SafetensorsCheckpoint(p) for t, p in _expert_dirs(tiny_root, "internvl").items()}
    assert merged.keys() == base.keys()
    include, exclude = SELECTION["internvl"]
    selection = Selection(include, exclude)
    n_merged = 0
    for name in base.keys():
        assert merged.shape(name) == base.shape(name) and merged.dtype(name) == base.dtype(name)
        if not selection.selects(name):
            assert torch.equal(merged.get(name), base.get(name)), f"{name} must keep the base's bytes"
            continue
        n_merged += 1
        theta0 = base.get(name).float()
        taus = np.stack([(e.get(name).float() - theta0).numpy() for e in experts.values()])
        expected = (theta0 + 0.7 * torch.from_numpy(_ties_reference(taus, 0.2))).to(torch.bfloat16)
        torch.testing.assert_close(merged.get(name), expected, atol=0, rtol=1e-2)
    assert n_merged == 2 * 7 + 2  # 2 layers x 7 linears + the projector's two linears
    report = json.loads((out / "merge_report.json").read_text())
    assert report["totals"]["merged"] == n_merged and report["totals"]["kept"] == len(base.keys()) - n_merged
    assert report["totals"]["peak_rss_bytes"] > 0 and all("seconds" in t for t in report["tensors"])
    assert (out / ".hydra" / "config.yaml").is_file()


def test_lora_adapter_expert_gives_the_same_merge_as_its_full_weights(tiny_root, tiny_conf, tmp_path):
    _merge(tiny_conf, tmp_path / "a", "model=tiny_qwen2_vl", "method=task_arithmetic", "save_merged=true")
    _merge(tiny_conf, tmp_path / "f", "model=tiny_qwen2_vl_full", "method=task_arithmetic", "save_merged=true")
    from_adapter = SafetensorsCheckpoint(tmp_path / "a" / "merged")
    from_full = SafetensorsCheckpoint(tmp_path / "f" / "merged")
    base = SafetensorsCheckpoint(tiny_root / "qwen2_vl" / "base")
    for name in base.keys():
        a, f = from_adapter.get(name).float(), from_full.get(name).float()
        # Within bf16 rounding: the full expert was stored in bf16 after PEFT merged the adapter.
        torch.testing.assert_close(a, f, atol=2e-2, rtol=2e-2)
    report = json.loads((tmp_path / "a" / "merge_report.json").read_text())
    assert report["experts"]["ocr"] == "lora_adapter" and report["experts"]["vqa"] == "full"


def test_sharded_input_and_sharded_output(tiny_root, tiny_conf, tmp_path):
    assert (tiny_root / "qwen2_vl" / "base" / "model.safetensors.index.json").is_file(), "fixture should be sharded"
    out = tmp_path / "run"
    _merge(tiny_conf, out, "model=tiny_qwen2_vl", "method=weight_average", "save_merged=true", "shard_size_mb=0.05")
    index = json.loads((out / "merged" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(out / "merged")
    # weight_average: every selected tensor is the mean of the experts (theta_0 + mean tau_i).
    name = "model.layers.0.self_attn.q_proj.weight"
    experts = [SafetensorsCheckpoint(tiny_root / "qwen2_vl" / f"{t}_merged" if t == "ocr" else tiny_root / "qwen2_vl" / t)
               for t in TASKS]  # fmt: skip
    expected = torch.stack([e.get(name).float() for e in experts]).mean(0)
    torch.testing.assert_close(SafetensorsCheckpoint(out / "merged").get(name).float(), expected, atol=3e-2, rtol=2e-2)
    assert model is not None


def test_dare_is_deterministic_per_seed(tiny_conf, tmp_path):
    for name, seed in (("s0a", 0), ("s0b", 0), ("s1", 1)):
        _merge(tiny_conf, tmp_path / name, "model=tiny_llava", "method=dare_ta", f"seed={seed}", "save_merged=true")
    read = lambda n: (tmp_path / n / "merged" / "model.safetensors").read_bytes()  # noqa: E731
    assert read("s0a") == read("s0b")
    assert read("s0a") != read("s1")
    assert tensor_seed(0, "a") != tensor_seed(0, "b") and tensor_seed(0, "a") == tensor_seed(0, "a")


def test_selection_include_and_exclude():
    s = Selection(include=[r"layers\.\d+\..*weight$"], exclude=["norm", r"\.bias$"])
    assert s.selects("model.layers.3.mlp.up_proj.weight")
    assert not s.selects("model.layers.3.input_layernorm.weight")
    assert not s.selects("model.embed_tokens.weight")
    assert Selection().selects("anything")
    with pytest.raises(MergeError, match=r"model.merge: bad regex '\('"):
        Selection(include=["("])


def test_hydra_rejects_unknown_keys_and_wrong_types(tiny_conf, tmp_path):
    proc = run_cli("--config-dir", str(tiny_conf), "model=tiny_llava", "method=ties", "method.foo=1", check=False)
    assert proc.returncode != 0 and "Key 'foo' not in 'TiesConfig'" in proc.stderr + proc.stdout
    proc = run_cli("--config-dir", str(tiny_conf), "model=tiny_llava", "method=ties", "method.density=abc", check=False)
    assert proc.returncode != 0 and "Value 'abc' of type 'str' could not be converted to Float" in proc.stderr + proc.stdout
    proc = run_cli("--config-dir", str(tiny_conf), "model=tiny_llava", "save_merged=maybe", check=False)
    assert proc.returncode != 0 and "save_merged" in proc.stderr + proc.stdout


def _one_error_line(proc):
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    return errors[0]


def test_bad_inputs_give_one_clear_line(tiny_root, tiny_conf, tmp_path):
    common = ["--config-dir", str(tiny_conf), "evaluator=none", "logger=none", "suite=none", "model=tiny_llava"]
    proc = run_cli(*common, f"hydra.run.dir={tmp_path / 'a'}", "model.experts.vqa=/nonexistent/expert", check=False)
    assert "/nonexistent/expert: no such checkpoint directory" in _one_error_line(proc)
    proc = run_cli(*common, f"hydra.run.dir={tmp_path / 'b'}", "device=gpu", check=False)
    assert "device: expected auto, cpu, cuda or cuda:N, got 'gpu'" in _one_error_line(proc)
    proc = run_cli(*common, f"hydra.run.dir={tmp_path / 'c'}", "model.files_from=nobody", check=False)
    assert "model.files_from: 'nobody' is neither 'base' nor an expert" in _one_error_line(proc)
    # An expert whose tensor has the wrong shape: named with its file.
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    tensors = load_file(tiny_root / "llava" / "vqa" / "model.safetensors")
    tensors["language_model.model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3, dtype=torch.bfloat16)
    save_file(tensors, broken / "model.safetensors")
    proc = run_cli(*common, f"hydra.run.dir={tmp_path / 'd'}", f"model.experts.vqa={broken}", check=False)
    line = _one_error_line(proc)
    assert "broken/model.safetensors: tensor language_model.model.layers.0.mlp.up_proj.weight has shape [3, 3]" in line


def test_a_crash_leaves_no_merged_checkpoint(tiny_root, tiny_conf, tmp_path):
    from safetensors.torch import load_file, save_file

    nan_expert = tmp_path / "nan"
    nan_expert.mkdir()
    tensors = load_file(tiny_root / "llava" / "vqa" / "model.safetensors")
    # The last merged tensor in file order, so that shards are already being written when it fails.
    name = sorted(k for k in tensors if "layers.1.self_attn.v_proj.weight" in k)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, nan_expert / "model.safetensors")
    out = tmp_path / "run"
    proc = run_cli("--config-dir", str(tiny_conf), "evaluator=none", "logger=none", "suite=none", "model=tiny_llava",
                   f"model.experts.vqa={nan_expert}", "save_merged=true", f"hydra.run.dir={out}", check=False)  # fmt: skip
    assert f"tensor {name} has NaN or Inf values (expert vqa)" in _one_error_line(proc)
    assert not (out / "merged").exists() and not list(out.glob(".merged.tmp-*"))
    assert not (out / "merge_report.json").exists()


def test_import_is_light():
    code = ("import sys, mmbench_merge, mmbench_merge.config, mmbench_merge.methods, mmbench_merge.results;"
            "heavy = [m for m in ('torch', 'transformers', 'lmms_eval', 'vllm', 'wandb', 'matplotlib') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, f"importing mmbench_merge pulled in {proc.stdout.strip()}"


def test_preset_values_are_reported_as_used(tiny_conf, tmp_path):
    """OptMerge's composed config holds nulls; the report and the end-of-run summary show the preset's values."""
    out = tmp_path / "run"
    proc = _merge(tiny_conf, out, "model=tiny_internvl", "method=optmerge", "method.iters=3")
    report = json.loads((out / "merge_report.json").read_text())
    assert report["scaling"] == 0.1  # the full fine-tuning preset
    assert report["params"] == {"center": True, "init": "sum", "optimizer": "adam", "lr": 1e-5, "iters": 3,
                                "solver": "loop"}
    summary = [line for line in proc.stdout.splitlines() if line.startswith("== tiny_internvl / optmerge")]
    assert summary and "scaling=0.1" in summary[0] and "center=True" in summary[0] and "None" not in summary[0]
