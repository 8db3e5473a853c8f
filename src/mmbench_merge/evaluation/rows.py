"""Task scores -> the task-level fields of results rows, plus the per-category and overall averages.

The run-level fields (run_id, model, method, params, ...) are added by the runner's record step; the schema
and the `avg:` rows are fixed in docs/ARCHITECTURE.md ("Results rows").
"""

from __future__ import annotations

from statistics import mean

from . import TaskScore


def score_rows(scores: list[TaskScore]) -> list[dict]:
    """One row per task headline metric, then `avg:<Category>` rows (in first-seen order) and `avg:all`.

    Averages are plain means of the headline task scores: per category, and over all tasks (the paper's
    average is the plain mean of its ten benchmark scores, not the mean of the category means).
    """
    rows = [
        {"category": s.category, "task": s.task, "metric": s.metric, "value": round(s.value, 4), "n_samples": s.n_samples}
        for s in scores
    ]
    if not scores:
        return rows
    scores = [s for s in scores if s.headline]  # averages: headline metrics only
    if not scores:
        return rows
    by_category: dict[str, list[TaskScore]] = {}
    for s in scores:
        by_category.setdefault(s.category, []).append(s)
    for category, members in by_category.items():
        rows.append({
            "category": category, "task": f"avg:{category}", "metric": "average",
            "value": round(mean(m.value for m in members), 4), "n_samples": sum(m.n_samples for m in members),
        })  # fmt: skip
    rows.append({
        "category": "all", "task": "avg:all", "metric": "average",
        "value": round(mean(s.value for s in scores), 4), "n_samples": sum(s.n_samples for s in scores),
    })  # fmt: skip
    return rows
