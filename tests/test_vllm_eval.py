"""evaluator=vllm: the launch of vLLM's environment as a child process, its environment check, its results.

vLLM needs a GPU and its own environment, neither of which is here. The launch is real all the same: a
stand-in interpreter (an executable script) answers the environment check and writes a results file in
lmms-eval's layout, and the real child module runs under this venv's interpreter with a CPU backend in
place of `vllm`, through lmms-eval on the MiniBench tasks.
"""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
METRICS = {"minibench_vqa": "vqa_acc", "minibench_geometry": "mc_acc", "minibench_chart": "relaxed_acc",
           "minibench_ocr": "exact_match", "minibench_grounding": "acc_iou50"}  # fmt: skip

FAKE_PYTHON = '''#!{python}
import json, os, sys
from pathlib import Path
with open(os.environ["FAKE_VLLM_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1] == "-c":
    if os.environ.get("FAKE_VLLM_MODE") == "no-vllm":
        sys.exit("ModuleNotFoundError: No module named 'vllm'")
    print("vllm 0.0-fake")
    sys.exit(0)
assert sys.argv[1:3] == ["-m", "mmbench_merge.evaluation.vllm_child"], sys.argv
spec = json.loads(Path(sys.argv[3]).read_text())
print("INFO fake vLLM engine starting")
if os.environ.get("FAKE_VLLM_MODE") == "crash":
    print("torch.OutOfMemoryError: CUDA out of memory", file=sys.stderr)
    sys.exit(1)
metrics = json.loads(os.environ["FAKE_VLLM_METRICS"])
results = {{
    "results": {{t: {{"alias": t, metrics[t] + ",none": 0.25 * (i + 1), metrics[t] + "_stderr,none": "N/A"}}
                for i, t in enumerate(spec["tasks"])}},
    "n-samples": {{t: {{"original": 4, "effective": 4}} for t in spec["tasks"]}},
    "configs": {{t: {{"task": t}} for t in spec["tasks"]}},
    "versions": {{t: "Yaml" for t in spec["tasks"]}},
    "mmbench_errors": json.loads(os.environ.get("FAKE_VLLM_ERRORS", "[]")),
}}
out = Path(spec["output_dir"])
out.mkdir(parents=True, exist_ok=True)
(out / "results.json").write_text(json.dumps(results))
'''


@pytest.fixture
def fake_python(tmp_path, monkeypatch):
    script = tmp_path / "venv-vllm" / "bin" / "python"
    script.parent.mkdir(parents=True)
    script.write_text(FAKE_PYTHON.format(python=sys.executable))
    script.chmod(0o755)
    monkeypatch.setenv("FAKE_VLLM_LOG", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("FAKE_VLLM_METRICS", json.dumps(METRICS))
    return script


def compose(*overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mmbench_merge.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def calls(tmp_path):
    return [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]


def test_launch_spec_and_parsing_through_a_stand_in_interpreter(fake_python, tmp_path, capfd):
    from mmbench_merge.evaluation import check
    from mmbench_merge.evaluation.vllm_eval import evaluate_with_vllm
    from mmbench_merge.runner import PreparedModel

    cfg = compose("model=mini_qwen2vl", "suite=minibench", "evaluator=vllm", f"evaluator.python={fake_python}",
                  "evaluator.tensor_parallel_size=2", "evaluator.limit=4")  # fmt: skip
    check(cfg, "cuda")  # the environment check runs the interpreter once
    model_dir = tmp_path / "merged"
    model_dir.mkdir()
    scores = evaluate_with_vllm(cfg, PreparedModel(model_dir=model_dir), "cuda")
    assert [(s.task, s.value, s.n_samples) for s in scores] == [
        (t, pytest.approx(25.0 * (i + 1)), 4) for i, t in enumerate(METRICS)]  # fmt: skip
    check_call, launch_call = calls(tmp_path)
    assert check_call[0] == "-c" and "import vllm, lmms_eval" in check_call[1]
    assert launch_call[:2] == ["-m", "mmbench_merge.evaluation.vllm_child"]
    assert Path(launch_call[2]).name == "spec.json" and not Path(launch_call[2]).exists()  # a temporary dir
    assert "INFO fake vLLM engine starting" in capfd.readouterr().err  # the child's output is streamed


def test_spec_names_the_checkpoint_and_the_family_prompts(tmp_path):
    from mmbench_merge.evaluation.vllm_eval import child_spec

    cfg = compose("model=mini_internvl", "suite=minibench", "evaluator=vllm", "evaluator.tensor_parallel_size=2",
                  "evaluator.max_new_tokens=16", "evaluator.limit=3")  # fmt: skip
    spec = child_spec(cfg, "/ckpt/merged", ["/tasks"], tmp_path / "out", "cuda")
    assert spec["backend"] == "vllm" and spec["prompts_for"] == "internvl_hf"
    assert spec["model_args"] == {"model": "/ckpt/merged", "tensor_parallel_size": 2, "gpu_memory_utilization": 0.8,
                                  "batch_size": 64, "dtype": "float32", "trust_remote_code": False,
                                  "max_new_tokens": 16}  # fmt: skip
    assert spec["tasks"] == list(METRICS) and spec["limit"] == 3 and spec["gen_kwargs"] == "max_new_tokens=16"


@pytest.mark.parametrize("mode, message", [
    ("crash", "evaluator=vllm: lmms-eval \\(vllm backend\\) exited with 1: torch.OutOfMemoryError: CUDA out of memory"),
    ("errors", "lmms-eval reported 1 error\\(s\\) during evaluation; first: generation failed"),
])  # fmt: skip
def test_child_failures_are_one_line_errors(fake_python, tmp_path, monkeypatch, mode, message):
    from mmbench_merge import MergeError
    from mmbench_merge.evaluation.vllm_eval import evaluate_with_vllm
    from mmbench_merge.runner import PreparedModel

    monkeypatch.setenv("FAKE_VLLM_MODE", mode)
    monkeypatch.setenv("FAKE_VLLM_ERRORS", json.dumps(["generation failed"]))
    cfg = compose("model=mini_qwen2vl", "suite=minibench", "evaluator=vllm", f"evaluator.python={fake_python}")
    with pytest.raises(MergeError, match=message):
        evaluate_with_vllm(cfg, PreparedModel(model_dir=tmp_path), "cuda")


def test_environment_check(fake_python, tmp_path, monkeypatch):
    from mmbench_merge import MergeError
    from mmbench_merge.evaluation.vllm_eval import check_environment

    cfg = compose("evaluator=vllm", f"evaluator.python={tmp_path / 'nowhere' / 'python'}")
    with pytest.raises(MergeError, match="no vLLM environment at .*nowhere/python \\(run `make install-vllm`"):
        check_environment(cfg)
    cfg.evaluator.python = None
    monkeypatch.setenv("MMBENCH_VLLM_PYTHON", str(fake_python))
    assert check_environment(cfg) == "vllm 0.0-fake"
    monkeypatch.setenv("FAKE_VLLM_MODE", "no-vllm")
    with pytest.raises(MergeError, match="cannot import vllm and lmms_eval: ModuleNotFoundError: No module named 'vllm'"):
        check_environment(cfg)


def test_the_real_child_runs_lmms_eval_in_its_own_process(tmp_path):
    """vllm_child under this venv's interpreter, with the CPU qwen2_vl backend standing in for vllm."""
    from mmbench_merge.evaluation.vllm_eval import evaluate_with_vllm
    from mmbench_merge.runner import PreparedModel

    cfg = compose("model=mini_qwen2vl", "suite=minibench", "evaluator=vllm", f"evaluator.python={sys.executable}",
                  "evaluator.backend=qwen2_vl", "evaluator.limit=1", "evaluator.batch_size=1",
                  "evaluator.log_samples=true")  # fmt: skip
    scores = evaluate_with_vllm(cfg, PreparedModel(model_dir=Path(cfg.model.base)), "cpu")
    assert [s.task for s in scores] == list(METRICS)
    assert all(s.n_samples == 1 and 0 <= s.value <= 100 and len(s.samples) == 1 for s in scores)
