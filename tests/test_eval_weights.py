"""In-memory merged weights go into a loaded model exactly as from_pretrained would load them from disk."""

import math
from pathlib import Path

import pytest
import torch

from mmbench_merge import MergeError, fixtures
from mmbench_merge.checkpoints import SafetensorsCheckpoint
from mmbench_merge.evaluation import TaskScore
from mmbench_merge.evaluation.lmms import lmms_errors, scores_from_results
from mmbench_merge.evaluation.rows import score_rows
from mmbench_merge.evaluation.weights import load_into_model


@pytest.fixture(scope="module", params=["qwen2_vl", "internvl", "llava"])
def two_checkpoints(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    a = fixtures.save_model(fixtures.build_model(request.param, seed=0), root / "a", "float32")
    b = fixtures.save_model(fixtures.build_model(request.param, seed=1), root / "b", "float32")
    return a, b


def _load(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)


def test_loaded_state_equals_from_pretrained(two_checkpoints):
    a, b = two_checkpoints
    ckpt = SafetensorsCheckpoint(b)
    state = {name: ckpt.get(name) for name in ckpt.keys()}  # noqa: SIM118 (not a dict)  # checkpoint names (e.g. Qwen2-VL's model.layers.*)
    model = _load(a)
    assert load_into_model(model, state) == len(state)
    reference = _load(b).state_dict()
    got = model.state_dict()
    assert got.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(got[name], value), name
    # and the model really changed: a differs from b
    assert any(not torch.equal(_load(a).state_dict()[n], reference[n]) for n in reference)


def test_unknown_or_missing_tensor_is_an_error(two_checkpoints):
    a, b = two_checkpoints
    ckpt = SafetensorsCheckpoint(b)
    state = {name: ckpt.get(name) for name in ckpt.keys()}  # noqa: SIM118 (not a dict)
    model = _load(a)
    renamed = dict(state)
    first = next(iter(renamed))
    renamed["not.a.tensor"] = renamed.pop(first)
    with pytest.raises(MergeError, match="not.a.tensor|no tensor for"):
        load_into_model(model, renamed)
    wrong_shape = dict(state)
    wrong_shape[first] = torch.zeros(3, 3)
    with pytest.raises(MergeError, match=f"{first}.*shape"):
        load_into_model(model, wrong_shape)


# ------------------------------------------------------------------------------------------ what lmms-eval returned
TASKS = [
    type("Spec", (), {"name": "t1", "category": "VQA", "metric": "acc", "label": None, "scale": 100.0})(),
    type("Spec", (), {"name": "t2", "category": "OCR", "metric": "em", "label": "T2", "scale": 100.0})(),
]


def _results(t1=0.5, t2=0.25, n=4):
    return {
        "results": {"t1": {"alias": "t1", "acc,none": t1, "acc_stderr,none": "N/A"}, "t2": {"em,none": t2}},
        "n-samples": {"t1": {"original": 10, "effective": n}, "t2": {"original": 10, "effective": n}},
    }


def test_scores_from_results_reads_headline_metrics():
    scores = scores_from_results(_results(), TASKS)
    assert [(s.task, s.value, s.n_samples, s.label) for s in scores] == [("t1", 50.0, 4, "t1"), ("t2", 25.0, 4, "T2")]


@pytest.mark.parametrize(
    "broken, message",
    [
        (None, "no results"),
        ({}, "no results"),
        ({**_results(), "results": {"t1": {"acc,none": 0.5}}}, "no results for task t2"),
        (_results(t2=None), "no metric 'em'"),
        (_results(t1=float("nan")), "not a number"),
        (_results(n=0), "no samples"),
    ],
)
def test_a_crash_lmms_eval_survived_is_a_failure(broken, message):
    with pytest.raises(MergeError, match=message):
        scores_from_results(broken, TASKS)


def test_errors_logged_by_lmms_eval_are_collected():
    from loguru import logger

    with lmms_errors() as errors:
        logger.warning("not an error")
        logger.error("Error CUDA out of memory in generating")
    assert errors == ["Error CUDA out of memory in generating"]


def test_score_rows_averages():
    scores = [
        TaskScore("a", "VQA", "m", "a", 40.0, 2), TaskScore("b", "VQA", "m", "b", 60.0, 2),
        TaskScore("c", "OCR", "m", "c", 90.0, 3),
    ]  # fmt: skip
    rows = score_rows(scores)
    by_task = {r["task"]: r for r in rows}
    assert [r["task"] for r in rows] == ["a", "b", "c", "avg:VQA", "avg:OCR", "avg:all"]
    assert by_task["avg:VQA"]["value"] == 50.0 and by_task["avg:VQA"]["category"] == "VQA"
    # the paper's average: plain mean of the task scores (not of the category means, which would be 70)
    assert math.isclose(by_task["avg:all"]["value"], (40 + 60 + 90) / 3, abs_tol=1e-4)
    assert by_task["avg:all"]["category"] == "all" and by_task["avg:all"]["metric"] == "average"
    assert score_rows([]) == []


def test_model_view_takes_weights_from_one_dir_and_files_from_another(tmp_path):
    from contextlib import ExitStack
    from types import SimpleNamespace

    from mmbench_merge.evaluation.lmms import model_view

    weights, files = tmp_path / "weights", tmp_path / "files"
    for d in (weights, files):
        d.mkdir()
        (d / "model.safetensors").write_text(f"weights of {d.name}")
        (d / "config.json").write_text(f"config of {d.name}")
    (weights / "model.safetensors.index.json").write_text("index of weights")
    (files / "tokenizer.json").write_text("tokenizer of files")
    (files / "chat_template.jinja").write_text("template of files")
    with ExitStack() as stack:
        same = model_view(SimpleNamespace(model_dir=weights, base_dir=weights, files_dir=weights), stack)
        assert same == str(weights)  # nothing to combine
        view = Path(model_view(SimpleNamespace(model_dir=None, base_dir=weights, files_dir=files), stack))
        contents = {p.name: p.read_text() for p in view.iterdir()}
        assert contents == {
            "model.safetensors": "weights of weights", "model.safetensors.index.json": "index of weights",
            "config.json": "config of files", "tokenizer.json": "tokenizer of files",
            "chat_template.jinja": "template of files",
        }  # fmt: skip
    assert not view.exists()  # a temporary directory, gone after the evaluation
