"""InternVL's original `internvl_chat` layout <-> transformers' native InternVL, without running remote code.

The paper's InternVL2.5 checkpoints (base and experts) are in the original layout: one model.safetensors with
`language_model.*` (a plain Qwen2 causal LM), `mlp1.{0,1,3}` (the projector: LayerNorm, Linear, GELU, Linear)
and `vision_model.*` (InternViT, fused `attn.qkv`), a config.json with `llm_config` / `vision_config` /
`auto_map`, and five remote-code .py files. Merging works on these names (the paper's selection is written
for them). Evaluating them needs either the remote code (trust_remote_code) or a translation to the layout
that transformers' own InternVLForConditionalGeneration loads, which this module does while streaming:

- names: `vision_model` -> `vision_tower`, `layers` -> `layer`, `class_embedding` -> `cls_token`,
  `position_embedding` -> `position_embeddings`, `patch_embedding` -> `patch_embeddings.projection`,
  `ls1/ls2` -> `lambda_1/lambda_2`, `attn.proj` -> `attention.projection_layer`, `attn` -> `attention`,
  `norm1/norm2` -> `layernorm_before/after`; `attn.qkv` rows are split into q, k, v (thirds, in that order);
  `mlp1.0/1/3` -> `multi_modal_projector.layer_norm/linear_1/linear_2`; `language_model.*` stays as is
  (the names transformers 5 writes and reads on disk for this class).
- config: `llm_config` -> `text_config`, `vision_config` -> InternVLVisionConfig fields, image size,
  downsample ratio, image token id and count; the processor (GotOcr2 image processor + InternVLProcessor),
  the tokenizer's image-token attributes and the chat template of the config's `template`.

Every function here works on names, shapes and small JSON files; tensors pass through one at a time.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from . import MergeError

if TYPE_CHECKING:
    import torch

ORIGINAL_MODEL_TYPE = "internvl_chat"
REMOTE_CODE_FILES = ("configuration_intern_vit.py", "configuration_internvl_chat.py", "modeling_intern_vit.py",
                     "modeling_internvl_chat.py", "conversation.py")  # fmt: skip
IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>"}  # fmt: skip
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# Files of an original checkpoint the native view / write replaces or drops.
_ORIGINAL_ONLY = {"config.json", "preprocessor_config.json", "processor_config.json", "configuration.json",
                  *REMOTE_CODE_FILES}  # fmt: skip

# InternViT renames, applied in order to the part after `vision_model.` (the conversion rules of transformers'
# InternVL conversion script, written here as (pattern, replacement) pairs).
_VISION_RENAMES = [
    (r"^embeddings\.class_embedding$", "embeddings.cls_token"),
    (r"^embeddings\.position_embedding$", "embeddings.position_embeddings"),
    (r"^embeddings\.patch_embedding\.", "embeddings.patch_embeddings.projection."),
    (r"^encoder\.layers\.(\d+)\.", r"encoder.layer.\1."),
    (r"\.ls(\d)$", r".lambda_\1"),
    (r"\.attn\.proj\.", ".attention.projection_layer."),
    (r"\.attn\.(q_norm|k_norm)\.", r".attention.\1."),
    (r"\.attn\.qkv\.", ".attention.qkv."),  # split below
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
]
_VISION_KNOWN = re.compile(
    r"^(embeddings\.(cls_token|position_embeddings|patch_embeddings\.projection\.(weight|bias))"
    r"|encoder\.layer\.\d+\.(lambda_[12]|attention\.(qkv|projection_layer|q_norm|k_norm)\.(weight|bias)"
    r"|mlp\.fc[12]\.(weight|bias)|layernorm_(before|after)\.(weight|bias)))$"
)
_PROJECTOR = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}
_PROJECTOR_BACK = {v: k for k, v in _PROJECTOR.items()}


# ------------------------------------------------------------------------------------------ detection
def read_config(path: Path) -> dict:
    file = Path(path) / "config.json"
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise MergeError(f"{file}: file not found") from None
    except ValueError as exc:
        raise MergeError(f"{file}: not valid JSON ({exc})") from None


def is_original(path: Path) -> bool:
    """True when the checkpoint directory is in the original internvl_chat layout."""
    config = read_config(path)
    return config.get("model_type") == ORIGINAL_MODEL_TYPE or "llm_config" in config


# ------------------------------------------------------------------------------------------ names
def native_names(name: str) -> list[str]:
    """The native checkpoint name(s) of one original tensor name (three for a fused qkv, else one)."""
    if name.startswith("language_model."):
        return [name]
    match = re.fullmatch(r"mlp1\.(\d)\.(weight|bias)", name)
    if match:
        if match.group(1) not in _PROJECTOR:
            raise MergeError(f"tensor {name}: not part of InternVL's projector mlp1 (expected mlp1.0/1/3)")
        return [f"multi_modal_projector.{_PROJECTOR[match.group(1)]}.{match.group(2)}"]
    if name.startswith("vision_model."):
        rest = name[len("vision_model."):]
        for pattern, replacement in _VISION_RENAMES:
            rest = re.sub(pattern, replacement, rest)
        if not _VISION_KNOWN.match(rest):
            raise MergeError(f"tensor {name}: unknown InternViT tensor, no native InternVL name for it")
        if ".attention.qkv." in rest:
            return [f"vision_tower.{rest.replace('.qkv.', f'.{p}_proj.')}" for p in "qkv"]
        return [f"vision_tower.{rest}"]
    raise MergeError(f"tensor {name}: not an InternVL (internvl_chat) tensor (language_model / mlp1 / vision_model)")


def original_name(native: str) -> str:
    """The original name of a native tensor (q/k/v projections of the ViT all map to their fused `qkv`)."""
    if native.startswith("language_model."):
        return native
    match = re.fullmatch(r"multi_modal_projector\.(layer_norm|linear_1|linear_2)\.(weight|bias)", native)
    if match:
        return f"mlp1.{_PROJECTOR_BACK[match.group(1)]}.{match.group(2)}"
    if not native.startswith("vision_tower."):
        raise MergeError(f"tensor {native}: not a native InternVL tensor name")
    rest = native[len("vision_tower."):]
    backwards = [
        (r"^embeddings\.cls_token$", "embeddings.class_embedding"),
        (r"^embeddings\.position_embeddings$", "embeddings.position_embedding"),
        (r"^embeddings\.patch_embeddings\.projection\.", "embeddings.patch_embedding."),
        (r"^encoder\.layer\.(\d+)\.", r"encoder.layers.\1."),
        (r"\.lambda_(\d)$", r".ls\1"),
        (r"\.attention\.projection_layer\.", ".attn.proj."),
        (r"\.attention\.[qkv]_proj\.", ".attn.qkv."),
        (r"\.attention\.", ".attn."),
        (r"\.layernorm_before\.", ".norm1."),
        (r"\.layernorm_after\.", ".norm2."),
    ]
    for pattern, replacement in backwards:
        rest = re.sub(pattern, replacement, rest)
    return f"vision_model.{rest}"


def split_rows(name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], slice]]:
    """(native name, native shape, row slice) for one original tensor."""
    names = native_names(name)
    if len(names) == 1:
        return [(names[0], tuple(shape), slice(None))]
    if not shape or shape[0] % 3:
        raise MergeError(f"tensor {name}: fused qkv with shape {list(shape)}, whose rows do not split in three")
    third = shape[0] // 3
    return [(n, (third, *shape[1:]), slice(i * third, (i + 1) * third)) for i, n in enumerate(names)]


def native_layout(layout: Iterable[tuple[str, str, tuple[int, ...]]]) -> list[tuple[str, str, tuple[int, ...]]]:
    """An original (name, dtype, shape) layout, in order, as the native layout it converts to."""
    return [(native, dtype, part_shape) for name, dtype, shape in layout
            for native, part_shape, _ in split_rows(name, shape)]  # fmt: skip


def to_native(name: str, tensor: "torch.Tensor") -> Iterator[tuple[str, "torch.Tensor"]]:
    """The native tensor(s) of one original tensor (views, no copy)."""
    for native, _, rows in split_rows(name, tuple(tensor.shape)):
        yield native, tensor[rows]


def to_native_state_dict(state: dict) -> dict:
    """Original names -> native names for tensors held in memory; empties `state` as it goes."""
    native = {}
    for name in list(state):
        native.update(to_native(name, state.pop(name)))
    return native


def to_original_state_dict(native: dict) -> dict:
    """Native names -> original names (q, k, v concatenated back into `qkv`, in that order)."""
    import torch

    out: dict = {}
    pending: dict[str, dict[str, "torch.Tensor"]] = {}
    for name, tensor in native.items():
        target = original_name(name)
        match = re.search(r"\.attention\.([qkv])_proj\.", name)
        if match is None:
            out[target] = tensor
            continue
        parts = pending.setdefault(target, {})
        parts[match.group(1)] = tensor
        if len(parts) == 3:
            out[target] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
            del pending[target]
    if pending:
        raise MergeError(f"tensor {next(iter(pending))}: q, k and v projections incomplete")
    return out


# ------------------------------------------------------------------------------------------ config
def _image_size(config: dict) -> int:
    size = config.get("force_image_size") or config["vision_config"].get("image_size", 448)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _patch_size(vision: dict) -> int:
    patch = vision.get("patch_size", 14)
    return int(patch[0] if isinstance(patch, (list, tuple)) else patch)


def native_config(config: dict, image_token_id: int, source: str = "config.json") -> dict:
    """The native InternVLConfig (as a dict) of an original config.json."""
    for key in ("llm_config", "vision_config"):
        if not isinstance(config.get(key), dict):
            raise MergeError(f"{source}: key {key} missing, not an original InternVL (internvl_chat) config")
    llm, vision = dict(config["llm_config"]), config["vision_config"]
    arch = (llm.get("architectures") or ["Qwen2ForCausalLM"])[0]
    if llm.get("model_type") not in ("qwen2", "llama") or arch not in ("Qwen2ForCausalLM", "LlamaForCausalLM"):
        raise MergeError(
            f"{source}: llm_config is {llm.get('model_type')!r}/{arch}; only Qwen2 / LLaMA language models "
            "(InternVL2.5 1B-8B, 26B+ use InternLM2) have a native mapping"
        )
    # InternVL2.5's llm_config asks for flash_attention_2 (not installed on most machines): let transformers choose.
    for key in ("architectures", "auto_map", "_name_or_path", "transformers_version", "torch_dtype", "use_bfloat16",
                "attn_implementation", "_attn_implementation"):
        llm.pop(key, None)
    dtype = config.get("torch_dtype") or llm.get("torch_dtype") or "bfloat16"
    image_size, patch = _image_size(config), _patch_size(vision)
    ratio = float(config.get("downsample_ratio", 0.5))
    vision_native = {
        "model_type": "internvl_vision",
        "hidden_size": vision["hidden_size"],
        "intermediate_size": vision["intermediate_size"],
        "num_hidden_layers": vision["num_hidden_layers"],
        "num_attention_heads": vision["num_attention_heads"],
        "attention_bias": bool(vision.get("qkv_bias", True)),
        "use_qk_norm": bool(vision.get("qk_normalization", False)),
        "norm_type": vision.get("norm_type", "layer_norm"),
        "layer_norm_eps": vision.get("layer_norm_eps", 1e-6),
        "hidden_act": vision.get("hidden_act", "gelu"),
        "image_size": [image_size, image_size],
        "patch_size": [patch, patch],
        "num_channels": vision.get("num_channels", 3),
        "use_mean_pooling": True,
        "dtype": dtype,
    }
    select_layer = config.get("select_layer", -1)
    return {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "text_config": {**llm, "dtype": dtype},
        "vision_config": vision_native,
        "image_token_id": int(image_token_id),
        "image_seq_length": int((image_size // patch) ** 2 * ratio**2),
        "downsample_ratio": ratio,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": select_layer,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", llm.get("tie_word_embeddings", False))),
        "dtype": dtype,
    }


# The chat templates of the `template` names InternVL2.5 checkpoints use (ChatML; images as <IMG_CONTEXT>,
# expanded by the processor). The system message is the one InternVL2.5's conversation.py sets.
INTERNVL2_5_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
_CHATML = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" "__SYSTEM__" "<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif part['type'] == 'video' %}<video>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_TEMPLATES = {"internvl2_5": _CHATML.replace("__SYSTEM__", INTERNVL2_5_SYSTEM)}


def chat_template(config: dict, files_dir: Path) -> str:
    """A chat_template.jinja in the files' directory wins; else the one of the config's `template` name."""
    own = Path(files_dir) / "chat_template.jinja"
    if own.is_file():
        return own.read_text()
    name = config.get("template")
    if name not in CHAT_TEMPLATES:
        raise MergeError(
            f"{Path(files_dir) / 'config.json'}: template {name!r} has no native chat template here "
            f"(known: {', '.join(CHAT_TEMPLATES)}); put a chat_template.jinja beside it"
        )
    return CHAT_TEMPLATES[name]


def _token_ids(files_dir: Path) -> dict[str, int]:
    """Ids of the image tokens from tokenizer.json / added_tokens.json (no tokenizer is built)."""
    ids: dict[str, int] = {}
    tokenizer_json = files_dir / "tokenizer.json"
    if tokenizer_json.is_file():
        data = json.loads(tokenizer_json.read_text())
        ids.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
        ids.update({k: v for k, v in (data.get("model", {}).get("vocab") or {}).items() if k in IMAGE_TOKENS.values()})
    added = files_dir / "added_tokens.json"
    if added.is_file():
        ids.update(json.loads(added.read_text()))
    return ids


def native_files(files_dir: Path) -> dict[str, str]:
    """File name -> text of every small file the native layout needs, from an original directory."""
    files_dir = Path(files_dir)
    config = read_config(files_dir)
    ids = _token_ids(files_dir)
    context = IMAGE_TOKENS["context_image_token"]
    if context not in ids:
        raise MergeError(f"{files_dir}: the tokenizer has no {context} token (tokenizer.json / added_tokens.json)")
    native = native_config(config, ids[context], str(files_dir / "config.json"))
    pre_file = files_dir / "preprocessor_config.json"
    pre = json.loads(pre_file.read_text()) if pre_file.is_file() else {}
    size = native["vision_config"]["image_size"][0]
    image_processor = {
        "image_processor_type": "GotOcr2ImageProcessor",
        "crop_to_patches": bool(config.get("dynamic_image_size", False)),
        "min_patches": int(config.get("min_dynamic_patch", 1)),
        "max_patches": int(config.get("max_dynamic_patch", 12)),
        "size": {"height": size, "width": size},
        "image_mean": pre.get("image_mean", IMAGENET_MEAN),
        "image_std": pre.get("image_std", IMAGENET_STD),
        "resample": 3, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True,
    }  # fmt: skip
    processor = {"processor_class": "InternVLProcessor", "image_seq_length": native["image_seq_length"],
                 "image_processor": image_processor}  # fmt: skip
    tok_file = files_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(tok_file.read_text()) if tok_file.is_file() else {}
    tokenizer_config.pop("auto_map", None)
    tokenizer_config.pop("chat_template", None)  # the native one is chat_template.jinja
    tokenizer_config.update(IMAGE_TOKENS)
    tokenizer_config["model_specific_special_tokens"] = dict(IMAGE_TOKENS)
    tokenizer_config["processor_class"] = "InternVLProcessor"
    dump = lambda d: json.dumps(d, indent=2, ensure_ascii=False) + "\n"  # noqa: E731
    return {
        "config.json": dump(native),
        "processor_config.json": dump(processor),
        "preprocessor_config.json": dump(image_processor),
        "tokenizer_config.json": dump(tokenizer_config),
        "chat_template.jinja": chat_template(config, files_dir),
    }


def copy_native_files(files_dir: Path, out_dir: Path) -> None:
    """Non-weight files of an original directory into `out_dir`, translated; remote code left behind."""
    from .checkpoints import copy_non_weight_files

    out_dir = Path(out_dir)
    copy_non_weight_files(files_dir, out_dir)
    for name in _ORIGINAL_ONLY | {"chat_template.json"}:
        (out_dir / name).unlink(missing_ok=True)
    for name, text in native_files(files_dir).items():
        (out_dir / name).write_text(text)


# ------------------------------------------------------------------------------------------ writing
class NativeWriter:
    """A ShardedWriter in the native layout fed with original tensors (same interface as ShardedWriter)."""

    def __init__(self, out_dir: Path, layout: list[tuple[str, str, tuple[int, ...]]], max_shard_bytes: int):
        from .checkpoints import ShardedWriter

        self.layout = native_layout(layout)
        self._writer = ShardedWriter(out_dir, self.layout, max_shard_bytes)

    def write(self, name: str, tensor: "torch.Tensor") -> None:
        for native, part in to_native(name, tensor):
            self._writer.write(native, part.contiguous())

    def commit(self, extra_files_from: list[Path] = (), check=None) -> Path:
        """Like ShardedWriter.commit; the files are translated from the last source (files_from)."""
        files_dir = Path(list(extra_files_from)[-1])

        def translate_then_check(path: Path) -> None:
            copy_native_files(files_dir, path)
            verify_native(path, self.layout)
            if check is not None:
                check(path)

        return self._writer.commit(extra_files_from=(), check=translate_then_check)

    def abort(self) -> None:
        self._writer.abort()


def verify_native(path: Path, layout: list[tuple[str, str, tuple[int, ...]]]) -> None:
    from .checkpoints import SafetensorsCheckpoint

    written = SafetensorsCheckpoint(path)
    expected = {name: (dtype, shape) for name, dtype, shape in layout}
    got = {name: (written.dtype(name), written.shape(name)) for name in written.keys()}
    if got != expected:
        name = sorted(set(got) ^ set(expected) or {n for n in got if got[n] != expected.get(n)})[0]
        raise MergeError(f"{path}: tensor {name} differs from the native layout of the base")


def write_native_checkpoint(src_dir: Path, out_dir: Path, files_dir: Path | None = None,
                            max_shard_bytes: int = 2000 * 2**20) -> Path:
    """Convert an original checkpoint directory to the native layout, one tensor at a time."""
    from .checkpoints import SafetensorsCheckpoint, iter_layout

    source = SafetensorsCheckpoint(src_dir)
    writer = NativeWriter(out_dir, list(iter_layout(source)), max_shard_bytes)
    try:
        for name in source.keys():
            writer.write(name, source.get(name))
        return writer.commit(extra_files_from=[Path(files_dir or src_dir)])
    except BaseException:
        writer.abort()
        raise


def native_view(weights_dir: Path, files_dir: Path, out_dir: Path) -> Path:
    """A native directory for evaluation: weights converted from `weights_dir`, files from `files_dir`."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    return write_native_checkpoint(weights_dir, out_dir, files_dir)
