"""python -m mmbench_merge.minibench build [--profile default] [--out DIR] [--serial]
   python -m mmbench_merge.minibench score [--profile default] [--root DIR] [--limit N]
   python -m mmbench_merge.minibench path FAMILY ITEM"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmbench_merge.minibench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the MiniBench (into the cache, or into --out)")
    b.add_argument("--profile", default="default")
    b.add_argument("--out", type=Path, help="build into this directory (replaced atomically), e.g. prebuilt/minibench")
    b.add_argument("--serial", action="store_true", help="train the two families one after the other")
    s = sub.add_parser("score", help="the 6 x 5 table (base + experts on every task) of a built MiniBench")
    s.add_argument("--profile", default="default")
    s.add_argument("--root", type=Path)
    s.add_argument("--limit", type=int)
    s.add_argument("--family", action="append", choices=["qwen2_vl", "internvl"])
    p = sub.add_parser("path", help="print the path of one item (what ${minibench:family,item} resolves to)")
    p.add_argument("family")
    p.add_argument("item")
    args = parser.parse_args(argv)

    from .. import MergeError

    try:
        if args.command == "build":
            from . import ensure_built
            from .build import build_atomic, get_profile

            if args.out:
                print(build_atomic(args.out.resolve(), get_profile(args.profile), parallel=not args.serial))
            else:
                print(ensure_built(args.profile, parallel=not args.serial))
        elif args.command == "score":
            from . import ensure_built
            from .score import score_table

            root = args.root or ensure_built(args.profile)
            score_table(root, families=args.family or ["qwen2_vl", "internvl"], limit=args.limit)
        else:
            from . import resolve_path

            print(resolve_path(args.family, args.item))
    except MergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
