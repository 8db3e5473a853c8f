"""The leaderboard from recorded rows (results.jsonl in the documented schema), incl. missing tasks, the paper's
numbers, the HTML (checked in headless Chromium when it is installed), the PNGs and the W&B table."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from mmbench_merge.leaderboard import build_leaderboard
from mmbench_merge.leaderboard.paper import PAPER_TASKS, paper_column, paper_entry, paper_rows
from mmbench_merge.results import RESULTS_FILE, write_json_atomic, write_rows

REPO = Path(__file__).resolve().parents[1]
SPECS = [{"name": "mini_vqa", "category": "VQA", "metric": "exact_match", "label": "MiniVQA"},
         {"name": "mini_gqa", "category": "VQA", "metric": "exact_match", "label": "MiniGQA"},
         {"name": "mini_ocr", "category": "OCR", "metric": "anls", "label": "MiniOCR"}]  # fmt: skip
_count = [0]


def write_run(
    root: Path,
    method: str,
    scores: dict,
    *,
    scaling=None,
    params=None,
    model="mini",
    suite="minibench",
    started_at="2026-01-01T00:00:00+00:00",
    specs=SPECS,
    extra_rows=(),
) -> Path:
    """A run directory as a run leaves it: results.jsonl (task rows + avg: rows) and run.json."""
    _count[0] += 1  # run ids unique across the session; directory names numbered per root
    run_dir = root / f"run{len(list(root.glob('run*'))) + 1:03d}"
    run_dir.mkdir(parents=True)
    params = dict(params or {})
    base = {"run_id": f"r{_count[0]}", "model": model, "method": method, "params": params, "scaling": scaling,
            "suite": suite, "n_samples": 50, "seed": 0, "git_commit": "abc", "started_at": started_at,
            "duration_s": 1.0}  # fmt: skip
    cat = {s["name"]: s["category"] for s in specs}
    metric = {s["name"]: s["metric"] for s in specs}
    rows = [{**base, "category": cat.get(t, "other"), "task": t, "metric": metric.get(t, "acc"), "value": v}
            for t, v in scores.items()]  # fmt: skip
    # aggregate rows as the evaluator writes them; deliberately wrong here: the leaderboard must recompute
    rows.append({**base, "category": "all", "task": "avg:all", "metric": "average", "value": 99.0})
    rows += [{**base, **r} for r in extra_rows]
    write_rows(run_dir / RESULTS_FILE, rows)
    config = {"model": {"name": model}, "method": {"name": method, "scaling": scaling, **params},
              "suite": {"name": suite, "tasks": specs}}  # fmt: skip
    write_json_atomic(run_dir / "run.json", {"run_id": base["run_id"], "fingerprint": "f", "config": config,
                                             "status": "complete"})  # fmt: skip
    return run_dir


def mean(xs):
    return sum(xs) / len(xs)


@pytest.fixture
def mini_runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    write_run(root, "base", {"mini_vqa": 20.0, "mini_gqa": 30.0, "mini_ocr": 10.0})
    write_run(root, "expert", {"mini_vqa": 70.0, "mini_gqa": 60.0}, params={"expert": "vqa"})  # no OCR score
    write_run(
        root, "expert", {"mini_vqa": 15.0, "mini_gqa": 25.0, "mini_ocr": 80.0}, params={"expert": "ocr"}
    )
    for scaling, off in [(0.3, 0.0), (0.5, 10.0), (1.0, -5.0)]:
        write_run(root, "ties", {"mini_vqa": 40.0 + off, "mini_gqa": 45.0 + off, "mini_ocr": 50.0 + off},
                  scaling=scaling, params={"density": 0.2})  # fmt: skip
    # ties 0.5 once more, later: its scores replace the earlier run's
    write_run(
        root,
        "ties",
        {"mini_vqa": 52.0, "mini_gqa": 57.0, "mini_ocr": 61.0},
        scaling=0.5,
        params={"density": 0.2},
        started_at="2026-02-01T00:00:00+00:00",
        extra_rows=[{"category": "OCR", "task": "mini_ocr", "metric": "exact_match", "value": 1.0}],
    )
    # task_arithmetic: a high average over two tasks loses to a complete run
    write_run(root, "task_arithmetic", {"mini_vqa": 90.0, "mini_gqa": 90.0}, scaling=0.3)
    write_run(root, "task_arithmetic", {"mini_vqa": 41.0, "mini_gqa": 42.0, "mini_ocr": 43.0}, scaling=0.7)
    # a merge-only run: complete, no scores
    empty = root / "merge_only"
    empty.mkdir()
    (empty / RESULTS_FILE).write_text("")
    write_json_atomic(empty / "run.json", {"config": {"model": {"name": "mini"}, "method": {"name": "ties",
                                           "scaling": 0.3}}, "status": "complete"})  # fmt: skip
    return root


def test_tables_from_recorded_rows(mini_runs, tmp_path):
    out = build_leaderboard([mini_runs], tmp_path / "lb")
    (board,) = out["boards"]
    assert (board.model, board.suite) == ("mini", "minibench")
    assert [c.label for c in board.columns] == ["MiniVQA", "MiniGQA", "MiniOCR"]
    best = {t["key"]: t for t in out["tables"]}["mini_minibench_best"]
    cols = best["columns"]
    assert cols == ["row", "settings", "MiniVQA", "MiniGQA", "MiniOCR", "VQA avg", "OCR avg", "Avg", "tasks", "n/task"]
    rows = {r[0]: dict(zip(cols, r)) for r in best["data"]}
    assert list(rows) == [
        "base",
        "expert: vqa",
        "expert: ocr",
        "task_arithmetic",
        "ties",
    ]  # the paper's order
    assert rows["base"]["Avg"] == pytest.approx(mean([20, 30, 10])) and rows["base"]["VQA avg"] == 25.0
    vqa = rows["expert: vqa"]  # a missing task: blank cell, averages over what is there
    assert vqa["MiniOCR"] is None and vqa["OCR avg"] is None and vqa["tasks"] == "2/3"
    assert vqa["Avg"] == pytest.approx(65.0)
    ties = rows["ties"]  # best scaling 0.5, the later run's scores, the headline metric (anls) only
    assert ties["settings"] == "scaling=0.5, density=0.2"
    assert (ties["MiniVQA"], ties["MiniOCR"]) == (52.0, 61.0)
    assert ties["Avg"] == pytest.approx(mean([52, 57, 61])) and ties["VQA avg"] == pytest.approx(54.5)
    ta = rows["task_arithmetic"]
    assert ta["settings"] == "scaling=0.7" and ta["Avg"] == pytest.approx(42.0) and ta["tasks"] == "3/3"

    sweep = {t["key"]: t for t in out["tables"]}["mini_minibench_sweep"]
    settings = [(r[0], r[1]) for r in sweep["data"]]
    assert settings == [("task_arithmetic", "scaling=0.3"), ("task_arithmetic", "scaling=0.7"),
                        ("ties", "scaling=0.3, density=0.2"), ("ties", "scaling=0.5, density=0.2"),
                        ("ties", "scaling=1, density=0.2")]  # fmt: skip
    assert "mini_minibench_paper" not in {t["key"] for t in out["tables"]}  # not suite=paper

    md = out["markdown"].read_text()
    assert "| expert: vqa |  | 70.00 | 60.00 | – | 65.00 | – | 65.00 | 2/3 |" in md
    assert "Runs without task scores" in md and "merge_only" in md
    assert "leaderboard_mini_minibench_average.png" in md


class _Tables(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self.imgs, self.external = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append(attrs.get("id"))
        if tag == "img":
            self.imgs.append(attrs["src"][:22])
        if tag in ("script", "link", "img") and (attrs.get("src") or attrs.get("href") or "").startswith(
            "http"
        ):
            self.external.append(attrs)


def test_html_is_self_contained_and_pngs_are_plots(mini_runs, tmp_path):
    from PIL import Image, ImageStat

    out = build_leaderboard([mini_runs], tmp_path / "lb")
    parser = _Tables()
    parser.feed(out["html"].read_text())
    assert parser.tables == ["mini_minibench_best", "mini_minibench_sweep"]
    assert parser.imgs and all(src.startswith("data:image/png;base64") for src in parser.imgs)
    assert not parser.external
    assert {p.name for p in out["plots"]} == {f"leaderboard_mini_minibench_{k}.png"
                                             for k in ("average", "heatmap", "scaling")}  # fmt: skip
    for png in out["plots"]:
        with Image.open(png) as img:
            img.load()
            assert img.width > 300 and img.height > 200
            rgb = img.convert("RGB")
            assert len(rgb.getcolors(maxcolors=1 << 20)) > 20  # bars, text, colour map: not a blank canvas
            assert max(ImageStat.Stat(rgb).stddev) > 10


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(chromium() is None, reason="no headless Chromium installed")
def test_html_sorts_in_a_headless_browser(mini_runs, tmp_path):
    out = build_leaderboard([mini_runs], tmp_path / "lb")
    avg_col = 7  # row, settings, 3 tasks, 2 category averages, Avg
    url = f"{out['html'].resolve().as_uri()}#sort=mini_minibench_best:{avg_col}:desc"
    proc = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", url],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]

    class Rows(HTMLParser):
        def __init__(self):
            super().__init__()
            self.in_best, self.rows, self.sorted = False, [], []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "table":
                self.in_best = attrs.get("id") == "mini_minibench_best"
            if self.in_best and tag == "tr":
                self.rows.append([])
            if self.in_best and tag == "td":
                self.rows[-1].append(attrs.get("data-value"))
            if self.in_best and tag == "th" and "sorted-desc" in (attrs.get("class") or ""):
                self.sorted.append(True)

    parser = Rows()
    parser.feed(proc.stdout)
    body = [r for r in parser.rows if r]
    averages = [float(r[avg_col]) for r in body]
    assert averages == sorted(averages, reverse=True) and body[0][0] == "expert: vqa"  # 65.0 is the highest
    assert parser.sorted == [True]


def test_paper_suite_sits_beside_the_published_numbers(tmp_path):
    root = tmp_path / "runs"
    names = {"VizWiz": "vizwiz_vqa_val", "GQA": "gqa", "MathVista": "mathvista_testmini",
             "MathVision": "mathvision_testmini", "ChartQA": "chartqa", "TextVQA": "textvqa_val",
             "OCRVQA": "ocrvqa_test", "RefCOCO": "refcoco_bbox_val", "RefCOCO+": "refcoco+_bbox_val",
             "RefCOCOg": "refcocog_bbox_val"}  # fmt: skip
    cats = [
        "VQA",
        "VQA",
        "Geometry",
        "Geometry",
        "Chart",
        "OCR",
        "OCR",
        "Grounding",
        "Grounding",
        "Grounding",
    ]
    specs = [
        {"name": names[c], "category": cat, "metric": "acc", "label": c} for c, cat in zip(PAPER_TASKS, cats)
    ]
    base = paper_entry("qwen2vl", "base")
    ours_base = {names[c]: base[c] + 1.0 for c in PAPER_TASKS}
    write_run(root, "base", ours_base, model="qwen2vl", suite="paper", specs=specs)
    opt = paper_entry("qwen2vl", "optmerge")
    ours_opt = {names[c]: opt[c] - 2.0 for c in PAPER_TASKS if c != "MathVision"}  # one task not evaluated
    write_run(root, "optmerge", ours_opt, model="qwen2vl", suite="paper", scaling=1.0, specs=specs)
    out = build_leaderboard([root], tmp_path / "lb")
    tables = {t["key"]: t for t in out["tables"]}
    best = tables["qwen2vl_paper_best"]
    rows = {r[0]: dict(zip(best["columns"], r)) for r in best["data"]}
    assert rows["base"]["paper Avg"] == 21.82
    assert rows["base"]["Δ Avg"] == pytest.approx(mean([base[c] + 1 for c in PAPER_TASKS]) - 21.82)
    assert rows["optmerge"]["paper Avg"] == 63.30 and rows["optmerge"]["tasks"] == "9/10"
    cmp = tables["qwen2vl_paper_paper"]
    row = dict(zip(cmp["columns"], next(r for r in cmp["data"] if r[0] == "optmerge")))
    assert row["RefCOCO+ paper"] == 65.90 and row["RefCOCO+ Δ"] == pytest.approx(-2.0)
    assert row["RefCOCOg paper"] == 78.24 and row["MathVision ours"] is None and row["MathVision Δ"] is None
    assert "| paper Avg | Δ Avg |" in out["markdown"].read_text()


def test_paper_data_is_shipped_and_mapped():
    rows = paper_rows()
    assert len(rows) == 32 and {r["table"] for r in rows} == {"2", "3"}
    assert paper_entry("internvl2_5", "optmerge")["Avg"] == 57.44
    assert paper_entry("internvl2_5", "expert:vqa")["RefCOCO"] is None  # experts that emit no boxes
    assert paper_column("RefCOCO+", "x") == "RefCOCO+" and paper_column("OCR-VQA", "mmb_ocrvqa_test") == "OCRVQA"
    assert paper_column("RefCOCO+", "mmb_refcocoplus_val") == "RefCOCO+"
    assert (
        paper_column("", "refcocog_bbox_val") == "RefCOCOg"
        and paper_column("", "refcoco_bbox_val") == "RefCOCO"
    )
    assert paper_column("", "vizwiz_vqa_val") == "VizWiz" and paper_column("", "mini_vqa") is None


def test_cli_writes_next_to_the_runs_and_rejects_a_missing_dir(mini_runs, tmp_path):
    env_cmd = [sys.executable, "-m", "mmbench_merge.leaderboard"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([*env_cmd, str(mini_runs)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (mini_runs / "leaderboard" / "leaderboard.md").exists() and (mini_runs / "leaderboard" /
                                                                       "leaderboard.html").exists()  # fmt: skip
    # Building again over the same directory does not read its own output as runs.
    proc = subprocess.run([*env_cmd, str(mini_runs)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("10 runs, 1 tables")
    bad = subprocess.run(
        [*env_cmd, str(tmp_path / "nope")], capture_output=True, text=True, env=env, timeout=60
    )
    assert bad.returncode == 2 and "no such directory" in bad.stderr


def test_leaderboard_table_logged_to_wandb(mini_runs, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(key, str(tmp_path / key.lower()))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    from mmbench_merge.loggers.wandb_run import offline_runs, read_offline_run

    out = build_leaderboard([mini_runs], tmp_path / "lb", wandb=True)
    (run,) = offline_runs(tmp_path / "lb")
    got = read_offline_run(run)
    assert got["run"]["job_type"] == "leaderboard"
    best = got["tables"]["mini_minibench_best"]
    expected = {t["key"]: t for t in out["tables"]}["mini_minibench_best"]
    assert best["columns"] == expected["columns"]
    assert [r[0] for r in best["data"]] == ["base", "expert: vqa", "expert: ocr", "task_arithmetic", "ties"]
    assert best["data"][4][expected["columns"].index("Avg")] == pytest.approx(mean([52, 57, 61]))


def test_rows_file_given_directly_and_runs_counted_once(mini_runs, tmp_path):
    """A plain rows file (e.g. exported elsewhere) is a run of its own; a directory given twice counts once."""
    rows = mini_runs / "run001" / RESULTS_FILE
    loose = tmp_path / "exported.jsonl"
    loose.write_text(rows.read_text().replace('"method": "base"', '"method": "weight_average"'))
    out = build_leaderboard([mini_runs, mini_runs / "run001", loose], tmp_path / "lb")
    assert out["runs"] == 11  # ten run directories (one given twice) + the loose file
    best = {t["key"]: t for t in out["tables"]}["mini_minibench_best"]
    assert [r[0] for r in best["data"]][-3:] == ["weight_average", "task_arithmetic", "ties"]


def test_samples_per_task_column_shows_mixed_sizes(tmp_path):
    """Runs of 50 and 20 samples per task in one entry: the n/task column says 20-50, not one size."""
    root = tmp_path / "runs"
    write_run(root, "base", {"mini_vqa": 20.0, "mini_gqa": 30.0, "mini_ocr": 10.0})
    small = write_run(root, "ties", {"mini_vqa": 40.0}, scaling=0.5, params={"density": 0.2})
    rows = [json.loads(line) for line in (small / RESULTS_FILE).read_text().splitlines()]
    write_rows(small / RESULTS_FILE, [{**r, "n_samples": 20} for r in rows])
    write_run(root, "ties", {"mini_gqa": 45.0, "mini_ocr": 50.0}, scaling=0.5, params={"density": 0.2})
    out = build_leaderboard([root], tmp_path / "lb")
    best = {t["key"]: t for t in out["tables"]}["mini_minibench_best"]
    rows = {r[0]: dict(zip(best["columns"], r)) for r in best["data"]}
    assert rows["base"]["n/task"] == "50"
    assert rows["ties"]["n/task"] == "20-50"


def test_modality_suite_sits_beside_table_5(tmp_path):
    from mmbench_merge.leaderboard.paper import modality_rows

    root = tmp_path / "runs"
    specs = [{"name": "modality_music_avqa", "category": "AV-QA", "metric": "exact_match", "label": "MUSIC-AVQA"},
             {"name": "modality_avqa", "category": "AV-QA", "metric": "option_match", "label": "AVQA"}]  # fmt: skip
    write_run(root, "expert", {"modality_music_avqa": 50.0, "modality_avqa": 70.0}, params={"expert": "audio"},
              model="vicuna_omni", suite="modality", specs=specs)  # fmt: skip
    write_run(root, "optmerge", {"modality_music_avqa": 54.17, "modality_avqa": 80.0}, scaling=1.0,
              model="vicuna_omni", suite="modality", specs=specs)  # fmt: skip
    out = build_leaderboard([root], tmp_path / "lb")
    tables = {t["key"]: t for t in out["tables"]}
    cmp = tables["vicuna_omni_modality_paper"]
    rows = {r[0]: dict(zip(cmp["columns"], r)) for r in cmp["data"]}
    assert rows["optmerge"]["MUSIC-AVQA paper"] == 53.17 and rows["optmerge"]["MUSIC-AVQA Δ"] == pytest.approx(1.0)
    assert rows["optmerge"]["AVQA paper"] == 80.82 and rows["optmerge"]["Avg paper"] == 67.00
    assert rows["expert: audio"]["AVQA paper"] == 47.57
    assert {r["row"] for r in modality_rows()} >= {"Vision only", "TSV Merging", "NaiveMC (online composition)"}
    assert paper_entry("vicuna_omni", "tsv")["Avg"] == 67.34 and paper_entry("tiny_omni", "tsv") is None
