"""Checkpoint access: resolve a directory or hub id, read tensors one name at a time, write shards.

A checkpoint directory holds either full weights (``model.safetensors``, or shards listed in
``model.safetensors.index.json``) or a PEFT LoRA adapter (``adapter_config.json`` +
``adapter_model.safetensors``). Tensors are read one at a time with positioned reads at the offsets the
safetensors header gives; nothing here ever materialises a whole model.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from . import MergeError

if TYPE_CHECKING:
    import torch

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"

# Files that are weights (never copied as "non-weight files" into a merged checkpoint).
_WEIGHT_FILE = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.ckpt|\.h5|\.msgpack|\.gguf)$|safetensors\.index\.json$")
_ADAPTER_FILE = re.compile(r"^adapter_(config\.json|model\.(safetensors|bin))$")
# What a hub snapshot needs: weights in safetensors, configs, tokenizer, chat template, remote code.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.py", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


# ------------------------------------------------------------------------------------------ resolve
def resolve(path_or_id: str, revision: str | None = None) -> Path:
    """A local directory as is (never touching the network), else a hub id downloaded with huggingface_hub."""
    path = Path(os.path.expanduser(path_or_id))
    if path.is_dir():
        return path
    if path.exists():
        raise MergeError(f"{path_or_id}: is a file, expected a checkpoint directory")
    looks_local = path_or_id.startswith(("/", ".", "~")) or path_or_id.count("/") != 1
    if looks_local:
        raise MergeError(f"{path_or_id}: no such checkpoint directory (and not a hub id of the form owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path_or_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # network errors, missing repo, offline mode: one clear line
        raise MergeError(f"{path_or_id}: could not be fetched from the hub ({type(exc).__name__}: {exc})") from exc


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG_NAME).is_file()


# ------------------------------------------------------------------------------------------ reading
class SafetensorsCheckpoint:
    """Full weights in a directory: a lazy name -> tensor source over one or several safetensors files."""

    def __init__(self, path: Path):
        self.path = Path(path)
        index_file = self.path / WEIGHTS_INDEX_NAME
        single_file = self.path / WEIGHTS_NAME
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise MergeError(f"{index_file}: not a safetensors index ({exc})") from exc
            self._file_of = {name: self.path / fname for name, fname in weight_map.items()}
        elif single_file.is_file():
            self._file_of = None  # filled from the header below
        else:
            pickled = sorted(p.name for p in self.path.glob("*") if re.search(r"\.(bin|pt|pth|ckpt)$", p.name))
            if pickled:  # never unpickled: a pickle can run any code when loaded
                raise MergeError(
                    f"{self.path}: only pickled weights ({pickled[0]}), which are never loaded; "
                    f"convert the checkpoint to safetensors ({WEIGHTS_NAME})"
                )
            raise MergeError(
                f"{self.path}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} (and no {ADAPTER_CONFIG_NAME})"
            )
        self._meta: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._offsets: dict[str, tuple[int, int]] = {}  # absolute byte range of each tensor in its file
        files = sorted(set(self._file_of.values())) if self._file_of else [single_file]
        file_of: dict[str, Path] = {}
        for file in files:
            data_start, header = _read_header(file)
            for name, info in header.items():
                self._meta[name] = (info["dtype"], tuple(info["shape"]))
                begin, end = info["data_offsets"]
                self._offsets[name] = (data_start + begin, data_start + end)
                file_of[name] = file
        if self._file_of is not None:
            missing = sorted(set(self._file_of) - set(file_of))
            if missing:
                raise MergeError(f"{index_file}: tensor {missing[0]} is listed but not in {self._file_of[missing[0]].name}")
        self._file_of = file_of

    def keys(self) -> list[str]:
        return list(self._meta)

    def __contains__(self, name: str) -> bool:
        return name in self._meta

    def dtype(self, name: str) -> str:
        """The safetensors dtype string (BF16, F16, F32, ...)."""
        return self._meta[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][1]

    def nbytes(self, name: str) -> int:
        dtype, shape = self._meta[name]
        n = 1
        for d in shape:
            n *= d
        return n * DTYPE_BYTES[dtype]

    def file_of(self, name: str) -> Path:
        return self._file_of[name]

    def get(self, name: str) -> "torch.Tensor":
        """Load one tensor (in its stored dtype) with a plain positioned read.

        Not through a memory map: mapped pages stay in the process's resident set after use, which would make
        the merge's footprint grow with the model instead of with its largest tensor.
        """
        import torch

        dtype, shape = self._meta[name]
        start, end = self._offsets[name]
        buffer = bytearray(end - start)
        if buffer:
            with open(self._file_of[name], "rb") as f:
                f.seek(start)
                if f.readinto(buffer) != len(buffer):
                    raise MergeError(f"{self._file_of[name]}: tensor {name} is truncated")
            return torch.frombuffer(buffer, dtype=torch_dtype(dtype)).reshape(shape)
        return torch.empty(shape, dtype=torch_dtype(dtype))


DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip


def read_safetensors_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) from a safetensors header, without touching the tensor data."""
    _, header = _read_header(file)
    return {name: (info["dtype"], tuple(info["shape"])) for name, info in header.items()}


def _read_header(file: Path) -> tuple[int, dict]:
    """(offset where the data section starts, the header without __metadata__)."""
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > 100_000_000:
                raise ValueError(f"header length {header_len} is implausible")
            if 8 + header_len > size:
                raise ValueError(f"header length {header_len} runs past the end of the file ({size} bytes)")
            header = json.loads(f.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        header.pop("__metadata__", None)
        data_size = size - 8 - header_len
        for name, info in header.items():
            if (not isinstance(info, dict) or info.get("dtype") not in DTYPE_BYTES or "shape" not in info
                    or len(info.get("data_offsets", ())) != 2):  # fmt: skip
                raise ValueError(f"tensor {name} has a malformed entry {info}")
            begin, end = info["data_offsets"]
            if not 0 <= begin <= end or end - begin != DTYPE_BYTES[info["dtype"]] * _numel(info["shape"]):
                raise ValueError(f"tensor {name} has data offsets {[begin, end]} that do not fit its dtype and shape")
            if end > data_size:
                raise TruncatedError(
                    f"{file}: truncated: tensor {name} ends at byte {end} of the data but the file holds {data_size}"
                )
    except FileNotFoundError:
        raise MergeError(f"{file}: file not found") from None
    except PermissionError:
        raise MergeError(f"{file}: not readable (permission denied)") from None
    except IsADirectoryError:
        raise MergeError(f"{file}: is a directory, expected a safetensors file") from None
    except TruncatedError as exc:
        raise MergeError(str(exc)) from None
    except (struct.error, ValueError, AttributeError, TypeError) as exc:
        raise MergeError(f"{file}: not a safetensors file ({exc})") from exc
    return 8 + header_len, header


class TruncatedError(Exception):
    """Internal: the data section is shorter than the header says."""


# ------------------------------------------------------------------------------------------ LoRA adapters
@dataclass
class LoraModule:
    a_key: str
    b_key: str
    scale: float


class LoraAdapter:
    """A PEFT LoRA adapter seen as dense deltas ``scale * B @ A`` keyed by the *base checkpoint's* tensor names.

    PEFT names modules by the model's Python attribute path, which differs from the checkpoint's tensor names
    in several families (transformers 5 nests the language model under ``model.language_model``; adapters
    trained under transformers 4 use yet other prefixes). ``attribute_names`` maps the model's attribute paths
    to checkpoint names (families.attribute_names); a module that maps to no base tensor is an error.
    """

    def __init__(self, path: Path, base: SafetensorsCheckpoint, attribute_names: dict[str, str] | None = None):
        self.path = Path(path)
        config_file = self.path / ADAPTER_CONFIG_NAME
        try:
            self.config = json.loads(config_file.read_text())
        except ValueError as exc:
            raise MergeError(f"{config_file}: not valid JSON ({exc})") from exc
        peft_type = self.config.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise MergeError(f"{config_file}: peft_type {peft_type!r} is not supported (only LORA)")
        weights_file = self.path / ADAPTER_WEIGHTS_NAME
        if not weights_file.is_file():
            raise MergeError(f"{self.path}: no {ADAPTER_WEIGHTS_NAME}")
        self._file = weights_file
        self._handle = None
        header = read_safetensors_header(weights_file)
        self.modules: dict[str, LoraModule] = {}  # base tensor name -> module
        names = attribute_names if attribute_names is not None else {k: k for k in base.keys()}
        for key in header:
            match = re.match(r"^(?:base_model\.model\.)?(.*)\.lora_A(?:\.[^.]+)?\.weight$", key)
            if match is None:
                if re.search(r"\.lora_B(?:\.[^.]+)?\.weight$", key):
                    continue  # paired with its lora_A below
                raise MergeError(
                    f"{weights_file}: tensor {key} is not a LoRA A/B matrix "
                    "(modules_to_save, DoRA magnitudes and embedding adapters are not supported)"
                )
            module_path = match.group(1)
            b_key = key.replace(".lora_A", ".lora_B")
            if b_key not in header:
                raise MergeError(f"{weights_file}: tensor {key} has no matching {b_key}")
            rank = header[key][1][0]
            target = names.get(module_path + ".weight")
            if target is None:
                raise MergeError(
                    f"{weights_file}: module {module_path} matches no tensor of the base checkpoint {base.path}"
                )
            (out_f, in_f) = (header[b_key][1][0], header[key][1][1])
            if base.shape(target) != (out_f, in_f):
                raise MergeError(
                    f"{weights_file}: {module_path} gives a delta of shape {(out_f, in_f)} "
                    f"but base tensor {target} has shape {base.shape(target)}"
                )
            self.modules[target] = LoraModule(key, b_key, self._scale(module_path, rank))

    def _scale(self, module_path: str, rank: int) -> float:
        """lora_alpha / r (or / sqrt(r) with rsLoRA), honouring rank_pattern and alpha_pattern."""
        alpha = self.config.get("lora_alpha", 8)
        r = self.config.get("r", rank)
        for pattern_key, value in (self.config.get("rank_pattern") or {}).items():
            if _peft_pattern_matches(pattern_key, module_path):
                r = value
        for pattern_key, value in (self.config.get("alpha_pattern") or {}).items():
            if _peft_pattern_matches(pattern_key, module_path):
                alpha = value
        if r != rank:
            raise MergeError(f"{self.path}: {module_path} has rank {rank} in its weights but {r} in its config")
        if self.config.get("use_rslora"):
            return alpha / (r**0.5)
        return alpha / r

    def delta(self, name: str, device: "torch.device | str" = "cpu") -> "torch.Tensor | None":
        """The dense float32 delta for base tensor `name`, or None if the adapter does not touch it."""
        module = self.modules.get(name)
        if module is None:
            return None
        from safetensors import safe_open

        if self._handle is None:
            self._handle = safe_open(str(self._file), framework="pt", device="cpu")
        a = self._handle.get_tensor(module.a_key).to(device=device, dtype=_float32())
        b = self._handle.get_tensor(module.b_key).to(device=device, dtype=_float32())
        return (b @ a) * module.scale


def _peft_pattern_matches(pattern_key: str, module_path: str) -> bool:
    """PEFT's rule: the pattern matches the full module path or a dotted suffix of it."""
    return re.fullmatch(rf"(.*\.)?{pattern_key}", module_path) is not None


def _float32():
    import torch

    return torch.float32


# ------------------------------------------------------------------------------------------ writing
class ShardedWriter:
    """Writes tensors into safetensors shards whose layout is planned up front.

    The merged model has exactly the base's names, shapes and dtypes, so every shard's header is known before
    the first byte of data: each tensor is written to disk as soon as it is computed and then dropped. Memory
    stays at one tensor, not one shard. Everything goes into a temporary directory that is renamed into place
    by ``commit`` only after the checks pass, so a crash never leaves a checkpoint a later run would trust.
    """

    def __init__(self, out_dir: Path, layout: list[tuple[str, str, tuple[int, ...]]], max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.tmp_dir = self.out_dir.with_name(f".{self.out_dir.name}.tmp-{os.getpid()}")
        remove_stale_temp_dirs(self.out_dir)
        if self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir)
        with _io_errors(self.tmp_dir):
            self.tmp_dir.mkdir(parents=True)
        self._shards = _plan_shards(layout, max_shard_bytes)
        n = len(self._shards)
        self._shard_of: dict[str, int] = {}
        self._files: list[Path] = []
        for i, shard in enumerate(self._shards):
            fname = WEIGHTS_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            self._files.append(self.tmp_dir / fname)
            for name, *_ in shard:
                self._shard_of[name] = i
        self._layout = {name: (dtype, shape) for name, dtype, shape in layout}
        self._open: dict[int, object] = {}
        self._written: dict[int, list[str]] = {i: [] for i in range(n)}

    def write(self, name: str, tensor: "torch.Tensor") -> None:
        """Append one tensor; tensors must come in layout order within each shard."""
        dtype, shape = self._layout[name]
        if tuple(tensor.shape) != shape or _safetensors_dtype(tensor) != dtype:
            raise MergeError(
                f"merged tensor {name}: got {_safetensors_dtype(tensor)}{list(tensor.shape)}, "
                f"base has {dtype}{list(shape)}"
            )
        i = self._shard_of[name]
        expected = self._shards[i][len(self._written[i])][0]
        if name != expected:
            raise MergeError(f"merged tensor {name} written out of order (expected {expected})")
        data = tensor.detach().contiguous().cpu().reshape(-1)
        with _io_errors(self._files[i]):  # a full disk or a lost mount: one line, and abort() cleans up
            f = self._open.get(i)
            if f is None:
                f = self._open[i] = open(self._files[i], "wb")
                f.write(_header_bytes(self._shards[i]))
            if data.numel():
                f.write(memoryview(data.view(_uint8()).numpy()))  # the tensor's own bytes: no copy
            self._written[i].append(name)
            if len(self._written[i]) == len(self._shards[i]):
                del self._open[i]
                f.close()

    def commit(self, extra_files_from: list[Path] = (), check=None) -> Path:
        """Close shards, write the index, copy non-weight files, run `check` on the result, move it into place."""
        unfinished = [i for i, shard in enumerate(self._shards) if len(self._written[i]) != len(shard)]
        if unfinished:
            missing = self._shards[unfinished[0]][len(self._written[unfinished[0]])][0]
            raise MergeError(f"merged checkpoint incomplete: tensor {missing} was never written")
        with _io_errors(self.tmp_dir):
            if len(self._files) > 1:
                total = sum(DTYPE_BYTES[d] * _numel(s) for d, s in self._layout.values())
                index = {
                    "metadata": {"total_size": total},
                    "weight_map": {name: self._files[i].name for name, i in self._shard_of.items()},
                }
                (self.tmp_dir / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
            for src in extra_files_from:
                copy_non_weight_files(src, self.tmp_dir)
        if check is not None:
            check(self.tmp_dir)
        with _io_errors(self.out_dir):
            if self.out_dir.exists():
                shutil.rmtree(self.out_dir)
            os.replace(self.tmp_dir, self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        for f in self._open.values():
            try:
                f.close()
            except OSError:  # e.g. the buffered tail of a shard on a full disk: the directory goes anyway
                pass
        self._open.clear()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


@contextlib.contextmanager
def _io_errors(path: Path):
    """An OSError while writing (disk full, quota, read-only, permission) as one MergeError line naming `path`."""
    try:
        yield
    except OSError as exc:
        raise MergeError(f"{path}: could not write ({exc.strerror or exc})") from exc


def remove_stale_temp_dirs(out_dir: Path) -> list[Path]:
    """Remove `.<name>.tmp-<pid>` siblings of `out_dir` left by writers that died (kill -9, OOM, node loss).

    A directory whose pid is alive on this machine is another writer's and is left alone (two writers of one
    run directory are kept apart by the per-point lock, not here).
    """
    from .results import pid_alive

    removed = []
    parent = Path(out_dir).parent
    if not parent.is_dir():
        return removed
    for tmp in parent.glob(f".{Path(out_dir).name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed



def _plan_shards(layout, max_shard_bytes):
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dtype, shape in layout:
        nbytes = DTYPE_BYTES[dtype] * _numel(shape)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dtype, shape))
        size += nbytes
    return shards


def _header_bytes(shard) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in shard:
        end = offset + DTYPE_BYTES[dtype] * _numel(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _uint8():
    import torch

    return torch.uint8


_TORCH_TO_ST = {
    "torch.float64": "F64", "torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16",
    "torch.int64": "I64", "torch.int32": "I32", "torch.int16": "I16", "torch.int8": "I8", "torch.uint8": "U8",
    "torch.bool": "BOOL", "torch.float8_e4m3fn": "F8_E4M3", "torch.float8_e5m2": "F8_E5M2",
}  # fmt: skip


def _safetensors_dtype(tensor: "torch.Tensor") -> str:
    return _TORCH_TO_ST[str(tensor.dtype)]


def torch_dtype(st_dtype: str) -> "torch.dtype":
    import torch

    inverse = {v: k for k, v in _TORCH_TO_ST.items()}
    return getattr(torch, inverse[st_dtype].split(".")[1])


def copy_non_weight_files(src: Path, dst: Path) -> list[str]:
    """Copy config, generation config, tokenizer, processor, chat template and remote code (*.py)."""
    copied = []
    for item in sorted(Path(src).iterdir()):
        if item.is_file() and not _WEIGHT_FILE.search(item.name) and not _ADAPTER_FILE.match(item.name):
            if item.name.startswith(".") or item.name == "README.md":
                continue
            shutil.copy2(item, dst / item.name)
            copied.append(item.name)
    return copied


def iter_layout(base: SafetensorsCheckpoint) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    """The base's tensors in file order (shard by shard), which is the order they are merged and written."""
    for name in base.keys():
        yield name, base.dtype(name), base.shape(name)
