"""The leaderboard: every results.jsonl under the given directories -> leaderboard.md, a self-contained
leaderboard.html (sortable tables, plots inline) and PNG plots, one set of tables per (model, suite).

    python -m mmbench_merge.leaderboard runs/                 # writes runs/leaderboard/
    python -m mmbench_merge.leaderboard runs/ other_runs/ --out site/ --wandb

Rows follow the paper's tables: the base, each expert, each method at its best configuration (and, in a second
table, every configuration of the scaling sweep), with category and overall averages. For suite=paper the
paper's published numbers (Tables 2 and 3, shipped in mmbench_merge/data/) stand beside ours with the difference.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from ..results import collect_runs, write_text_atomic
from .render import board_tables, render_html, render_markdown, slug
from .tables import Board, build_boards, unscored_runs

__all__ = ["build_leaderboard", "build_boards", "Board"]


def build_leaderboard(sources, out_dir: Path, *, wandb: bool = False, logger_cfg: dict | None = None) -> dict:
    """Read every run under `sources`, write the leaderboard files into `out_dir`; returns what was written."""
    from .plots import plot_averages, plot_heatmap, plot_scaling

    sources = [str(s) for s in sources]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = collect_runs(sources)
    boards = build_boards(runs)
    sections, pngs = [], []
    for board in boards:
        stem = f"leaderboard_{slug(board.model)}_{slug(board.suite)}"
        plots = [("average per method", plot_averages(board, out_dir / f"{stem}_average.png")),
                 ("score per task", plot_heatmap(board, out_dir / f"{stem}_heatmap.png")),
                 ("scaling sweep", plot_scaling(board, out_dir / f"{stem}_scaling.png"))]  # fmt: skip
        plots = [(title, path.name) for title, path in plots if path is not None]
        pngs += [out_dir / name for _, name in plots]
        sections.append({"title": f"{board.model} · suite {board.suite}", "tables": board_tables(board),
                         "plots": plots})  # fmt: skip
    unscored = [_describe(r) for r in unscored_runs(runs)]
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = out_dir / "leaderboard.md"
    page = out_dir / "leaderboard.html"
    write_text_atomic(md, render_markdown(sections, sources, unscored, generated))
    write_text_atomic(page, render_html(sections, sources, unscored, generated, out_dir))
    tables = [t for s in sections for t in s["tables"]]
    if wandb:
        from ..loggers.wandb_run import log_leaderboard

        log_leaderboard(tables, out_dir, logger_cfg)
    return {
        "runs": len(runs),
        "boards": boards,
        "tables": tables,
        "markdown": md,
        "html": page,
        "plots": pngs,
    }


def _describe(run) -> str:
    config = (run.record or {}).get("config") or {}
    method = dict(config.get("method") or {})
    name = method.pop("name", "?")
    settings = ", ".join(f"{k}={v}" for k, v in method.items())
    model = (config.get("model") or {}).get("name", "?")
    return f"{model} / {name}" + (f" ({settings})" if settings else "") + f": {run.run_dir}"
