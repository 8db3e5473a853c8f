"""PNG plots of a board (matplotlib, Agg backend): the average per row, a row x task heatmap, and the
average against the scaling for each method."""

from __future__ import annotations

from pathlib import Path

from .tables import Board

KIND_COLORS = {"base": "#7f7f7f", "expert": "#9ecae1", "method": "#3182bd"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _kind(entry) -> str:
    return entry.method if entry.is_reference else "method"


def _short_label(entry) -> str:
    """The row's name and its first setting (the scaling): the full settings stay in the tables, where they fit."""
    if not entry.settings:
        return entry.label
    return f"{entry.label} ({entry.settings.split(', ')[0]})"


def plot_averages(board: Board, path: Path) -> Path:
    """Horizontal bars: the overall average of each row of the best table (the paper's as ticks when known)."""
    plt = _pyplot()
    entries = [e for e in board.best() if board.averages(e)["average"] is not None]
    labels = [_short_label(e) for e in entries]
    values = [board.averages(e)["average"] for e in entries]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(entries) + 1.4))
    ys = range(len(entries))[::-1]
    ax.barh(list(ys), values, color=[KIND_COLORS[_kind(e)] for e in entries])
    for y, v in zip(ys, values):
        ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
    papers = [(y, board.paper_row(e)) for y, e in zip(ys, entries)]
    papers = [(y, p["Avg"]) for y, p in papers if p and p.get("Avg") is not None]
    if papers:
        ax.scatter([p for _, p in papers], [y for y, _ in papers], marker="|", s=200, color="#d62728",
                   label="paper", zorder=3)  # fmt: skip
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.set_xlabel("average score (0-100)")
    ax.set_xlim(0, max([*values, *[p for _, p in papers], 1.0]) * 1.15)
    ax.set_title(f"{board.model} / {board.suite}: average")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_heatmap(board: Board, path: Path) -> Path:
    """Rows of the best table x tasks, the score in each cell; grey where a task was not scored."""
    import numpy as np

    plt = _pyplot()
    entries = board.best()
    values = np.array([[e.scores.get(c.task, np.nan) for c in board.columns] for e in entries], dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 * len(board.columns) + 3, 0.45 * len(entries) + 1.8))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, aspect="auto", vmin=0, vmax=max(100.0, np.nanmax(
        values) if np.isfinite(values).any() else 100.0))  # fmt: skip
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", fontsize=7,
                        color="white" if values[i, j] < 60 else "black")  # fmt: skip
    ax.set_xticks(
        range(len(board.columns)), [c.label for c in board.columns], rotation=40, ha="right", fontsize=8
    )
    ax.set_yticks(range(len(entries)), [e.label for e in entries], fontsize=8)
    fig.colorbar(im, ax=ax, label="score")
    ax.set_title(f"{board.model} / {board.suite}: score per task")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scaling(board: Board, path: Path) -> Path | None:
    """The average against the scaling, one line per method and hyperparameter setting; None if no sweep."""
    import json

    lines: dict[str, list] = {}
    for e in board.sweep():
        avg = board.averages(e)["average"]
        if e.scaling is None or avg is None:
            continue
        label = e.method + ("" if not e.params else " " + json.dumps(e.params, sort_keys=True))
        lines.setdefault(label, []).append((e.scaling, avg))
    if not any(len(points) > 1 for points in lines.values()):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in lines.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("scaling (lambda)")
    ax.set_ylabel("average score")
    ax.set_title(f"{board.model} / {board.suite}: scaling sweep")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
