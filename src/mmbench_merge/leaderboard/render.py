"""Leaderboard tables as data (columns + rows), then as Markdown and as one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from .tables import Board, Entry

MISSING = "–"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


def _score_cells(board: Board, entry: Entry) -> list:
    avg = board.averages(entry)
    cells = [entry.scores.get(c.task) for c in board.columns]
    cells += [avg["categories"][cat] for cat in board.categories]
    cells += [avg["average"], f"{avg['present']}/{avg['total']}", entry.samples_text]
    return cells


def _score_header(board: Board) -> list[str]:
    return [c.label for c in board.columns] + [f"{cat} avg" for cat in board.categories] + ["Avg", "tasks", "n/task"]


def board_tables(board: Board) -> list[dict]:
    """The tables of one board: best per method (+ the paper's averages), the scaling sweep, the paper's scores.

    Each table: {"key", "title", "columns", "data"} with numbers as floats and missing scores as None.
    """
    name = f"{board.model} / {board.suite}"
    base_key = f"{slug(board.model)}_{slug(board.suite)}"
    header = ["row", "settings", *_score_header(board)]
    best_rows = []
    for entry in board.best():
        cells = [entry.label, entry.settings, *_score_cells(board, entry)]
        if board.has_paper:
            paper = board.paper_row(entry)
            ours = board.averages(entry)["average"]
            theirs = paper["Avg"] if paper else None
            cells += [theirs, None if ours is None or theirs is None else ours - theirs]
        best_rows.append(cells)
    if board.has_paper:
        header += ["paper Avg", "Δ Avg"]
    tables = [{"key": f"{base_key}_best", "title": f"{name}: best configuration per method", "columns": header,
               "data": best_rows}]  # fmt: skip
    sweep = [[e.label, e.settings, *_score_cells(board, e)] for e in board.sweep()]
    if sweep:
        tables.append({"key": f"{base_key}_sweep", "title": f"{name}: every configuration (scaling sweep)",
                       "columns": ["method", "settings", *_score_header(board)], "data": sweep})  # fmt: skip
    mapped = board.paper_columns()
    if mapped:
        columns, data = ["row"], []
        for col in board.columns:
            if col.task in mapped:
                columns += [f"{col.label} ours", f"{col.label} paper", f"{col.label} Δ"]
        columns += ["Avg ours", "Avg paper", "Avg Δ"]
        for entry in board.best():
            paper = board.paper_row(entry)
            cells = [entry.label]
            for col in board.columns:
                if col.task not in mapped:
                    continue
                ours = entry.scores.get(col.task)
                theirs = paper.get(mapped[col.task]) if paper else None
                cells += [ours, theirs, None if ours is None or theirs is None else ours - theirs]
            ours, theirs = board.averages(entry)["average"], paper["Avg"] if paper else None
            cells += [ours, theirs, None if ours is None or theirs is None else ours - theirs]
            data.append(cells)
        tables.append({"key": f"{base_key}_paper", "title": f"{name}: ours beside the paper's published numbers",
                       "columns": columns, "data": data})  # fmt: skip
    return tables


def fmt(value, signed: bool = False) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        value = round(value, 2) + 0.0  # no "-0.00"
        return f"{value:+.2f}" if signed else f"{value:.2f}"
    return str(value)


def _is_delta(column: str) -> bool:
    return column.startswith("Δ") or column.endswith(" Δ")


# ------------------------------------------------------------------------------------------ Markdown
def markdown_table(table: dict) -> str:
    def cell(v, col):
        return fmt(v, _is_delta(col)).replace("|", "\\|")

    lines = ["| " + " | ".join(table["columns"]) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(table["columns"]))) + "|"]  # fmt: skip
    for row in table["data"]:
        lines.append("| " + " | ".join(cell(v, c) for v, c in zip(row, table["columns"])) + " |")
    return "\n".join(lines)


def render_markdown(sections: list[dict], sources: list[str], unscored: list[str], generated: str) -> str:
    out = ["# Leaderboard", "",
           f"Generated {generated} from the results.jsonl files under {', '.join(f'`{s}`' for s in sources)}. "
           "Scores are 0-100; averages are plain means of the task scores present (`tasks` counts them); "
           f"`{MISSING}` marks a task the run did not score. Rebuild with `python -m mmbench_merge.leaderboard "
           f"{' '.join(sources)}`.", ""]  # fmt: skip
    if not sections:
        out += ["No task scores recorded yet.", ""]
    for section in sections:
        out += [f"## {section['title']}", ""]
        for table in section["tables"]:
            out += [f"### {table['title']}", "", markdown_table(table), ""]
        for title, png in section["plots"]:
            out += [f"![{title}]({png})", ""]
    if unscored:
        out += ["## Runs without task scores", "",
                "Complete runs that recorded no task rows (evaluator=none: merge only):", ""]  # fmt: skip
        out += [f"- {line}" for line in unscored] + [""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ HTML
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#f0f3f7;cursor:pointer;user-select:none}
th.sorted-asc::after{content:" \\25B2"}th.sorted-desc::after{content:" \\25BC"}
td:first-child,td:nth-child(2),th:first-child,th:nth-child(2){text-align:left}
td.missing{color:#aaa}td.pos{color:#17702e}td.neg{color:#b3261e}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}
"""

# Click a header to sort (numbers as numbers, missing last); #sort=<table id>:<column>:<asc|desc> sorts on load.
_JS = """
function sortTable(table, col, dir){
  const body = table.tBodies[0]; const rows = Array.from(body.rows);
  const val = r => { const c = r.cells[col]; const v = c.dataset.value;
    return v === undefined || v === '' ? null : (isNaN(Number(v)) ? v : Number(v)); };
  rows.sort((a, b) => { const x = val(a), y = val(b);
    if (x === null && y === null) return 0; if (x === null) return 1; if (y === null) return -1;
    const r = (typeof x === 'number' && typeof y === 'number') ? x - y : String(x).localeCompare(String(y));
    return dir === 'asc' ? r : -r; });
  rows.forEach(r => body.appendChild(r));
  Array.from(table.tHead.rows[0].cells).forEach((th, i) => {
    th.classList.remove('sorted-asc', 'sorted-desc'); if (i === col) th.classList.add('sorted-' + dir); });
}
document.querySelectorAll('table.sortable').forEach(table => {
  Array.from(table.tHead.rows[0].cells).forEach((th, i) => th.addEventListener('click', () => {
    sortTable(table, i, th.classList.contains('sorted-desc') ? 'asc' : 'desc'); }));
});
const m = location.hash.match(/^#sort=([^:]+):(\\d+):(asc|desc)$/);
if (m && document.getElementById(m[1])) sortTable(document.getElementById(m[1]), Number(m[2]), m[3]);
"""


def html_table(table: dict) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in table["columns"])
    body = []
    for row in table["data"]:
        cells = []
        for value, col in zip(row, table["columns"]):
            cls = "missing" if value is None else ""
            if isinstance(value, float) and _is_delta(col):
                shown = round(value, 2)  # colour what is shown: float noise is no difference
                cls = "pos" if shown > 0 else "neg" if shown < 0 else ""
            data = "" if value is None else (repr(value) if isinstance(value, float) else str(value))
            cells.append(f'<td class="{cls}" data-value="{esc(data)}">{esc(fmt(value, _is_delta(col)))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table class="sortable" id="{esc(table["key"])}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")  # fmt: skip


def render_html(
    sections: list[dict], sources: list[str], unscored: list[str], generated: str, out_dir: Path
) -> str:
    """One page, nothing external: CSS and the sorting script inline, the plots as data: URIs."""
    esc = html.escape
    parts = [f"<h1>Leaderboard</h1><p>Generated {esc(generated)} from the results under "
             f"{esc(', '.join(sources))}. Scores 0-100; averages are plain means of the task scores present; "
             f"{MISSING} marks a task not scored. Click a column header to sort.</p>"]  # fmt: skip
    if not sections:
        parts.append("<p>No task scores recorded yet.</p>")
    for section in sections:
        parts.append(f"<h2>{esc(section['title'])}</h2>")
        for table in section["tables"]:
            parts.append(f"<h3>{esc(table['title'])}</h3>{html_table(table)}")
        for title, png in section["plots"]:
            data = base64.b64encode((Path(out_dir) / png).read_bytes()).decode()
            parts.append(f'<figure><img alt="{esc(title)}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{esc(title)}</figcaption></figure>")  # fmt: skip
    if unscored:
        parts.append("<h2>Runs without task scores</h2><ul>" + "".join(f"<li>{esc(u)}</li>" for u in unscored)
                     + "</ul>")  # fmt: skip
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>mmbench-merge leaderboard</title>'
            f"<style>{_CSS}</style></head><body>{''.join(parts)}<script>{_JS}</script></body></html>\n")  # fmt: skip
