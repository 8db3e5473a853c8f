"""MiniBench: generators, prompts, the micro build (concurrent, into a temporary cache), loadable model
directories, LoRA experts through the merge engine, and the evaluation backends reproducing what was trained."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mmbench_merge.minibench import prompts
from mmbench_merge.minibench.tasks import SIZE, TASKS, generate

REPO = Path(__file__).resolve().parents[1]
COLUMNS = {"id", "image", "question", "answer", "bbox", "choices", "task"}


# ------------------------------------------------------------------------------------------ generators
@pytest.mark.parametrize("task", [*TASKS, "caption"])
def test_generators_are_deterministic_and_well_formed(task):
    a, b = generate(task, 12, seed=3, split="test"), generate(task, 12, seed=3, split="test")
    other = generate(task, 12, seed=4, split="test")
    assert [s["image"].tobytes() for s in a] == [s["image"].tobytes() for s in b]
    assert [(s["question"], s["answer"]) for s in a] == [(s["question"], s["answer"]) for s in b]
    assert [s["image"].tobytes() for s in a] != [s["image"].tobytes() for s in other]
    for s in a:
        assert COLUMNS <= set(s), s.keys()
        assert s["image"].size == (SIZE, SIZE) and s["image"].mode == "RGB"
        assert s["question"] and s["answer"] and s["task"] == task
        if task == "grounding":
            x1, y1, x2, y2 = s["bbox"]
            assert 0 <= x1 < x2 <= 1000 and 0 <= y1 < y2 <= 1000
            assert s["answer"] == "[" + ", ".join(str(int(v)) for v in s["bbox"]) + "]"
        elif task == "caption" and s["answer"].startswith("rectangle"):
            assert len(s["bbox"]) == 4 and s["answer"].endswith(", <box>")
        else:
            assert s["bbox"] == []
        if task == "geometry":
            assert s["answer"] in "ABC"[: len(s["choices"])] and len(s["choices"]) in (2, 3)


def test_grounding_box_covers_the_drawn_object():
    """The gold box (0-1000 grid) is where the named object's pixels are."""
    for s in generate("grounding", 20, seed=0, split="test"):
        x1, y1, x2, y2 = (round(v * SIZE / 1000) for v in s["bbox"])
        crop = s["image"].crop((x1, y1, x2 + 1, y2 + 1))
        colors = {c for _, c in crop.getcolors(10_000) or []}
        assert any(c != (255, 255, 255) for c in colors), s["question"]


def test_chart_answers_match_the_question():
    from mmbench_merge.minibench.tasks import CHART_MAX

    for s in generate("chart", 30, seed=1, split="test"):
        if "largest" in s["question"]:
            assert s["answer"] in "ABCD"
        else:
            assert s["answer"].isdigit() and 1 <= int(s["answer"]) <= CHART_MAX


def _pixels(image, color, box=None):
    """How many pixels of `image` (inside `box`) are close to `color`."""
    crop = image.crop(box) if box else image
    return sum(n for n, c in crop.getcolors(100_000) if sum(abs(a - b) for a, b in zip(c, color)) < 60)


def test_chart_bar_heights_are_the_values():
    """The asked bar's drawn height, measured in pixels of its token column, gives the gold value."""
    from mmbench_merge.minibench.tasks import CELL, COLORS

    checked = 0
    for s in generate("chart", 60, seed=2, split="test"):
        match = re.fullmatch(r"What is the value of bar ([A-D])\?", s["question"])
        if not match:
            continue
        col = "ABCD".index(match.group(1))
        column = s["image"].crop((col * CELL + CELL // 2, 0, col * CELL + CELL // 2 + 1, SIZE))
        height = _pixels(column, COLORS["blue"])
        assert round(height / 14) == int(s["answer"]), (s["id"], height)
        checked += 1
    assert checked >= 5


def test_geometry_answers_match_the_drawing():
    """Longest line: the colour with most pixels; rectangle: the dark outline's extent; polygon: its fill ratio."""
    from mmbench_merge.minibench.tasks import COLORS, LINE_COLORS

    kinds = set()
    for s in generate("geometry", 60, seed=5, split="test"):
        gold = s["choices"]["ABC".index(s["answer"])]
        if "longest" in s["question"]:
            lengths = [_pixels(s["image"], COLORS[c]) for c in LINE_COLORS]
            assert gold == f"the {LINE_COLORS[lengths.index(max(lengths))]} side", (s["id"], lengths)
        elif "rectangle" in s["question"]:
            dark = [(x, y) for x in range(SIZE) for y in range(SIZE) if s["image"].getpixel((x, y)) == (0, 0, 0)]
            width = max(x for x, _ in dark) - min(x for x, _ in dark)
            height = max(y for _, y in dark) - min(y for _, y in dark)
            assert gold == ("the width" if width > height else "the height"), s["id"]
        else:  # a regular n-gon fills n/(2 pi) sin(2 pi / n) of its circumscribed circle
            grey = [(x, y) for x in range(SIZE) for y in range(SIZE) if s["image"].getpixel((x, y)) == (90, 90, 90)]
            cx, cy = sum(x for x, _ in grey) / len(grey), sum(y for _, y in grey) / len(grey)
            radius = max(math.hypot(x - cx, y - cy) for x, y in grey)
            fill = len(grey) / (math.pi * radius**2)
            sides = min((3, 4, 5), key=lambda n: abs(fill - n / (2 * math.pi) * math.sin(2 * math.pi / n)))
            assert gold == str(sides), (s["id"], fill)
        kinds.add(s["question"])
    assert len(kinds) == 3


def test_prompts_and_targets_per_family():
    doc = generate("grounding", 1, seed=0, split="test")[0]
    x1, y1, x2, y2 = (int(v) for v in doc["bbox"])
    assert prompts.target("grounding", "qwen2_vl", doc) == f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"
    assert prompts.target("grounding", "internvl", doc) == f"[[{x1}, {y1}, {x2}, {y2}]]"
    geo = generate("geometry", 1, seed=0, split="test")[0]
    text = prompts.prompt("geometry", "internvl", geo)
    assert all(f"{'ABC'[i]}. {c}" in text for i, c in enumerate(geo["choices"]))
    assert prompts.target("geometry", "qwen2_vl", geo) == geo["answer"]
    with pytest.raises(ValueError, match="unknown MiniBench task"):
        prompts.prompt("audio", "internvl", geo)
    rectangle = next(d for d in generate("caption", 40, seed=0, split="test") if d["bbox"])
    x1, y1, x2, y2 = (int(v) for v in rectangle["bbox"])
    qwen_box = f", <|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"
    assert prompts.target("caption", "qwen2_vl", rectangle).endswith(qwen_box)
    assert prompts.target("caption", "internvl", rectangle).endswith(f", [[{x1}, {y1}, {x2}, {y2}]]")


def test_experts_write_only_tokens_the_base_wrote():
    """Every token of every task's answer (as trained) occurs in the base's captions: a LoRA on the language model
    cannot train the output row of a token the base never wrote (the first build's Qwen2-VL VQA expert was stuck
    at chance on such tokens)."""
    from mmbench_merge.minibench.build import FAMILIES, get_profile, tokenizer_corpus
    from mmbench_merge.minibench.models import train_tokenizer
    from mmbench_merge.minibench.train import target_ids

    profile = get_profile("default")
    tok = train_tokenizer(tokenizer_corpus(profile), profile.vocab)
    captions = generate("caption", 600, seed=0, split="train")
    for family in FAMILIES:
        written = {t for doc in captions for t in target_ids(tok, family, "caption", doc)}
        for task in TASKS:
            for doc in generate(task, 150, seed=0, split="test"):
                unseen = set(target_ids(tok, family, task, doc)) - written
                assert not unseen, (family, task, doc["answer"], tok.convert_ids_to_tokens(sorted(unseen)))


def test_resolver_rejects_unknown_family_item_and_profile():
    from mmbench_merge import MergeError
    from mmbench_merge.minibench import ensure_built, resolve_path

    with pytest.raises(MergeError, match=r"unknown family 'llava'"):
        resolve_path("llava", "base")
    with pytest.raises(MergeError, match=r"unknown item 'ocr_full'"):
        resolve_path("internvl", "ocr_full")  # InternVL experts are full fine-tunes already
    with pytest.raises(MergeError, match=r"unknown profile 'huge'"):
        ensure_built("huge")


# ------------------------------------------------------------------------------------------ micro build
BUILD_SCRIPT = """
import json, sys
from mmbench_merge.minibench import ensure_built
root = ensure_built("micro", parallel=False)
print(json.dumps({"root": str(root)}))
"""


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """Two processes build the micro MiniBench at once into a fresh cache; both must get the same complete root."""
    cache = tmp_path_factory.mktemp("mmbench_cache")
    env = {**os.environ, "MMBENCH_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    roots = {json.loads(out.strip().splitlines()[-1])["root"] for out, _ in outs}
    return {"cache": cache, "root": Path(roots.pop()), "n_roots": 1 + len(roots), "env": env}


def test_concurrent_builds_make_one_complete_root(micro):
    from mmbench_merge.minibench.build import get_profile

    root = micro["root"]
    assert micro["n_roots"] == 1
    assert (root / "build.json").is_file()
    builds = (micro["cache"] / "minibench" / "builds.log").read_text().splitlines()
    assert len(builds) == 1, builds  # the second process waited on the lock and found the build complete
    assert not [p for p in root.parent.iterdir() if ".partial" in p.name or ".tmp" in p.name]  # no leftovers
    profile = get_profile("micro")
    for family in ("qwen2_vl", "internvl"):
        for task in ("base", *TASKS):
            curve = (root / "logs" / f"{family}_{task}.jsonl").read_text().splitlines()  # loss curves
            steps = profile.base_steps if task == "base" else profile.steps_for(task)
            assert [json.loads(line)["step"] for line in curve] == list(range(steps)), (family, task)
    assert profile.steps_for("grounding") != profile.expert_steps  # the per-task override is exercised


RESUME_SCRIPT = """
import sys
from pathlib import Path
from mmbench_merge.minibench.build import build, get_profile
build(Path(sys.argv[1]), get_profile("micro"), parallel=False)
"""


def test_resumed_build_trains_the_same_experts(micro, tmp_path):
    """A build resumed from some finished model dirs retrains the missing experts into the very same files an
    uninterrupted build wrote: each expert has its own seed and its own batches, and the base reloads exactly."""
    import shutil

    from mmbench_merge.minibench.build import config_hash, get_profile

    root, partial = micro["root"], tmp_path / "partial"
    shutil.copytree(root, partial)
    (partial / "build.json").unlink()
    (partial / "data.done").write_text(config_hash(get_profile("micro")) + "\n")
    missing = ["qwen2_vl/ocr", "qwen2_vl/ocr_full", "internvl/grounding"]
    for item in missing:
        shutil.rmtree(partial / item)
    proc = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(partial)], env=micro["env"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (partial / "build.json").is_file()
    for item in missing:
        files = sorted(f.relative_to(root / item) for f in (root / item).rglob("*") if f.is_file())
        assert files == sorted(f.relative_to(partial / item) for f in (partial / item).rglob("*") if f.is_file())
        assert any(f.suffix == ".safetensors" for f in files), item
        for name in files:  # byte for byte: weights, configs, the adapter's model card (no machine path in it)
            assert (root / item / name).read_bytes() == (partial / item / name).read_bytes(), f"{item}/{name}"


def test_tokenizer_writes_digits_and_capitals_one_per_token(micro):
    """OCR strings and box coordinates are written glyph by glyph, never as merged BPE pieces."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(micro["root"] / "tokenizer")
    assert tok.tokenize("XK96") == ["X", "K", "9", "6"]
    assert tok.decode(tok("text: HT7.").input_ids) == "text: HT7."


def test_datasets_layout_and_columns(micro):
    import datasets

    for task in TASKS:
        for split in ("train", "test"):
            ds = datasets.load_from_disk(str(micro["root"] / "data" / task / split))
            assert set(ds.column_names) == COLUMNS
            row = ds[0]
            assert row["task"] == task and row["image"].size == (SIZE, SIZE)
            expected = generate(task, 1, seed=0, split=split)[0]
            assert (row["question"], row["answer"]) == (expected["question"], expected["answer"])


def test_model_dirs_load_with_auto_classes(micro):
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    root = micro["root"]
    dirs = [("qwen2_vl", root / "qwen2_vl" / "base"), ("qwen2_vl", root / "qwen2_vl" / "ocr_full"),
            ("internvl", root / "internvl" / "base"), ("internvl", root / "internvl" / "grounding")]  # fmt: skip
    for family, path in dirs:
        model = AutoModelForImageTextToText.from_pretrained(path)
        assert model.config.model_type == family
        processor = AutoProcessor.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert tokenizer.eos_token == "<|im_end|>"
        for token in ("<|im_start|>", "<|im_end|>", "<|box_start|>", "<|image_pad|>", "<IMG_CONTEXT>"):
            assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id
        text = processor.apply_chat_template(prompts.chat_messages("vqa", family, {"question": "q?", "image": None}),
                                             tokenize=False, add_generation_prompt=True)  # fmt: skip
        assert text.endswith("<|im_start|>assistant\n")
    # the LoRA experts are PEFT adapters on the language model of the base
    config = json.loads((root / "qwen2_vl" / "ocr" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and "language_model" in config["target_modules"]


def test_resolver_and_lora_merge_through_engine(micro, monkeypatch, tmp_path):
    """mini_qwen2vl.yaml composes through the ${minibench:...} resolver; the engine merges its LoRA adapters."""
    import torch
    from hydra import compose, initialize_config_dir
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from mmbench_merge.config import register_configs
    from mmbench_merge.engine import merge_model

    monkeypatch.setenv("MMBENCH_CACHE", str(micro["cache"]))
    monkeypatch.setenv("MMBENCH_MINIBENCH_PROFILE", "micro")
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["model=mini_qwen2vl", "method=task_arithmetic", "method.scaling=1.0"])
    root = micro["root"]
    assert cfg.model.base == str(root / "qwen2_vl" / "base")
    assert cfg.model.experts.ocr == str(root / "qwen2_vl" / "ocr")
    merge_model(cfg.model, dict(cfg.method), out_dir=tmp_path / "merged", device="cpu")
    merged = load_file(str(next((tmp_path / "merged").glob("*.safetensors"))))
    base = load_file(str(root / "qwen2_vl" / "base" / "model.safetensors"))
    # Task arithmetic with scaling 1 is base + sum of the experts' LoRA deltas: rebuild that with PEFT itself.
    name = next(k for k in merged if re.search(r"layers\.0\.self_attn\.q_proj\.weight$", k))
    expected = base[name].clone()
    for task in TASKS:
        model = AutoModelForImageTextToText.from_pretrained(root / "qwen2_vl" / "base")
        model = PeftModel.from_pretrained(model, root / "qwen2_vl" / task).merge_and_unload()
        expected += model.state_dict()[_attribute(model, name)] - base[name]
    torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
    visual = next(k for k in base if "visual" in k)
    assert torch.equal(merged[visual], base[visual])  # excluded: the base's bytes


def _attribute(model, checkpoint_name: str) -> str:
    suffix = checkpoint_name.split("layers.", 1)[1]
    return next(k for k in model.state_dict() if k.endswith("layers." + suffix) and "language_model" in k)


@pytest.mark.parametrize("family", ["qwen2_vl", "internvl"])
def test_training_rows_are_the_single_prompt_then_target(micro, family):
    """Batched training rows (prompts of different lengths) equal each prompt encoded alone + target + <|im_end|>,
    whatever side the processor pads on (InternVLProcessor pads on the left by default)."""
    import torch
    from transformers import AutoProcessor

    from mmbench_merge.minibench.train import encode_batch, encode_prompts

    processor = AutoProcessor.from_pretrained(micro["root"] / family / "base")
    docs = generate("vqa", 6, seed=0, split="test") + generate("geometry", 2, seed=0, split="test")
    tasks = ["vqa"] * 6 + ["geometry"] * 2
    batch = encode_batch(family, processor, tasks, docs)
    eot = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for i, (task, doc) in enumerate(zip(tasks, docs)):
        alone = encode_prompts(family, processor, [task], [doc])["input_ids"][0]
        target = processor.tokenizer(" " + prompts.target(task, family, doc), add_special_tokens=False).input_ids
        target += [eot]
        n = int(batch["attention_mask"][i].sum())
        assert torch.equal(batch["input_ids"][i, :n], torch.cat([alone, torch.tensor(target)]))
        assert batch["labels"][i, len(alone) : n].tolist() == target
        assert (batch["labels"][i, : len(alone)] == -100).all()


# ------------------------------------------------------------------------------------------ evaluation backends
def _backend_answer(backend_cls, kwargs, args_for, doc, task):
    from lmms_eval.api.instance import Instance

    lm = backend_cls(**kwargs)
    lm.task_dict = {task: {"test": [doc]}}
    inst = Instance("generate_until", args_for(lm), idx=0, metadata={"task": task, "doc_id": 0, "repeats": 1})
    out = lm.generate_until([inst])[0]
    return getattr(out, "text", out)


@pytest.mark.parametrize("family", ["qwen2_vl", "internvl"])
def test_lmms_eval_backend_generates_what_the_scorer_generates(micro, family):
    """The lmms-eval backend and the training encoding agree token for token: same greedy answer."""
    import datasets

    from mmbench_merge.minibench.score import generate as score_generate
    from mmbench_merge.minibench.score import load_model

    path = micro["root"] / family / ("chart_full" if family == "qwen2_vl" else "chart")
    doc = datasets.load_from_disk(str(micro["root"] / "data" / "chart" / "test"))[0]
    gen_kwargs = {"max_new_tokens": 12, "temperature": 0}
    if family == "qwen2_vl":
        from lmms_eval.models.simple.qwen2_vl import Qwen2_VL

        answer = _backend_answer(
            Qwen2_VL, {"pretrained": str(path), "device": "cpu", "device_map": "cpu"},
            lambda lm: (prompts.prompt("chart", family, doc), dict(gen_kwargs), lambda d: [d["image"]], 0, "chart",
                        "test"), doc, "chart")  # fmt: skip
    else:
        from lmms_eval.models.chat.internvl_hf import InternVLHf

        answer = _backend_answer(
            InternVLHf, {"pretrained": str(path), "device": "cpu", "device_map": "cpu"},
            lambda lm: (prompts.prompt("chart", family, doc), lambda d: prompts.chat_messages("chart", family, d),
                        dict(gen_kwargs), 0, "chart", "test"), doc, "chart")  # fmt: skip
    model, processor = load_model(path, family)
    expected = score_generate(model, processor, family, "chart", [doc], max_new_tokens=12)[0]
    assert answer.strip() == expected.strip()


# ------------------------------------------------------------------------------------------ shipped copy
def test_shipped_copy_matches_the_default_profile(monkeypatch, tmp_path):
    """prebuilt/minibench/ is what `make minibench` builds for the current default profile, and the resolver
    uses it without building anything (the cache stays empty)."""
    from mmbench_merge.minibench import SHIPPED, resolve_path
    from mmbench_merge.minibench.build import config_hash, get_profile

    info = json.loads((SHIPPED / "build.json").read_text())
    assert info["hash"] == config_hash(get_profile("default")), "prebuilt/minibench is stale: run `make minibench`"
    monkeypatch.setenv("MMBENCH_CACHE", str(tmp_path))
    monkeypatch.delenv("MMBENCH_MINIBENCH_PROFILE", raising=False)
    assert resolve_path("internvl", "grounding") == str(SHIPPED / "internvl" / "grounding")
    assert resolve_path("qwen2_vl", "ocr_full") == str(SHIPPED / "qwen2_vl" / "ocr_full")
    for family in ("qwen2_vl", "internvl"):
        for item in ("base", *TASKS):
            path = Path(resolve_path(family, item))
            adapter = family == "qwen2_vl" and item != "base"
            assert (path / ("adapter_config.json" if adapter else "config.json")).is_file(), path
            assert any(path.glob("*.safetensors")), path
    assert not list(tmp_path.iterdir())
