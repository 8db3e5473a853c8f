"""Hooks for the modality-merging lmms-eval tasks (MUSIC-AVQA, AVQA): inputs, prompts and the paper's metrics."""

from __future__ import annotations

from mmbench_merge.modality.tasks import avqa_score, music_avqa_score


def doc_to_inputs(doc):
    return {m: list(doc[m]) for m in ("vision", "audio", "video") if doc.get(m)}


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def music_avqa_results(doc, results):
    return {"exact_match": music_avqa_score(results[0], doc["answer"])}


def avqa_results(doc, results):
    return {"option_match": avqa_score(results[0], doc["answer"])}
