"""Download everything a run needs into the Hugging Face caches, for clusters whose compute nodes are offline.

    python -m mmbench_merge.prefetch model=internvl2_5 suite=paper      # on a login node, with internet
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python run.py model=internvl2_5 suite=paper ...   # on the nodes

Takes the same Hydra overrides as run.py (model, suite, model.revision, ...). For every hub id among the base
and the experts it fetches the files checkpoints.resolve would (HUB_PATTERNS) at model.revision and prints
the commit it got, which is what to pin (`model.revision`). For every task of the suite it loads the dataset
exactly as lmms-eval will (path, name, split, dataset_kwargs), plus the datasets a task's own hooks read
(GQA's images), so that HF_DATASETS_OFFLINE=1 later finds them in the datasets cache. Exit code 2 with one
`error:` line when something cannot be fetched.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from . import MergeError

# Datasets read by a task's process_docs besides its own (task -> [(path, name, split)]).
EXTRA_DATASETS = {"mmb_gqa": [("lmms-lab-encoder/GQA", "testdev_balanced_images", "testdev")]}


@dataclass(frozen=True)
class DatasetNeed:
    task: str
    path: str
    name: str | None
    split: str | None
    kwargs: tuple = ()  # sorted (key, value) pairs of dataset_kwargs (revision, ...)


def hub_ids(model_cfg) -> list[str]:
    """The base and experts that are hub ids (local directories need nothing)."""
    ids = []
    for source in [model_cfg.base, *model_cfg.experts.values()]:
        path = Path(str(source)).expanduser()
        if path.is_dir() or str(source).startswith(("/", ".", "~")) or str(source).count("/") != 1:
            continue
        if source not in ids:
            ids.append(str(source))
    return ids


def fetch_model(repo_id: str, revision: str | None) -> tuple[Path, str]:
    """snapshot_download of what a run reads; (local snapshot dir, commit)."""
    from huggingface_hub import snapshot_download

    from .checkpoints import HUB_PATTERNS

    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # noqa: BLE001 (network, missing repo, offline without a cache: one line)
        raise MergeError(f"{repo_id}: could not be fetched ({type(exc).__name__}: {exc})") from None
    return path, path.name  # the hub cache names snapshot directories by commit


def dataset_needs(cfg) -> list[DatasetNeed]:
    """Every dataset the suite's tasks load, read from the task configs lmms-eval will use."""
    from contextlib import ExitStack

    from .evaluation.suites import task_manager_for
    from .families import get_family

    needs: list[DatasetNeed] = []
    with ExitStack() as stack:
        manager = task_manager_for(cfg, get_family(cfg.model.family), stack)
        for spec in cfg.suite.tasks:
            config = manager._get_config(spec.name)
            for name in _leaf_tasks(manager, spec.name, config):
                leaf = manager._get_config(name) if name != spec.name else config
                kwargs = dict(leaf.get("dataset_kwargs") or {})
                if kwargs.pop("load_from_disk", False):
                    continue  # a local copy (MiniBench): nothing to fetch
                kwargs.pop("token", None)  # no task of ours needs a login; lmms-eval's token=True is dropped
                split = leaf.get("test_split") or leaf.get("validation_split")
                needs.append(DatasetNeed(name, leaf["dataset_path"], leaf.get("dataset_name"), split,
                                         tuple(sorted(kwargs.items()))))  # fmt: skip
            for path, ds_name, split in EXTRA_DATASETS.get(spec.name, []):
                needs.append(DatasetNeed(spec.name, path, ds_name, split))
    return needs


def _leaf_tasks(manager, name: str, config: dict) -> list[str]:
    """A task, or the tasks of a group (suite=general names some groups)."""
    if "dataset_path" in config:
        return [name]
    return [t if isinstance(t, str) else t.get("task") for t in config.get("task", [])]


def fetch_dataset(need: DatasetNeed) -> None:
    import datasets

    try:
        datasets.load_dataset(need.path, need.name, split=need.split, **dict(need.kwargs))
    except Exception as exc:  # noqa: BLE001
        raise MergeError(f"task {need.task}: dataset {need.path} ({need.name or 'default'}, {need.split}) could not "
                         f"be fetched ({type(exc).__name__}: {exc})") from None


def prefetch(cfg, out=sys.stdout) -> dict:
    """Fetch models and datasets; returns {"models": {repo: commit}, "datasets": [needs]}."""
    models = {}
    for repo_id in hub_ids(cfg.model):
        path, commit = fetch_model(repo_id, cfg.model.revision)
        models[repo_id] = commit
        print(f"model   {repo_id}  commit {commit}  -> {path}", file=out, flush=True)
    needs = dataset_needs(cfg) if cfg.suite.tasks else []
    done = []
    for need in needs:
        if need in done:
            continue
        fetch_dataset(need)
        done.append(need)
        revision = dict(need.kwargs).get("revision", "unpinned")
        print(f"dataset {need.path}  {need.name or ''}  {need.split}  ({need.task}; revision {revision})",
              file=out, flush=True)  # fmt: skip
    if models:
        print("pin these commits with model.revision (one revision for every repo of a model) or per repo in "
              "its model YAML", file=out)  # fmt: skip
    return {"models": models, "datasets": done}


def main(argv: list[str] | None = None) -> int:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from .config import register_configs

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    conf_dir = Path(__file__).resolve().parents[2] / "conf"
    register_configs()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose(config_name="config", overrides=argv)
        OmegaConf.resolve(cfg)
    except Exception as exc:  # noqa: BLE001 (Hydra's override / missing-config errors: one line)
        print(f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        return 2
    try:
        prefetch(cfg)
    except MergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
