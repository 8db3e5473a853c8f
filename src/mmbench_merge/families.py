"""Architecture knowledge as data: one small record per model family.

A model config names its family; everything family-specific (the transformers class, how PEFT module names
relate to checkpoint tensor names, which lmms-eval backend evaluates it, how it states boxes) lives here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import MergeError


@dataclass(frozen=True)
class Family:
    name: str
    model_class: str | None  # transformers class; None for remote-code checkpoints (trust_remote_code)
    model_type: str  # config.model_type
    lmms_backend: str  # lmms-eval model backend that evaluates it
    box_format: str  # "qwen": <|box_start|>(x1,y1),(x2,y2)<|box_end|>; "internvl": [[x1, y1, x2, y2]]; "none"


FAMILIES: dict[str, Family] = {
    "qwen2_vl": Family("qwen2_vl", "Qwen2VLForConditionalGeneration", "qwen2_vl", "qwen2_vl", "qwen"),
    # InternVL in transformers' native format (OpenGVLab/InternVL2_5-1B-hf and our MiniBench models).
    "internvl": Family("internvl", "InternVLForConditionalGeneration", "internvl", "internvl_hf", "internvl"),
    # InternVL in its original "internvl_chat" format (OpenGVLab/InternVL2_5-1B, remote code).
    # Evaluated through the native class (names and config mapped by internvl_chat.py) unless the model config
    # sets trust_remote_code: true, which selects lmms-eval's remote-code `internvl2` backend (REMOTE_CODE_BACKENDS).
    "internvl_chat": Family("internvl_chat", None, "internvl_chat", "internvl_hf", "internvl"),
    # LLaVA / Vicuna-style vision-language models (and the modality-merging Vicuna models).
    "llava": Family("llava", "LlavaForConditionalGeneration", "llava", "llava_hf", "none"),
    # Modality merging: ModelCompose's vision / audio / video LoRAs of one Vicuna, merged into one omni model
    # (mmbench_merge.modality; its lmms-eval backend is registered by this project).
    "omni": Family("omni", None, "multimodal", "mmbench_omni", "none"),
}


REMOTE_CODE_BACKENDS = {"internvl_chat": "internvl2"}  # family -> lmms-eval backend that runs the checkpoint's code


def backend_for(model_cfg, override: str | None = None) -> str:
    """The lmms-eval backend that evaluates a model config (evaluator.backend wins when set)."""
    family = get_family(model_cfg.family)
    remote = bool(model_cfg.get("trust_remote_code", False))
    if override:
        if override in REMOTE_CODE_BACKENDS.values() and not remote:
            raise MergeError(f"evaluator.backend={override} runs the checkpoint's own code: set "
                             f"model.trust_remote_code=true to allow it")
        return override
    if remote and family.name in REMOTE_CODE_BACKENDS:
        return REMOTE_CODE_BACKENDS[family.name]
    return family.lmms_backend


def needs_native_view(model_cfg) -> bool:
    """internvl_chat without remote code: original-layout directories are translated before evaluation."""
    return model_cfg.family == "internvl_chat" and not bool(model_cfg.get("trust_remote_code", False))


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise MergeError(f"model.family: unknown family {name!r}; known: {', '.join(FAMILIES)}") from None


def attribute_names(family: Family, base_dir: Path, checkpoint_keys: list[str]) -> dict[str, str]:
    """Map the model's attribute paths (what PEFT names modules by) to checkpoint tensor names.

    transformers 5 renames checkpoint keys when it loads a model (Qwen2-VL's `model.layers.0...` becomes
    `model.language_model.layers.0...`) and renames them back when it saves. We ask transformers itself: build
    the model from the base's config on the meta device (no memory, no weights) and run its save-time
    renaming over the attribute names. Checkpoint names also map to themselves, which covers adapters trained
    under transformers 4, whose module paths were the checkpoint names.
    """
    mapping = {key: key for key in checkpoint_keys}
    if family.model_class is None:
        return mapping  # remote code: module paths are the checkpoint names
    import torch
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir)
    model_class = getattr(transformers, family.model_class)
    with torch.device("meta"):
        model = model_class._from_config(config)
    for attribute, checkpoint_name in checkpoint_names(model).items():
        if checkpoint_name in mapping:
            mapping.setdefault(attribute, checkpoint_name)
    return mapping


def checkpoint_names(model) -> dict[str, str]:
    """Parameter / buffer name in the module -> tensor name in a checkpoint saved by transformers."""
    import torch

    names = [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: module names are the checkpoint names
        return {name: name for name in names}
    placeholders = {name: torch.empty(0, device="meta") for name in names}
    by_identity = {id(t): name for name, t in placeholders.items()}
    try:
        reverted = revert_weight_conversion(model, placeholders)
    except Exception:  # noqa: BLE001 (remote-code models without a conversion mapping)
        return {name: name for name in names}
    mapping = {}
    for checkpoint_name, tensor in reverted.items():
        module_name = by_identity.get(id(tensor))
        if module_name is not None:
            mapping[module_name] = checkpoint_name
    for name in names:
        mapping.setdefault(name, name)
    return mapping
