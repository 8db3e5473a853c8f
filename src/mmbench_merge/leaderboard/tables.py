"""From recorded runs to leaderboard tables: one board per (model, suite).

A board has one column per task (the suite's headline metric; label, category and order from the run's
recorded suite config when there is one, else from the rows), and rows ("entries") of evaluated
configurations. Averages are recomputed from the task scores (the avg: rows are skipped): a category's average
is the plain mean of its tasks present, the overall average the plain mean of every task present; an entry
that lacks some tasks is marked incomplete. When the same configuration was run more than once, the latest
score of each task counts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from ..results import REFERENCE_METHODS, RecordedRun
from .paper import has_paper, paper_column, paper_entry

REFERENCE_ORDER = ("vqa", "geometry", "chart", "ocr", "grounding", "vision", "audio", "video")


@dataclass
class Column:
    task: str
    label: str
    category: str
    metric: str | None  # the headline metric; None: the first metric recorded for the task


@dataclass
class Entry:
    """One evaluated configuration: a reference model, or a method with its hyperparameters and scaling."""

    key: str  # base | expert:<capability> | <method>
    method: str
    params: dict
    scaling: float | None
    scores: dict = field(default_factory=dict)  # task -> value
    stamps: dict = field(default_factory=dict)  # task -> started_at of the run the score comes from
    samples: dict = field(default_factory=dict)  # task -> n_samples the score was computed on
    run_ids: set = field(default_factory=set)

    @property
    def samples_text(self) -> str:
        """Samples per task: one number, or min-max when the scores come from runs of different sizes."""
        counts = sorted({int(n) for n in self.samples.values() if n is not None})
        if not counts:
            return ""
        return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"

    @property
    def is_reference(self) -> bool:
        return self.method in REFERENCE_METHODS

    @property
    def label(self) -> str:
        if self.method == "base":
            return "base"
        if self.method == "expert":
            return f"expert: {self.params.get('expert')}"
        return self.method

    @property
    def settings(self) -> str:
        """Scaling and hyperparameters as text (empty for reference rows)."""
        if self.is_reference:
            return ""
        parts = [] if self.scaling is None else [f"scaling={_fmt_num(self.scaling)}"]
        parts += [f"{k}={_fmt_num(v)}" for k, v in sorted(self.params.items()) if v is not None]
        return ", ".join(parts)


@dataclass
class Board:
    model: str
    suite: str
    columns: list[Column]
    entries: list[Entry]

    @property
    def categories(self) -> list[str]:
        seen = []
        for col in self.columns:
            if col.category not in seen:
                seen.append(col.category)
        return seen

    @property
    def has_paper(self) -> bool:
        return has_paper(self.model, self.suite)

    def averages(self, entry: Entry) -> dict:
        """{"categories": {cat: mean or None}, "average": mean or None, "present": n, "total": N}."""
        cats = {}
        for cat in self.categories:
            vals = [
                entry.scores[c.task] for c in self.columns if c.category == cat and c.task in entry.scores
            ]
            cats[cat] = sum(vals) / len(vals) if vals else None
        vals = [entry.scores[c.task] for c in self.columns if c.task in entry.scores]
        return {"categories": cats, "average": sum(vals) / len(vals) if vals else None, "present": len(vals),
                "total": len(self.columns)}  # fmt: skip

    def rank_key(self, entry: Entry):
        avg = self.averages(entry)
        return (avg["present"], avg["average"] if avg["average"] is not None else -math.inf)

    def best(self) -> list[Entry]:
        """Base, each expert, then each method at its best configuration (most tasks, then highest average)."""
        refs = [e for e in self.entries if e.is_reference]
        best: dict[str, Entry] = {}
        for e in self.entries:
            if not e.is_reference and (
                e.method not in best or self.rank_key(e) > self.rank_key(best[e.method])
            ):
                best[e.method] = e
        return _ordered(refs) + _ordered(list(best.values()))

    def sweep(self) -> list[Entry]:
        """Every method configuration, by method, then hyperparameters, then scaling."""
        return _ordered([e for e in self.entries if not e.is_reference])

    def paper_row(self, entry: Entry) -> dict | None:
        return paper_entry(self.model, entry.key) if self.has_paper else None

    def paper_columns(self) -> dict[str, str]:
        """task -> the paper's column, for the tasks that have one (suite=paper only)."""
        if not self.has_paper:
            return {}
        out = {}
        for col in self.columns:
            pc = paper_column(col.label, col.task)
            if pc:
                out[col.task] = pc
        return out


def _method_rank(method: str) -> tuple:
    """Registered methods in registry order (the paper's), then the paper's other rows, then by name."""
    from ..methods import list_methods
    from .paper import paper_rows

    order = list_methods()
    order += [r["method"] for r in paper_rows() if r["method"] not in order and ":" not in r["method"]
              and r["method"] != "base"]  # fmt: skip
    return (order.index(method), method) if method in order else (len(order), method)


def _ordered(entries: list[Entry]) -> list[Entry]:
    def key(e: Entry):
        if e.method == "base":
            return (0, 0, "", "", 0.0)
        if e.method == "expert":
            x = str(e.params.get("expert"))
            return (1, REFERENCE_ORDER.index(x) if x in REFERENCE_ORDER else 99, x, "", 0.0)
        return (2, *_method_rank(e.method), json.dumps(e.params, sort_keys=True), e.scaling or 0.0)

    return sorted(entries, key=key)


def _fmt_num(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# ------------------------------------------------------------------------------------------ building
def _suite_tasks(run: RecordedRun) -> list[dict]:
    config = (run.record or {}).get("config") or {}
    return list(((config.get("suite") or {}).get("tasks")) or [])


def _entry_identity(row: dict) -> tuple[str, str, str, float | None]:
    method = row.get("method") or "?"
    params = dict(row.get("params") or {})
    if method == "base":
        return ("base", method, "{}", None)
    if method == "expert":
        expert = params.get("expert")
        return (f"expert:{expert}", method, json.dumps({"expert": expert}), None)
    scaling = row.get("scaling")
    return (method, method, json.dumps(params, sort_keys=True), None if scaling is None else float(scaling))


def _same_metric(a: str | None, b: str | None) -> bool:
    """lmms-eval metric keys carry a filter suffix (`exact_match,none`): compare the metric part."""
    return a is not None and b is not None and a.split(",")[0] == b.split(",")[0]


def build_boards(runs: list[RecordedRun]) -> list[Board]:
    """One board per (model, suite) found in the runs' rows, sorted by model then suite."""
    columns: dict[tuple, dict[str, Column]] = {}
    entries: dict[tuple, dict[tuple, Entry]] = {}
    for run in runs:
        specs = _suite_tasks(run)
        for row in run.rows:
            task = row.get("task")
            if task is None or str(task).startswith("avg:") or row.get("value") is None:
                continue
            board_key = (str(row.get("model")), str(row.get("suite")))
            cols = columns.setdefault(board_key, {})
            if task not in cols:
                spec = next((s for s in specs if s.get("name") == task), {})
                cols[task] = Column(task, spec.get("label") or task, spec.get("category") or row.get("category")
                                    or "other", spec.get("metric") or row.get("metric"))  # fmt: skip
            col = cols[task]
            if not _same_metric(row.get("metric"), col.metric):
                continue  # a secondary metric of the task: not in the tables
            ident = _entry_identity(row)
            entry = entries.setdefault(board_key, {}).get(ident)
            if entry is None:
                entry = Entry(ident[0], ident[1], json.loads(ident[2]), ident[3])
                entries[board_key][ident] = entry
            stamp = str(row.get("started_at") or "")
            if task not in entry.scores or stamp >= entry.stamps.get(task, ""):
                entry.scores[task] = float(row["value"])
                entry.stamps[task] = stamp
                entry.samples[task] = row.get("n_samples")
            entry.run_ids.add(row.get("run_id"))
    boards = []
    for key in sorted(columns):
        cols = _order_columns(list(columns[key].values()), runs)
        boards.append(Board(key[0], key[1], cols, list(entries.get(key, {}).values())))
    return boards


def _order_columns(cols: list[Column], runs: list[RecordedRun]) -> list[Column]:
    """The suite's task order where a run recorded it; tasks grouped by category in first-seen order."""
    order: list[str] = []
    for run in runs:
        for spec in _suite_tasks(run):
            if spec.get("name") not in order:
                order.append(spec.get("name"))
    rank = {t: i for i, t in enumerate(order)}
    cats: list[str] = []
    for c in sorted(cols, key=lambda c: rank.get(c.task, len(rank))):
        if c.category not in cats:
            cats.append(c.category)
    return sorted(cols, key=lambda c: (cats.index(c.category), rank.get(c.task, len(rank))))


def unscored_runs(runs: list[RecordedRun]) -> list[RecordedRun]:
    """Complete runs that recorded no task score (evaluator=none): listed, not ranked."""
    return [r for r in runs if not any(row.get("value") is not None and not str(row.get("task", "")).startswith(
        "avg:") for row in r.rows)]  # fmt: skip
