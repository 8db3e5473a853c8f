"""The merge cache: tau_m (float32, per tensor) stored once per merge identity, shared by the jobs of a grid.

A merge writes theta_0 + scaling * tau_m. Everything but `scaling` fixes tau_m, so tau_m is stored under a key
made of: the checkpoints' fingerprints (per weight file: name, size, mtime), the experts used and their order,
the method and its hyperparameters other than scaling, the selection patterns, the seed, the device type, the
torch version and a hash of the merge code. A later merge with the same key (another scaling, or the rerun of a
job whose evaluation failed) reads tau_m from here and the base's tensors, and no expert: one merge plus cheap
rescales for a whole scaling sweep, and output bit-identical to the uncached merge (same float32 tau_m, same
arithmetic).

Layout: ``<dir>/<key>/model.safetensors`` (tau_m of every merged tensor, F32) + ``meta.json``; ``<dir>/<key>.lock``.
Concurrency: a reader holds a shared fcntl lock on ``<key>.lock``, the writer an exclusive one while it merges,
so two identical jobs started together merge once (the second waits, then hits). Entries are written into a
temporary directory and renamed into place: a killed writer leaves no entry a later job would trust. Size:
least recently used entries are evicted past ``max_size_gb`` (entries in use are skipped).

    python -m mmbench_merge.merge_cache list  [--dir D]
    python -m mmbench_merge.merge_cache clear [--dir D]
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger("mmbench_merge")

ENV_DIR = "MMBENCH_CACHE"
ENTRY_FILE = "model.safetensors"
META_FILE = "meta.json"
FORMAT = 1
_KEY = re.compile(r"^[0-9a-f]{64}$")
_TMP = re.compile(r"^\.([0-9a-f]{64})\.tmp-(\d+)$")
_WEIGHT_FILES = re.compile(r"(\.safetensors|safetensors\.index\.json|^adapter_config\.json)$")
_FLOATING = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


# ------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class CacheSettings:
    enabled: bool = True
    dir: Path = Path("runs/merge_cache")
    max_size_gb: float = 50.0

    @classmethod
    def from_config(cls, cfg, runs_dir: str | None = None) -> "CacheSettings | None":
        """From the `merge_cache` config node (a DictConfig, a dict or None); None when disabled."""
        if cfg is None:
            return None
        get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
        if not get("enabled", True):
            return None
        folder = get("dir", None) or default_dir(runs_dir)
        size = float(get("max_size_gb", 50.0))
        if not size > 0:
            from . import MergeError

            raise MergeError(f"merge_cache.max_size_gb must be positive, got {size}")
        return cls(True, Path(os.path.expanduser(str(folder))), size)


def default_dir(runs_dir: str | None = None) -> Path:
    """$MMBENCH_CACHE/merge_cache (beside the MiniBench builds, never among them), else <runs_dir>/merge_cache."""
    env = os.environ.get(ENV_DIR)
    return (Path(env) if env else Path(runs_dir or "runs")) / "merge_cache"


# ------------------------------------------------------------------------------------------ the key
def checkpoint_fingerprint(path: Path) -> list:
    """(name, size, mtime_ns) of every weight file of a checkpoint or adapter directory: cheap, no data read."""
    path = Path(path)
    rows = []
    for item in sorted(path.iterdir()):
        if _WEIGHT_FILES.search(item.name) and item.is_file():
            st = item.stat()
            rows.append([item.name, st.st_size, st.st_mtime_ns])
    return rows


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """sha256 of the merge code (engine, checkpoint reading, methods, this module) and the torch version."""
    import torch

    here = Path(__file__).parent
    digest = hashlib.sha256(torch.__version__.encode())
    for file in [here / "engine.py", here / "checkpoints.py", here / "merge_cache.py",
                 *sorted((here / "methods").glob("*.py"))]:  # fmt: skip
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def cache_key(base_path: Path, expert_paths: dict[str, Path], method: str, params: dict, include, exclude,
              seed: int, device: str) -> tuple[str, dict]:  # fmt: skip
    """(key, the description it hashes): what fixes tau_m, i.e. everything but the scaling."""
    description = {
        "format": FORMAT,
        "base": checkpoint_fingerprint(base_path),
        "experts": [[key, checkpoint_fingerprint(path)] for key, path in expert_paths.items()],  # order kept
        "method": method,
        "params": params,
        "include": list(include),
        "exclude": list(exclude),
        "seed": int(seed),
        "device": str(device).split(":")[0],
        "code": code_hash(),
    }
    raw = json.dumps(description, sort_keys=True, default=str).encode()
    return hashlib.sha256(raw).hexdigest(), description


# ------------------------------------------------------------------------------------------ the store
class Entry:
    """One key's slot, locked: `hit` tells whether tau_m is there (`reader`), else `writer` fills it."""

    def __init__(self, cache: "MergeCache", key: str, hit: bool):
        self.cache = cache
        self.key = key
        self.hit = hit
        self.path = cache.root / key
        self.writer = None
        self.stored = False
        self.meta: dict = {}
        if hit:
            self.meta = json.loads((self.path / META_FILE).read_text())

    def reader(self):
        from .checkpoints import SafetensorsCheckpoint

        return SafetensorsCheckpoint(self.path)

    def start_writing(self, layout: list[tuple[str, tuple[int, ...]]]):
        """A ShardedWriter for tau_m of `layout` ((name, shape) in merge order), into a temporary directory."""
        from .checkpoints import ShardedWriter

        planned = [(name, "F32", tuple(shape)) for name, shape in layout]
        self.writer = ShardedWriter(self.path, planned, max_shard_bytes=2**62)
        return self.writer

    def commit(self, meta: dict) -> None:
        """Write meta.json and rename the entry into place, then evict past the size limit."""
        if self.writer is None:
            return
        meta = {**meta, "key": self.key, "created": time.time()}
        (self.writer.tmp_dir / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
        self.writer.commit()
        self.writer = None
        self.stored = True
        self.cache.evict(keep=self.key)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


class MergeCache:
    def __init__(self, root: Path, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)

    @classmethod
    def from_settings(cls, settings: CacheSettings) -> "MergeCache":
        return cls(settings.dir, int(settings.max_size_gb * 2**30))

    def _lock_file(self, key: str) -> Path:
        return self.root / f"{key}.lock"

    def _complete(self, key: str) -> bool:
        return (self.root / key / META_FILE).is_file() and (self.root / key / ENTRY_FILE).is_file()

    @contextmanager
    def entry(self, key: str) -> Iterator[Entry]:
        """The locked slot of `key`: shared while reading a hit, exclusive while a miss is merged and written.

        A second job asking for a key being written waits for the writer, then reads what it wrote.
        """
        from . import MergeError

        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._lock_file(key), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise MergeError(f"merge_cache.dir: {self.root} is not writable ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            hit = self._complete(key)
            if not hit:
                fcntl.flock(fd, fcntl.LOCK_UN)
                fcntl.flock(fd, fcntl.LOCK_EX)
                hit = self._complete(key)  # written by the job we waited for
                if not hit:
                    self._remove_stale(key)
            if hit:
                os.utime(self.root / key / META_FILE)  # last used, for the LRU order
            entry = Entry(self, key, hit)
            try:
                yield entry
            except BaseException:
                entry.abort()
                raise
            entry.abort()  # a writer never committed (e.g. the merge stopped early): nothing is kept
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _remove_stale(self, key: str) -> None:
        """Under the key's exclusive lock: temporary directories of writers that died, a half-removed entry."""
        for item in self.root.glob(f".{key}.tmp-*"):
            shutil.rmtree(item, ignore_errors=True)
        if (self.root / key).exists():
            shutil.rmtree(self.root / key, ignore_errors=True)

    # -------------------------------------------------------------------------------------- listing / eviction
    def entries(self) -> list[dict]:
        """Every complete entry: key, bytes, last used (epoch seconds), and its description, oldest use first."""
        rows = []
        if not self.root.is_dir():
            return rows
        for item in self.root.iterdir():
            if not (_KEY.match(item.name) and item.is_dir() and self._complete(item.name)):
                continue
            meta_file = item / META_FILE
            try:
                meta = json.loads(meta_file.read_text())
                size = sum(f.stat().st_size for f in item.iterdir() if f.is_file())
                used = meta_file.stat().st_mtime
            except (OSError, ValueError):
                continue
            rows.append({"key": item.name, "bytes": size, "last_used": used, "meta": meta})
        rows.sort(key=lambda r: r["last_used"])
        return rows

    def _try_remove(self, key: str) -> bool:
        """Remove an entry unless a job holds its lock (reading or writing it)."""
        fd = os.open(self._lock_file(key), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            shutil.rmtree(self.root / key, ignore_errors=True)
            self._lock_file(key).unlink(missing_ok=True)
            return True
        finally:
            os.close(fd)

    def evict(self, keep: str | None = None) -> list[str]:
        """Remove least recently used entries until the total is within max_bytes; returns the removed keys."""
        rows = self.entries()
        total = sum(r["bytes"] for r in rows)
        removed = []
        for row in rows:
            if total <= self.max_bytes:
                break
            if row["key"] == keep:
                continue
            if self._try_remove(row["key"]):
                total -= row["bytes"]
                removed.append(row["key"])
                log.info("merge cache: evicted %s (%.1f MB, least recently used)", row["key"][:12], row["bytes"] / 2**20)
        return removed

    def clear(self) -> tuple[int, int]:
        """Remove every entry not in use and dead writers' temporary directories: (entries removed, bytes)."""
        from .results import pid_alive

        n, freed = 0, 0
        for row in self.entries():
            if self._try_remove(row["key"]):
                n += 1
                freed += row["bytes"]
        if self.root.is_dir():
            for item in self.root.iterdir():
                match = _TMP.match(item.name)
                if match and not pid_alive(int(match.group(2))):
                    shutil.rmtree(item, ignore_errors=True)
        return n, freed



def is_floating(st_dtype: str) -> bool:
    return st_dtype in _FLOATING


# ------------------------------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mmbench_merge.merge_cache", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["list", "clear"])
    parser.add_argument("--dir", default=None, help=f"cache directory (default ${ENV_DIR}, else runs/merge_cache)")
    args = parser.parse_args(argv)
    cache = MergeCache(Path(args.dir) if args.dir else default_dir(), 0)
    if args.command == "list":
        rows = cache.entries()
        for row in rows:
            meta = row["meta"]
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["last_used"]))
            experts = ",".join(meta.get("experts", []))
            print(f"{row['key'][:16]}  {row['bytes'] / 2**20:9.1f} MB  used {used}  {meta.get('method')} "
                  f"{json.dumps(meta.get('params', {}), sort_keys=True)}  experts={experts}  base={meta.get('base')}")
        total = sum(r["bytes"] for r in rows)
        print(f"{len(rows)} entries, {total / 2**20:.1f} MB in {cache.root}")
    else:
        n, freed = cache.clear()
        print(f"removed {n} entries ({freed / 2**20:.1f} MB) from {cache.root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
