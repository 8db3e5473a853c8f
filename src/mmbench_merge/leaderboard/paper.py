"""The paper's published numbers (Tables 2 and 3, shipped in mmbench_merge/data/) and how our tasks map to them."""

from __future__ import annotations

import csv
import re
from functools import lru_cache
from importlib import resources

PAPER_FILE = "paper_results.csv"
MODALITY_FILE = "paper_modality_results.csv"
# The benchmark columns of Tables 2 and 3, in the paper's order.
PAPER_TASKS = ("VizWiz", "GQA", "MathVista", "MathVision", "ChartQA", "TextVQA", "OCRVQA", "RefCOCO", "RefCOCO+",
               "RefCOCOg")  # fmt: skip
# Suites whose tasks are the paper's benchmarks (compared with the published numbers).
PAPER_SUITES = {"paper"}
# Table 5 (modality merging): our model name, its suite, its columns, and our row keys -> the table's rows.
MODALITY_MODEL = "vicuna_omni"
MODALITY_SUITES = {"modality"}
MODALITY_TASKS = ("MUSIC-AVQA", "AVQA")
MODALITY_KEYS = {"expert:vision": "Vision only", "expert:audio": "Audio only", "expert:video": "Video only",
                 "weight_average": "Weight Average", "task_arithmetic": "Task Arithmetic", "ties": "TIES Merging",
                 "tsv": "TSV Merging", "iso_c": "Iso-C", "wudi": "WUDI Merging", "optmerge": "OptMerge"}  # fmt: skip


def _read_csv(name: str) -> list[dict]:
    text = resources.files("mmbench_merge").joinpath("data", name).read_text()
    return list(csv.DictReader(text.splitlines()))


@lru_cache(maxsize=None)
def paper_rows() -> tuple[dict, ...]:
    """Every row of Tables 2 and 3: table, model, row, method, the ten scores and Avg (floats; None if blank)."""
    rows = []
    for raw in _read_csv(PAPER_FILE):
        row = {k: raw[k] for k in ("table", "model", "row", "method")}
        for col in (*PAPER_TASKS, "Avg"):
            row[col] = float(raw[col]) if raw[col].strip() else None
        rows.append(row)
    return tuple(rows)


def modality_rows() -> list[dict]:
    """Table 5 (modality merging): row, MUSIC-AVQA, AVQA, Avg."""
    return [{k: (v if k == "row" else float(v)) for k, v in raw.items()} for raw in _read_csv(MODALITY_FILE)]


def paper_entry(model: str, key: str) -> dict | None:
    """The paper's row for our model name and row key (base, expert:<capability>, <method>), or None."""
    if model == MODALITY_MODEL:
        name = MODALITY_KEYS.get(key)
        return next((r for r in modality_rows() if r["row"] == name), None)
    for row in paper_rows():
        if row["model"] == model and row["method"] == key:
            return row
    return None


def has_paper(model: str, suite: str) -> bool:
    if suite in MODALITY_SUITES:
        return model == MODALITY_MODEL
    return suite in PAPER_SUITES and any(r["model"] == model for r in paper_rows())


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9+]", "", text.lower())


def paper_column(label: str, task: str) -> str | None:
    """The paper's benchmark column for one of our tasks: its label or task name equal to, or else starting
    with, a paper column (the longest wins: refcocog_bbox_val is RefCOCOg, not RefCOCO)."""
    for text in (label, task):
        for col in (*PAPER_TASKS, *MODALITY_TASKS):
            if _norm(text) == _norm(col):
                return col
    for text in (label, task):
        hits = [col for col in PAPER_TASKS if _norm(text).startswith(_norm(col))]
        if hits:
            return max(hits, key=len)
    return None
