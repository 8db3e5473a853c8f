"""Tiny random checkpoints of the real architectures, for tests and benchmarks.

Built from transformers configs (Qwen2VLForConditionalGeneration, InternVLForConditionalGeneration in
transformers' native format, LlavaForConditionalGeneration), saved with ``save_pretrained`` so their tensor
names and files are exactly what transformers writes. Experts are the base plus random perturbations; one
expert can be saved as a PEFT LoRA adapter instead (``make_lora_expert``).
"""

from __future__ import annotations

import json
from pathlib import Path

FAMILY_OF_ARCH = {"qwen2_vl": "qwen2_vl", "internvl": "internvl", "llava": "llava"}
TASKS = ("vqa", "geometry", "chart", "ocr", "grounding")


def tiny_config(arch: str, hidden: int = 64, layers: int = 2, vocab: int = 320):
    """A transformers config of `arch` small enough to build in milliseconds."""
    text = dict(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )  # fmt: skip
    if arch == "qwen2_vl":
        from transformers import Qwen2VLConfig

        head_dim = hidden // 4
        section = [head_dim // 8, head_dim // 8 + head_dim // 16, head_dim // 8 + head_dim // 16]
        section[0] = head_dim // 2 - section[1] - section[2]
        text["rope_scaling"] = {"type": "mrope", "mrope_section": section}
        vision = dict(depth=1, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, in_channels=3, temporal_patch_size=2)  # fmt: skip
        return Qwen2VLConfig(text_config=text, vision_config=vision, vocab_size=vocab, image_token_id=vocab - 3,
                             video_token_id=vocab - 4, vision_start_token_id=vocab - 5, vision_end_token_id=vocab - 6,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    if arch == "internvl":
        from transformers import InternVLConfig

        text["model_type"] = "qwen2"
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=[28, 28], patch_size=[14, 14])  # fmt: skip
        return InternVLConfig(text_config=text, vision_config=vision, image_token_id=vocab - 3,
                              downsample_ratio=0.5)  # fmt: skip
    if arch == "llava":
        from transformers import LlavaConfig

        text["model_type"] = "llama"
        vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32)  # fmt: skip
        return LlavaConfig(text_config=text, vision_config=vision, image_token_id=vocab - 3)
    raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(FAMILY_OF_ARCH)}")


def build_model(arch: str, seed: int = 0, **config_kwargs):
    import torch
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    config = tiny_config(arch, **config_kwargs)
    return AutoModelForImageTextToText.from_config(config)


def save_model(model, path: Path, dtype: str = "bfloat16", max_shard_size: str | None = None) -> Path:
    import torch

    path = Path(path)
    model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def make_family(root: Path, arch: str, *, seed: int = 0, noise: float = 0.02, dtype: str = "bfloat16",
                lora_expert: str | None = "ocr", max_shard_size: str | None = None) -> dict:
    """Base + five experts under `root`; returns {"base": path, "experts": {task: path}}.

    Each full expert is the base with a random perturbation on every tensor (so the merge must keep excluded
    tensors at the base values by itself). `lora_expert` names one expert saved as a PEFT LoRA adapter on the
    language model's linear layers, plus the same expert with the adapter merged in under `<task>_merged`.
    """
    import torch

    root = Path(root)
    base_model = build_model(arch, seed=seed)
    base_dir = save_model(base_model, root / "base", dtype, max_shard_size)
    experts = {}
    for i, task in enumerate(TASKS):
        if task == lora_expert:
            adapter_dir, merged_dir = make_lora_expert(base_dir, root / task, arch, seed=seed + 100 + i, dtype=dtype)
            experts[task] = str(adapter_dir)
            experts[f"{task}_merged"] = str(merged_dir)
            continue
        model = build_model(arch, seed=seed)
        gen = torch.Generator().manual_seed(seed + 1 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn(p.shape, generator=gen))
        experts[task] = str(save_model(model, root / task, dtype, max_shard_size))
    (root / "family.json").write_text(json.dumps({"arch": arch, "base": str(base_dir), "experts": experts}))
    return {"base": str(base_dir), "experts": experts}


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_lora_expert(base_dir: Path, out_dir: Path, arch: str, *, seed: int, dtype: str = "bfloat16",
                     r: int = 4, alpha: int = 8, use_rslora: bool = False):
    """A PEFT LoRA adapter on the language model of `base_dir` with random non-zero A and B.

    Returns (adapter_dir, merged_dir): the adapter as PEFT saves it, and the base with it merged in (as the
    paper's Qwen2-VL experts were released).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_pretrained(base_dir, dtype=torch.float32)
    # Target only the language model's linears (the vision tower has its own q/k/v names in some families).
    target = r".*language_model.*\.(" + "|".join(LORA_TARGETS) + r")$"
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=target, use_rslora=use_rslora, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    adapter_dir = Path(out_dir)
    peft_model.save_pretrained(adapter_dir)
    merged = peft_model.merge_and_unload()
    merged_dir = save_model(merged, Path(f"{out_dir}_merged"), dtype)
    return adapter_dir, merged_dir


# The paper's selection (language-model linear weights, plus the projector for InternVL), per family's names.
LM_LINEARS = r"layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$"
SELECTION = {
    "qwen2_vl": ([LM_LINEARS], [r"^(model\.)?visual\.", "embed_tokens", r"^lm_head\.", "norm", r"\.bias$"]),
    "internvl": ([LM_LINEARS, r"^(model\.)?multi_modal_projector\.linear_(1|2)\.weight$"],
                 [r"^(model\.)?vision_tower\.", "embed_tokens", "lm_head", "norm", r"\.bias$"]),
    "llava": ([LM_LINEARS], [r"^(model\.)?vision_tower\.", "multi_modal_projector", "embed_tokens", "lm_head",
                             "norm", r"\.bias$"]),
}  # fmt: skip


def write_model_yaml(conf_dir: Path, name: str, arch: str, family_paths: dict, finetune: str = "full",
                     experts: tuple[str, ...] = TASKS, files_from: str = "base", extra: dict | None = None) -> Path:
    """A model config (same schema as conf/model/*.yaml) for a fixture family; pass its dir with --config-dir."""
    include, exclude = INTERNVL_CHAT_SELECTION if arch == "internvl_chat" else SELECTION[arch]
    lines = ["defaults: [/model_schema@_here_]", f"name: {name}", f"family: {FAMILY_OF_ARCH.get(arch, arch)}",
             f"finetune: {finetune}", f"base: {family_paths['base']}", "experts:"]  # fmt: skip
    lines += [f"  {task}: {family_paths['experts'][task]}" for task in experts]
    lines += ["merge:", f"  include: {json.dumps(include)}", f"  exclude: {json.dumps(exclude)}",
              f"files_from: {files_from}", "dtype: float32"]  # fmt: skip
    lines += [f"{key}: {json.dumps(value)}" for key, value in (extra or {}).items()]
    path = Path(conf_dir) / "model" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def build_all(root: Path) -> Path:
    """Every fixture family under `root`, with model YAMLs in `root/conf/model/`; returns the conf dir."""
    root = Path(root)
    for arch in FAMILY_OF_ARCH:
        paths = make_family(root / arch, arch)
        write_model_yaml(root / "conf", f"tiny_{arch}", arch, paths)
    return root / "conf"


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m mmbench_merge.fixtures OUT_DIR   (builds tiny checkpoints + model YAMLs)")
    print(build_all(Path(sys.argv[1])))


# ------------------------------------------------------------------------------------------ real disk layouts
REMOTE_CODE_TRAP = (
    "# A stand-in for InternVL's remote code: a test checkpoint must never run it.\n"
    "raise RuntimeError('remote code from {path} was imported')\n"
)


def to_internvl_chat(native_dir: Path, out_dir: Path, *, template: str = "internvl2_5") -> Path:
    """The original `internvl_chat` layout (one model.safetensors, llm_config / vision_config / auto_map,
    remote-code .py files, a CLIP preprocessor config) of a native InternVL checkpoint, as OpenGVLab ships
    InternVL2.5. The .py files raise when imported, so a test can tell that no remote code ran.
    """
    from safetensors.torch import save_file

    from .checkpoints import SafetensorsCheckpoint
    from .internvl_chat import REMOTE_CODE_FILES, to_original_state_dict

    native_dir, out_dir = Path(native_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = SafetensorsCheckpoint(native_dir)
    state = to_original_state_dict({name: source.get(name).clone() for name in source.keys()})
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    native = json.loads((native_dir / "config.json").read_text())
    text, vision = dict(native["text_config"]), native["vision_config"]
    text.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    size = vision["image_size"][0] if isinstance(vision["image_size"], list) else vision["image_size"]
    patch = vision["patch_size"][0] if isinstance(vision["patch_size"], list) else vision["patch_size"]
    dtype = native.get("dtype", "bfloat16")
    config = {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                     "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"},
        "downsample_ratio": native.get("downsample_ratio", 0.5), "force_image_size": size,
        "dynamic_image_size": False, "use_thumbnail": True, "min_dynamic_patch": 1, "max_dynamic_patch": 12,
        "ps_version": "v2", "select_layer": native.get("vision_feature_layer", -1), "template": template,
        "use_backbone_lora": 0, "use_llm_lora": 0, "tie_word_embeddings": "language_model.lm_head.weight"
        not in state, "torch_dtype": dtype,
        "llm_config": text,
        "vision_config": {
            "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
            "hidden_size": vision["hidden_size"], "intermediate_size": vision["intermediate_size"],
            "num_hidden_layers": vision["num_hidden_layers"], "num_attention_heads": vision["num_attention_heads"],
            "patch_size": patch, "image_size": size, "qkv_bias": vision.get("attention_bias", False),
            "qk_normalization": vision.get("use_qk_norm", False), "norm_type": vision.get("norm_type", "layer_norm"),
            "layer_norm_eps": vision.get("layer_norm_eps", 1e-6), "hidden_act": vision.get("hidden_act", "gelu"),
            "initializer_factor": 1.0, "torch_dtype": dtype,
        },
    }  # fmt: skip
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    processor = json.loads((native_dir / "processor_config.json").read_text()).get("image_processor", {})
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": processor.get("image_mean"),
        "image_std": processor.get("image_std"), "resample": 3, "size": size}, indent=2) + "\n")  # fmt: skip
    tokenizer_config = json.loads((native_dir / "tokenizer_config.json").read_text())
    for key in ("start_image_token", "end_image_token", "context_image_token", "video_token",
                "model_specific_special_tokens", "processor_class"):  # fmt: skip
        tokenizer_config.pop(key, None)  # the original tokenizer config knows nothing of the processor
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    for name in ("tokenizer.json", "generation_config.json"):
        if (native_dir / name).is_file():
            (out_dir / name).write_bytes((native_dir / name).read_bytes())
    for name in REMOTE_CODE_FILES:
        (out_dir / name).write_text(REMOTE_CODE_TRAP.format(path=out_dir / name))
    return out_dir


def make_internvl_chat_family(native_family: dict, root: Path, experts: tuple[str, ...] = TASKS) -> dict:
    """Base + full experts of a native InternVL family converted to the original layout under `root`."""
    root = Path(root)
    base = to_internvl_chat(Path(native_family["base"]), root / "base")
    converted = {t: str(to_internvl_chat(Path(native_family["experts"][t]), root / t)) for t in experts}
    return {"base": str(base), "experts": converted}


# The paper's InternVL2.5 selection on original names: LLM linears, projector linears and its LayerNorm weight.
INTERNVL_CHAT_SELECTION = ([LM_LINEARS, r"^mlp1\.(0|1|3)\.weight$"],
                           [r"^vision_model\.", "embed_tokens", "lm_head", "norm", r"\.bias$"])  # fmt: skip
