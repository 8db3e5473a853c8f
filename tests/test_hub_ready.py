"""What a user with the hub needs, checked offline: prefetch into a Hugging Face cache in its real layout, a
run that then reads only that cache, and suite=paper tasks that need no login (GQA's images included)."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "prebuilt" / "minibench" / "internvl"
TASKS = ("vqa", "geometry", "chart", "ocr", "grounding")


def put_in_hub_cache(cache: Path, repo_id: str, src: Path, commit: str) -> None:
    """One model repo in huggingface_hub's cache layout: blobs by hash, snapshots/<commit>/ links, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in src.iterdir():
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from mmbench_merge.fixtures import write_model_yaml

    root = tmp_path_factory.mktemp("hub")
    cache = root / "hub-cache"
    commits = {}
    for i, item in enumerate(("base", *TASKS)):
        commits[f"owner/mini-{item}"] = f"{i + 1:x}" * 40
        put_in_hub_cache(cache, f"owner/mini-{item}", SHIPPED / item, commits[f"owner/mini-{item}"])
    paths = {"base": "owner/mini-base", "experts": {t: f"owner/mini-{t}" for t in TASKS}}
    write_model_yaml(root / "conf", "hub_internvl", "internvl", paths)
    missing = {"base": "owner/not-cached", "experts": {t: f"owner/mini-{t}" for t in TASKS}}
    write_model_yaml(root / "conf", "hub_missing", "internvl", missing)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(REPO / "src"), "HF_HOME": str(root / "hf-home"), "WANDB_MODE": "disabled"}  # fmt: skip
    env.pop("HF_TOKEN", None)
    return {"root": root, "conf": root / "conf", "env": env, "commits": commits}


def test_prefetch_reports_every_checkpoint_and_a_run_then_reads_only_the_cache(hub, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mmbench_merge.prefetch", f"hydra.searchpath=[file://{hub['conf']}]",
                           "model=hub_internvl", "suite=none"], env=hub["env"], capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("model ")]
    assert [line.split()[1:4] for line in lines] == [[repo, "commit", commit] for repo, commit in hub["commits"].items()]
    run = subprocess.run([sys.executable, "run.py", "--config-dir", str(hub["conf"]), "model=hub_internvl",
                          "method=ties", "evaluator=none", "suite=none", "logger=none", "save_merged=true",
                          f"hydra.run.dir={tmp_path}/run"], cwd=REPO, env=hub["env"], capture_output=True,
                         text=True, timeout=600, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "run" / "merged" / "model.safetensors").is_file()
    assert not (hub["root"] / "hf-home" / "token").exists()


def test_prefetch_of_an_uncached_repo_offline_is_one_error_line(hub):
    proc = subprocess.run([sys.executable, "-m", "mmbench_merge.prefetch", f"hydra.searchpath=[file://{hub['conf']}]",
                           "model=hub_missing", "suite=none"], env=hub["env"], capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: owner/not-cached: could not be fetched")
    assert "Traceback" not in proc.stderr


def test_paper_suite_dataset_plan_needs_no_token_and_includes_gqa_images():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mmbench_merge.config import register_configs
    from mmbench_merge.prefetch import dataset_needs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=qwen2vl", "suite=paper"])
    needs = dataset_needs(cfg)
    assert {n.task for n in needs} == {t.name for t in cfg.suite.tasks}
    gqa = [(n.path, n.name, n.split) for n in needs if n.task == "mmb_gqa"]
    assert gqa == [("lmms-lab-encoder/GQA", "testdev_balanced_instructions", "testdev"),
                   ("lmms-lab-encoder/GQA", "testdev_balanced_images", "testdev")]  # fmt: skip
    assert all("token" not in dict(n.kwargs) for n in needs)
    ocr = next(n for n in needs if n.task == "mmb_ocrvqa_testcore")  # suite=paper scores the paper's subset
    assert "revision" not in dict(ocr.kwargs)  # unverified here: not pinned (docs/evaluation.md says how)


def test_gqa_task_builds_offline_without_a_login(tmp_path, monkeypatch):
    """mmb_gqa on local copies shaped like the hub's (questions; images stored apart), with no token anywhere."""
    import datasets
    from lmms_eval.tasks import TaskManager, get_task_dict
    from PIL import Image

    from mmbench_merge.evaluation import TASKS_DIR

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored login either
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    questions = datasets.Dataset.from_dict({
        "id": ["q1", "q2", "q3"], "imageId": ["n1", "n2", "n1"], "question": ["what color?", "is it?", "where?"],
        "answer": ["red", "no", "left"], "fullAnswer": ["It is red.", "No.", "Left."], "isBalanced": [True] * 3,
        "groups": [{"global": None, "local": "x"}] * 3, "entailed": [""] * 3, "equivalent": [""] * 3,
        "types": [{"structural": "query", "semantic": "attr", "detailed": "color"}] * 3,
        "annotations": [{"answer": "", "question": "", "fullAnswer": ""}] * 3, "semantic": [""] * 3,
        "semanticStr": [""] * 3,
    })  # fmt: skip
    images = datasets.Dataset.from_dict({"id": ["n1", "n2", "n9"], "image": [
        Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("L", (8, 8), 0), Image.new("RGB", (8, 8))]})  # fmt: skip
    datasets.DatasetDict({"testdev": questions}).save_to_disk(str(tmp_path / "questions"))
    datasets.DatasetDict({"testdev": images}).save_to_disk(str(tmp_path / "images"))
    monkeypatch.setenv("MMBENCH_GQA_IMAGES", str(tmp_path / "images"))
    tasks = tmp_path / "tasks"
    shutil.copytree(TASKS_DIR / "paper", tasks)
    yaml = tasks / "mmb_gqa.yaml"
    text = "\n".join(line for line in yaml.read_text().splitlines()
                     if not line.startswith(("dataset_path", "dataset_name")))  # fmt: skip
    yaml.write_text(text + f"\ndataset_path: {tmp_path / 'questions'}\ndataset_kwargs:\n  load_from_disk: true\n")
    manager = TaskManager("WARNING", include_path=str(tasks), include_defaults=False, model_name="qwen2_vl")
    task = get_task_dict(["mmb_gqa"], manager)["mmb_gqa"]
    docs = list(task.test_docs())
    assert [d["question"] for d in docs] == ["what color?", "is it?", "where?"]
    assert [d["image"].getpixel((0, 0)) for d in docs] == [(255, 0, 0), (0, 0, 0), (255, 0, 0)]
    assert task.doc_to_target(docs[0]) == "red"


def test_gqa_images_missing_one_is_named(tmp_path, monkeypatch):
    import datasets
    from PIL import Image

    from mmbench_merge.evaluation.tasks.paper import utils

    datasets.Dataset.from_dict({"id": ["n1"], "image": [Image.new("RGB", (4, 4))]}).save_to_disk(str(tmp_path / "i"))
    monkeypatch.setenv("MMBENCH_GQA_IMAGES", str(tmp_path / "i"))
    questions = datasets.Dataset.from_dict({"imageId": ["n1", "n7"], "question": ["a", "b"]})
    with pytest.raises(ValueError, match="GQA: image n7 of the questions is not in the images split"):
        utils.gqa_process_docs(questions)
