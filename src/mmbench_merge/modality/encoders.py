"""The omni model's encoders and projectors that transformers does not ship, written for this project.

Each loads the released weights by their own key names:
- `Beats`: BEATs (Chen et al., 2022) as in `BEATs_iter3_plus_AS2M.pt` ({"cfg": ..., "model": state dict}): a
  16x16 patch embedding of the 128-bin fbank, a weight-normed convolutional position embedding, post-LN
  transformer layers with DeepNorm residual scaling and gated relative position bias (bucketed, shared from
  layer 0). Output [b, T, encoder_embed_dim].
- `LanguageBindVideo`: the video tower of `LanguageBind/LanguageBind_Video_merge` (`vision_model.*` keys): a CLIP
  ViT whose every layer first attends across frames (temporal_embedding, temporal_layer_norm1, temporal_attn)
  and then within a frame. Output: the hidden states of every layer, per frame.
- `AudioQFormer`: ModelCompose's `qformer_<Q>N_<L>L` audio projector (Video-LLaMA's audio Q-Former): learned
  query tokens cross-attending to the encoder features plus a position embedding, then `audio_llama_proj`.
- `mlp2x_gelu`: Linear, GELU, Linear (keys `0.*`, `2.*`).
- `kaldi_fbank`: Kaldi-compatible log-mel filter banks (torchaudio's `compliance.kaldi.fbank` defaults), in
  torch, since torchaudio is not a dependency.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import MergeError

# --------------------------------------------------------------------------------------------- fbank


def kaldi_fbank(waveform: torch.Tensor, sample_rate: int = 16000, num_mel_bins: int = 128,
                frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0) -> torch.Tensor:  # fmt: skip
    """Log-mel filter banks [frames, num_mel_bins] of a mono waveform, Kaldi's defaults (povey window,
    pre-emphasis 0.97, DC removal, power spectrum, 20 Hz to Nyquist, snip_edges, no dither)."""
    x = waveform.double().reshape(-1)
    win = int(sample_rate * frame_length_ms / 1000)
    shift = int(sample_rate * frame_shift_ms / 1000)
    if x.numel() < win:
        raise MergeError(f"audio of {x.numel()} samples is shorter than one {frame_length_ms} ms frame")
    n_frames = 1 + (x.numel() - win) // shift
    frames = x.as_strided((n_frames, win), (shift, 1)).clone()
    frames -= frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - 0.97 * previous
    window = (0.5 - 0.5 * torch.cos(2 * math.pi * torch.arange(win, dtype=torch.float64) / (win - 1))).pow(0.85)
    frames = frames * window
    n_fft = 1 << (win - 1).bit_length()
    power = torch.fft.rfft(frames, n=n_fft).abs().pow(2)  # [frames, n_fft/2 + 1]
    banks = _mel_banks(num_mel_bins, n_fft, sample_rate)  # [bins, n_fft/2]
    banks = F.pad(banks, (0, 1))  # Kaldi leaves out the Nyquist bin
    energies = power @ banks.T
    return energies.clamp(min=torch.finfo(torch.float32).eps).log().float()


def _mel(f):
    return 1127.0 * torch.log1p(f / 700.0)


def _mel_banks(num_bins: int, n_fft: int, sample_rate: int, low: float = 20.0) -> torch.Tensor:
    high = sample_rate / 2
    n_bins_fft = n_fft // 2
    fft_bin_width = sample_rate / n_fft
    mel_low, mel_high = _mel(torch.tensor(low, dtype=torch.float64)), _mel(torch.tensor(high, dtype=torch.float64))
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins, dtype=torch.float64)[:, None]
    left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
    mel = _mel(fft_bin_width * torch.arange(n_bins_fft, dtype=torch.float64))[None, :]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    return torch.clamp(torch.minimum(up, down), min=0.0)


# --------------------------------------------------------------------------------------------- BEATs
BEATS_DEFAULTS = dict(input_patch_size=16, embed_dim=512, conv_bias=False, encoder_layers=12, encoder_embed_dim=768,
                      encoder_ffn_embed_dim=3072, encoder_attention_heads=12, conv_pos=128, conv_pos_groups=16,
                      relative_position_embedding=True, num_buckets=320, max_distance=800, gru_rel_pos=True,
                      deep_norm=True, layer_norm_first=False)  # fmt: skip
FBANK_MEAN, FBANK_STD = 15.41663, 6.55582


class _BeatsAttention(nn.Module):
    def __init__(self, dim: int, heads: int, has_bias_table: bool, num_buckets: int, max_distance: int, gru: bool):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.gru = gru
        if gru:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, heads, 1, 1))
        if has_bias_table:
            self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def _buckets(self, rel: torch.Tensor) -> torch.Tensor:
        half = self.num_buckets // 2
        buckets = (rel > 0).long() * half
        rel = rel.abs()
        max_exact = half // 2
        large = max_exact + (torch.log(rel.float().clamp(min=1) / max_exact) / math.log(self.max_distance / max_exact)
                             * (half - max_exact)).long()  # fmt: skip
        large = large.clamp(max=half - 1)
        return buckets + torch.where(rel < max_exact, rel, large)

    def position_bias(self, length: int) -> torch.Tensor:
        pos = torch.arange(length, device=self.relative_attention_bias.weight.device)
        return self.relative_attention_bias(self._buckets(pos[None, :] - pos[:, None])).permute(2, 0, 1)  # [H,T,T]

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        alpha = 32.0
        scaling = self.head_dim**-0.5
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        scores = (q * (scaling / alpha)) @ k.transpose(-1, -2)
        scores = (scores - scores.max(dim=-1, keepdim=True).values) * alpha
        rel = bias[None]  # [1,H,T,T]
        if self.gru:
            gates = torch.sigmoid(self.grep_linear(q).view(b, self.heads, t, 2, 4).sum(-1))
            gate_a, gate_b = gates.chunk(2, dim=-1)
            rel = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * rel
        attn = torch.softmax(scores + rel, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, t, d)
        return self.out_proj(out)


class _BeatsLayer(nn.Module):
    def __init__(self, cfg: dict, first: bool):
        super().__init__()
        dim = cfg["encoder_embed_dim"]
        self.self_attn = _BeatsAttention(dim, cfg["encoder_attention_heads"],
                                         first and cfg["relative_position_embedding"], cfg["num_buckets"],
                                         cfg["max_distance"], cfg["gru_rel_pos"])  # fmt: skip
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, cfg["encoder_ffn_embed_dim"])
        self.fc2 = nn.Linear(cfg["encoder_ffn_embed_dim"], dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.residual_scale = math.pow(2.0 * cfg["encoder_layers"], 0.25) if cfg["deep_norm"] else 1.0

    def forward(self, x, bias):
        x = self.self_attn_layer_norm(x * self.residual_scale + self.self_attn(x, bias))
        return self.final_layer_norm(x * self.residual_scale + self.fc2(F.gelu(self.fc1(x))))


class _BeatsEncoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        dim = cfg["encoder_embed_dim"]
        self.pos_conv_weight_g = nn.Parameter(torch.ones(1, 1, cfg["conv_pos"]))
        self.pos_conv_weight_v = nn.Parameter(torch.randn(dim, dim // cfg["conv_pos_groups"], cfg["conv_pos"]) * 0.02)
        self.pos_conv_bias = nn.Parameter(torch.zeros(dim))
        self.groups, self.kernel = cfg["conv_pos_groups"], cfg["conv_pos"]
        self.layer_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(_BeatsLayer(cfg, i == 0) for i in range(cfg["encoder_layers"]))

    def forward(self, x):
        v, g = self.pos_conv_weight_v, self.pos_conv_weight_g
        weight = g * v / v.norm(dim=(0, 1), keepdim=True)  # weight_norm over dim 2
        conv = F.conv1d(x.transpose(1, 2), weight, self.pos_conv_bias, padding=self.kernel // 2, groups=self.groups)
        if self.kernel % 2 == 0:
            conv = conv[:, :, :-1]  # SamePad
        x = self.layer_norm(x + F.gelu(conv).transpose(1, 2))
        bias = self.layers[0].self_attn.position_bias(x.shape[1])
        for layer in self.layers:
            x = layer(x, bias)
        return x


class Beats(nn.Module):
    """BEATs feature extractor; `load_state_dict` takes the released key names (see `released_state_dict`)."""

    def __init__(self, cfg: dict | None = None):
        super().__init__()
        self.cfg = {**BEATS_DEFAULTS, **(cfg or {})}
        c = self.cfg
        self.patch_embedding = nn.Conv2d(1, c["embed_dim"], kernel_size=c["input_patch_size"],
                                         stride=c["input_patch_size"], bias=c["conv_bias"])  # fmt: skip
        self.layer_norm = nn.LayerNorm(c["embed_dim"])
        self.post_extract_proj = nn.Linear(c["embed_dim"], c["encoder_embed_dim"])
        self.encoder = _BeatsEncoder(c)

    @property
    def out_dim(self) -> int:
        return self.cfg["encoder_embed_dim"]

    # The released names of the parameters whose module path here differs.
    _RENAMES = {"encoder.pos_conv.0.weight_g": "encoder.pos_conv_weight_g",
                "encoder.pos_conv.0.weight_v": "encoder.pos_conv_weight_v",
                "encoder.pos_conv.0.bias": "encoder.pos_conv_bias",
                "encoder.pos_conv.0.parametrizations.weight.original0": "encoder.pos_conv_weight_g",
                "encoder.pos_conv.0.parametrizations.weight.original1": "encoder.pos_conv_weight_v"}  # fmt: skip

    def load_released(self, state: dict, source: str) -> None:
        renamed = {self._RENAMES.get(k, k): v for k, v in state.items() if not k.startswith("predictor")}
        load_exact(self, renamed, source)

    def released_state_dict(self) -> dict:
        back = {v: k for k, v in self._RENAMES.items() if "parametrizations" not in k}
        return {back.get(k, k): v for k, v in self.state_dict().items()}

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        """fbank [b, frames, 128] (raw log-mel) -> features [b, tokens, encoder_embed_dim]."""
        x = ((fbank - FBANK_MEAN) / (2 * FBANK_STD)).unsqueeze(1)
        x = self.patch_embedding(x)  # [b, C, frames/16, 128/16]
        x = self.layer_norm(x.flatten(2).transpose(1, 2))
        return self.encoder(self.post_extract_proj(x))


def load_beats(path, device="cpu") -> Beats:
    """A BEATs checkpoint file ({"cfg": {...}, "model": state dict}), read with weights_only=True."""
    from pathlib import Path

    from .checkpoint import load_tensors_or_dict

    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.pt"), key=lambda p: ("beats" not in p.name.lower(), str(p)))
        if not files:
            raise MergeError(f"{path}: no BEATs checkpoint (*.pt) in this directory")
        path = files[0]
    data = load_tensors_or_dict(path)
    if not isinstance(data.get("model"), dict):
        raise MergeError(f"{path}: not a BEATs checkpoint (no 'model' state dict)")
    model = Beats(data.get("cfg") or {})
    model.load_released(data["model"], str(path))
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------- LanguageBind video
class _ClipAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # fmt: skip
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class _ClipMlp(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, inner), nn.Linear(inner, dim)

    def forward(self, x):
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # quick_gelu


class _VideoLayer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        dim, eps = c["hidden_size"], c.get("layer_norm_eps", 1e-5)
        self.t = c["num_frames"]
        self.temporal_embedding = nn.Parameter(torch.zeros(1, c["num_frames"], dim))
        self.temporal_attn = _ClipAttention(dim, c["num_attention_heads"])
        self.temporal_layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = _ClipAttention(dim, c["num_attention_heads"])
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _ClipMlp(dim, c["intermediate_size"])
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x, t: int):
        bt, n, d = x.shape
        b = bt // t
        # across frames: (b t) n d -> (b n) t d
        xt = x.view(b, t, n, d).transpose(1, 2).reshape(b * n, t, d) + self.temporal_embedding[:, :t]
        res = xt
        xt = res + self.temporal_attn(self.temporal_layer_norm1(xt))
        x = xt.view(b, n, t, d).transpose(1, 2).reshape(bt, n, d)
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class LanguageBindVideo(nn.Module):
    """The vision tower of LanguageBind_Video_merge; `vision_model.*` keys of its safetensors / bin."""

    def __init__(self, vision_config: dict):
        super().__init__()
        c = dict(vision_config)
        c.setdefault("num_frames", 8)
        self.cfg = c
        dim, patch, size = c["hidden_size"], c["patch_size"], c["image_size"]
        self.class_embedding = nn.Parameter(torch.zeros(dim))
        self.patch_embedding = nn.Conv2d(c.get("num_channels", 3), dim, patch, patch, bias=False)
        self.position_embedding = nn.Embedding((size // patch) ** 2 + 1, dim)
        self.pre_layrnorm = nn.LayerNorm(dim, eps=c.get("layer_norm_eps", 1e-5))
        self.layers = nn.ModuleList(_VideoLayer(c) for _ in range(c["num_hidden_layers"]))
        self.post_layernorm = nn.LayerNorm(dim, eps=c.get("layer_norm_eps", 1e-5))

    @property
    def out_dim(self) -> int:
        return self.cfg["hidden_size"]

    @staticmethod
    def released_name(name: str) -> str:
        head, _, rest = name.partition(".")
        if head in ("class_embedding", "patch_embedding", "position_embedding"):
            return f"vision_model.embeddings.{name}"
        if head == "layers":
            return f"vision_model.encoder.{name}"
        return f"vision_model.{name}"

    def load_released(self, state: dict, source: str) -> None:
        ours = {self.released_name(k): k for k in self.state_dict()}
        picked = {ours[k]: v for k, v in state.items() if k in ours}
        load_exact(self, picked, source, released=ours)

    def released_state_dict(self) -> dict:
        return {self.released_name(k): v for k, v in self.state_dict().items()}

    def forward(self, frames: torch.Tensor) -> list[torch.Tensor]:
        """frames [b, t, 3, H, W] -> hidden states [b*t, 1 + patches, dim] after the embeddings and each layer."""
        b, t = frames.shape[:2]
        x = self.patch_embedding(frames.flatten(0, 1)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.position_embedding.weight[None, : x.shape[1] + 1]
        x = self.pre_layrnorm(x)
        states = [x]
        for layer in self.layers:
            x = layer(x, t)
            states.append(x)
        return states


def load_languagebind_video(path, device="cpu") -> LanguageBindVideo:
    import json
    from pathlib import Path

    from .checkpoint import load_tensors

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise MergeError(f"{path}: no config.json (expected a LanguageBind_Video checkpoint directory)")
    config = json.loads(cfg_file.read_text())
    vision = config.get("vision_config") or config
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise MergeError(f"{path}: no *.safetensors or pytorch_model*.bin")
    state = {}
    for file in files:
        state.update(load_tensors(file))
    model = LanguageBindVideo(vision)
    model.load_released(state, str(path))
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------- projectors
class _Attn(nn.Module):  # BERT self/cross attention: `self.{query,key,value}`, `output.{dense,LayerNorm}`
    def __init__(self, dim, kv_dim, heads, eps=1e-12):
        super().__init__()
        self.heads = heads
        self.self = nn.Module()
        self.self.query, self.self.key, self.self.value = nn.Linear(dim, dim), nn.Linear(kv_dim, dim), nn.Linear(kv_dim, dim)
        self.output = nn.Module()
        self.output.dense, self.output.LayerNorm = nn.Linear(dim, dim), nn.LayerNorm(dim, eps=eps)

    def forward(self, x, kv):
        b, n, d = x.shape
        h = self.heads
        q = self.self.query(x).view(b, n, h, d // h).transpose(1, 2)
        k = self.self.key(kv).view(b, kv.shape[1], h, d // h).transpose(1, 2)
        v = self.self.value(kv).view(b, kv.shape[1], h, d // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.output.LayerNorm(self.output.dense(out) + x)


class _QFormerLayer(nn.Module):
    def __init__(self, dim, kv_dim, inner, heads):
        super().__init__()
        self.attention = _Attn(dim, dim, heads)
        self.crossattention = _Attn(dim, kv_dim, heads)
        self.intermediate_query = nn.Module()
        self.intermediate_query.dense = nn.Linear(dim, inner)
        self.output_query = nn.Module()
        self.output_query.dense, self.output_query.LayerNorm = nn.Linear(inner, dim), nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x, enc):
        x = self.attention(x, x)
        x = self.crossattention(x, enc)
        return self.output_query.LayerNorm(self.output_query.dense(F.gelu(self.intermediate_query.dense(x))) + x)


class AudioQFormer(nn.Module):
    """`audio_query_tokens`, `audio_Qformer.bert.{embeddings.LayerNorm, encoder.layer.N.*}`, `audio_llama_proj`,
    `audio_position_embedding` (ModelCompose `qformer_<Q>N_<L>L`, BERT with cross-attention in every layer)."""

    def __init__(self, queries, dim, kv_dim, inner, layers, heads, positions, out_dim):
        super().__init__()
        self.audio_query_tokens = nn.Parameter(torch.zeros(1, queries, dim))
        self.audio_Qformer = nn.Module()
        self.audio_Qformer.bert = nn.Module()
        self.audio_Qformer.bert.embeddings = nn.Module()
        self.audio_Qformer.bert.embeddings.LayerNorm = nn.LayerNorm(dim, eps=1e-12)
        self.audio_Qformer.bert.encoder = nn.Module()
        self.audio_Qformer.bert.encoder.layer = nn.ModuleList(
            _QFormerLayer(dim, kv_dim, inner, heads) for _ in range(layers))  # fmt: skip
        self.audio_llama_proj = nn.Linear(dim, out_dim)
        self.audio_position_embedding = nn.Embedding(positions, kv_dim)

    @classmethod
    def from_state(cls, state: dict, source: str, heads: int | None = None) -> "AudioQFormer":
        try:
            _, queries, dim = state["audio_query_tokens"].shape
            positions, kv_dim = state["audio_position_embedding.weight"].shape
            out_dim = state["audio_llama_proj.weight"].shape[0]
            inner = state["audio_Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"].shape[0]
        except KeyError as exc:
            raise MergeError(f"{source}: audio Q-Former tensor {exc.args[0]} missing") from None
        layers = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("audio_Qformer.bert.encoder.layer."))
        heads = heads or (dim // 64 if dim % 64 == 0 else max(1, dim // 8))  # BERT: 64-wide heads
        model = cls(queries, dim, kv_dim, inner, layers, heads, positions, out_dim)
        load_exact(model, state, source)
        return model

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """encoder features [b, T, kv_dim] -> [b, queries, out_dim]."""
        n = min(feats.shape[1], self.audio_position_embedding.num_embeddings)  # longer audio is cut at the table
        feats = feats[:, :n] + self.audio_position_embedding.weight[None, :n]
        x = self.audio_Qformer.bert.embeddings.LayerNorm(self.audio_query_tokens.expand(feats.shape[0], -1, -1))
        for layer in self.audio_Qformer.bert.encoder.layer:
            x = layer(x, feats)
        return self.audio_llama_proj(x)


def mlp2x_gelu(state: dict, source: str) -> nn.Module:
    try:
        w0, w2 = state["0.weight"], state["2.weight"]
    except KeyError as exc:
        raise MergeError(f"{source}: mlp2x_gelu projector tensor {exc.args[0]} missing") from None
    model = nn.Sequential(nn.Linear(w0.shape[1], w0.shape[0]), nn.GELU(), nn.Linear(w2.shape[1], w2.shape[0]))
    load_exact(model, state, source)
    return model


def build_projector(kind: str, state: dict, source: str) -> nn.Module:
    if kind == "mlp2x_gelu":
        return mlp2x_gelu(state, source)
    if kind.startswith("qformer"):
        return AudioQFormer.from_state(state, source)
    raise MergeError(f"{source}: projector type {kind!r} is not supported (mlp2x_gelu, qformer_<Q>N_<L>L)")


def load_exact(model: nn.Module, state: dict, source: str, released: dict | None = None) -> None:
    """Load `state` into `model`; a missing, unexpected or mis-shaped tensor is one error naming it."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        name = released and {v: k for k, v in released.items()}.get(missing[0]) or missing[0]
        raise MergeError(f"{source}: tensor {name} missing ({len(missing)} in all)")
    extra = sorted(set(state) - set(own))
    if extra:
        raise MergeError(f"{source}: tensor {extra[0]} unexpected ({len(extra)} in all)")
    for name, value in state.items():
        if tuple(value.shape) != tuple(own[name].shape):
            raise MergeError(f"{source}: tensor {name} has shape {list(value.shape)}, expected {list(own[name].shape)}")
    model.load_state_dict({k: v.float() for k, v in state.items()})
