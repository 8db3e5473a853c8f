"""Scoring functions on known cases: each expected value is worked out by hand in the test."""

import math
import random

import pytest

from mmbench_merge.evaluation import metrics as m


# ------------------------------------------------------------------------------------------ grounding parser
@pytest.mark.parametrize(
    "answer, expected",
    [
        # Qwen2-VL, 0-1000 grid, with and without the box tokens, with spaces
        ("<|box_start|>(100,200),(300,400)<|box_end|>", [0.1, 0.2, 0.3, 0.4]),
        ("(100,200),(300,400)", [0.1, 0.2, 0.3, 0.4]),
        ("<|object_ref_start|>the dog<|object_ref_end|><|box_start|>( 5 , 10 ) , ( 995 , 1000 )<|box_end|>",
         [0.005, 0.01, 0.995, 1.0]),
        # InternVL, 0-1000 grid, with and without <ref>/<box> wrapping
        ("[[120, 45, 680, 999]]", [0.12, 0.045, 0.68, 0.999]),
        ("<ref>the cat</ref><box>[[0, 0, 500, 250]]</box>", [0.0, 0.0, 0.5, 0.25]),
        # bracketed 0-1 floats (lmms-eval's refcoco format, LLaVA)
        ("[0.12, 0.3, 0.5, 0.75]", [0.12, 0.3, 0.5, 0.75]),
        ("The box is [0.1,0.2,0.3,0.4].", [0.1, 0.2, 0.3, 0.4]),
        # all four in [0, 1]: 0-1 coordinates, integers included (the paper's rule)
        ("[[0, 0, 1, 1]]", [0.0, 0.0, 1.0, 1.0]),
        # swapped corners are kept as given (they overlap nothing)
        ("(300,400),(100,200)", [0.3, 0.4, 0.1, 0.2]),
        # one 4-number tuple
        ("(100, 200, 500, 600)", [0.1, 0.2, 0.5, 0.6]),
        # the paper's order: a bracketed box first, then a 4-tuple, then Qwen's corner pairs
        ("[[100, 100, 200, 200]] or (500,500),(600,600)", [0.1, 0.1, 0.2, 0.2]),
        ("(500,500),(600,600) or [[100, 100, 200, 200]]", [0.1, 0.1, 0.2, 0.2]),
        ("(5, 6, 7, 8) or (500,500),(600,600)", [0.005, 0.006, 0.007, 0.008]),
    ],
)
def test_parse_box_formats(answer, expected):
    box = m.parse_box(answer)
    assert box is not None
    assert box == pytest.approx(expected)


@pytest.mark.parametrize(
    "garbage",
    ["", None, "a dog on the left", "(100,200)", "[1, 2, 3]", "[[a, b, c, d]]", "box: 1 2 3 4", "((1,2),(3))"],
)
def test_parse_box_garbage_is_none(garbage):
    assert m.parse_box(garbage) is None


def test_box_iou_known_cases():
    assert m.box_iou([0, 0, 1, 1], [0, 0, 1, 1]) == pytest.approx(1.0)
    assert m.box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    # half overlap: inter 0.5, union 1.5
    assert m.box_iou([0, 0, 1, 1], [0.5, 0, 1.5, 1]) == pytest.approx(1 / 3)
    assert m.box_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0


def test_box_iou_random_against_pixel_count():
    rng = random.Random(0)
    for _ in range(20):
        a = sorted(rng.randint(0, 50) for _ in range(2)), sorted(rng.randint(0, 50) for _ in range(2))
        b = sorted(rng.randint(0, 50) for _ in range(2)), sorted(rng.randint(0, 50) for _ in range(2))
        box_a = [a[0][0], a[1][0], a[0][1], a[1][1]]
        box_b = [b[0][0], b[1][0], b[0][1], b[1][1]]
        cells_a = {(x, y) for x in range(box_a[0], box_a[2]) for y in range(box_a[1], box_a[3])}
        cells_b = {(x, y) for x in range(box_b[0], box_b[2]) for y in range(box_b[1], box_b[3])}
        union = len(cells_a | cells_b)
        expected = len(cells_a & cells_b) / union if union else 0.0
        assert m.box_iou(box_a, box_b) == pytest.approx(expected)


def test_grounding_accuracy_threshold():
    gold = [0.1, 0.1, 0.5, 0.5]
    assert m.grounding_accuracy("(100,100),(500,500)", gold) == 1.0  # IoU 1
    assert m.grounding_accuracy("[[100, 100, 500, 500]]", gold) == 1.0
    # IoU exactly 0.5 (binary-exact values): gold area 0.25, prediction inside it with area 0.125
    half = [0.0, 0.0, 0.5, 0.5]
    assert m.grounding_accuracy("[[0, 0, 500, 250]]", half) == 1.0
    assert m.grounding_accuracy("[[0, 0, 500, 240]]", half) == 0.0
    assert m.grounding_accuracy("no idea", gold) == 0.0


# ------------------------------------------------------------------------------------------ VQA accuracy
def test_vqa_accuracy_known_cases():
    answers = ["dog"] * 3 + ["cat"] * 7
    # "dog": leave out one of the 3 dogs (3 subsets): 2 matches -> 2/3; leave out a cat (7 subsets): 3 -> 1
    assert m.vqa_accuracy("dog", answers) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert m.vqa_accuracy("cat", answers) == pytest.approx(1.0)
    answers = ["two"] + ["other"] * 9
    # one match: leaving it out gives 0, otherwise 1/3
    assert m.vqa_accuracy("two", answers) == pytest.approx(9 * (1 / 3) / 10)
    assert m.vqa_accuracy("bird", answers) == 0.0


def test_vqa_accuracy_normalises_like_evalai():
    answers = ["2"] * 10
    assert m.vqa_accuracy("Two.", answers) == 1.0  # number words and punctuation
    assert m.vqa_accuracy("  a 2 ", answers) == 1.0  # articles and spaces
    assert m.vqa_accuracy("two", "2") == 1.0  # a single gold answer counts as ten annotators
    assert m.vqa_accuracy("3", "2") == 0.0
    assert m.vqa_accuracy("", []) == 0.0


# ------------------------------------------------------------------------------------------ exact match
@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        ("Yes", "yes", 1.0),
        ("yes.", "yes", 1.0),
        ("  Left side ", "left  side", 1.0),
        ("t-shirt", "tshirt", 1.0),
        ("The Hobbit", "the hobbit", 1.0),
        ("yes .", "yes", 1.0),  # space before punctuation (lmms-eval's exact_match says no)
        ("don\u2019t know", "don't know", 1.0),  # curly apostrophe: not a word character
        ("1990\u20142000", "1990-2000", 1.0),  # em dash
        ("file_name", "filename", 0.0),  # `_` is a word character: kept
        ("Caf\u00e9 Ol\u00e9", "caf\u00e9 ol\u00e9", 1.0),  # letters of any script are kept, lower-cased
        ("no", "yes", 0.0),
        ("left", "left side", 0.0),
        ("", "yes", 0.0),
    ],
)
def test_exact_match_normalisation(pred, gold, expected):
    assert m.exact_match(pred, gold) == expected


def test_exact_match_any_of_several_answers():
    assert m.exact_match("Blue", ["red", "blue"]) == 1.0
    assert m.exact_match("green", ["red", "blue"]) == 0.0


# ------------------------------------------------------------------------------------------ relaxed accuracy
@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        ("10.4", "10", 1.0),  # 4% off
        ("10.6", "10", 0.0),  # 6% off
        ("95", "100", 1.0),
        ("94.9", "100", 0.0),
        ("45%", "0.45", 1.0),  # percentages become fractions
        ("12.", "12", 1.0),  # a number
        ("Yes.", "Yes", 0.0),  # not a number: the dot stays (lmms-eval and VLMEvalKit: 0)
        (" Yes ", "yes", 1.0),  # surrounding spaces are stripped (VLMEvalKit)
        ("Yes", "yes", 1.0),
        ("Yes", "no", 0.0),
        ("0", "0", 1.0),  # a zero target needs exact match
        ("0.01", "0", 0.0),
    ],
)
def test_relaxed_accuracy(pred, gold, expected):
    assert m.relaxed_accuracy(pred, gold) == expected


# ------------------------------------------------------------------------------------------ geometry subsets
def test_category_mean_is_mean_of_category_accuracies():
    samples = [
        {"score": 1, "categories": ["a"]},
        {"score": 0, "categories": ["a"]},
        {"score": 1, "categories": ["a", "b"]},  # counts in both
        {"score": 0, "categories": ["b"]},
        {"score": 1, "categories": ["c"]},
        {"score": 1, "categories": []},  # in no category: ignored
    ]
    # a: 2/3, b: 1/2, c: 1 -> mean = (2/3 + 1/2 + 1) / 3; the pooled accuracy would be 3/5
    assert m.category_mean(samples) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert m.category_mean([]) == 0.0


def test_category_mean_random_against_direct_formula():
    rng = random.Random(1)
    cats = ["x", "y", "z"]
    samples = [{"score": rng.random() < 0.4, "categories": rng.sample(cats, rng.randint(1, 3))} for _ in range(50)]
    accs = []
    for c in cats:
        members = [s["score"] for s in samples if c in s["categories"]]
        accs.append(sum(members) / len(members))
    assert m.category_mean(samples) == pytest.approx(sum(accs) / len(accs))


def test_mathvista_and_mathvision_categories():
    doc = {"metadata": {"skills": ["algebraic reasoning", "arithmetic reasoning"], "task": "geometry problem solving"}}
    assert m.mathvista_categories(doc) == ["algebraic reasoning", "geometry problem solving"]
    assert m.mathvista_categories({"metadata": {"skills": ["statistical reasoning"], "task": "figure question answering"}}) == []
    assert m.mathvision_categories({"subject": "metric geometry - area"}) == ["metric geometry - area"]
    assert m.mathvision_categories({"subject": "graph theory"}) == []


# ------------------------------------------------------------------------------------------ math answers
MC = {"question_type": "multi_choice", "answer_type": "text", "choices": ["30", "45", "60", "90"], "answer": "60"}


@pytest.mark.parametrize(
    "response, expected",
    [
        ("C", "60"),
        ("(C)", "60"),
        ("The answer is C.", "60"),
        ("Answer: (C) 60", "60"),
        ("C. 60", "60"),
        ("The angle is 60 degrees.", "60"),  # the option text
        ("A", "30"),
        ("The correct option is C", "60"),
        ("Looking at the options, the right choice is (C).", "60"),
    ],
)
def test_mathvista_multiple_choice_extraction(response, expected):
    assert m.mathvista_extract(response, MC) == expected


def test_mathvista_free_form_numbers():
    integer = {"question_type": "free_form", "answer_type": "integer", "choices": None, "answer": "12"}
    assert m.mathvista_score("12", integer) == 1.0
    assert m.mathvista_score("The perimeter is 3 + 4 + 5 = 12.", integer) == 1.0
    assert m.mathvista_score("The answer is 12, not 13", integer) == 1.0
    assert m.mathvista_score("13", integer) == 0.0
    assert m.mathvista_score("no idea", integer) == 0.0
    floating = {"question_type": "free_form", "answer_type": "float", "choices": None, "answer": "1.5",
                "precision": 1.0}
    assert m.mathvista_score("about 1.49", floating) == 1.0  # rounded to one decimal
    assert m.mathvista_score("1.6", floating) == 0.0
    half = {"question_type": "free_form", "answer_type": "float", "choices": None, "answer": "0.5", "precision": 1}
    assert m.mathvista_score("1/2", half) == 1.0  # a fraction is a number
    assert m.mathvista_score("It is 1 / 2.", half) == 1.0
    assert m.mathvista_score("x/0", half) == 0.0
    # Without "answer is", the last number is taken: the rules cannot tell which one answers (the judge can).
    assert m.mathvista_score("The perimeter is 12 and the area is 36", integer) == 0.0


def test_mathvision_rule_checker():
    mc = {"answer": "B", "options": ["1", "2", "3"]}
    assert m.mathvision_score("The answer is B.", mc) == 1.0
    assert m.mathvision_score("The answer is A.", mc) == 0.0
    free = {"answer": "12", "options": []}
    assert m.mathvision_score("\\boxed{12}", free) == 1.0
    assert m.mathvision_score("\\boxed{13}", free) == 0.0
    assert not math.isnan(m.mathvision_score("", free))


def test_multiple_choice_accuracy():
    choices = ["3", "4", "5"]
    assert m.multiple_choice_accuracy("B", choices, "B") == 1.0
    assert m.multiple_choice_accuracy("(B)", choices, "B") == 1.0
    assert m.multiple_choice_accuracy("The answer is B.", choices, "B") == 1.0
    assert m.multiple_choice_accuracy("4", choices, "B") == 1.0  # the option's text alone
    assert m.multiple_choice_accuracy("A", choices, "B") == 0.0
    assert m.multiple_choice_accuracy("D", choices, "B") == 0.0  # not an option
    assert m.multiple_choice_accuracy("3 or 4", choices, "B") == 0.0  # two options named
    assert m.multiple_choice_accuracy("", choices, "B") == 0.0
