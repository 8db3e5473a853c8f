"""The merge cache: a hit reads no expert and gives the uncached merge's bytes; keys, locks, eviction, CLI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from mmbench_merge import engine
from mmbench_merge.engine import merge_model
from mmbench_merge.merge_cache import CacheSettings, MergeCache

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"layers.0.q.weight": (48, 32), "layers.0.norm.weight": (32,), "layers.0.mlp.weight": (64, 32),
          "layers.1.q.weight": (48, 32), "layers.1.mlp.weight": (64, 32), "step": ()}  # fmt: skip


def _write(path: Path, tensors: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    return path


@pytest.fixture()
def family(tmp_path):
    """A random bf16 base and three experts (base + noise); one int tensor, which is never merged."""
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in SHAPES.items() if n != "step"}
    base["step"] = torch.tensor(7, dtype=torch.int64)
    root = tmp_path / "ckpt"
    _write(root / "base", base)
    for i, key in enumerate(["vqa", "ocr", "chart"]):
        expert = {n: (v.float() + 0.05 * (i + 1) * torch.randn(v.shape, generator=g)).to(v.dtype)
                  if v.is_floating_point() else v for n, v in base.items()}  # fmt: skip
        _write(root / key, expert)
    return root


def _model(root: Path, experts=("vqa", "ocr", "chart"), exclude=()):
    return OmegaConf.create({
        "name": "toy", "family": "qwen2_vl", "finetune": "full", "base": str(root / "base"),
        "experts": {k: str(root / k) for k in experts}, "merge": {"include": [], "exclude": list(exclude)},
        "files_from": "base", "revision": None,
    })  # fmt: skip


def _run(root, method, cache_dir=None, experts=("vqa", "ocr", "chart"), seed=0, **cache_kw):
    cache = {"enabled": True, "dir": str(cache_dir), **cache_kw} if cache_dir is not None else None
    result = merge_model(_model(root, experts), method, seed=seed, device="cpu", keep_in_memory=True, cache=cache)
    return result


def _same_bytes(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].view(-1).view(torch.uint8).tolist() == b[name].view(-1).view(torch.uint8).tolist(), name


class _NoExpert:
    def __init__(self, *args, **kwargs):
        raise AssertionError("a cache hit opened an expert")


METHODS = [
    {"name": "ties", "density": 0.3},
    {"name": "dare_ties", "density": 0.4, "drop_rate": 0.3},
]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m["name"])
def test_a_hit_reads_no_expert_and_gives_the_uncached_bytes(family, tmp_path, method, monkeypatch):
    cache_dir = tmp_path / "cache"
    uncached = {s: _run(family, {**method, "scaling": s}).state_dict for s in (0.7, 1.0)}
    first = _run(family, {**method, "scaling": 1.0}, cache_dir)
    assert first.report.cache["status"] == "stored"
    _same_bytes(first.state_dict, uncached[1.0])  # filling the cache changes nothing

    reads = []
    real_get = engine.SafetensorsCheckpoint.get
    monkeypatch.setattr(engine, "Expert", _NoExpert)
    monkeypatch.setattr(engine.SafetensorsCheckpoint, "get",
                        lambda self, name: reads.append(self.path.name) or real_get(self, name))  # fmt: skip
    hit = _run(family, {**method, "scaling": 0.7}, cache_dir)
    assert hit.report.cache["status"] == "hit" and hit.report.cache["key"] == first.report.cache["key"]
    assert set(reads) == {"base", first.report.cache["key"]}  # the base and the cached tau_m, no expert
    _same_bytes(hit.state_dict, uncached[0.7])
    assert hit.report.experts == {"vqa": "full", "ocr": "full", "chart": "full"}
    assert hit.report.to_json()["totals"]["merged"] == 5 and hit.report.peak_rss_bytes > 0


def test_the_key_follows_everything_but_the_scaling(family, tmp_path):
    cache_dir = tmp_path / "cache"
    ties = {"name": "dare_ties", "density": 0.3, "drop_rate": 0.2, "scaling": 1.0}
    key = _run(family, ties, cache_dir).report.cache["key"]
    assert _run(family, {**ties, "scaling": 0.5}, cache_dir).report.cache == {
        "key": key, "dir": str(cache_dir), "status": "hit"}  # fmt: skip
    changed = [
        _run(family, {**ties, "density": 0.5}, cache_dir),  # a hyperparameter
        _run(family, ties, cache_dir, seed=1),  # the seed (DARE's drops)
        _run(family, ties, cache_dir, experts=("ocr", "vqa", "chart")),  # the experts' order
        _run(family, ties, cache_dir, experts=("vqa", "ocr")),  # the experts used
        _run(family, {"name": "ties", "density": 0.3, "scaling": 1.0}, cache_dir),  # the method
    ]
    st = (family / "ocr" / "model.safetensors").stat()
    os.utime(family / "ocr" / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed.append(_run(family, ties, cache_dir))  # a checkpoint file changed (mtime)
    keys = [r.report.cache["key"] for r in changed]
    assert all(r.report.cache["status"] == "stored" for r in changed)
    assert len({key, *keys}) == len(keys) + 1
    merged = merge_model(_model(family, exclude=["mlp"]), ties, device="cpu", keep_in_memory=True,
                         cache={"dir": str(cache_dir)})  # fmt: skip
    assert merged.report.cache["key"] not in {key, *keys}  # the selection


def test_a_failed_merge_leaves_no_entry_and_the_next_one_stores(family, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    real = engine._merge_one
    calls = []

    def failing(name, *args):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill in the middle of the merge
        return real(name, *args)

    monkeypatch.setattr(engine, "_merge_one", failing)
    with pytest.raises(KeyboardInterrupt):
        _run(family, {"name": "ties", "density": 0.3, "scaling": 1.0}, cache_dir)
    assert sorted(p.name for p in cache_dir.iterdir() if not p.name.endswith(".lock")) == []
    monkeypatch.setattr(engine, "_merge_one", real)
    assert _run(family, {"name": "ties", "density": 0.3, "scaling": 1.0}, cache_dir).report.cache["status"] == "stored"
    assert len(MergeCache(cache_dir, 0).entries()) == 1


def test_least_recently_used_entries_are_evicted_past_the_limit(family, tmp_path):
    cache_dir = tmp_path / "cache"
    one_entry = 4 * sum(torch.Size(s).numel() for n, s in SHAPES.items() if n != "step")  # tau_m in float32
    limit_gb = (2.5 * one_entry + 4096) / 2**30  # two entries and their headers fit, three do not
    keys = []
    for density in (0.1, 0.2):
        keys.append(_run(family, {"name": "ties", "density": density}, cache_dir, max_size_gb=limit_gb)
                    .report.cache["key"])  # fmt: skip
    os.utime(cache_dir / keys[0] / "meta.json", (1, 1))  # the first is the least recently used
    assert _run(family, {"name": "ties", "density": 0.2}, cache_dir, max_size_gb=limit_gb).report.cache["status"] == "hit"
    os.utime(cache_dir / keys[0] / "meta.json", (1, 1))
    third = _run(family, {"name": "ties", "density": 0.3}, cache_dir, max_size_gb=limit_gb).report.cache["key"]
    left = {row["key"] for row in MergeCache(cache_dir, 0).entries()}
    assert left == {keys[1], third}
    assert CacheSettings.from_config({"enabled": False, "dir": "x"}) is None


_JOB = """
import sys
from omegaconf import OmegaConf
from mmbench_merge.engine import merge_model
model = OmegaConf.create({"name": "toy", "family": "qwen2_vl", "finetune": "full", "base": sys.argv[1] + "/base",
    "experts": {k: sys.argv[1] + "/" + k for k in ("vqa", "ocr", "chart")}, "merge": {"include": [], "exclude": []},
    "files_from": "base", "revision": None})
r = merge_model(model, {"name": "ties", "density": 0.3, "scaling": float(sys.argv[3])}, device="cpu",
                cache={"dir": sys.argv[2]})
print(r.report.cache["status"])
"""


def test_concurrent_identical_jobs_merge_once(family, tmp_path):
    cache_dir = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    jobs = [subprocess.Popen([sys.executable, "-c", _JOB, str(family), str(cache_dir), str(s)], env=env,
                             stdout=subprocess.PIPE, text=True) for s in (0.5, 1.0, 1.5)]  # fmt: skip
    statuses = sorted(job.communicate(timeout=300)[0].strip() for job in jobs)
    assert all(job.returncode == 0 for job in jobs)
    assert statuses == ["hit", "hit", "stored"]
    assert len(MergeCache(cache_dir, 0).entries()) == 1
    assert not list(cache_dir.glob(".*tmp-*"))


def test_command_line_lists_and_clears(family, tmp_path):
    cache_dir = tmp_path / "merge_cache"  # where `clear` looks with MMBENCH_CACHE=tmp_path
    key = _run(family, {"name": "ties", "density": 0.3}, cache_dir).report.cache["key"]
    (cache_dir / f".{key}.tmp-999999999").mkdir()  # a writer that died
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cli = [sys.executable, "-m", "mmbench_merge.merge_cache"]
    listed = subprocess.run([*cli, "list", "--dir", str(cache_dir)], env=env, capture_output=True, text=True,
                            check=True).stdout  # fmt: skip
    assert key[:16] in listed and "ties" in listed and "1 entries" in listed
    cleared = subprocess.run([*cli, "clear"], env={**env, "MMBENCH_CACHE": str(tmp_path)}, capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
    assert cleared.startswith("removed 1 entries")
    assert [p for p in cache_dir.iterdir() if not p.name.endswith(".lock")] == []
