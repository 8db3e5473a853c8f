"""MiniBench: the offline benchmark (synthetic tasks of the five capabilities, tiny trained model families).

`ensure_built(profile)` returns the root of a built MiniBench: the copy shipped with the project (prebuilt/)
when its build-config hash matches, else one built on first use into `$MMBENCH_CACHE` (default
`~/.cache/mmbench-merge`) under a directory keyed by that hash. `resolve_path(family, item)` backs the OmegaConf
resolver `${minibench:family,item}` used by conf/model/mini_*.yaml. Importing this package is torch-free.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import MergeError

PROFILE_ENV = "MMBENCH_MINIBENCH_PROFILE"  # which profile the ${minibench:...} resolver uses (default: default)
SHIPPED = Path(__file__).resolve().parents[3] / "prebuilt" / "minibench"  # repo checkout: prebuilt/minibench/


def cache_root() -> Path:
    return Path(os.environ.get("MMBENCH_CACHE") or Path.home() / ".cache" / "mmbench-merge")


def built_dir(profile: str = "default") -> Path:
    from .build import config_hash, get_profile

    p = get_profile(profile)
    return cache_root() / "minibench" / f"{p.name}-{config_hash(p)}"


def _complete(root: Path, digest: str) -> bool:
    import json

    try:
        return json.loads((root / "build.json").read_text())["hash"] == digest
    except (OSError, ValueError, KeyError):
        return False


def ensure_built(profile: str = "default", parallel: bool = True) -> Path:
    """The root of the built MiniBench of `profile`; builds it if needed (lock + temp dir + atomic rename)."""
    import fcntl

    from .build import build_atomic, config_hash, get_profile

    p = get_profile(profile)
    digest = config_hash(p)
    if _complete(SHIPPED, digest):
        return SHIPPED
    final = built_dir(profile)
    if _complete(final, digest):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent grid jobs wait here for the one that builds
        if not _complete(final, digest):
            build_atomic(final, p, parallel)
            with open(final.parent / "builds.log", "a") as log:  # one line per build: what the cache holds and why
                log.write(f"{final.name} built by pid {os.getpid()}\n")
    return final


ITEMS = ("base", "vqa", "geometry", "chart", "ocr", "grounding")


def resolve_path(family: str, item: str, profile: str | None = None) -> str:
    """Path of `item` of `family` in the built MiniBench: base, <task> (Qwen2-VL: the LoRA adapter),
    <task>_full (Qwen2-VL: the adapter merged into full weights), data, tokenizer, root."""
    from .build import FAMILIES

    profile = profile or os.environ.get(PROFILE_ENV) or "default"
    family, item = str(family).strip(), str(item).strip()
    if family not in FAMILIES:
        raise MergeError(f"${{minibench:{family},{item}}}: unknown family {family!r}; known: {', '.join(FAMILIES)}")
    tasks = ITEMS[1:]
    known = [*ITEMS, "data", "tokenizer", "root"] + ([f"{t}_full" for t in tasks] if family == "qwen2_vl" else [])
    if item not in known:
        raise MergeError(f"${{minibench:{family},{item}}}: unknown item {item!r}; known: {', '.join(known)}")
    root = ensure_built(profile)
    if item == "root":
        return str(root)
    if item in ("data", "tokenizer"):
        return str(root / item)
    return str(root / family / item)
