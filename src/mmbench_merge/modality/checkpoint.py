"""Reading ModelCompose modality checkpoints and splitting their keys.

A modality folder (`multimodal-vicuna-7b-v1.5-<modality>-naivemc`) holds `adapter_model.bin` (a torch pickle of
a plain dict of bf16 tensors: the `default` LoRA factors of every q/k/v/o/gate/up/down plus the modality's
projector under `model.modal_projectors.<modality>.`) or a `.safetensors` copy of it, and `config.json`, whose
first non-empty encoder field says which modality the folder serves. The pickle is only ever read with
`torch.load(weights_only=True)`: a pickle that would run code, or holds anything but tensors, is refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .. import MergeError
from . import MODALITIES

ADAPTER_BIN = "adapter_model.bin"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
PROJECTOR_BIN = "mm_projector.bin"
CONFIG = "config.json"

# The encoder fields of a ModelCompose config, in the order its merge script reads them: the first non-empty
# one names the modality.
ENCODER_FIELDS = (
    ("mm_vision_encoder", "vision"),
    ("mm_vision_tower", "vision"),
    ("mm_video_encoder", "video"),
    ("mm_audio_encoder", "audio"),
)
# q/k/v/o/gate/up/down LoRA factors: `<module>.lora_{A,B}.default.weight`.
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.default\.weight$")


@dataclass
class ModalityCheckpoint:
    modality: str
    path: Path  # the folder
    file: Path  # the weights file read
    config: dict
    tensors: dict  # name -> tensor (memory-mapped where the file allows)

    @property
    def lora_r(self) -> int:
        return int(self.config.get("lora_r") or 0)

    @property
    def lora_alpha(self) -> float:
        return float(self.config.get("lora_alpha") or 0)


def modality_of(config: dict, where: Path) -> str:
    """The modality a ModelCompose config serves: its first non-empty encoder field."""
    for field, modality in ENCODER_FIELDS:
        if isinstance(config.get(field), str) and config[field].strip():
            return modality
    names = ", ".join(f for f, _ in ENCODER_FIELDS)
    raise MergeError(f"{where}: names no encoder ({names} all empty): cannot tell its modality")


def read_config(folder: Path) -> dict:
    path = folder / CONFIG
    if not path.is_file():
        raise MergeError(f"{folder}: no {CONFIG} (a ModelCompose modality folder has one)")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise MergeError(f"{path}: not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise MergeError(f"{path}: not a JSON object")
    return config


def load_tensors_or_dict(file: Path):
    """Whatever a torch pickle holds, read with torch.load(weights_only=True) (memory-mapped when possible);
    a pickle that would run code or build other objects is refused with one line naming the file."""
    import torch

    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) format: no mmap
    except Exception as exc:  # noqa: BLE001 (UnpicklingError for code-running pickles, and any corruption)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MergeError(f"{file}: refused: not loadable with torch.load(weights_only=True) "
                         f"({type(exc).__name__}: {first[:160]})") from None  # fmt: skip


def load_tensors(file: Path) -> dict:
    """A plain name -> tensor dict from a .safetensors file or a torch pickle read with weights_only=True."""
    import torch

    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except Exception as exc:  # noqa: BLE001 (corrupt header, truncated file: one line)
            raise MergeError(f"{file}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    data = load_tensors_or_dict(file)
    if not isinstance(data, dict):
        raise MergeError(f"{file}: holds a {type(data).__name__}, expected a dict of tensors")
    for name, value in data.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise MergeError(f"{file}: entry {name!r} is a {type(value).__name__}, expected a tensor")
    return dict(data)


def read_modality(folder: Path | str) -> ModalityCheckpoint:
    """One modality folder: its config, its modality and its tensors (safetensors preferred over the pickle)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MergeError(f"{folder}: no such modality checkpoint directory")
    config = read_config(folder)
    modality = modality_of(config, folder / CONFIG)
    for name in (ADAPTER_SAFETENSORS, ADAPTER_BIN, PROJECTOR_BIN):
        if (folder / name).is_file():
            file = folder / name
            break
    else:
        raise MergeError(f"{folder}: no {ADAPTER_SAFETENSORS} or {ADAPTER_BIN}")
    tensors = load_tensors(file)
    if not tensors:
        raise MergeError(f"{file}: holds no tensors")
    return ModalityCheckpoint(modality, folder, file, config, tensors)


def read_modalities(folders: dict[str, Path]) -> list[ModalityCheckpoint]:
    """Every expert folder of the model config; each must serve the modality it is listed under, once."""
    checkpoints = []
    for key, folder in folders.items():
        ck = read_modality(folder)
        if key in MODALITIES and ck.modality != key:
            raise MergeError(f"model.experts.{key}: {folder / CONFIG} serves modality {ck.modality!r}, not {key!r}")
        checkpoints.append(ck)
    seen: dict[str, Path] = {}
    for ck in checkpoints:
        if ck.modality in seen:
            raise MergeError(f"{ck.path}: modality {ck.modality} is served twice (also by {seen[ck.modality]})")
        seen[ck.modality] = ck.path
    return checkpoints


@dataclass
class KeySplit:
    shared: list[str]  # in every checkpoint: merged
    unique: dict[str, list[str]]  # modality -> keys only it has: carried over unchanged


def split_keys(checkpoints: list[ModalityCheckpoint]) -> KeySplit:
    """Keys in every checkpoint (merged) and keys in exactly one (carried); any other key is an error."""
    if not checkpoints:
        raise MergeError("model.experts: no modality checkpoints given")
    owners: dict[str, list[ModalityCheckpoint]] = {}
    for ck in checkpoints:
        for name in ck.tensors:
            owners.setdefault(name, []).append(ck)
    n = len(checkpoints)
    shared, unique = [], {ck.modality: [] for ck in checkpoints}
    for name, cks in owners.items():
        if len(cks) == n:
            shapes = {tuple(ck.tensors[name].shape) for ck in cks}
            if len(shapes) > 1:
                detail = ", ".join(f"{ck.modality} {list(ck.tensors[name].shape)}" for ck in cks)
                raise MergeError(f"shared key {name} has different shapes ({detail})")
            shared.append(name)
        elif len(cks) == 1 and n > 1:
            unique[cks[0].modality].append(name)
        else:
            have = ", ".join(ck.modality for ck in cks)
            missing = ", ".join(ck.modality for ck in checkpoints if ck not in cks)
            raise MergeError(f"key {name} is in {have} but not in {missing}: neither shared nor unique")
    # A projector key in all checkpoints would be averaged silently: every shared key must be a LoRA factor.
    for name in shared:
        if n > 1 and not LORA_KEY.match(name):
            raise MergeError(f"shared key {name} is not a LoRA factor (*.lora_A/B.default.weight)")
    return KeySplit(shared, unique)


def lora_shape(checkpoints: list[ModalityCheckpoint]) -> tuple[int, float]:
    """(r, alpha), the same for every checkpoint (the factor-space merge needs one rank and one scale)."""
    values = {(ck.lora_r, ck.lora_alpha) for ck in checkpoints}
    if len(values) != 1:
        detail = ", ".join(f"{ck.modality} r={ck.lora_r} alpha={ck.lora_alpha}" for ck in checkpoints)
        raise MergeError(f"lora_r / lora_alpha differ between the modality configs ({detail})")
    r, alpha = values.pop()
    if r <= 0 or alpha <= 0:
        raise MergeError(f"{checkpoints[0].path / CONFIG}: lora_r / lora_alpha missing or not positive")
    return r, alpha


def merged_config(checkpoints: list[ModalityCheckpoint]) -> dict:
    """The paper's config merge: per key the first truthy value wins; adds `<modality>_lora_{r,alpha}`."""
    merged: dict = {}
    for ck in checkpoints:
        for key, value in ck.config.items():
            merged[key] = merged.get(key) or value
        merged[f"{ck.modality}_lora_r"] = ck.lora_r
        merged[f"{ck.modality}_lora_alpha"] = ck.config.get("lora_alpha")
    return merged

