"""A 6-point scaling sweep of OptMerge with the merge cache against one merge (evaluation excluded).

The sweep merges once (a miss: tau_m computed and stored) and rescales five times (hits: the base and the cached
tau_m are read, no expert, no optimisation). One merge and one sweep alternate `--repeats` times in this process
(each sweep in a fresh cache directory); the ratio is taken per repetition, then the median. The checkpoint is
bench/io_floor.py's random bf16 one (InternVL2.5-1B's language-model shapes; `--layers`, `--vocab`).

    PYTHONPATH=src python bench/sweep_cache.py --layers 1 --vocab 4096 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from io_floor import EXPERT_NAMES, make  # noqa: E402

SCALINGS = [0.05, 0.1, 0.2, 0.3, 0.5, 1.0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="internvl2_5_1b")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=5)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm/mmbench-sweep-cache"))
    args = parser.parse_args()

    import torch
    from omegaconf import OmegaConf

    from mmbench_merge.engine import merge_model

    root = args.dir
    shutil.rmtree(root, ignore_errors=True)
    make(root, args.shapes, args.layers, args.vocab, args.experts)
    model = OmegaConf.create({
        "name": "bench", "family": "internvl", "finetune": "full", "base": str(root / "base"),
        "experts": {k: str(root / k) for k in EXPERT_NAMES[:args.experts]},
        "merge": {"include": [r"layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$"], "exclude": []},
        "files_from": "base", "revision": None,
    })  # fmt: skip
    method = {"name": "optmerge", "iters": args.iters, "rank_fraction": None, "center": None, "init": None,
              "optimizer": None, "lr": None, "momentum": None}  # fmt: skip

    def one(scaling, cache=None):
        return merge_model(model, {**method, "scaling": scaling}, device="cpu", keep_in_memory=True, cache=cache)

    singles, sweeps, statuses = [], [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        reference = one(SCALINGS[-1]).state_dict
        singles.append(time.perf_counter() - started)
        cache_dir = Path(tempfile.mkdtemp(dir=root, prefix="cache-"))
        started = time.perf_counter()
        results = [one(s, {"dir": str(cache_dir)}) for s in SCALINGS]
        sweeps.append(time.perf_counter() - started)
        statuses = [r.report.cache["status"] for r in results]
        last = results[-1].state_dict
        assert all(torch.equal(last[n].view(torch.int16), reference[n].view(torch.int16)) for n in reference)
        shutil.rmtree(cache_dir)
    ratio = statistics.median(s / o for s, o in zip(sweeps, singles))
    load = os.getloadavg()[0]
    print(f"OptMerge (full preset, {args.iters} steps), {args.layers} layer(s) of {args.shapes}, {args.experts} experts;"
          f" load {load:.1f} on {os.cpu_count()} CPUs")  # fmt: skip
    print(f"one merge: median {statistics.median(singles):.2f} s; 6-point sweep with the cache: median "
          f"{statistics.median(sweeps):.2f} s ({' '.join(statuses)}); sweep / one merge: median {ratio:.2f} "
          f"(runs: {', '.join(f'{s / o:.2f}' for s, o in zip(sweeps, singles))}); the sweep's last point is "
          "bit-identical to the uncached merge")  # fmt: skip
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
