"""The packaged suites load in lmms-eval's TaskManager offline: configs, hooks, prompts per family, metrics.

The paper's datasets are not reachable here, so these tests check each task's configuration (what lmms-eval
would download, how it would prompt and score), not the download.
"""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mmbench_merge.evaluation import TASKS_DIR

REPO = Path(__file__).resolve().parents[1]
PAPER = OmegaConf.load(REPO / "conf/suite/paper.yaml")
PAPER_FULL = OmegaConf.load(REPO / "conf/suite/paper_ocrvqa_full.yaml")
GENERAL = OmegaConf.load(REPO / "conf/suite/general.yaml")
FAMILY_BACKENDS = {"qwen2_vl": "qwen", "internvl_hf": "internvl", "internvl2": "internvl", "llava_hf": "plain"}


@pytest.fixture(scope="module")
def paper_manager():
    from lmms_eval.tasks import TaskManager

    return TaskManager("WARNING", include_path=str(TASKS_DIR / "paper"), include_defaults=False)


def test_paper_suite_has_the_ten_benchmarks_in_five_categories():
    categories = [t.category for t in PAPER.tasks]
    assert len(PAPER.tasks) == 10
    assert {c: categories.count(c) for c in set(categories)} == {
        "VQA": 2, "Geometry": 2, "Chart": 1, "OCR": 2, "Grounding": 3,
    }  # fmt: skip


def test_paper_tasks_are_indexed(paper_manager):
    names = {t.name for t in PAPER.tasks} | {t.name for t in PAPER_FULL.tasks}
    assert sorted(names) == sorted(paper_manager.all_subtasks)
    # the two suites differ only in OCR-VQA: the paper's TESTCORE subset, or the whole test split
    differ = {t.name for t in PAPER.tasks} ^ {t.name for t in PAPER_FULL.tasks}
    assert differ == {"mmb_ocrvqa_testcore", "mmb_ocrvqa_test"}


@pytest.mark.parametrize("spec", list(PAPER.tasks), ids=lambda s: s.name)
def test_paper_task_config(paper_manager, spec):
    from lmms_eval.api.task import TaskConfig

    config = paper_manager._get_config(spec.name)
    TaskConfig(**config)  # lmms-eval's own schema accepts it
    assert config["task"] == spec.name
    assert config["output_type"] == "generate_until"
    # a pinned hub dataset id (org/name) and an explicit split
    assert config["dataset_path"].count("/") == 1 and config["test_split"]
    for hook in ("doc_to_visual", "doc_to_text", "process_results"):
        assert callable(config[hook]), hook
    metrics = [m["metric"] for m in config["metric_list"]]
    # the headline first; the math tasks also declare the LLM judge's score (filled only with evaluator.judge)
    assert metrics == ([spec.metric, f"{spec.metric}_judge"] if spec.category == "Geometry" else [spec.metric])
    # every family backend has its prompt style
    assert {k: v["style"] for k, v in config["lmms_eval_specific_kwargs"].items() if k != "default"} == FAMILY_BACKENDS
    assert config["generation_kwargs"]["do_sample"] is False


def _fake_doc(name):
    from PIL import Image

    image = Image.new("RGB", (8, 8))
    if "refcoco" in name:
        return {"image": image, "answer": "the red cup", "bbox": [0.1, 0.2, 0.3, 0.4]}
    if "mathvista" in name:
        return {"decoded_image": image, "query": "Hint: ...\nQuestion: find x", "question_type": "free_form",
                "answer_type": "integer", "choices": None, "answer": "12", "precision": None,
                "metadata": {"skills": ["algebraic reasoning"], "task": "geometry problem solving"}}
    if "mathvision" in name:
        return {"decoded_image": image, "question": "Find the angle.", "options": ["30", "60"], "answer": "B",
                "subject": "metric geometry - angle"}
    return {"image": image, "question": "What is written?", "answer": "stop", "answers": ["stop"] * 10}


@pytest.mark.parametrize("spec", list(PAPER.tasks), ids=lambda s: s.name)
def test_paper_task_prompts_and_scoring(paper_manager, spec):
    config = paper_manager._get_config(spec.name)
    doc = _fake_doc(spec.name)
    prompts = {}
    for backend, kwargs in config["lmms_eval_specific_kwargs"].items():
        prompts[backend] = config["doc_to_text"](doc, kwargs)
        assert isinstance(prompts[backend], str) and prompts[backend]
    visual = config["doc_to_visual"](doc)
    assert len(visual) == 1 and visual[0].size == (8, 8)
    if "refcoco" in spec.name:
        assert "<ref>the red cup</ref>" in prompts["internvl_hf"]
        assert "<ref>" not in prompts["qwen2_vl"] and "the red cup" in prompts["qwen2_vl"]
        good = config["process_results"](doc, ["(100,200),(300,400)"])
        bad = config["process_results"](doc, ["[[600, 600, 900, 900]]"])
        assert good == {"acc_iou50": 1.0} and bad == {"acc_iou50": 0.0}
        return
    if spec.category == "Geometry":
        right = "12" if "mathvista" in spec.name else "B"
        result = config["process_results"](doc, [right])[spec.metric]
        assert result["score"] == 1.0 and result["categories"]
        wrong = config["process_results"](doc, ["7" if "mathvista" in spec.name else "A"])[spec.metric]
        assert wrong["score"] == 0.0
        # aggregation: mean over categories
        assert config["metric_list"][0]["aggregation"]([result, wrong]) == pytest.approx(0.5)
        return
    assert prompts["qwen2_vl"] != prompts["internvl_hf"]
    # a trailing dot is punctuation for exact match and VQA accuracy, but stays in ChartQA's text compare
    right = "Stop" if spec.category == "Chart" else "Stop."
    assert config["process_results"](doc, [right]) == {spec.metric: 1.0}
    assert config["process_results"](doc, ["go"]) == {spec.metric: 0.0}


def test_ocrvqa_rows_are_exploded_per_question():
    import datasets
    from PIL import Image

    from mmbench_merge.evaluation.tasks.paper import utils

    ds = datasets.Dataset.from_dict({
        "image": [Image.new("RGB", (4, 4)), Image.new("RGB", (4, 4))], "image_id": ["a", "b"],
        "questions": [["q1", "q2"], ["q3"]], "answers": [["x", "y"], ["z"]], "title": ["t", "u"],
    })  # fmt: skip
    out = utils.ocrvqa_process_docs(ds)
    assert out["question"] == ["q1", "q2", "q3"] and out["answer"] == ["x", "y", "z"]
    assert out["image_id"] == ["a", "a", "b"]


def _ocrvqa_split():
    import datasets
    from PIL import Image

    return datasets.Dataset.from_dict({
        "image": [Image.new("RGB", (4, 4))] * 3, "image_id": ["a", "b", "c"],
        "questions": [["Who wrote this book?", "Is this a comic?"], ["Who is the author?"], ["Title?"]],
        "answers": [["x", "no"], ["y"], ["z"]], "title": ["t", "u", "v"],
    })  # fmt: skip


def test_ocrvqa_testcore_keeps_the_listed_questions(tmp_path, monkeypatch):
    from mmbench_merge.evaluation.tasks.paper import utils

    keys = tmp_path / "testcore.tsv"
    keys.write_text("# OCRVQA_TESTCORE keys\na\tIs this  a comic?\n\nc\n")  # a pair (spaces squeezed), a cover
    monkeypatch.setenv(utils.TESTCORE_ENV, str(keys))
    out = utils.ocrvqa_testcore_process_docs(_ocrvqa_split())
    assert list(zip(out["image_id"], out["question"])) == [("a", "Is this a comic?"), ("c", "Title?")]
    assert out["answer"] == ["no", "z"]


def test_ocrvqa_testcore_without_its_list_fails_early(tmp_path, monkeypatch):
    from mmbench_merge import MergeError
    from mmbench_merge.evaluation import check
    from mmbench_merge.evaluation.tasks.paper import utils

    cfg = OmegaConf.create({"suite": PAPER, "evaluator": {"name": "lmms_eval"}})
    monkeypatch.delenv(utils.TESTCORE_ENV, raising=False)
    with pytest.raises(MergeError, match=r"^suite=paper: task mmb_ocrvqa_testcore .* set MMBENCH_OCRVQA_TESTCORE=<file>"):
        check(cfg, "cpu")
    monkeypatch.setenv(utils.TESTCORE_ENV, str(tmp_path / "missing.tsv"))
    with pytest.raises(MergeError, match="missing.tsv: cannot read the OCRVQA_TESTCORE key list"):
        check(cfg, "cpu")
    (tmp_path / "empty.tsv").write_text("# nothing\n")
    monkeypatch.setenv(utils.TESTCORE_ENV, str(tmp_path / "empty.tsv"))
    with pytest.raises(MergeError, match="has no keys"):
        check(cfg, "cpu")
    (tmp_path / "other.tsv").write_text("zzz\n")
    monkeypatch.setenv(utils.TESTCORE_ENV, str(tmp_path / "other.tsv"))
    check(cfg, "cpu")  # readable: the match against the split happens when lmms-eval loads it
    with pytest.raises(MergeError, match="none of its keys matches"):
        utils.ocrvqa_testcore_process_docs(_ocrvqa_split())
    # the full-split suite and merge-only runs need no list
    monkeypatch.delenv(utils.TESTCORE_ENV)
    check(OmegaConf.create({"suite": PAPER_FULL, "evaluator": {"name": "lmms_eval"}}), "cpu")
    check(OmegaConf.create({"suite": PAPER, "evaluator": {"name": "none"}}), "cpu")


def test_general_suite_names_lmms_eval_tasks():
    from lmms_eval.tasks import TaskManager

    manager = TaskManager("WARNING")
    for spec in GENERAL.tasks:
        assert spec.name in manager.all_tasks, spec.name
        metrics = [m["metric"] for m in manager._get_config(spec.name).get("metric_list", [])]
        assert spec.metric in metrics, (spec.name, metrics)


def _cfg(evaluator, suite=PAPER):
    return OmegaConf.create({"evaluator": OmegaConf.load(REPO / f"conf/evaluator/{evaluator}.yaml"), "suite": suite})


def test_evaluator_checks_fail_before_merging():
    from mmbench_merge import MergeError
    from mmbench_merge.evaluation import check

    with pytest.raises(MergeError, match="evaluator=vllm runs on a GPU"):
        check(_cfg("vllm"), "cpu")
    with pytest.raises(MergeError, match="no tasks"):
        check(_cfg("lmms_eval", OmegaConf.load(REPO / "conf/suite/none.yaml")), "cpu")
    check(_cfg("lmms_eval", PAPER_FULL), "cpu")  # suite=paper also needs the TESTCORE list (test above)
    check(_cfg("none", OmegaConf.load(REPO / "conf/suite/none.yaml")), "cpu")


def test_vllm_backend_arguments():
    from mmbench_merge.evaluation.vllm_eval import vllm_kwargs

    cfg = _cfg("vllm")
    cfg.model = {"dtype": "bfloat16", "family": "qwen2_vl"}
    cfg.evaluator.tensor_parallel_size = 2
    cfg.evaluator.max_pixels = 1003520
    kwargs = vllm_kwargs(cfg, "/ckpt")
    assert kwargs["model"] == "/ckpt" and kwargs["tensor_parallel_size"] == 2 and kwargs["max_pixels"] == 1003520
    assert kwargs["gpu_memory_utilization"] == 0.8 and kwargs["trust_remote_code"] is False
    cfg.model.family = "internvl_chat"  # remote code only with the model config's explicit opt-in
    assert vllm_kwargs(cfg, "/ckpt")["trust_remote_code"] is False
    cfg.model.trust_remote_code = True
    assert vllm_kwargs(cfg, "/ckpt")["trust_remote_code"] is True


def test_paper_process_docs_on_small_datasets():
    """The dataset hooks on a few rows shaped like the hub datasets: RefCOCO boxes, geometry subsets."""
    import datasets
    from PIL import Image

    from mmbench_merge.evaluation.tasks.paper import utils

    ref = datasets.Dataset.from_dict({
        "image": [Image.new("RGB", (200, 100))], "bbox": [[20.0, 10.0, 100.0, 50.0]],  # x, y, w, h in pixels
        "answer": [["the left dog", "dog on the left"]], "question_id": ["1"],
    })  # fmt: skip
    rows = utils.refcoco_process_docs(ref)
    assert rows["answer"] == ["the left dog", "dog on the left"]
    assert rows[0]["bbox"] == pytest.approx([0.1, 0.1, 0.6, 0.6])  # x1, y1, x2, y2 in 0-1
    assert utils.refcoco_results(rows[0], ["[[100, 100, 600, 600]]"]) == {"acc_iou50": 1.0}

    vista = datasets.Dataset.from_dict({"pid": ["1", "2", "3"], "metadata": [
        {"skills": ["algebraic reasoning"], "task": "math word problem"},
        {"skills": ["statistical reasoning"], "task": "figure question answering"},
        {"skills": ["arithmetic reasoning"], "task": "geometry problem solving"},
    ]})  # fmt: skip
    assert utils.mathvista_process_docs(vista)["pid"] == ["1", "3"]
    vision = datasets.Dataset.from_dict({"id": ["1", "2"], "subject": ["solid geometry", "graph theory"]})
    assert utils.mathvision_process_docs(vision)["id"] == ["1"]
