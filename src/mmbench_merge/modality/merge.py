"""Merging modality LoRAs into one omni checkpoint, through the same method registry as every other merge.

Factor space (the paper, `merge_space: factor`): the task vectors of a shared key are the raw LoRA factors
(there is no base to subtract); every method's per-tensor function is applied to the A factors of a module and,
separately, to its B factors: A_m = scaling * f(A_1..A_n), B_m = scaling * f(B_1..B_n). The effective update
(alpha/r) B_m A_m then mixes cross terms B_i A_j (i != j) that no expert trained.

Product space (labelled options): each expert's dW_i = (alpha/r) B_i A_i is one dense task vector per module,
dW_m = scaling * f(dW_1..dW_n); `product_dense` keeps dW_m dense, `product_svd` re-factorises it to rank r by
truncated SVD (B = U_r S_r r/alpha, A = V_r^T), a LoRA of the original shape.

Keys present in exactly one checkpoint (each modality's projector) are carried over as the same tensors,
byte for byte. One key at a time: at most n + 2 tensors of one key are live besides the inputs.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .. import MergeError
from . import MERGE_SPACES, MODALITIES
from .checkpoint import LORA_KEY, ModalityCheckpoint, lora_shape, merged_config, read_modalities, split_keys

if TYPE_CHECKING:
    import torch

OMNI_CONFIG = "omni_config.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DENSE_WEIGHTS = "delta_model.safetensors"  # product_dense: module weight name -> dW_m
PROJECTOR_WEIGHTS = "projectors.safetensors"
MODELCOMPOSE_CONFIG = "config.json"  # the paper's merged config (first truthy value per key)
FORMAT = "mmbench-omni/1"
PEFT_PREFIX = "base_model.model."
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class OmniMerge:
    """A merged omni model in memory: the LoRA (or dense deltas), every projector, and what runs them."""

    space: str
    r: int
    alpha: float
    lora: dict = field(default_factory=dict)  # `<module>.lora_{A,B}.default.weight` -> tensor (factor, product_svd)
    dense: dict = field(default_factory=dict)  # `<module>.weight` -> dW (product_dense)
    projectors: dict = field(default_factory=dict)  # modality -> {key: tensor}, the experts' own tensors
    modalities: dict = field(default_factory=dict)  # modality -> encoder / projector description
    config: dict = field(default_factory=dict)  # the paper's merged config.json
    base: str = ""
    method: dict = field(default_factory=dict)  # name, params, scaling
    report: dict | None = None

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def omni_config(self, weights: bool) -> dict:
        files = {}
        if weights:
            files = {"lora": ADAPTER_WEIGHTS if self.lora else None, "dense": DENSE_WEIGHTS if self.dense else None,
                     "projectors": PROJECTOR_WEIGHTS}  # fmt: skip
        return {"format": FORMAT, "base": self.base, "merge_space": self.space,
                "lora": {"r": self.r, "alpha": self.alpha}, "files": files, "modalities": self.modalities,
                "method": self.method, "conv_mode": "vicuna_v1"}  # fmt: skip

    def deltas(self) -> "dict[str, torch.Tensor]":
        """Module weight name -> (alpha/r) B A (or the dense dW), float32: what is added to the base's W."""
        out = dict(self.dense)
        for name in self.lora:
            m = LORA_KEY.match(name)
            if m and m["factor"] == "A":
                a = self.lora[name].float()
                b = self.lora[f"{m['module']}.lora_B.default.weight"].float()
                out[f"{m['module']}.weight"] = self.scale * (b @ a)
        return {k: v.float() for k, v in out.items()}


# ------------------------------------------------------------------------------------------ describing
def describe_modality(ck: ModalityCheckpoint, encoder_override: str | None) -> dict:
    """What the runtime needs for one modality: its encoder (and kind), projector type and feature selection."""
    c = ck.config
    if ck.modality == "vision":
        encoder = c.get("mm_vision_encoder") or c.get("mm_vision_tower")
        info = {"encoder_type": "clip", "projector_type": c.get("mm_projector_type") or "mlp2x_gelu",
                "hidden_size": c.get("mm_hidden_size"), "select_layer": c.get("mm_vision_select_layer", -2),
                "select_feature": c.get("mm_vision_select_feature") or "patch",
                "image_aspect_ratio": c.get("image_aspect_ratio") or "pad"}  # fmt: skip
    elif ck.modality == "audio":
        encoder = c.get("mm_audio_encoder")
        info = {"encoder_type": "beats", "projector_type": c.get("mm_audio_projector_type") or "qformer_32N_2L",
                "hidden_size": c.get("mm_audio_hidden_size")}  # fmt: skip
    else:
        encoder = c.get("mm_video_encoder")
        info = {"encoder_type": "languagebind_video", "projector_type": c.get("mm_video_projector_type") or "mlp2x_gelu",
                "hidden_size": c.get("mm_video_hidden_size"), "select_layer": c.get("mm_video_select_layer", -2),
                "num_frames": int(c.get("num_frames") or 8)}  # fmt: skip
    return {"encoder": encoder_override or encoder, "projector_prefix": f"model.modal_projectors.{ck.modality}.",
            **info}  # fmt: skip


# ------------------------------------------------------------------------------------------ sources
def resolve_source(source: str, revision: str | None = None, extra_patterns: tuple[str, ...] = ()) -> Path:
    """A local directory or file, a hub id, or a folder / file inside a hub repo (`owner/name/sub/path`).

    `extra_patterns` widens what a whole-repo download fetches (encoders ship `.pt` / `.bin` weights)."""
    from ..checkpoints import HUB_PATTERNS, resolve

    path = Path(os.path.expanduser(source))
    if path.is_file():
        return path
    parts = source.split("/")
    if path.exists() or source.startswith(("/", ".", "~")) or (len(parts) <= 2 and not extra_patterns):
        return resolve(source, revision)
    from huggingface_hub import snapshot_download

    if len(parts) <= 2:
        repo, sub, patterns = source, "", [*HUB_PATTERNS, *extra_patterns]
    else:
        repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
        patterns = [f"{sub}/*", sub]
    try:
        root = Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 (network, missing repo, offline mode: one clear line)
        raise MergeError(f"{source}: could not be fetched from the hub ({type(exc).__name__}: {exc})") from None
    return root / sub if sub else root


def open_experts(model_cfg) -> list[ModalityCheckpoint]:
    if not model_cfg.experts:
        raise MergeError(f"model {model_cfg.name}: no modality experts given")
    folders = {key: resolve_source(src, model_cfg.get("revision")) for key, src in model_cfg.experts.items()}
    return read_modalities(folders)


# ------------------------------------------------------------------------------------------ the merge
def merge_omni(model_cfg, method_cfg: dict, *, seed: int = 0, device: str = "cpu",
               only: str | None = None, progress: bool = False) -> OmniMerge:  # fmt: skip
    """Merge the model's modality experts with `method_cfg` (or, with `only`, take that one expert as is)."""
    import torch

    from ..engine import MergeReport, TensorRecord, _rss_bytes, resolve_device, tensor_seed
    from ..methods import resolve_method

    space = model_cfg.get("merge_space") or "factor"
    if space not in MERGE_SPACES:
        raise MergeError(f"model.merge_space: {space!r} is not one of {', '.join(MERGE_SPACES)}")
    device = resolve_device(device)
    checkpoints = open_experts(model_cfg)
    if only is not None:
        checkpoints = [ck for ck in checkpoints if ck.modality == only]
        if not checkpoints:
            raise MergeError(f"method.expert: {only!r} is not a modality of model {model_cfg.name}")
        fn, kwargs, scaling, space = None, {}, 1.0, "factor"
    else:
        fn, kwargs, scaling = resolve_method(method_cfg, model_cfg.finetune)
    split = split_keys(checkpoints)
    r, alpha = lora_shape(checkpoints)
    encoders = dict(model_cfg.get("encoders") or {})
    unknown = sorted(set(encoders) - set(MODALITIES))
    if unknown:
        raise MergeError(f"model.encoders.{unknown[0]}: not a modality ({', '.join(MODALITIES)})")

    params = {**kwargs, "merge_space": space}
    report = MergeReport(method_cfg["name"] if only is None else "expert", scaling, params, device,
                         {ck.modality: "modality_lora" for ck in checkpoints})  # fmt: skip
    merge = OmniMerge(space, r, alpha, base=str(model_cfg.base), config=merged_config(checkpoints),
                      method={"name": report.method, "params": params, "scaling": scaling})  # fmt: skip
    started = time.perf_counter()

    def record(name, merged, t0, tensor):
        report.tensors.append(TensorRecord(name, merged, time.perf_counter() - t0, tuple(tensor.shape),
                                           str(tensor.dtype).replace("torch.", "")))  # fmt: skip
        report.peak_rss_bytes = max(report.peak_rss_bytes, _rss_bytes())

    def apply(name: str, task_vectors: list) -> "torch.Tensor":
        for ck, tau in zip(checkpoints, task_vectors):
            if not torch.isfinite(tau).all():
                raise MergeError(f"{ck.file}: tensor {name} has NaN or Inf values ({ck.modality})")
        if fn is None:
            return task_vectors[0]
        generator = torch.Generator(device=device).manual_seed(tensor_seed(seed, name))
        tau_m = fn(task_vectors, generator=generator, **kwargs)
        if tuple(tau_m.shape) != tuple(task_vectors[0].shape):
            raise MergeError(f"method returned shape {list(tau_m.shape)} for {name} of shape {list(task_vectors[0].shape)}")
        out = scaling * tau_m
        if not torch.isfinite(out).all():
            raise MergeError(f"merged tensor {name} has NaN or Inf values (method output or scaling overflow)")
        return out

    # With one checkpoint (a reference row) every key is "shared": its LoRA factors are the LoRA, the rest projector.
    lora_names = [n for n in split.shared if LORA_KEY.match(n)]
    names = lora_names
    if progress:
        from tqdm import tqdm

        names = tqdm(names, desc="merging LoRA factors", unit="tensor", mininterval=1.0)
    if space == "factor":
        for name in names:
            t0 = time.perf_counter()
            dtype = checkpoints[0].tensors[name].dtype
            taus = [ck.tensors[name].to(device=device, dtype=torch.float32) for ck in checkpoints]
            merge.lora[name] = apply(name, taus).to(dtype).cpu()
            record(name, True, t0, merge.lora[name])
    else:
        for module in _modules(lora_names):
            t0 = time.perf_counter()
            a_name, b_name = f"{module}.lora_A.default.weight", f"{module}.lora_B.default.weight"
            dtype = checkpoints[0].tensors[a_name].dtype
            deltas = [(alpha / r) * (ck.tensors[b_name].to(device, torch.float32) @ ck.tensors[a_name].to(device, torch.float32))
                      for ck in checkpoints]  # fmt: skip
            delta = apply(f"{module}.weight", deltas)
            del deltas
            if space == "product_dense":
                merge.dense[f"{module}.weight"] = delta.to(dtype).cpu()
                record(f"{module}.weight", True, t0, delta)
            else:
                b, a = refactorise(delta, r, alpha)
                merge.lora[a_name], merge.lora[b_name] = a.to(dtype).cpu(), b.to(dtype).cpu()
                record(a_name, True, t0, a)
                record(b_name, True, t0, b)
    for ck in checkpoints:
        merge.modalities[ck.modality] = describe_modality(ck, encoders.get(ck.modality))
        merge.projectors[ck.modality] = {}
        carried = split.unique[ck.modality] if len(checkpoints) > 1 else [n for n in ck.tensors if n not in lora_names]
        for name in carried:
            t0 = time.perf_counter()
            merge.projectors[ck.modality][name] = ck.tensors[name]  # the expert's tensor itself: byte-identical
            record(name, False, t0, ck.tensors[name])
    report.seconds = time.perf_counter() - started
    merge.report = report.to_json()
    return merge


def _modules(shared: list[str]) -> list[str]:
    factors: dict[str, set] = {}
    for name in shared:
        m = LORA_KEY.match(name)
        factors.setdefault(m["module"], set()).add(m["factor"])
    for module, have in factors.items():
        if have != {"A", "B"}:
            missing = ({"A", "B"} - have).pop()
            raise MergeError(f"LoRA module {module} has no lora_{missing} factor: cannot form B A")
    return list(factors)


def refactorise(delta: "torch.Tensor", r: int, alpha: float) -> "tuple[torch.Tensor, torch.Tensor]":
    """(B, A) of rank r with (alpha/r) B A the best rank-r approximation of `delta` (truncated SVD)."""
    from ..methods._matrix import svd

    u, s, vh = svd(delta.float())
    k = min(r, s.numel())
    b = u[:, :k] * (s[:k] * (r / alpha))
    a = vh[:k]
    if k < r:  # a matrix smaller than r: pad with zero directions to keep the LoRA's shape
        import torch

        b = torch.cat([b, b.new_zeros(b.shape[0], r - k)], dim=1)
        a = torch.cat([a, a.new_zeros(r - k, a.shape[1])], dim=0)
    return b, a


# ------------------------------------------------------------------------------------------ writing
def peft_name(name: str) -> str:
    """`model.layers.0.self_attn.q_proj.lora_A.default.weight` -> PEFT's saved name for a LlamaForCausalLM."""
    return PEFT_PREFIX + name.replace(".default.weight", ".weight")


def from_peft_name(name: str) -> str:
    if not name.startswith(PEFT_PREFIX):
        raise MergeError(f"adapter tensor {name}: not a PEFT name (expected the prefix {PEFT_PREFIX})")
    return name[len(PEFT_PREFIX):].replace(".lora_A.weight", ".lora_A.default.weight").replace(
        ".lora_B.weight", ".lora_B.default.weight")  # fmt: skip


def adapter_config(merge: OmniMerge) -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": merge.base, "r": merge.r,
            "lora_alpha": merge.alpha, "lora_dropout": 0.0, "bias": "none", "target_modules": TARGET_MODULES,
            "fan_in_fan_out": False, "inference_mode": True}  # fmt: skip


def write_omni(merge: OmniMerge, out_dir: Path) -> Path:
    """Write the omni folder into a temporary directory, verify it, then rename it into place."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        if merge.lora:
            save_file({peft_name(k): v.contiguous() for k, v in merge.lora.items()}, str(tmp / ADAPTER_WEIGHTS))
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(merge), indent=2))
        if merge.dense:
            save_file({k: v.contiguous() for k, v in merge.dense.items()}, str(tmp / DENSE_WEIGHTS))
        projectors = {k: v.contiguous() for per in merge.projectors.values() for k, v in per.items()}
        save_file(projectors, str(tmp / PROJECTOR_WEIGHTS), metadata={"format": "pt"})
        (tmp / OMNI_CONFIG).write_text(json.dumps(merge.omni_config(weights=True), indent=2))
        (tmp / MODELCOMPOSE_CONFIG).write_text(json.dumps(merge.config, indent=2))
        verify_omni(tmp, merge)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def verify_omni(path: Path, merge: OmniMerge) -> None:
    """Every tensor written reads back with the same name, shape, dtype and bytes as the merge in memory."""
    expected = {ADAPTER_WEIGHTS: {peft_name(k): v for k, v in merge.lora.items()},
                DENSE_WEIGHTS: dict(merge.dense),
                PROJECTOR_WEIGHTS: {k: v for per in merge.projectors.values() for k, v in per.items()}}  # fmt: skip
    for fname, tensors in expected.items():
        if not tensors:
            continue
        written = read_safetensors(path / fname)
        missing, extra = set(tensors) - set(written), set(written) - set(tensors)
        if missing or extra:
            name = sorted(missing or extra)[0]
            raise MergeError(f"{path / fname}: tensor {name} is {'missing' if missing else 'unexpected'}")
        for name, value in tensors.items():
            if not same_bytes(written[name], value):
                raise MergeError(f"{path / fname}: tensor {name} does not read back as written")


def same_bytes(a: "torch.Tensor", b: "torch.Tensor") -> bool:
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def read_safetensors(file: Path) -> dict:
    from safetensors.torch import load_file

    if not file.is_file():
        raise MergeError(f"{file}: missing")
    return load_file(str(file))


def read_omni(path: Path) -> tuple[dict, OmniMerge | None]:
    """(omni_config, the merge it holds or None when the folder carries no weights)."""
    path = Path(path)
    cfg_file = path / OMNI_CONFIG
    if not cfg_file.is_file():
        raise MergeError(f"{path}: no {OMNI_CONFIG} (not an omni model folder)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("format") != FORMAT:
        raise MergeError(f"{cfg_file}: format {cfg.get('format')!r}, expected {FORMAT!r}")
    files = cfg.get("files") or {}
    if not files:
        return cfg, None
    merge = OmniMerge(cfg["merge_space"], int(cfg["lora"]["r"]), float(cfg["lora"]["alpha"]), base=cfg["base"],
                      modalities=cfg["modalities"], method=cfg.get("method") or {})  # fmt: skip
    if files.get("lora"):
        merge.lora = {from_peft_name(k): v for k, v in read_safetensors(path / files["lora"]).items()}
    if files.get("dense"):
        merge.dense = read_safetensors(path / files["dense"])
    projectors = read_safetensors(path / files["projectors"])
    for modality, info in cfg["modalities"].items():
        prefix = info["projector_prefix"]
        merge.projectors[modality] = {k: v for k, v in projectors.items() if k.startswith(prefix)}
    return cfg, merge


def state_dict_of(merge: OmniMerge) -> dict:
    """The merge as one flat name -> tensor dict (LoRA factors, dense updates, projectors), for in-memory handoff."""
    flat = {**merge.lora, **merge.dense}
    for per in merge.projectors.values():
        flat.update(per)
    return flat


def merged_from_state(omni_cfg: dict, state: dict) -> OmniMerge:
    """The inverse of `state_dict_of`, given the omni_config.json that describes it."""
    merge = OmniMerge(omni_cfg["merge_space"], int(omni_cfg["lora"]["r"]), float(omni_cfg["lora"]["alpha"]),
                      base=omni_cfg["base"], modalities=omni_cfg["modalities"])  # fmt: skip
    prefixes = {m: info["projector_prefix"] for m, info in omni_cfg["modalities"].items()}
    for name, value in state.items():
        modality = next((m for m, p in prefixes.items() if name.startswith(p)), None)
        if modality is not None:
            merge.projectors.setdefault(modality, {})[name] = value
        elif LORA_KEY.match(name):
            merge.lora[name] = value
        elif name.endswith(".weight") and merge.space == "product_dense":
            merge.dense[name] = value
        else:
            raise MergeError(f"merged weights: tensor {name} is neither a LoRA factor, a dense update nor a projector")
    return merge
