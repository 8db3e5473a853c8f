"""The bad-input catalogue (issue 11, docs/reliability.md): every case gives exactly one `error:` line naming the
file / tensor / key and what is wrong, and leaves nothing a later run would trust (no merged/, no results.jsonl,
no merge_report.json, no temporary directory; run.json says failed).

Cases run in process (Hydra's compose API + runner.run, as app.main_app would, with save_merged=true so a
partial checkpoint would show); a few run the real CLI, where exit code 2 and stderr are the point.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmbench_merge import MergeError
from mmbench_merge.checkpoints import SafetensorsCheckpoint
from mmbench_merge.config import register_configs
from mmbench_merge.families import FAMILIES

from .conftest import ROOT, run_cli

CONF = ROOT / "conf"
COMMON = ["evaluator=none", "logger=none", "suite=none", "device=cpu", "save_merged=true"]


def compose_cfg(tiny_conf: Path, runs_dir: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[
            f"hydra.searchpath=[file://{tiny_conf}]", "model=tiny_llava", "method=task_arithmetic", *COMMON,
            f"runs_dir={runs_dir}", *overrides])  # fmt: skip


def run_in_process(cfg, run_dir: Path) -> str | None:
    """What app.main_app prints for this config: the `error:` line, or None when the run completes."""
    from mmbench_merge.runner import run

    try:
        run(cfg, run_dir)
    except MergeError as exc:
        return f"error: {exc}"
    return None


def assert_nothing_trusted(run_dir: Path) -> None:
    assert not (run_dir / "results.jsonl").exists(), "a failed run must not look complete"
    assert not (run_dir / "merged").exists(), "a failed run must leave no merged checkpoint"
    assert not (run_dir / "merge_report.json").exists()
    assert not list(run_dir.glob(".*.tmp-*")), f"temporary files left: {list(run_dir.glob('.*.tmp-*'))}"
    if (run_dir / "run.json").exists():
        assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"


def check_case(tiny_conf, tmp_path, overrides, expected, mutate=None, run_dir=None):
    runs = tmp_path / "runs"
    run_dir = run_dir or runs / "job"
    cfg = compose_cfg(tiny_conf, runs, *overrides)
    if mutate is not None:
        mutate(cfg)
    line = run_in_process(cfg, run_dir)
    assert line == expected
    assert "\n" not in line
    assert_nothing_trusted(run_dir)


# ------------------------------------------------------------------------------------------ config values
FRACTION = "a value in (0, 1]"
POSITIVE = "a finite value > 0"
CONFIG_CASES = {
    "ties_density_above_one": (["method=ties", "method.density=1.5"], f"method.density: ties needs {FRACTION}, got 1.5"),
    "ties_density_zero": (["method=ties", "method.density=0"], f"method.density: ties needs {FRACTION}, got 0.0"),
    "dare_ties_density": (["method=dare_ties", "method.density=-0.2"],
                          f"method.density: dare_ties needs {FRACTION}, got -0.2"),
    "dare_ta_drop_rate_one": (["method=dare_ta", "method.drop_rate=1.0"],
                              "method.drop_rate: dare_ta needs a value in [0, 1), got 1.0"),
    "dare_ties_drop_rate_negative": (["method=dare_ties", "method.drop_rate=-0.1"],
                                     "method.drop_rate: dare_ties needs a value in [0, 1), got -0.1"),
    "tsv_rank_fraction": (["method=tsv", "method.rank_fraction=1.5"],
                          f"method.rank_fraction: tsv needs {FRACTION}, got 1.5"),
    "optmerge_rank_fraction": (["method=optmerge", "method.rank_fraction=0"],
                               f"method.rank_fraction: optmerge needs {FRACTION}, got 0.0"),
    "iso_cts_common_fraction": (["method=iso_cts", "method.common_fraction=2"],
                                f"method.common_fraction: iso_cts needs {FRACTION}, got 2.0"),
    "scaling_zero": (["method.scaling=0"], f"method.scaling: task_arithmetic needs {POSITIVE}, got 0.0"),
    "scaling_negative": (["method.scaling=-0.5"], f"method.scaling: task_arithmetic needs {POSITIVE}, got -0.5"),
    "scaling_nan": (["method.scaling=nan"], f"method.scaling: task_arithmetic needs {POSITIVE}, got nan"),
    "scaling_inf": (["method=ties", "method.scaling=inf"], f"method.scaling: ties needs {POSITIVE}, got inf"),
    "wudi_iters_negative": (["method=wudi", "method.iters=-1"], "method.iters: wudi needs an integer >= 0, got -1"),
    "wudi_lr_zero": (["method=wudi", "method.lr=0"], f"method.lr: wudi needs {POSITIVE}, got 0.0"),
    "wudi_optimizer": (["method=wudi", "method.optimizer=rmsprop"],
                       "method.optimizer: wudi takes one of adam, sgd, got 'rmsprop'"),
    "optmerge_momentum": (["method=optmerge", "method.momentum=1.0"],
                          "method.momentum: optmerge needs a value in [0, 1), got 1.0"),
    "evaluator_limit_zero": (["evaluator.limit=0"],
                             "evaluator.limit: needs a positive number of samples per task (or null), got 0"),
    "evaluator_limit_negative": (["evaluator.limit=-3"],
                                 "evaluator.limit: needs a positive number of samples per task (or null), got -3"),
    "shard_size_zero": (["shard_size_mb=0"], "shard_size_mb: needs a positive finite size in MB, got 0.0"),
    "shard_size_negative": (["shard_size_mb=-1"], "shard_size_mb: needs a positive finite size in MB, got -1.0"),
    "bad_device": (["device=gpu"], "device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
    "bad_regex": (["model.merge.include=['(']"],
                  "model.merge: bad regex '(' (missing ), unterminated subpattern at position 0)"),
    "unknown_family": (["model.family=gpt"], f"model.family: unknown family 'gpt'; known: {', '.join(FAMILIES)}"),
    "files_from_nobody": (["model.files_from=nobody"],
                          "model.files_from: 'nobody' is neither 'base' nor an expert "
                          "(vqa, geometry, chart, ocr, grounding)"),
    "weight_average_scaling": (["method=weight_average", "method.scaling=0.5"],
                               "method.scaling: weight_average has its scaling fixed at 1.0 (got 0.5); "
                               "sweep scaling with task_arithmetic instead"),
    "missing_base": (["model.base=/nonexistent/base"],
                     "/nonexistent/base: no such checkpoint directory (and not a hub id of the form owner/name)"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_value(case, tiny_conf, tmp_path):
    overrides, message = CONFIG_CASES[case]
    check_case(tiny_conf, tmp_path, overrides, f"error: {message}")


def test_device_cuda_without_gpu(tiny_conf, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    check_case(tiny_conf, tmp_path, ["device=cuda"], "error: device: cuda requested but torch sees no CUDA device")


@pytest.mark.parametrize("method", ["ties", "dare_ties", "tsv", "iso_c", "iso_cts", "wudi", "optmerge"])
def test_methods_that_need_two_experts_given_one(method, tiny_conf, tmp_path, tiny_root):
    def one_expert(cfg):
        cfg.model.experts = {"vqa": str(tiny_root / "llava" / "vqa")}

    check_case(tiny_conf, tmp_path, [f"method={method}"],
               f"error: model.experts: {method} merges at least 2 experts, got 1 "
               "(with one expert use task_arithmetic, or method=expert for the expert itself)", one_expert)  # fmt: skip


def test_one_expert_task_arithmetic_still_runs(tiny_conf, tmp_path, tiny_root):
    cfg = compose_cfg(tiny_conf, tmp_path / "runs")
    cfg.model.experts = {"vqa": str(tiny_root / "llava" / "vqa")}
    assert run_in_process(cfg, tmp_path / "runs" / "job") is None
    assert (tmp_path / "runs" / "job" / "merged" / "model.safetensors").is_file()


def test_no_experts(tiny_conf, tmp_path):
    def none(cfg):
        cfg.model.experts = {}

    check_case(tiny_conf, tmp_path, [], "error: model.experts: no experts given (task_arithmetic merges at least 1)",
               none)  # fmt: skip


def test_base_given_as_a_file(tiny_conf, tmp_path):
    file = tmp_path / "base.safetensors"
    file.write_bytes(b"x")
    check_case(tiny_conf, tmp_path, [f"model.base={file}"], f"error: {file}: is a file, expected a checkpoint directory")


def test_hub_id_offline(tiny_conf, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runs = tmp_path / "runs"
    line = run_in_process(compose_cfg(tiny_conf, runs, "model.experts.vqa=nobody/no-such-model"), runs / "job")
    assert line.startswith("error: nobody/no-such-model: could not be fetched from the hub (") and "\n" not in line
    assert_nothing_trusted(runs / "job")


# ------------------------------------------------------------------------------------------ runs_dir
def test_runs_dir_is_a_file(tiny_conf, tmp_path):
    file = tmp_path / "runs"
    file.write_text("")
    cfg = compose_cfg(tiny_conf, file)
    other = tmp_path / "job"
    assert run_in_process(cfg, other) == f"error: runs_dir: {file} is a file, expected a directory"
    assert_nothing_trusted(other)


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only tmpfs (root can write anywhere else); skipped where mounting is not allowed."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        if os.geteuid() != 0:
            mnt.chmod(0o555)
            yield mnt
            mnt.chmod(0o755)
            return
        pytest.skip(f"cannot mount a read-only tmpfs: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_runs_dir_unwritable(tiny_conf, tmp_path, read_only_dir):
    runs = read_only_dir / "runs"
    cfg = compose_cfg(tiny_conf, runs)
    assert run_in_process(cfg, tmp_path / "job") == (
        f"error: runs_dir: {runs} is not writable (cannot be created in {read_only_dir})")
    assert_nothing_trusted(tmp_path / "job")


# ------------------------------------------------------------------------------------------ checkpoints
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _expert(tiny_root, tmp_path, name="vqa", arch="llava") -> Path:
    return _copy(tiny_root / arch / name, tmp_path / f"bad_{name}")


def _header_end(file: Path) -> tuple[str, int, int]:
    """(name of the tensor whose data ends last, its end offset, header length)."""
    raw = file.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + hlen])
    header.pop("__metadata__", None)
    name = max(header, key=lambda k: header[k]["data_offsets"][1])
    return name, header[name]["data_offsets"][1], hlen


def _case_bin_only(tiny_root, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(tiny_root / "llava" / "vqa" / "config.json", d)
    marker = tmp_path / "UNPICKLED"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    line = (f"{d}: only pickled weights (pytorch_model.bin), which are never loaded; "
            "convert the checkpoint to safetensors (model.safetensors)")  # fmt: skip
    return [f"model.experts.vqa={d}"], line, lambda: not marker.exists()


def _case_garbage_header(tiny_root, tmp_path):
    d = _expert(tiny_root, tmp_path)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 16) + b"this is not json")
    return ([f"model.experts.vqa={d}"],
            f"{d / 'model.safetensors'}: not a safetensors file (Expecting value: line 1 column 1 (char 0))")


def _case_header_past_file(tiny_root, tmp_path):
    d = _expert(tiny_root, tmp_path)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 5000) + b"{}")
    return ([f"model.experts.vqa={d}"], f"{d / 'model.safetensors'}: not a safetensors file "
            "(header length 5000 runs past the end of the file (10 bytes))")  # fmt: skip


def _case_huge_header(tiny_root, tmp_path):
    d = _expert(tiny_root, tmp_path)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    return ([f"model.experts.vqa={d}"],
            f"{d / 'model.safetensors'}: not a safetensors file (header length 1000000000000 is implausible)")


def _case_data_short(tiny_root, tmp_path):
    d = _expert(tiny_root, tmp_path)
    f = d / "model.safetensors"
    name, end, hlen = _header_end(f)
    os.truncate(f, f.stat().st_size - 10)
    held = f.stat().st_size - 8 - hlen
    return ([f"model.experts.vqa={d}"],
            f"{f}: truncated: tensor {name} ends at byte {end} of the data but the file holds {held}")


def _case_missing_shard(tiny_root, tmp_path):
    d = _expert(tiny_root, tmp_path, arch="qwen2_vl")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) >= 2, "the qwen2_vl fixture is sharded"
    shards[-1].unlink()
    return ["model=tiny_qwen2_vl", f"model.experts.vqa={d}"], f"{shards[-1]}: file not found"


def _rewrite(d: Path, edit) -> Path:
    f = d / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})
    return f


def _case_missing_tensor(tiny_root, tmp_path):
    d = _expert(tiny_root, tmp_path)
    name = "language_model.model.layers.1.mlp.down_proj.weight"
    _rewrite(d, lambda t: t.pop(name))
    return [f"model.experts.vqa={d}"], f"{d}: tensor {name} of the base is missing"


def _case_extra_tensor(tiny_root, tmp_path):
    d = _expert(tiny_root, tmp_path)
    f = _rewrite(d, lambda t: t.update({"extra.weight": torch.zeros(2, dtype=torch.bfloat16)}))
    return [f"model.experts.vqa={d}"], f"{f}: tensor extra.weight is not in the base {tiny_root / 'llava' / 'base'}"


def _case_shape_mismatch(tiny_root, tmp_path):
    d = _expert(tiny_root, tmp_path)
    name = "language_model.model.layers.0.mlp.up_proj.weight"
    f = _rewrite(d, lambda t: t.update({name: torch.zeros(3, 3, dtype=torch.bfloat16)}))
    shape = list(SafetensorsCheckpoint(tiny_root / "llava" / "base").shape(name))
    return [f"model.experts.vqa={d}"], f"{f}: tensor {name} has shape [3, 3], base has {shape}"


def _case_dtype_mismatch(tiny_root, tmp_path):
    d = _expert(tiny_root, tmp_path)
    f = _rewrite(d, lambda t: t.update({k: v.float() for k, v in t.items()}))
    first = SafetensorsCheckpoint(tiny_root / "llava" / "base").keys()[0]
    return ([f"model.experts.vqa={d}"], f"{f}: tensor {first} is F32, base has BF16 "
            "(convert the expert to the base's dtype; it is not cast silently)")  # fmt: skip


def _nan_in(d: Path, name: str, value=float("nan")) -> Path:
    def edit(t):
        t[name] = t[name].clone()
        t[name].view(-1)[3] = value

    return _rewrite(d, edit)


def _case_nan_in_merged_expert_tensor(tiny_root, tmp_path):
    d = _expert(tiny_root, tmp_path)
    name = "language_model.model.layers.1.self_attn.v_proj.weight"
    _nan_in(d, name)
    return [f"model.experts.vqa={d}"], f"{d}: tensor {name} has NaN or Inf values (expert vqa)"


def _case_nan_in_kept_base_tensor(tiny_root, tmp_path):
    d = _copy(tiny_root / "llava" / "base", tmp_path / "bad_base")
    name = "language_model.model.embed_tokens.weight"  # excluded from the merge: written as the base's bytes
    f = _nan_in(d, name)
    return [f"model.base={d}"], f"{f}: tensor {name} of the base has NaN or Inf values"


def _case_inf_in_merged_base_tensor(tiny_root, tmp_path):
    d = _copy(tiny_root / "llava" / "base", tmp_path / "bad_base")
    name = "language_model.model.layers.0.mlp.gate_proj.weight"
    f = _nan_in(d, name, float("inf"))
    return [f"model.base={d}"], f"{f}: tensor {name} of the base has NaN or Inf values"


def _case_empty_expert_dir(tiny_root, tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return ([f"model.experts.vqa={d}"],
            f"{d}: no model.safetensors or model.safetensors.index.json (and no adapter_config.json)")


def _adapter_edit(tiny_root, tmp_path, edit):
    d = _copy(tiny_root / "llava" / "ocr", tmp_path / "bad_adapter")
    f = d / "adapter_model.safetensors"
    tensors = load_file(f)
    result = edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})
    return d, f, result


def _case_adapter_target_not_in_base(tiny_root, tmp_path):
    def rename(tensors):
        keys = [k for k in tensors if ".layers.0.self_attn.q_proj." in k]
        for k in keys:
            tensors[k.replace("q_proj", "qkv_fused")] = tensors.pop(k)
        a_key = [k for k in keys if "lora_A" in k][0].replace("q_proj", "qkv_fused")
        return a_key.removeprefix("base_model.model.").split(".lora_A")[0]

    d, f, module = _adapter_edit(tiny_root, tmp_path, rename)
    return ([f"model.experts.ocr={d}"],
            f"{f}: module {module} matches no tensor of the base checkpoint {tiny_root / 'llava' / 'base'}")


def _case_adapter_for_another_base(tiny_root, tmp_path):
    from mmbench_merge.families import attribute_names, get_family

    def widen(tensors):
        a_key = sorted(k for k in tensors if ".layers.0.mlp.up_proj.lora_A" in k)[0]
        r, n = tensors[a_key].shape
        tensors[a_key] = torch.zeros(r, n + 8, dtype=tensors[a_key].dtype)
        b_key = a_key.replace("lora_A", "lora_B")
        return a_key.removeprefix("base_model.model.").split(".lora_A")[0], tensors[b_key].shape[0], n + 8

    d, f, (module, out_f, in_f) = _adapter_edit(tiny_root, tmp_path, widen)
    base = SafetensorsCheckpoint(tiny_root / "llava" / "base")
    target = attribute_names(get_family("llava"), base.path, base.keys())[module + ".weight"]
    return ([f"model.experts.ocr={d}"], f"{f}: {module} gives a delta of shape {(out_f, in_f)} "
            f"but base tensor {target} has shape {base.shape(target)}")  # fmt: skip


CHECKPOINT_CASES = {name.removeprefix("_case_"): fn for name, fn in globals().items() if name.startswith("_case_")}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_bad_checkpoint(case, tiny_root, tiny_conf, tmp_path):
    overrides, message, *extra = CHECKPOINT_CASES[case](tiny_root, tmp_path)
    check_case(tiny_conf, tmp_path, overrides, f"error: {message}")
    for check in extra:
        assert check(), f"{case}: side effect check failed"


def test_disk_full_while_writing(tiny_conf, tmp_path):
    """A tmpfs smaller than the merged checkpoint: one line naming the shard, nothing left but run.json."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {proc.stderr.decode().strip()}")
    try:
        run_dir = mnt / "job"
        cfg = compose_cfg(tiny_conf, tmp_path / "runs")
        line = run_in_process(cfg, run_dir)
        shard = run_dir / f".merged.tmp-{os.getpid()}" / "model.safetensors"
        assert line == f"error: {shard}: could not write (No space left on device)"
        assert_nothing_trusted(run_dir)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_clean_inputs_still_merge(tiny_conf, tmp_path):
    """The checks refuse nothing good: the shipped fixture merges with every method that needs two experts."""
    runs = tmp_path / "runs"
    for method in ("ties", "tsv"):
        assert run_in_process(compose_cfg(tiny_conf, runs, f"method={method}", "rerun=true"), runs / method) is None
        assert (runs / method / "merged" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------ the real CLI
def test_cli_bad_inputs_give_one_line_and_exit_2(tiny_conf, tmp_path):
    """Hydra's own errors (unknown key / option, wrong type) and the runs_dir callback, through run.py."""
    file = tmp_path / "file"
    file.write_text("")
    cases = [
        (["method=ties", "method.density=1.5"], "error: method.density: ties needs a value in (0, 1], got 1.5"),
        (["method=ties", "method.foo=1"],
         "error: Could not override 'method.foo': method.foo: Key 'foo' not in 'TiesConfig'"),
        (["method=nope"], "error: In 'config': Could not find 'method/nope' (available: base, dare_ta, dare_ties, expert, "),
        (["save_merged=maybe"],
         "error: Error merging override save_merged=maybe: save_merged: Value 'maybe' is not a valid bool (type str)"),
        ([f"runs_dir={file}"], f"error: runs_dir: {file} is a file, expected a directory"),
    ]
    for i, (overrides, expected) in enumerate(cases):
        run_dir = tmp_path / f"job{i}"
        proc = run_cli("--config-dir", str(tiny_conf), "model=tiny_llava", *COMMON, f"hydra.run.dir={run_dir}",
                       *overrides, check=False)  # fmt: skip
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert proc.returncode == 2, (overrides, proc.stderr)
        assert len(errors) == 1 and errors[0].startswith(expected), (overrides, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        if expected.endswith(", "):
            continue
        assert errors[0] == expected
        assert not run_dir.exists() or not (run_dir / "merged").exists()


def test_unknown_lmms_eval_task(tiny_conf, tmp_path):
    """Named by the TaskManager check (evaluation/suites.py), which the evaluation runs before any sample."""
    from contextlib import ExitStack

    from mmbench_merge.evaluation import TASKS_DIR
    from mmbench_merge.evaluation.suites import task_manager_for
    from mmbench_merge.families import get_family

    cfg = compose_cfg(tiny_conf, tmp_path / "runs", "suite=paper")
    from mmbench_merge.config import TaskSpec

    cfg.suite.tasks = [TaskSpec(name="no_such_task", category="VQA", metric="acc")]
    with ExitStack() as stack, pytest.raises(MergeError) as err:
        task_manager_for(cfg, get_family("llava"), stack)
    assert f"error: {err.value}" == f"error: suite=paper: task no_such_task not found in {TASKS_DIR / 'paper'}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_base(tiny_root, tiny_conf, tmp_path):
    d = _copy(tiny_root / "llava" / "base", tmp_path / "locked_base")
    (d / "model.safetensors").chmod(0)
    try:
        check_case(tiny_conf, tmp_path, [f"model.base={d}"],
                   f"error: {d / 'model.safetensors'}: not readable (permission denied)")  # fmt: skip
    finally:
        (d / "model.safetensors").chmod(0o644)
