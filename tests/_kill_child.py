"""The merge that tests/test_kill.py kills: a child of a forkserver that has torch and the package imported, so
an iteration costs a fork, not an interpreter start (which takes seconds). Kept out of the test module so that
the child imports neither pytest nor conftest."""

from __future__ import annotations

import time

PRELOAD = ["torch", "transformers", "hydra", "mmbench_merge.runner", "mmbench_merge.engine", "mmbench_merge.methods.ties",
           "tests._kill_child"]  # fmt: skip


def merge_slowly(conf: str, tiny_conf: str, runs: str, run_dir: str, delay: float, overrides: list[str]) -> None:
    """runner.run on the composed config, every tensor read slowed by `delay` seconds."""
    from hydra import compose, initialize_config_dir

    from mmbench_merge import MergeError, checkpoints
    from mmbench_merge.config import register_configs
    from mmbench_merge.runner import run

    original = checkpoints.SafetensorsCheckpoint.get

    def slow_get(self, name):
        time.sleep(delay)
        return original(self, name)

    checkpoints.SafetensorsCheckpoint.get = slow_get
    register_configs()
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose(config_name="config",
                      overrides=[f"hydra.searchpath=[file://{tiny_conf}]", f"runs_dir={runs}", *overrides])  # fmt: skip
    try:
        run(cfg, run_dir)
    except MergeError as exc:
        print(f"error: {exc}", flush=True)
