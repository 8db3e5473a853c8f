"""End to end through lmms-eval on the MiniBench `micro` build (CPU, offline): merge, evaluate, record.

The micro models are barely trained, so the scores themselves say little; what is checked is that every
category gets its row, that each row's value is the mean of the per-sample scores recomputed here from the
model's answers, that the in-memory merge evaluates exactly like the written checkpoint, and that reference
rows and failures take the same path.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ["VQA", "Geometry", "Chart", "OCR", "Grounding"]
LIMIT = 1


@pytest.fixture(scope="module")
def micro_env(tmp_path_factory):
    """A private MiniBench cache with the micro build, selected for the ${minibench:...} model paths."""
    cache = tmp_path_factory.mktemp("mmbench-cache")
    env = {
        "MMBENCH_CACHE": str(cache), "MMBENCH_MINIBENCH_PROFILE": "micro", "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache / "hf-datasets"),
    }  # fmt: skip
    mp = pytest.MonkeyPatch()
    for key, value in env.items():
        mp.setenv(key, value)
    from mmbench_merge.minibench import ensure_built

    root = ensure_built("micro")
    yield {"root": Path(root), "env": env}
    mp.undo()


def compose(*overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mmbench_merge.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def run(tmp_path, name, *overrides):
    from mmbench_merge.results import read_rows
    from mmbench_merge.runner import run as run_once

    cfg = compose(f"evaluator.limit={LIMIT}", "evaluator.log_samples=true", "device=cpu", *overrides)
    run_dir = tmp_path / name
    run_dir.mkdir()
    run_once(cfg, run_dir)
    rows = read_rows(run_dir / "results.jsonl")
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    return cfg, rows, samples


def recompute(task: str, response: str, doc: dict) -> float:
    from mmbench_merge.evaluation import metrics

    kind = task.removeprefix("minibench_")
    if kind == "vqa":
        return metrics.vqa_accuracy(response, doc["answer"])
    if kind == "geometry":
        return metrics.multiple_choice_accuracy(response, doc["choices"], doc["answer"])
    if kind == "chart":
        return metrics.relaxed_accuracy(response, doc["answer"])
    if kind == "ocr":
        return metrics.exact_match(response, doc["answer"])
    return metrics.grounding_accuracy(response, [v / 1000 for v in doc["bbox"]])


def check_rows(rows, samples, root, method):
    import datasets

    tasks = [r for r in rows if not r["task"].startswith("avg:")]
    assert [r["category"] for r in tasks] == CATEGORIES
    assert all(r["n_samples"] == LIMIT and 0 <= r["value"] <= 100 and r["method"] == method for r in tasks)
    averages = {r["task"]: r for r in rows if r["task"].startswith("avg:")}
    assert sorted(averages) == sorted([f"avg:{c}" for c in CATEGORIES] + ["avg:all"])
    assert averages["avg:all"]["value"] == pytest.approx(sum(r["value"] for r in tasks) / len(tasks), abs=1e-3)
    for row in tasks:
        docs = datasets.load_from_disk(str(root / "data" / row["task"].removeprefix("minibench_") / "test"))
        mine = [s for s in samples if s["task"] == row["task"]]
        assert len(mine) == LIMIT
        scores = [recompute(row["task"], s["response"], docs[s["doc_id"]]) for s in mine]
        assert [s[row["metric"]] for s in mine] == pytest.approx(scores)
        assert row["value"] == pytest.approx(100 * sum(scores) / len(scores), abs=1e-3)


def test_merge_in_memory_evaluates_like_the_written_checkpoint(micro_env, tmp_path):
    _, rows, samples = run(tmp_path, "memory", "model=mini_qwen2vl", "method=ties")
    assert not (tmp_path / "memory" / "merged").exists()  # nothing written
    check_rows(rows, samples, micro_env["root"], "ties")
    _, rows_disk, samples_disk = run(tmp_path, "disk", "model=mini_qwen2vl", "method=ties", "save_merged=true")
    assert (tmp_path / "disk" / "merged" / "config.json").is_file()
    assert [s["response"] for s in samples_disk] == [s["response"] for s in samples]
    assert [r["value"] for r in rows_disk] == [r["value"] for r in rows]


@pytest.mark.parametrize("method", [["method=base"], ["method=expert", "method.expert=ocr"]], ids=["base", "expert"])
def test_reference_rows(micro_env, tmp_path, method):
    _, rows, samples = run(tmp_path, "ref", "model=mini_qwen2vl", *method)
    check_rows(rows, samples, micro_env["root"], method[0].split("=")[1])
    assert not (tmp_path / "ref" / "merge_report.json").exists()
    if "method.expert=ocr" in method:
        assert rows[0]["params"] == {"expert": "ocr"}


def test_internvl_family(micro_env, tmp_path):
    _, rows, samples = run(tmp_path, "internvl", "model=mini_internvl", "method=task_arithmetic")
    check_rows(rows, samples, micro_env["root"], "task_arithmetic")


def test_a_task_without_its_metric_fails_the_run(micro_env, tmp_path):
    from mmbench_merge import MergeError
    from mmbench_merge.runner import run as run_once

    cfg = compose("model=mini_qwen2vl", "method=base", "evaluator.limit=1", "device=cpu",
                  "suite.tasks.0.metric=no_such_metric")  # fmt: skip
    with pytest.raises(MergeError, match="minibench_vqa: lmms-eval returned no metric 'no_such_metric'"):
        run_once(cfg, tmp_path)
    assert not (tmp_path / "results.jsonl").exists()


@pytest.mark.slow
def test_cli_defaults_end_to_end(micro_env, tmp_path):
    """`python run.py` with the shipped defaults (MiniBench model, suite, lmms_eval), then a failing run."""
    env = {**os.environ, **micro_env["env"], "PYTHONPATH": str(REPO / "src")}
    ok = subprocess.run([sys.executable, "run.py", f"hydra.run.dir={tmp_path}/cli", "evaluator.limit=1"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "cli" / "results.jsonl").read_text().splitlines()]
    assert {r["category"] for r in rows} == set(CATEGORIES) | {"all"}
    bad = subprocess.run([sys.executable, "run.py", f"hydra.run.dir={tmp_path}/bad", "evaluator.limit=1",
                          "suite.tasks.0.metric=no_such_metric"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert bad.returncode == 2 and "error: task minibench_vqa" in bad.stderr
    assert not (tmp_path / "bad" / "results.jsonl").exists()


@pytest.mark.parametrize("backend, family", [("qwen2_vl", "qwen2_vl"), ("internvl_hf", "internvl")])
def test_minibench_tasks_prompt_and_score_the_trained_format(micro_env, backend, family):
    """Each MiniBench task prompts with minibench.prompts and gives full marks to the answer the model was
    trained to give (prompts.target), in each family's format; a wrong answer scores 0."""
    from contextlib import ExitStack

    import datasets
    from lmms_eval.tasks import TaskManager

    from mmbench_merge.evaluation.suites import render_minibench_tasks
    from mmbench_merge.minibench import prompts

    suite = compose("suite=minibench").suite
    with ExitStack() as stack:
        manager = TaskManager("WARNING", include_path=str(render_minibench_tasks(suite, stack)),
                              include_defaults=False)  # fmt: skip
        for spec in suite.tasks:
            task = spec.name.removeprefix("minibench_")
            config = manager._get_config(spec.name)
            assert [m["metric"] for m in config["metric_list"]] == [spec.metric]
            kwargs = config["lmms_eval_specific_kwargs"][backend]
            docs = datasets.load_from_disk(f"{config['dataset_path']}")["test"]  # the DatasetDict view
            assert len(docs) == len(datasets.load_from_disk(str(micro_env["root"] / "data" / task / "test")))
            for doc in docs:
                assert config["doc_to_text"](doc, kwargs) == prompts.prompt(task, family, doc)
                gold = prompts.target(task, family, doc)
                assert config["process_results"](doc, [gold]) == {spec.metric: 1.0}, (task, gold)
                if task == "grounding":  # as decoded: Qwen2-VL's box tokens are special tokens
                    plain = gold.replace("<|box_start|>", "").replace("<|box_end|>", "")
                    assert config["process_results"](doc, [plain]) == {spec.metric: 1.0}
                wrong = "[[0, 0, 1, 1]]" if task == "grounding" else "zzz"
                assert config["process_results"](doc, [wrong]) == {spec.metric: 0.0}


def test_paper_tasks_run_through_lmms_eval_on_local_copies(micro_env, tmp_path):
    """Three paper tasks (VQA accuracy, the geometry-subset mean, grounding) through lmms-eval's whole
    pipeline with a MiniBench model, on small local datasets shaped like the hub ones (the hub is not
    reachable here): task construction, the dataset hooks, scoring and aggregation."""
    import shutil

    import datasets
    from lmms_eval.tasks import TaskManager
    from PIL import Image

    from mmbench_merge.evaluation import TASKS_DIR
    from mmbench_merge.evaluation.lmms import build_backend, run_tasks
    from mmbench_merge.families import get_family

    image = Image.new("RGB", (112, 112), (255, 255, 255))
    local = {
        "mmb_textvqa_val": ("validation", {"image": [image] * 2, "question": ["what is written?"] * 2,
                                           "answers": [["stop"] * 10, ["go"] * 10], "question_id": [1, 2]}),
        "mmb_mathvista_geo": ("testmini", {
            "pid": ["1", "2", "3"], "decoded_image": [image] * 3, "query": ["Find x."] * 3,
            "question_type": ["free_form", "multi_choice", "free_form"], "answer_type": ["integer", "text", "integer"],
            "choices": [None, ["30", "60"], None], "precision": [None, None, None], "answer": ["3", "60", "4"],
            "metadata": [{"skills": ["algebraic reasoning"], "task": "geometry problem solving"},
                         {"skills": ["geometry reasoning"], "task": "geometry problem solving"},
                         {"skills": ["statistical reasoning"], "task": "figure question answering"}]}),
        "mmb_refcoco_val": ("val", {"image": [image] * 2, "bbox": [[10.0, 10.0, 50.0, 50.0]] * 2,
                                    "answer": [["the red square"], ["the blue circle", "a circle"]],
                                    "question_id": ["1", "2"]}),
    }  # fmt: skip
    tasks_dir = tmp_path / "tasks"
    shutil.copytree(TASKS_DIR / "paper", tasks_dir)
    for name, (split, columns) in local.items():
        data = tmp_path / "data" / name
        datasets.DatasetDict({split: datasets.Dataset.from_dict(columns)}).save_to_disk(str(data))
        yaml = tasks_dir / f"{name}.yaml"
        text = "\n".join(line for line in yaml.read_text().splitlines() if not line.startswith("dataset_path"))
        yaml.write_text(text + f"\ndataset_path: {data}\ndataset_kwargs:\n  load_from_disk: true\n")

    cfg = compose("model=mini_qwen2vl", "suite=paper", "device=cpu", "evaluator.log_samples=true")
    cfg.suite.tasks = [t for t in cfg.suite.tasks if t.name in local]
    family = get_family(cfg.model.family)
    manager = TaskManager("WARNING", include_path=str(tasks_dir), include_defaults=False,
                          model_name=family.lmms_backend)  # fmt: skip
    lm = build_backend(family.lmms_backend, cfg.model.base, cfg, "cpu")
    scores = {s.task: s for s in run_tasks(lm, manager, cfg)}
    assert {t: s.n_samples for t, s in scores.items()} == {
        "mmb_textvqa_val": 2, "mmb_mathvista_geo": 2, "mmb_refcoco_val": 3,  # geometry rows only; one per expression
    }  # fmt: skip
    for task, score in scores.items():
        values = [sample[score.metric] for sample in score.samples]
        if task == "mmb_mathvista_geo":  # mean over categories, recomputed from the per-sample scores
            from mmbench_merge.evaluation.metrics import category_mean

            assert score.value == pytest.approx(100 * category_mean(values))
            assert all(v["categories"] for v in values)
        else:
            assert score.value == pytest.approx(100 * sum(values) / len(values))
