"""Running the omni model (transformers 5, no ModelCompose code).

The language model is a plain `LlamaForCausalLM` (Vicuna-7B) with the merged LoRA folded into its weights,
W <- W + (alpha/r) B A for every q/k/v/o/gate/up/down: ModelCompose's naive-MC models apply their one `default`
LoRA to every token, so folding is the same function. Each modality has an encoder and its projector:

    vision  CLIP ViT (transformers), image padded to a square, hidden_states[select_layer][:, 1:]  -> mlp2x_gelu
    audio   mono 16 kHz (at most 30 s), 128-bin Kaldi fbank, BEATs                                  -> Q-Former
    video   num_frames frames, LanguageBind video tower hidden_states[select_layer], every token    -> mlp2x_gelu

A prompt's `<image>` / `<audio>` / `<video>` placeholders are replaced, in order of appearance, by the projected
features of that modality's next input; the text between them is embedded with `embed_tokens`. A placeholder
of a modality the model does not have is dropped (a one-modality reference row gets the omni prompt).
Prompts use the vicuna_v1 template; decoding is greedy.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from .. import MergeError
from . import MODALITIES, PLACEHOLDERS

log = logging.getLogger("mmbench_merge")

PLACEHOLDER_RE = re.compile("(" + "|".join(re.escape(p) for p in PLACEHOLDERS.values()) + ")")
MODALITY_OF = {p: m for m, p in PLACEHOLDERS.items()}
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")  # fmt: skip
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
AUDIO_RATE = 16000
MAX_AUDIO_S = 30


def vicuna_prompt(question: str) -> str:
    """ModelCompose's vicuna_v1 conversation with one user turn and an open assistant turn."""
    return f"{SYSTEM} USER: {question} ASSISTANT:"


# --------------------------------------------------------------------------------------------- media
def read_image(item):
    from PIL import Image

    return item.convert("RGB") if isinstance(item, Image.Image) else Image.open(item).convert("RGB")


def read_audio(item) -> torch.Tensor:
    """Mono float waveform at 16 kHz, at most 30 s: from a path (wav, or any container av reads) or (array, rate)."""
    import numpy as np

    if isinstance(item, (tuple, list)):
        data, rate = np.asarray(item[0], dtype=np.float64), int(item[1])
    elif str(item).lower().endswith(".wav"):
        from scipy.io import wavfile

        rate, data = wavfile.read(str(item))
        if data.dtype.kind == "i":
            data = data / float(np.iinfo(data.dtype).max)
        data = np.asarray(data, dtype=np.float64)
    else:
        import av

        with av.open(str(item)) as container:
            stream = container.streams.audio[0]
            rate = stream.rate
            chunks = [frame.to_ndarray().astype(np.float64).reshape(frame.layout.nb_channels if frame.format.is_planar
                      else 1, -1) for frame in container.decode(stream)]  # fmt: skip
        data = np.concatenate(chunks, axis=1).T if chunks else np.zeros((0, 1))
    if data.ndim == 2:
        data = data.mean(axis=1)
    if rate != AUDIO_RATE:
        from scipy.signal import resample_poly

        data = resample_poly(data, AUDIO_RATE, rate)
    return torch.from_numpy(np.ascontiguousarray(data[: AUDIO_RATE * MAX_AUDIO_S]))


def read_frames(item, num_frames: int):
    """`num_frames` RGB frames (PIL) sampled uniformly from a video file or a directory of images."""
    import numpy as np
    from PIL import Image

    path = Path(item)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        frames = [Image.open(p).convert("RGB") for p in files]
    else:
        import av

        with av.open(str(path)) as container:
            frames = [f.to_image().convert("RGB") for f in container.decode(video=0)]
    if not frames:
        raise MergeError(f"{item}: no video frames")
    idx = np.linspace(0, len(frames) - 1, num_frames).round().astype(int)
    return [frames[i] for i in idx]


def _to_tensor(image, size: int) -> torch.Tensor:
    """Resize the short side to `size`, centre-crop, CLIP-normalise: [3, size, size]."""
    import numpy as np

    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample=3)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


# --------------------------------------------------------------------------------------------- encoders
class ClipVisionEncoder(nn.Module):
    def __init__(self, path: Path, info: dict):
        super().__init__()
        from transformers import CLIPImageProcessor, CLIPVisionModel

        self.model = CLIPVisionModel.from_pretrained(str(path))
        self.processor = CLIPImageProcessor.from_pretrained(str(path))
        self.select_layer = int(info.get("select_layer", -2))
        self.patch_only = (info.get("select_feature") or "patch") == "patch"
        self.pad = (info.get("image_aspect_ratio") or "pad") == "pad"

    def forward(self, item) -> torch.Tensor:
        from PIL import Image

        image = read_image(item)
        if self.pad:  # LLaVA's expand2square with the processor's mean colour
            w, h = image.size
            side = max(w, h)
            canvas = Image.new("RGB", (side, side), tuple(int(255 * m) for m in self.processor.image_mean))
            canvas.paste(image, ((side - w) // 2, (side - h) // 2))
            image = canvas
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"]
        param = next(self.model.parameters())
        out = self.model(pixel_values=pixels.to(param.device, param.dtype), output_hidden_states=True)
        feats = out.hidden_states[self.select_layer]
        return feats[:, 1:] if self.patch_only else feats


class BeatsAudioEncoder(nn.Module):
    def __init__(self, path: Path, info: dict):
        super().__init__()
        from .encoders import load_beats

        self.model = load_beats(path)

    def forward(self, item) -> torch.Tensor:
        from .encoders import kaldi_fbank

        wave = read_audio(item) * 32768.0  # BEATs' preprocessing scales to the int16 range
        fbank = kaldi_fbank(wave, AUDIO_RATE, 128)
        param = next(self.model.parameters())
        return self.model(fbank[None].to(param.device, param.dtype))


class LanguageBindVideoEncoder(nn.Module):
    def __init__(self, path: Path, info: dict):
        super().__init__()
        from .encoders import load_languagebind_video

        self.model = load_languagebind_video(path)
        self.select_layer = int(info.get("select_layer", -2))
        self.num_frames = int(self.model.cfg["num_frames"])

    def forward(self, item) -> torch.Tensor:
        frames = read_frames(item, self.num_frames)
        size = int(self.model.cfg["image_size"])
        x = torch.stack([_to_tensor(f, size) for f in frames])[None]  # [1, t, 3, H, W]
        param = next(self.model.parameters())
        feats = self.model(x.to(param.device, param.dtype))[self.select_layer]  # [t, n, D]
        return feats.reshape(1, -1, feats.shape[-1])


ENCODERS = {"clip": ClipVisionEncoder, "beats": BeatsAudioEncoder, "languagebind_video": LanguageBindVideoEncoder}


# --------------------------------------------------------------------------------------------- the model
class OmniModel(nn.Module):
    """Llama (merged LoRA folded in) + per-modality encoder and projector; `generate` answers one prompt."""

    def __init__(self, llm, tokenizer, modalities: dict):
        super().__init__()
        self.llm = llm
        self.tokenizer = tokenizer
        self.modalities = modalities  # modality -> description from omni_config.json
        self.encoders = nn.ModuleDict()
        self.projectors = nn.ModuleDict()
        self.folded = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.dtype

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    @classmethod
    def from_config(cls, omni_cfg: dict, *, device: str = "cpu", dtype: str | torch.dtype = "float32",
                    revision: str | None = None) -> "OmniModel":  # fmt: skip
        """The base Llama and every modality's encoder; the LoRA and projectors come with `load_merge`."""
        from transformers import AutoTokenizer, LlamaForCausalLM

        from .merge import resolve_source

        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        base = resolve_source(omni_cfg["base"], revision)
        llm = LlamaForCausalLM.from_pretrained(str(base), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(base))
        model = cls(llm, tokenizer, dict(omni_cfg["modalities"]))
        for modality, info in model.modalities.items():
            kind = info.get("encoder_type")
            if kind not in ENCODERS:
                raise MergeError(f"omni_config.json: modality {modality} has unknown encoder_type {kind!r}")
            if not info.get("encoder"):
                raise MergeError(f"model.encoders.{modality}: no encoder given (and none in the checkpoint's config)")
            source = resolve_source(info["encoder"], None, extra_patterns=("*.pt", "*.bin"))  # not the base's revision
            model.encoders[modality] = ENCODERS[kind](source, info)
        return model.to(device=device, dtype=dtype).eval()

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def fold(self, deltas: dict) -> int:
        """W <- W + delta for every `<module>.weight` of the Llama (deltas in float32, added then cast)."""
        params = dict(self.llm.named_parameters())
        for name, delta in deltas.items():
            target = params.get(name)
            if target is None:
                raise MergeError(f"merged LoRA: module weight {name} is not a parameter of the base Llama")
            if tuple(delta.shape) != tuple(target.shape):
                raise MergeError(f"merged LoRA: {name} update is {list(delta.shape)}, the base has {list(target.shape)}")
            target.copy_((target.float() + delta.to(target.device, torch.float32)).to(target.dtype))
        self.folded += len(deltas)
        return len(deltas)

    def load_merge(self, merge) -> int:
        """Fold the merged LoRA into the Llama and build every modality's projector from its tensors."""
        from .encoders import build_projector

        n = self.fold(merge.deltas())
        for modality, info in self.modalities.items():
            prefix = info["projector_prefix"]
            state = {k[len(prefix):]: v for k, v in merge.projectors.get(modality, {}).items()}
            if not state:
                raise MergeError(f"merged weights: no projector tensors for modality {modality} ({prefix}*)")
            projector = build_projector(info["projector_type"], state, f"projector {prefix}*")
            self.projectors[modality] = projector.to(device=self.device, dtype=self.dtype).eval()
            n += len(state)
        return n

    # ------------------------------------------------------------------ inputs
    @torch.no_grad()
    def features(self, modality: str, item) -> torch.Tensor:
        """One input of `modality` -> its projected features [tokens, hidden]."""
        if modality not in self.projectors:
            raise MergeError(f"omni model: modality {modality} has no projector loaded")
        feats = self.encoders[modality](item)
        return self.projectors[modality](feats.to(self.dtype))[0]

    @torch.no_grad()
    def embed(self, prompt: str, inputs: dict) -> tuple[torch.Tensor, list[tuple[str, int, int]]]:
        """[1, L, hidden] input embeddings for `prompt`, each placeholder replaced by its modality's next input.

        Returns the embeddings and the spans (what, start, length) of every piece, in order.
        """
        embed_tokens = self.llm.get_input_embeddings()
        queues = {m: list(inputs.get(m) or []) for m in MODALITIES}
        pieces, spans, pos = [], [], 0
        bos = self.tokenizer.bos_token_id
        parts = PLACEHOLDER_RE.split(prompt)
        for i, part in enumerate(parts):
            if i % 2 == 1:  # a placeholder
                modality = MODALITY_OF[part]
                if modality not in self.modalities:
                    continue  # a modality this model does not have: dropped
                if not queues[modality]:
                    raise MergeError(f"prompt has more {part} placeholders than {modality} inputs")
                emb = self.features(modality, queues[modality].pop(0))
                what = modality
            else:
                ids = self.tokenizer(part, add_special_tokens=False).input_ids
                if i == 0 and bos is not None:
                    ids = [bos, *ids]
                if not ids:
                    continue
                emb = embed_tokens(torch.tensor(ids, device=self.device))
                what = "text"
            pieces.append(emb.to(self.dtype))
            spans.append((what, pos, emb.shape[0]))
            pos += emb.shape[0]
        unused = [m for m, q in queues.items() if q and m in self.modalities]
        if unused:
            raise MergeError(f"{unused[0]} input(s) given without a {PLACEHOLDERS[unused[0]]} placeholder in the prompt")
        return torch.cat(pieces)[None], spans

    @torch.no_grad()
    def generate(self, question: str, inputs: dict, *, max_new_tokens: int = 128, until: list[str] | None = None,
                 template: bool = True) -> str:  # fmt: skip
        """Greedy answer to `question` (vicuna_v1 prompt) with `inputs` = {modality: [path | PIL image | ...]}."""
        embeds, _ = self.embed(vicuna_prompt(question) if template else question, inputs)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
        out = self.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                do_sample=False, num_beams=1, pad_token_id=self.tokenizer.pad_token_id
                                or self.tokenizer.eos_token_id)  # fmt: skip
        text = self.tokenizer.decode(out[0], skip_special_tokens=True).replace("</s>", "").strip()
        for stop in until or []:
            if stop and stop in text:
                text = text.split(stop)[0]
        return text.strip()
