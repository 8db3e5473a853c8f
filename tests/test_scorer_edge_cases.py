"""The edge cases of issue 15, scored three ways: ours, the paper's evaluation (worked out from its code, stated
per case), and lmms-eval 0.7.3's (computed by calling lmms-eval's own functions). docs/evaluation.md's table
"Scorer edge cases" is this list."""

import pytest

from mmbench_merge.evaluation import metrics as m

GOLD_BOX = [0.1, 0.2, 0.3, 0.4]

# (id, kind, prediction, gold, ours, paper's); lmms-eval's value comes from LMMS_EVAL below.
CASES = [
    ("curly apostrophe", "exact", "don\u2019t know", "don't know", 1.0, 1.0),
    ("em dash", "exact", "1990\u20142000", "1990-2000", 1.0, 1.0),
    ("underscore", "exact", "file_name", "filename", 0.0, 0.0),
    ("trailing dot, chart text", "chart", "Yes.", "Yes", 0.0, 0.0),
    ("swapped corners", "box", "[[300, 400, 100, 200]]", GOLD_BOX, 0.0, 0.0),
    ("one 4-number tuple", "box", "(100, 200, 300, 400)", GOLD_BOX, 1.0, 1.0),
    ("[[0,0,1,1]]: 0-1 floats", "box", "[[0,0,1,1]]", [0.0, 0.0, 1.0, 1.0], 1.0, 1.0),
    ("Qwen2-VL corner pairs", "box", "(100,200),(300,400)", GOLD_BOX, 1.0, 1.0),
]
LMMS_EVAL = {
    "curly apostrophe": 0.0, "em dash": 0.0, "underscore": 1.0, "trailing dot, chart text": 0.0,
    "swapped corners": 0.0, "one 4-number tuple": 0.0, "[[0,0,1,1]]: 0-1 floats": 1.0,
    "Qwen2-VL corner pairs": 0.0,
}  # fmt: skip


def _ours(kind, pred, gold):
    if kind == "exact":
        return m.exact_match(pred, gold)
    if kind == "chart":
        return m.relaxed_accuracy(pred, gold)
    return m.grounding_accuracy(pred, gold)


def _lmms_eval(kind, pred, gold):
    """lmms-eval 0.7.3's scoring of the same answer: GQA's exact_match (ignore_case, ignore_punctuation),
    ChartQA's process_results, RefCOCO's parser and ACC@0.5."""
    if kind == "exact":
        from lmms_eval.api.metrics import exact_match_hf_evaluate

        return float(exact_match_hf_evaluate([pred], [gold], ignore_case=True, ignore_punctuation=True)["exact_match"])
    if kind == "chart":
        from lmms_eval.tasks.chartqa.utils import chartqa_process_results

        return chartqa_process_results({"type": "human_test", "answer": gold}, [pred])["relaxed_overall"]
    from lmms_eval.tasks.refcoco.utils_rec import compute_accuracy, parse_float_sequence_within

    box = parse_float_sequence_within(pred)
    try:
        return float(compute_accuracy(gold, box, 0.5))
    except ZeroDivisionError:
        return 0.0


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_edge_case_scores(case):
    name, kind, pred, gold, ours, paper = case
    assert _ours(kind, pred, gold) == ours
    assert ours == paper  # every listed case now scores as the paper's evaluation does
    assert _lmms_eval(kind, pred, gold) == LMMS_EVAL[name]


MATH_MC = {"question_type": "multi_choice", "answer_type": "text", "choices": ["30", "45", "60", "90"], "answer": "60"}
MATH_INT = {"question_type": "free_form", "answer_type": "integer", "choices": None, "answer": "12"}
MATH_FLOAT = {"question_type": "free_form", "answer_type": "float", "choices": None, "answer": "0.5", "precision": 1}


@pytest.mark.parametrize(
    "response, doc, rule_based",
    [
        ("The correct option is C", MATH_MC, 1.0),
        ("1/2", MATH_FLOAT, 1.0),
        ("The perimeter is 12 and the area is 36", MATH_INT, 0.0),  # only a judge reads which number answers
    ],
)
def test_mathvista_edge_cases_rule_based(response, doc, rule_based):
    assert m.mathvista_score(response, doc) == rule_based
