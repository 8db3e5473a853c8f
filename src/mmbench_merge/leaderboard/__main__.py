"""python -m mmbench_merge.leaderboard DIR [DIR ...] [--out OUT] [--wandb]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mmbench_merge.leaderboard",
        description="Build leaderboard.md, leaderboard.html and PNG plots from every results.jsonl under DIRs.",
    )
    parser.add_argument(
        "dirs", nargs="+", type=Path, help="run directories (searched recursively) or results files"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output directory (default: <first DIR>/leaderboard)"
    )
    parser.add_argument(
        "--wandb", action="store_true", help="also log the tables to W&B (offline unless WANDB_MODE)"
    )
    parser.add_argument("--project", default="mmbench-merge", help="W&B project for --wandb")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.dirs if not d.exists()]
    if missing:
        print(f"error: no such directory or file: {', '.join(missing)}", file=sys.stderr)
        return 2
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        print("error: the leaderboard's plots need matplotlib (pip install 'mmbench-merge[plots]')", file=sys.stderr)
        return 2
    from . import build_leaderboard

    out = args.out or (args.dirs[0] if args.dirs[0].is_dir() else args.dirs[0].parent) / "leaderboard"
    written = build_leaderboard(args.dirs, out, wandb=args.wandb, logger_cfg={"project": args.project})
    print(f"{written['runs']} runs, {len(written['boards'])} tables -> {written['markdown']}, {written['html']}, "
          f"{len(written['plots'])} plots")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
