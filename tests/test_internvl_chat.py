"""InternVL2.5 in its original `internvl_chat` layout, as OpenGVLab and the paper's experts ship it.

The checkpoints here are the shipped MiniBench InternVL models rewritten in the original layout (one
model.safetensors, fused ViT qkv, mlp1.{0,1,3}, llm_config / vision_config / auto_map, CLIP preprocessor
config, five remote-code .py files that raise when imported). They merge on the original names with the
paper's selection and evaluate end to end through lmms-eval's native `internvl_hf` backend with no remote code.
"""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "prebuilt" / "minibench" / "internvl"
CATEGORIES = ["VQA", "Geometry", "Chart", "OCR", "Grounding"]


def _native_family():
    return {"base": str(SHIPPED / "base"), "experts": {t: str(SHIPPED / t) for t in
                                                        ("vqa", "geometry", "chart", "ocr", "grounding")}}  # fmt: skip


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """The shipped MiniBench InternVL family in the original layout, and a model YAML for it."""
    from mmbench_merge.fixtures import make_internvl_chat_family, write_model_yaml

    root = tmp_path_factory.mktemp("internvl_chat")
    paths = make_internvl_chat_family(_native_family(), root)
    write_model_yaml(root / "conf", "tiny_internvl_chat", "internvl_chat", paths)
    return {"root": root, "paths": paths, "conf": root / "conf"}


@pytest.fixture(scope="module")
def real_shape_original(tmp_path_factory):
    """A random InternVL with the real checkpoint's tensor set (ViT qkv bias, untied lm_head) at small sizes."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from mmbench_merge.fixtures import to_internvl_chat

    root = tmp_path_factory.mktemp("internvl_real_shape")
    config = AutoConfig.from_pretrained(SHIPPED / "base")
    config.vision_config.attention_bias = True
    config.tie_word_embeddings = False
    config.text_config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    native = root / "native"
    model.to(torch.bfloat16).save_pretrained(native)
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        shutil.copy(SHIPPED / "base" / name, native / name)
    return {"native": native, "original": to_internvl_chat(native, root / "original"), "config": config}


def test_original_layout_has_the_real_name_pattern_and_maps_onto_the_native_class(real_shape_original):
    """637 names for InternVL2.5-1B's 24+24 layers: 12 per LLM layer, 14 per ViT layer, 13 others; the
    mapping gives exactly the names, shapes and values transformers' own class saves (qkv split in three)."""
    import torch
    from transformers import AutoConfig, InternVLForConditionalGeneration

    from mmbench_merge.checkpoints import SafetensorsCheckpoint
    from mmbench_merge.families import checkpoint_names
    from mmbench_merge.internvl_chat import native_layout, native_view

    orig = SafetensorsCheckpoint(real_shape_original["original"])
    config = real_shape_original["config"]
    n_llm, n_vit = config.text_config.num_hidden_layers, config.vision_config.num_hidden_layers
    assert len(orig.keys()) == 12 * n_llm + 14 * n_vit + 13
    assert 12 * 24 + 14 * 24 + 13 == 637
    assert {"mlp1.0.weight", "mlp1.1.weight", "mlp1.3.bias", "language_model.lm_head.weight",
            "vision_model.encoder.layers.0.attn.qkv.bias", "vision_model.embeddings.class_embedding",
            "vision_model.encoder.layers.1.ls2"} <= set(orig.keys())  # fmt: skip
    meta = json.loads((real_shape_original["original"] / "config.json").read_text())
    assert {"llm_config", "vision_config", "auto_map", "template", "downsample_ratio"} <= set(meta)

    view = native_view(real_shape_original["original"], real_shape_original["original"],
                       real_shape_original["original"].parent / "view")  # fmt: skip
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(AutoConfig.from_pretrained(view))
    expected = {checkpoint_names(model)[n]: tuple(p.shape) for n, p in model.state_dict().items()}
    converted = SafetensorsCheckpoint(view)
    assert {n: converted.shape(n) for n in converted.keys()} == expected
    assert len(converted.keys()) == len(orig.keys()) + 4 * n_vit  # qkv weight and bias: three each
    assert [n for n, _, _ in native_layout((n, orig.dtype(n), orig.shape(n)) for n in orig.keys())] \
        == converted.keys()
    native = SafetensorsCheckpoint(real_shape_original["native"])
    assert sorted(native.keys()) == sorted(converted.keys())
    for name in native.keys():
        assert torch.equal(native.get(name), converted.get(name)), name


def test_config_and_processor_translate_to_the_native_ones():
    """The shipped native model -> original layout -> translated back: the same config, processor, tokens."""
    import tempfile

    from transformers import AutoConfig, AutoProcessor

    from mmbench_merge.fixtures import to_internvl_chat
    from mmbench_merge.internvl_chat import native_view

    with tempfile.TemporaryDirectory() as tmp:
        orig = to_internvl_chat(SHIPPED / "base", Path(tmp) / "orig")
        view = native_view(orig, orig, Path(tmp) / "view")
        assert not list(view.glob("*.py"))
        ours, theirs = AutoConfig.from_pretrained(view).to_dict(), AutoConfig.from_pretrained(SHIPPED / "base").to_dict()
        for d in (ours, theirs):
            d.pop("_name_or_path")
        assert ours == theirs
        processor = AutoProcessor.from_pretrained(view)
        reference = AutoProcessor.from_pretrained(SHIPPED / "base")
        assert processor.image_seq_length == reference.image_seq_length
        assert processor.image_token_id == reference.image_token_id == ours["image_token_id"]
        assert processor.image_processor.size == reference.image_processor.size
        assert "<|im_start|>system" in processor.chat_template  # the internvl2_5 template's system turn


def test_bad_original_tensor_and_config_are_one_line_errors(tmp_path):
    from mmbench_merge import MergeError
    from mmbench_merge.internvl_chat import native_config, native_names, split_rows

    with pytest.raises(MergeError, match="tensor vision_model.encoder.layers.0.attn.foo.weight: unknown InternViT"):
        native_names("vision_model.encoder.layers.0.attn.foo.weight")
    with pytest.raises(MergeError, match="tensor mlp1.2.weight: not part of"):
        native_names("mlp1.2.weight")
    with pytest.raises(MergeError, match="attn.qkv.weight: fused qkv with shape \\[4, 2\\]"):
        split_rows("vision_model.encoder.layers.0.attn.qkv.weight", (4, 2))
    with pytest.raises(MergeError, match="x/config.json: key llm_config missing"):
        native_config({"vision_config": {}}, 1, "x/config.json")
    with pytest.raises(MergeError, match="only Qwen2 / LLaMA"):
        native_config({"llm_config": {"model_type": "internlm2", "architectures": ["InternLM2ForCausalLM"]},
                       "vision_config": {}}, 1)  # fmt: skip


# ------------------------------------------------------------------------------------------ end to end
def compose(conf_dir, *overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mmbench_merge.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[f"hydra.searchpath=[file://{conf_dir}]", *overrides])


def run(original, tmp_path, name, *overrides):
    from mmbench_merge.results import read_rows
    from mmbench_merge.runner import run as run_once

    cfg = compose(original["conf"], "model=tiny_internvl_chat", "suite=minibench", "evaluator.limit=1",
                  "evaluator.log_samples=true", "logger=none", "device=cpu", f"runs_dir={tmp_path}", *overrides)  # fmt: skip
    run_dir = tmp_path / name
    run_dir.mkdir()
    run_once(cfg, run_dir)
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    return run_dir, read_rows(run_dir / "results.jsonl"), samples


def _remote_modules():
    """Modules of the checkpoints' remote code (transformers imports it as transformers_modules.*)."""
    names = {Path(f).stem for f in ("modeling_internvl_chat.py", "modeling_intern_vit.py", "conversation.py",
                                    "configuration_internvl_chat.py", "configuration_intern_vit.py")}  # fmt: skip
    return [m for m in sys.modules if m.split(".")[-1] in names or m.startswith("transformers_modules")]


def test_original_layout_merges_and_evaluates_end_to_end_without_remote_code(original, tmp_path):
    import torch

    from mmbench_merge.checkpoints import SafetensorsCheckpoint
    from mmbench_merge.internvl_chat import to_native

    run_dir, rows, samples = run(original, tmp_path, "memory", "method=task_arithmetic")
    tasks = [r for r in rows if not r["task"].startswith("avg:")]
    assert [r["category"] for r in tasks] == CATEGORIES and all(r["n_samples"] == 1 for r in tasks)
    assert len(samples) == 5 and not (run_dir / "merged").exists()
    assert _remote_modules() == []  # and the .py files raise on import: none of them ran
    report = json.loads((run_dir / "merge_report.json").read_text())
    merged = {t["name"] for t in report["tensors"] if t["merged"]}
    assert {"mlp1.0.weight", "mlp1.1.weight", "mlp1.3.weight"} <= merged  # the paper's selection
    assert not any(n.startswith("vision_model.") or n.endswith(".bias") or "lm_head" in n for n in merged)
    assert len(merged) == 7 * 4 + 3  # 7 linears x 4 LLM layers + the projector's three

    # The same merge written natively (the default) and in the original layout: the same values, and the
    # native write evaluates exactly like the in-memory merge.
    native_dir, native_rows, native_samples = run(original, tmp_path, "native", "method=task_arithmetic",
                                                  "save_merged=true", "rerun=true")  # fmt: skip
    assert [s["response"] for s in native_samples] == [s["response"] for s in samples]
    assert [r["value"] for r in native_rows] == [r["value"] for r in rows]
    orig_dir, _, _ = run(original, tmp_path, "orig", "method=task_arithmetic", "save_merged=true",
                         "model.merged_format=original", "rerun=true")  # fmt: skip
    native, orig = SafetensorsCheckpoint(native_dir / "merged"), SafetensorsCheckpoint(orig_dir / "merged")
    assert json.loads((native_dir / "merged" / "config.json").read_text())["model_type"] == "internvl"
    assert json.loads((orig_dir / "merged" / "config.json").read_text())["model_type"] == "internvl_chat"
    assert not list((native_dir / "merged").glob("*.py")) and len(list((orig_dir / "merged").glob("*.py"))) == 5
    assert len(native.keys()) == len(orig.keys()) + 2 * 2  # two ViT layers: qkv weight (no bias here) in three
    for name in orig.keys():
        for native_name, value in to_native(name, orig.get(name)):
            assert torch.equal(native.get(native_name), value), native_name
    assert _remote_modules() == []


def test_trust_remote_code_is_the_only_way_to_the_remote_code_backend(original):
    from mmbench_merge import MergeError
    from mmbench_merge.families import backend_for

    cfg = compose(original["conf"], "model=tiny_internvl_chat")
    assert backend_for(cfg.model) == "internvl_hf"
    with pytest.raises(MergeError, match="evaluator.backend=internvl2 runs the checkpoint's own code"):
        backend_for(cfg.model, "internvl2")
    cfg.model.trust_remote_code = True
    assert backend_for(cfg.model) == "internvl2"


def test_the_shipped_internvl2_5_config_selects_the_papers_tensors():
    """On the real 637 names (generated from the layout in docs): 168 LLM matrices + mlp1.{0,1,3}.weight."""
    from omegaconf import OmegaConf

    from mmbench_merge.engine import Selection

    model = OmegaConf.load(REPO / "conf" / "model" / "internvl2_5.yaml")
    selection = Selection(tuple(model.merge.include), tuple(model.merge.exclude))
    names = ["language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
             "language_model.model.norm.weight"]  # fmt: skip
    for i in range(24):
        p = f"language_model.model.layers.{i}."
        names += [p + f"self_attn.{x}_proj.{k}" for x in "qkv" for k in ("weight", "bias")]
        names += [p + "self_attn.o_proj.weight", p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        v = f"vision_model.encoder.layers.{i}."
        names += [v + f"{m}.{k}" for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "norm1", "norm2")
                  for k in ("weight", "bias")] + [v + "ls1", v + "ls2"]  # fmt: skip
    names += [f"mlp1.{i}.{k}" for i in (0, 1, 3) for k in ("weight", "bias")]
    names += [f"vision_model.embeddings.{x}" for x in ("class_embedding", "position_embedding",
                                                       "patch_embedding.weight", "patch_embedding.bias")]  # fmt: skip
    assert len(names) == 637
    selected = [n for n in names if selection.selects(n)]
    assert len(selected) == 171
    assert {n for n in selected if n.startswith("mlp1")} == {"mlp1.0.weight", "mlp1.1.weight", "mlp1.3.weight"}


def test_a_failed_evaluation_keeps_the_merge(original, tmp_path):
    """The backend fails before it takes the merged weights: with the merge cache off they are written to
    merged/ (native), not lost (with the cache on, the cache keeps them: tests/test_resume.py)."""
    from mmbench_merge import MergeError
    from mmbench_merge.checkpoints import SafetensorsCheckpoint
    from mmbench_merge.runner import run as run_once

    cfg = compose(original["conf"], "model=tiny_internvl_chat", "suite=minibench", "method=weight_average",
                  "evaluator.backend=no_such_backend", "logger=none", "device=cpu", f"runs_dir={tmp_path}",
                  "merge_cache.enabled=false")  # fmt: skip
    with pytest.raises(MergeError, match="evaluator.backend: lmms-eval has no usable backend 'no_such_backend'"):
        run_once(cfg, tmp_path / "run")
    merged = tmp_path / "run" / "merged"
    assert json.loads((merged / "config.json").read_text())["model_type"] == "internvl"
    assert "multi_modal_projector.layer_norm.weight" in SafetensorsCheckpoint(merged).keys()
    assert not (tmp_path / "run" / "results.jsonl").exists()


def test_llm_config_attention_choice_is_left_to_transformers():
    """InternVL2.5's llm_config names flash_attention_2; the native config must not require it."""
    from mmbench_merge.internvl_chat import native_config

    config = {"llm_config": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896,
                             "attn_implementation": "flash_attention_2", "rope_theta": 1e6},
              "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                                "num_attention_heads": 16, "qkv_bias": True, "image_size": 448, "patch_size": 14},
              "force_image_size": 448, "downsample_ratio": 0.5, "template": "internvl2_5"}  # fmt: skip
    native = native_config(config, 151667)
    assert "attn_implementation" not in native["text_config"] and "architectures" not in native["text_config"]
    assert native["image_seq_length"] == 256 and native["vision_config"]["attention_bias"] is True
    assert native["vision_config"]["image_size"] == [448, 448] and native["image_token_id"] == 151667
