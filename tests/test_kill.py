"""kill -9 of a merge with save_merged=true at random points: the rerun completes byte-identical to an
uninterrupted run, and no temporary directory is left behind (the killed writer's `.merged.tmp-<pid>` is
removed by the next write, its pid being dead).

The killed merge runs in a child process (the real runner on a composed config, as app.main_app runs it; forked
from a forkserver that has torch imported, tests/_kill_child.py) whose tensor reads are slowed down so that a
random kill time lands anywhere in the merge: before the first shard, between shards, in the commit or after it.
The reference and the reruns run in this process.
"""

from __future__ import annotations

import filecmp
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT
from .test_bad_input import COMMON, compose_cfg, run_in_process

DELAY_S = 0.004  # per tensor read in the killed process: spreads a ~0.1 s merge over ~1 s

# Where the kill is aimed, in turn: the merge itself most often, also before it starts and after its commit.
PHASES = ("merge", "after", "before", "merge", "merge")


def _wait_for(condition, proc, i: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.002)
    assert condition(), f"iteration {i}: the merge never got there (exit code {proc.exitcode})"


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _kill_loop(tiny_conf, tmp_path, monkeypatch, iterations: int, seed: int) -> None:
    runs = tmp_path / "runs"
    ref_dir = runs / "reference"
    # several shards: kills land between them; no merge cache, or every rerun would read tau_m back unslowed
    overrides = ("model=tiny_internvl", "method=ties", "rerun=true", "shard_size_mb=0.02", "merge_cache.enabled=false")
    from mmbench_merge.checkpoints import SafetensorsCheckpoint

    reads = []
    original = SafetensorsCheckpoint.get
    monkeypatch.setattr(SafetensorsCheckpoint, "get", lambda self, name: reads.append(name) or original(self, name))
    started = time.perf_counter()
    assert run_in_process(compose_cfg(tiny_conf, runs, *overrides), ref_dir) is None
    # The slowed merge takes about this long once its writer exists: kill times drawn in [0, window] land before
    # the first shard, between shards, in the commit, or (the last sixth) after it.
    merge_s = json.loads((ref_dir / "merge_report.json").read_text())["totals"]["seconds"]
    window = 1.2 * (merge_s + len(reads) * DELAY_S)
    del started
    monkeypatch.undo()
    reference = _tree(ref_dir / "merged")
    assert len([n for n in reference if n.endswith(".safetensors")]) >= 2, "expected a sharded checkpoint"

    import multiprocessing

    from . import _kill_child

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_kill_child.PRELOAD)
    rng = random.Random(seed)
    outcomes, timings = [], []
    for i in range(iterations):
        run_dir = runs / f"killed{i}"
        args = (str(ROOT / "conf"), str(tiny_conf), str(runs), str(run_dir), DELAY_S,
                [*COMMON, *overrides])  # fmt: skip
        t0 = time.perf_counter()
        proc = ctx.Process(target=_kill_child.merge_slowly, args=args)
        proc.start()
        tmp = run_dir / f".merged.tmp-{proc.pid}"
        phase = PHASES[i % len(PHASES)]
        if phase == "before":  # while the child composes, opens checkpoints, writes run.json
            time.sleep(rng.uniform(0.0, 1.0))
        else:
            _wait_for(lambda: tmp.exists() or (run_dir / "merged").exists(), proc, i)
            if phase == "after":  # the commit is done: run.json, merge_report.json, results.jsonl being written
                _wait_for(lambda: (run_dir / "merged").exists(), proc, i)
                time.sleep(rng.uniform(0.0, 0.05))
            else:  # the writer exists: anywhere in the merge, between shards, in the commit
                time.sleep(rng.uniform(0.0, window))
        t1 = time.perf_counter()
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        killed_tmp = list(run_dir.glob(".merged.tmp-*")) if run_dir.exists() else []
        left = "temp dir" if killed_tmp else ("merged/" if (run_dir / "merged").exists() else "nothing")
        outcomes.append(f"{phase}: {left}")
        # What the kill left is never a trusted partial checkpoint: merged/ exists only complete.
        if (run_dir / "merged").exists():
            assert _tree(run_dir / "merged") == reference, f"iteration {i}: a partial merged/ was left"
        assert not (run_dir / "results.jsonl").exists() or (run_dir / "merged").exists()
        # The rerun in the same run directory completes, byte-identical, and removes the dead writer's temp dir.
        assert run_in_process(compose_cfg(tiny_conf, runs, *overrides), run_dir) is None
        assert _tree(run_dir / "merged") == reference, f"iteration {i}: rerun differs from an uninterrupted run"
        assert not list(run_dir.glob(".merged.tmp-*")), f"iteration {i}: temporary directory left behind"
        assert (run_dir / "results.jsonl").exists()
        assert filecmp.cmp(run_dir / "merged" / "config.json", ref_dir / "merged" / "config.json", shallow=False)
        timings.append(f"{t1 - t0:.1f}+{time.perf_counter() - t1:.1f}s")
    print(f"kill points: {outcomes}; window {window:.2f}s; start-to-kill + rerun: {timings}")


def test_kill_9_mid_merge_then_rerun_is_byte_identical(tiny_conf, tmp_path, monkeypatch):
    _kill_loop(tiny_conf, tmp_path, monkeypatch, iterations=3, seed=11)


@pytest.mark.slow
def test_kill_9_mid_merge_many_times(tiny_conf, tmp_path, monkeypatch):
    _kill_loop(tiny_conf, tmp_path, monkeypatch, iterations=20, seed=12)


def test_stale_temp_dir_of_a_dead_writer_is_removed(tmp_path):
    """ShardedWriter removes `.merged.tmp-<pid>` of dead pids, and leaves a live writer's alone."""
    from mmbench_merge.checkpoints import ShardedWriter

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".merged.tmp-{dead.pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    live = tmp_path / f".merged.tmp-{os.getppid()}"  # our parent is alive
    live.mkdir()
    writer = ShardedWriter(tmp_path / "merged", [("x", "F32", (2,))], max_shard_bytes=1 << 20)
    assert not stale.exists(), "a dead writer's temporary directory must be removed"
    assert live.exists(), "a live writer's temporary directory must be left alone"
    writer.abort()
