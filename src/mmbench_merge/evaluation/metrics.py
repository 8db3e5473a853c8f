"""Per-sample scoring for the paper's ten benchmarks and the MiniBench, as pure functions.

Where lmms-eval has the metric we call its code: the EvalAI answer normalisation behind VQA accuracy
(`vqa_eval_metric.EvalAIAnswerProcessor`), ChartQA's relaxed correctness, MathVision's rule-based checker.
What it lacks we write here: the paper's exact-match normalisation (lmms-eval's `exact_match` keeps inner
and trailing spaces after dropping punctuation), the grounding answer parser for the Qwen2-VL / InternVL
box formats, MathVista's rule-based answer extraction (lmms-eval's needs an LLM and the Levenshtein
package) and the mean over geometry categories that the paper reports for the two math benchmarks.
Every score is in [0, 1]; the results rows scale to 0-100.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from statistics import mean

# ------------------------------------------------------------------------------------------ VQA accuracy
VQA_ANNOTATORS = 10  # VQA accuracy is defined over ten human answers


@lru_cache(maxsize=1)
def _eval_ai_processor():
    from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor

    return EvalAIAnswerProcessor()


def vqa_accuracy(prediction: str, answers: Sequence[str] | str) -> float:
    """VQA accuracy: mean over the ten leave-one-annotator-out subsets of min(1, #matching / 3).

    Answers are normalised with the EvalAI processor (lmms-eval's copy). A single gold answer (MiniBench)
    counts as ten annotators agreeing, so the score is then the normalised exact match.
    """
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        return 0.0
    process = _eval_ai_processor()
    pred = process(prediction or "")
    gold = [process(a) for a in answers]
    if len(gold) == 1:
        gold = gold * VQA_ANNOTATORS
    scores = []
    for i in range(len(gold)):
        others = gold[:i] + gold[i + 1 :]
        scores.append(min(1.0, sum(1 for a in others if a == pred) / 3))
    return mean(scores)


# ------------------------------------------------------------------------------------------ exact match
_NON_WORD = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
    """The paper's exact-match normalisation (its VLMEvalKit `accuracy` method, GQA and OCR-VQA): lower-case,
    remove every character that is neither a word character nor a space (Unicode-aware: curly quotes and dashes
    go, letters of any script, digits and `_` stay), squeeze spaces."""
    return " ".join(_NON_WORD.sub("", str(text).lower()).split())


def exact_match(prediction: str, answer: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals the (or any) normalised gold answer."""
    golds = [answer] if isinstance(answer, str) else list(answer)
    pred = normalize_answer(prediction or "")
    return float(any(pred == normalize_answer(g) for g in golds))


# ------------------------------------------------------------------------------------------ relaxed accuracy
def relaxed_accuracy(prediction: str, answer: str, tolerance: float = 0.05) -> float:
    """ChartQA's relaxed accuracy (lmms-eval's implementation): numbers within 5% relative error of the gold
    answer, else a case-insensitive exact match. The prediction is stripped of surrounding whitespace only, as
    the paper's VLMEvalKit does: "Yes." is not "Yes" (lmms-eval and VLMEvalKit both score it 0)."""
    from lmms_eval.tasks.chartqa.utils import relaxed_correctness

    pred = (prediction or "").strip()
    return float(relaxed_correctness(pred, str(answer).strip(), max_relative_change=tolerance))


# ------------------------------------------------------------------------------------------ grounding
_NUM = r"(-?\d+(?:\.\d+)?)"
_SEP = r"\s*,\s*"
# In the order the paper's grounding evaluation (its patched lmms-eval RefCOCO utils) tries them:
# [x1, y1, x2, y2] (also inside InternVL's [[...]]), then (x1, y1, x2, y2), then Qwen2-VL's (x1,y1),(x2,y2)
# (<|box_start|>...<|box_end|>, the special tokens usually decoded away).
_BOX_PATTERNS = (
    re.compile(rf"\[\s*{_NUM}{_SEP}{_NUM}{_SEP}{_NUM}{_SEP}{_NUM}\s*\]"),
    re.compile(rf"\(\s*{_NUM}{_SEP}{_NUM}{_SEP}{_NUM}{_SEP}{_NUM}\s*\)"),
    re.compile(rf"\(\s*{_NUM}{_SEP}{_NUM}\s*\)\s*,?\s*\(\s*{_NUM}{_SEP}{_NUM}\s*\)"),
)
GRID = 1000.0  # Qwen2-VL and InternVL state boxes on a 0-1000 grid
_UNIT_SLACK = 1e-5


def parse_box(text: str) -> list[float] | None:
    """The box in a model's answer as [x1, y1, x2, y2] in 0-1 image coordinates, or None (scores 0).

    As the paper's evaluation: the first `[x1, y1, x2, y2]` (InternVL's `[[...]]` included), else the first
    `(x1, y1, x2, y2)`, else the first `(x1,y1),(x2,y2)` (Qwen2-VL). The numbers are read as 0-1 coordinates when
    all four lie in [0, 1] (within 1e-5), else on the 0-1000 grid. Corners are taken as given: a box whose
    corners are swapped has no area and overlaps nothing (IoU 0), as in the paper's and InternVL's evaluation.
    """
    if not text:
        return None
    for pattern in _BOX_PATTERNS:
        match = pattern.search(text)
        if match:
            break
    else:
        return None
    values = [float(v) for v in match.groups()]
    if any(v < -_UNIT_SLACK or v > 1.0 + _UNIT_SLACK for v in values):
        values = [v / GRID for v in values]
    return values


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes (0 for empty boxes)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def grounding_accuracy(prediction: str, gold_box: Sequence[float], threshold: float = 0.5) -> float:
    """1.0 when the parsed box overlaps the gold box (0-1 coordinates) with IoU >= threshold."""
    box = parse_box(prediction)
    return float(box is not None and box_iou(box, gold_box) >= threshold)


# ------------------------------------------------------------------------------------------ geometry subsets
def category_mean(samples: Iterable[dict]) -> float:
    """Mean over categories of each category's accuracy; samples are {"score": float, "categories": [...]}.

    This is how the paper scores MathVista and MathVision: the plain mean of the accuracies of their
    geometry-related categories (a sample counts in every category it belongs to). Categories without
    samples (a `limit`ed run) are left out; no samples at all gives 0.
    """
    per_category: dict[str, list[float]] = {}
    for sample in samples:
        for category in sample["categories"]:
            per_category.setdefault(category, []).append(float(sample["score"]))
    if not per_category:
        return 0.0
    return mean(mean(scores) for scores in per_category.values())


MATHVISTA_CATEGORIES = ("geometry reasoning", "algebraic reasoning", "geometry problem solving")
MATHVISION_CATEGORIES = (
    "metric geometry - angle", "metric geometry - area", "metric geometry - length", "solid geometry",
)  # fmt: skip


def mathvista_categories(doc: dict) -> list[str]:
    """The paper's MathVista categories a testmini problem falls in (skills, or the task type)."""
    meta = doc.get("metadata") or {}
    skills = set(meta.get("skills") or [])
    found = [c for c in MATHVISTA_CATEGORIES[:2] if c in skills]
    if meta.get("task") == MATHVISTA_CATEGORIES[2]:
        found.append(MATHVISTA_CATEGORIES[2])
    return found


def mathvision_categories(doc: dict) -> list[str]:
    subject = doc.get("subject")
    return [subject] if subject in MATHVISION_CATEGORIES else []


# ------------------------------------------------------------------------------------------ MathVista answers
# a number, with thousands separators, decimals, or as a fraction "1/2"
_LAST_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?")


def _number_value(text: str) -> float | None:
    text = text.replace(",", "")
    if "/" in text:
        numerator, denominator = (float(x) for x in text.split("/"))
        return numerator / denominator if denominator else None
    return float(text)


def _choice_letter(response: str, n_choices: int) -> int | None:
    """Index of the option letter the response states, from the most explicit form to the least."""
    letters = "".join(chr(ord("A") + i) for i in range(n_choices))
    if not letters:
        return None
    patterns = (
        rf"^\(?([{letters}])\)?[.:]?$",  # "B", "(B)", "B."
        rf"answer\s*(?:is|:)?\s*:?\s*\(?([{letters}])\)?(?![A-Za-z])",  # "The answer is (B)", "Answer: B"
        rf"(?i:option|choice)\s*(?i:is)?\s*:?\s*\(?([{letters}])\)?(?![A-Za-z])",  # "The correct option is C"
        rf"\(([{letters}])\)",  # "(B) 12"
        rf"^([{letters}])[.:)]\s",  # "B. 12"
    )
    text = response.strip()
    for pattern in patterns:
        found = re.findall(pattern, text, flags=re.IGNORECASE if "answer" in pattern else 0)
        if found:
            return letters.index(found[-1].upper())
    return None


def multiple_choice_accuracy(response: str, choices: Sequence[str], answer_letter: str) -> float:
    """1.0 when the response states the gold option: its letter, or (no letter given) its text alone."""
    response = (response or "").strip()
    index = _choice_letter(response, len(choices))
    if index is None:
        contained = [i for i, c in enumerate(choices) if c and normalize_answer(c) in normalize_answer(response)]
        if len(contained) != 1:
            return 0.0
        index = contained[0]
    return float(chr(ord("A") + index) == str(answer_letter).strip().upper())


def mathvista_extract(response: str, doc: dict) -> str | None:
    """Rule-based MathVista answer extraction, normalised to the answer's type (MathVista's own rules).

    Multiple choice: the stated option letter, else the option whose text the response contains, else the
    most similar option (MathVista's fallback). Integer / float: the first number after "answer is", else the
    last number, rounded to the problem's precision. Text / list: the stripped response.
    """
    response = (response or "").strip()
    choices = list(doc.get("choices") or [])
    if doc.get("question_type") == "multi_choice" and choices:
        index = _choice_letter(response, len(choices))
        if index is not None:
            return choices[index]
        contained = [c for c in choices if c and str(c).lower() in response.lower()]
        if contained:
            return max(contained, key=len)
        if not response:
            return None
        return max(choices, key=lambda c: difflib.SequenceMatcher(None, response, str(c)).ratio())
    answer_type = doc.get("answer_type")
    if answer_type in ("integer", "float"):
        parts = re.split(r"answer\s*(?:is|:)", response, flags=re.IGNORECASE)
        stated = _LAST_NUMBER.findall(parts[-1]) if len(parts) > 1 else []
        numbers = stated[:1] or _LAST_NUMBER.findall(response)[-1:]
        if not numbers:
            return None
        value = _number_value(numbers[0])
        if value is None:
            return None
        if answer_type == "integer":
            return str(int(value))
        precision = doc.get("precision")
        return str(round(value, int(precision) if precision is not None else 2))
    return response or None


def mathvista_score(response: str, doc: dict) -> float:
    extracted = mathvista_extract(response, doc)
    return float(extracted is not None and str(extracted).strip() == str(doc.get("answer")).strip())


def mathvision_score(response: str, doc: dict) -> float:
    """MathVision's rule-based checker (lmms-eval's `mathvision_process_results`)."""
    from lmms_eval.tasks.mathvision.utils import mathvision_process_results

    result = mathvision_process_results(doc, [response or ""])
    return float(bool(result["mathvision_standard_eval"]["scores"][0]))
