"""Hooks for the MiniBench lmms-eval tasks: prompts from minibench.prompts, scores from evaluation.metrics."""

from __future__ import annotations

from mmbench_merge.evaluation import metrics
from mmbench_merge.minibench.prompts import prompt


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def _family(kwargs) -> str:
    return (kwargs or {}).get("family", "qwen2_vl")


def vqa_text(doc, lmms_eval_specific_kwargs=None):
    return prompt("vqa", _family(lmms_eval_specific_kwargs), doc)


def geometry_text(doc, lmms_eval_specific_kwargs=None):
    return prompt("geometry", _family(lmms_eval_specific_kwargs), doc)


def chart_text(doc, lmms_eval_specific_kwargs=None):
    return prompt("chart", _family(lmms_eval_specific_kwargs), doc)


def ocr_text(doc, lmms_eval_specific_kwargs=None):
    return prompt("ocr", _family(lmms_eval_specific_kwargs), doc)


def grounding_text(doc, lmms_eval_specific_kwargs=None):
    return prompt("grounding", _family(lmms_eval_specific_kwargs), doc)


def vqa_results(doc, results):
    return {"vqa_acc": metrics.vqa_accuracy(results[0], doc["answer"])}


def geometry_results(doc, results):
    return {"mc_acc": metrics.multiple_choice_accuracy(results[0], doc["choices"], doc["answer"])}


def chart_results(doc, results):
    return {"relaxed_acc": metrics.relaxed_accuracy(results[0], doc["answer"])}


def ocr_results(doc, results):
    return {"exact_match": metrics.exact_match(results[0], doc["answer"])}


def grounding_results(doc, results):
    gold = [v / metrics.GRID for v in doc["bbox"]]
    return {"acc_iou50": metrics.grounding_accuracy(results[0], gold)}
