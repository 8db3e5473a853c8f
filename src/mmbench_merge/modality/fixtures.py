"""A tiny omni fixture in the real layouts: base Llama, three ModelCompose modality folders, three encoders,
MUSIC-AVQA / AVQA style question files with media, and the model / suite YAMLs that run it.

Sizes (docs/modality.md): Llama H=64, I=176, 2 layers, 4 heads, vocab 128 (a character tokenizer); LoRA r=10,
alpha=20 on q/k/v/o/gate/up/down; projectors of different input widths per modality (vision 32, video 48) so
a cross-wiring shows; the audio Q-Former's full key set (hidden 16, 2 heads, 2 layers, encoder width 24,
4 queries, 64 positions). Encoders: CLIP 28 px / patch 14 / hidden 32; BEATs with encoder width 24;
LanguageBind video tower with hidden 48 and 2 frames.
"""

from __future__ import annotations

import json
from pathlib import Path

H, INTER, LAYERS, VOCAB, R, ALPHA = 64, 176, 2, 128, 10, 20
WIDTH = {"vision": 32, "video": 48}
BEATS_CFG = dict(input_patch_size=16, embed_dim=16, conv_bias=False, encoder_layers=2, encoder_embed_dim=24,
                 encoder_ffn_embed_dim=48, encoder_attention_heads=2, conv_pos=8, conv_pos_groups=2,
                 relative_position_embedding=True, num_buckets=32, max_distance=64, gru_rel_pos=True,
                 deep_norm=True, layer_norm_first=False)  # fmt: skip
VIDEO_CFG = dict(hidden_size=48, intermediate_size=96, num_attention_heads=2, num_hidden_layers=2, image_size=28,
                 patch_size=14, num_frames=2, layer_norm_eps=1e-5, add_time_attn=True)  # fmt: skip
MODULES = [("self_attn", p, H, H) for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
    ("mlp", "gate_proj", H, INTER), ("mlp", "up_proj", H, INTER), ("mlp", "down_proj", INTER, H)]  # fmt: skip


def lora_keys() -> dict[str, tuple[int, int]]:
    """The shared LoRA keys and their shapes (A [r, in], B [out, r])."""
    out = {}
    for layer in range(LAYERS):
        for block, name, n_in, n_out in MODULES:
            prefix = f"model.layers.{layer}.{block}.{name}"
            out[f"{prefix}.lora_A.default.weight"] = (R, n_in)
            out[f"{prefix}.lora_B.default.weight"] = (n_out, R)
    return out


def qformer_keys(dim=16, kv=24, inner=32, layers=2, queries=4, positions=64, out=H) -> dict[str, tuple]:
    """The audio projector's key set as ModelCompose saves it (`qformer_<Q>N_<L>L`), written out by hand."""
    keys = {"audio_query_tokens": (1, queries, dim), "audio_Qformer.bert.embeddings.LayerNorm.weight": (dim,),
            "audio_Qformer.bert.embeddings.LayerNorm.bias": (dim,), "audio_llama_proj.weight": (out, dim),
            "audio_llama_proj.bias": (out,), "audio_position_embedding.weight": (positions, kv)}  # fmt: skip
    for i in range(layers):
        p = f"audio_Qformer.bert.encoder.layer.{i}."
        for att, kv_in in (("attention", dim), ("crossattention", kv)):
            for proj, n_in in (("query", dim), ("key", kv_in), ("value", kv_in)):
                keys[f"{p}{att}.self.{proj}.weight"] = (dim, n_in)
                keys[f"{p}{att}.self.{proj}.bias"] = (dim,)
            keys[f"{p}{att}.output.dense.weight"] = (dim, dim)
            keys[f"{p}{att}.output.dense.bias"] = (dim,)
            keys[f"{p}{att}.output.LayerNorm.weight"] = (dim,)
            keys[f"{p}{att}.output.LayerNorm.bias"] = (dim,)
        keys[f"{p}intermediate_query.dense.weight"] = (inner, dim)
        keys[f"{p}intermediate_query.dense.bias"] = (inner,)
        keys[f"{p}output_query.dense.weight"] = (dim, inner)
        keys[f"{p}output_query.dense.bias"] = (dim,)
        keys[f"{p}output_query.LayerNorm.weight"] = (dim,)
        keys[f"{p}output_query.LayerNorm.bias"] = (dim,)
    return keys


def projector_keys(modality: str) -> dict[str, tuple]:
    if modality == "audio":
        return {f"model.modal_projectors.audio.{k}": v for k, v in qformer_keys().items()}
    w = WIDTH[modality]
    p = f"model.modal_projectors.{modality}."
    return {p + "0.weight": (H, w), p + "0.bias": (H,), p + "2.weight": (H, H), p + "2.bias": (H,)}


def modality_config(modality: str, encoder: str) -> dict:
    cfg = {"model_type": "multimodal", "architectures": ["MultimodalLlamaForCausalLM"], "hidden_size": H,
           "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": 4, "num_key_value_heads": 4,
           "vocab_size": VOCAB, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
           "lora_strategy": "same", "lora_r": R, "lora_alpha": ALPHA, "lora_dropout": 0.05,
           "local_prefix_tokens": 0, "local_suffix_tokens": 0, "mm_vision_encoder": None,
           "mm_vision_tower": None, "mm_audio_encoder": None, "mm_video_encoder": None}  # fmt: skip
    if modality == "vision":
        cfg.update(mm_vision_encoder=encoder, mm_vision_tower=encoder, mm_hidden_size=WIDTH["vision"],
                   mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                   use_mm_proj=True, image_aspect_ratio="pad")  # fmt: skip
    elif modality == "audio":
        cfg.update(mm_audio_encoder=encoder, mm_audio_hidden_size=24, mm_audio_projector_type="qformer_4N_2L",
                   image_aspect_ratio="square")  # fmt: skip
    else:
        cfg.update(mm_video_encoder=encoder, mm_video_hidden_size=WIDTH["video"], mm_video_projector_type="mlp2x_gelu",
                   mm_video_select_layer=-2)  # fmt: skip
    return cfg


def write_modality(folder: Path, modality: str, encoder: str, seed: int, fmt: str = "bin") -> Path:
    """One `multimodal-tiny-<modality>-naivemc` folder: random bf16 LoRA + projector, config.json."""
    import torch

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in {**lora_keys(), **projector_keys(modality)}.items():
        tensors[name] = (torch.randn(shape, generator=g) * 0.05).to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "bin":
        torch.save(tensors, folder / "adapter_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(modality_config(modality, encoder), indent=2))
    return folder


def tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in range(32, 127):
        vocab[chr(c)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")  # fmt: skip


def write_base(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=512, rms_norm_eps=1e-5,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(str(path))
    tokenizer().save_pretrained(str(path))
    return path


def write_encoders(root: Path, seed: int = 0) -> dict[str, str]:
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from .encoders import Beats, LanguageBindVideo

    torch.manual_seed(seed)
    clip = root / "clip-tiny"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=WIDTH["vision"], intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=28, patch_size=14)).save_pretrained(str(clip))  # fmt: skip
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(str(clip))
    beats = root / "beats-tiny"
    beats.mkdir(parents=True, exist_ok=True)
    torch.save({"cfg": BEATS_CFG, "model": {k: v.clone() for k, v in Beats(BEATS_CFG).released_state_dict().items()}},
               beats / "BEATs_tiny.pt")  # fmt: skip
    video = root / "languagebind-video-tiny"
    video.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    state = {k: v.contiguous().clone() for k, v in LanguageBindVideo(VIDEO_CFG).released_state_dict().items()}
    for k in list(state):  # LanguageBind's temporal embeddings start non-zero
        if k.endswith("temporal_embedding") or k.endswith("class_embedding"):
            state[k] = torch.randn_like(state[k]) * 0.02
    state["text_model.embeddings.token_embedding.weight"] = torch.zeros(4, 8)  # the text tower: ignored
    save_file(state, str(video / "model.safetensors"))
    (video / "config.json").write_text(json.dumps({"model_type": "LanguageBindVideo", "vision_config": VIDEO_CFG}))
    return {"vision": str(clip), "audio": str(beats), "video": str(video)}


def write_media(root: Path, n: int = 3, seed: int = 0) -> list[dict]:
    """`n` items of media: an image (png), 0.5 s of audio (wav, 16 kHz), a 4-frame video (mp4)."""
    import av
    import numpy as np
    from PIL import Image
    from scipy.io import wavfile

    rng = np.random.default_rng(seed)
    media = root / "media"
    media.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        img = media / f"{i}.png"
        Image.fromarray((rng.random((30, 40, 3)) * 255).astype("uint8")).save(img)
        wav = media / f"{i}.wav"
        wavfile.write(wav, 16000, (rng.standard_normal(8000) * 3000).astype(np.int16))
        mp4 = media / f"{i}.mp4"
        with av.open(str(mp4), "w") as c:
            s = c.add_stream("mpeg4", rate=4)
            s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
            for _ in range(4):
                frame = av.VideoFrame.from_ndarray((rng.random((32, 32, 3)) * 255).astype("uint8"), format="rgb24")
                for packet in s.encode(frame):
                    c.mux(packet)
            for packet in s.encode():
                c.mux(packet)
        items.append({"vision": [f"media/{i}.png"], "audio": [f"media/{i}.wav"], "video": [f"media/{i}.mp4"]})
    return items


def write_questions(root: Path, media: list[dict]) -> None:
    """MUSIC-AVQA- and AVQA-style test files (ModelCompose's conversation layout) with their answer files."""
    for stem, answers, question in (
        ("music-avqa-test", ["yes", "two", "zero"], "Is the instrument on the left louder than the one on the right?"),
        ("avqa-test", ["A", "C", "B"], "What makes the sound? (A) dog (B) car (C) drum (D) rain\nAnswer with the option's letter."),
    ):  # fmt: skip
        items, gold = [], []
        for i, (inputs, answer) in enumerate(zip(media, answers)):
            human = f"image: <image>\naudio: <audio>\nvideo: <video>\n{question}"
            items.append({"id": f"{stem}-{i}", "conversations": [{"from": "human", "value": human},
                                                                 {"from": "gpt", "value": None}],
                          "modal_inputs": inputs})  # fmt: skip
            gold.append({"id": f"{stem}-{i}", "answer": answer})
        (root / f"{stem}_mm_video+image+audio.json").write_text(json.dumps(items, indent=1))
        (root / f"{stem}_mm_answer.json").write_text(json.dumps(gold, indent=1))


def make_omni(root: Path, seed: int = 0) -> dict:
    """Everything the tiny omni model needs under `root`; returns the paths (also in root/omni.json)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    base = write_base(root / "vicuna-tiny", seed)
    encoders = write_encoders(root / "encoders", seed)
    experts = {}
    for i, modality in enumerate(("vision", "audio", "video")):
        folder = root / f"multimodal-tiny-{modality}-naivemc"
        # the author's encoder path in config.json, as released; the model YAML points at the real one
        write_modality(folder, modality, f"/author/path/{modality}-encoder", seed + 1 + i)
        experts[modality] = str(folder)
    data = root / "data"
    data.mkdir(exist_ok=True)
    write_questions(data, write_media(data, seed=seed))
    paths = {"base": str(base), "experts": experts, "encoders": encoders, "data": str(data)}
    (root / "omni.json").write_text(json.dumps(paths, indent=2))
    return paths


def write_yamls(conf_dir: Path, paths: dict, name: str = "tiny_omni", merge_space: str = "factor") -> None:
    """conf/model/<name>.yaml and conf/suite/tiny_modality.yaml for `run.py --config-dir conf_dir`."""
    import yaml

    model = {"defaults": ["/model_schema@_here_"], "name": name, "family": "omni", "finetune": "modality",
             "base": paths["base"], "experts": paths["experts"], "encoders": paths["encoders"],
             "merge_space": merge_space, "dtype": "float32"}  # fmt: skip
    (conf_dir / "model").mkdir(parents=True, exist_ok=True)
    (conf_dir / "model" / f"{name}.yaml").write_text(yaml.safe_dump(model, sort_keys=False))
    suite = {"defaults": ["/suite_schema@_here_"], "name": "tiny_modality", "packaged": "modality",
             "data_dir": paths["data"],
             "tasks": [{"name": "modality_music_avqa", "category": "AV-QA", "metric": "exact_match",
                        "label": "MUSIC-AVQA"},
                       {"name": "modality_avqa", "category": "AV-QA", "metric": "option_match", "label": "AVQA"}]}  # fmt: skip
    (conf_dir / "suite").mkdir(parents=True, exist_ok=True)
    (conf_dir / "suite" / "tiny_modality.yaml").write_text(yaml.safe_dump(suite, sort_keys=False))
