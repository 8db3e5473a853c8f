"""The streaming merge loop: one tensor name at a time, for every method.

For each tensor of the base, in file order: load the base tensor and each expert's, form the task vectors in
float32 on the chosen device, apply the method, and emit theta_0 + scaling * tau_m in the base dtype. Tensors
that the include/exclude patterns do not select are emitted bit-identical from the base. Peak memory is
(experts + 2) tensors of the largest size plus a fixed overhead, whatever the model's size.
"""

from __future__ import annotations

import logging
import re
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from . import MergeError
from .checkpoints import LoraAdapter, SafetensorsCheckpoint, is_adapter_dir, resolve
from .families import Family, attribute_names

if TYPE_CHECKING:
    import torch

log = logging.getLogger("mmbench_merge")


# ------------------------------------------------------------------------------------------ selection
@dataclass(frozen=True)
class Selection:
    """Which tensors are merged: matched by any include pattern (all if none) and by no exclude pattern."""

    include: Sequence[str] = ()
    exclude: Sequence[str] = ()

    def __post_init__(self):
        for pattern in (*self.include, *self.exclude):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise MergeError(f"model.merge: bad regex {pattern!r} ({exc})") from None

    def selects(self, name: str) -> bool:
        if self.include and not any(re.search(p, name) for p in self.include):
            return False
        return not any(re.search(p, name) for p in self.exclude)


# ------------------------------------------------------------------------------------------ experts
class Expert:
    """One expert as a source of task vectors: full weights (theta_i - theta_0) or a LoRA adapter (scale B A)."""

    def __init__(self, key: str, path: Path, base: SafetensorsCheckpoint, family: Family):
        self.key = key
        self.path = path
        if is_adapter_dir(path):
            self.adapter: LoraAdapter | None = LoraAdapter(path, base, attribute_names(family, base.path, base.keys()))
            self.weights: SafetensorsCheckpoint | None = None
        else:
            self.adapter = None
            self.weights = SafetensorsCheckpoint(path)
            _check_same_layout(base, self.weights)

    @property
    def kind(self) -> str:
        return "lora_adapter" if self.adapter else "full"

    def task_vector(self, name: str, base_value: "torch.Tensor", device, out: "torch.Tensor | None" = None,
                    raw: "torch.Tensor | None" = None) -> "torch.Tensor":  # fmt: skip
        """theta_i - theta_0 in float32 on `device`, into `out` when given (`raw`: this expert's tensor, read ahead)."""
        if self.adapter is not None:
            delta = self.adapter.delta(name, device)
            if out is None:
                return delta if delta is not None else torch_zeros_like(base_value)
            return out.zero_() if delta is None else out.copy_(delta)
        value = raw if raw is not None else self.weights.get(name)
        if out is None:  # in place: one float32 buffer per expert, no extra temporary
            return value.to(device=device, dtype=base_value.dtype).sub_(base_value)
        return out.copy_(value).sub_(base_value)


def torch_zeros_like(t):
    import torch

    return torch.zeros_like(t)


def _check_same_layout(base: SafetensorsCheckpoint, other: SafetensorsCheckpoint) -> None:
    """Same names, shapes and dtypes as the base (an expert in another dtype is refused, never cast)."""
    for name in base.keys():
        if name not in other:
            raise MergeError(f"{other.path}: tensor {name} of the base is missing")
        if other.shape(name) != base.shape(name):
            raise MergeError(
                f"{other.file_of(name)}: tensor {name} has shape {list(other.shape(name))}, "
                f"base has {list(base.shape(name))}"
            )
        if other.dtype(name) != base.dtype(name):
            raise MergeError(
                f"{other.file_of(name)}: tensor {name} is {other.dtype(name)}, base has {base.dtype(name)} "
                "(convert the expert to the base's dtype; it is not cast silently)"
            )
    extra = [name for name in other.keys() if name not in base]
    if extra:
        raise MergeError(f"{other.file_of(extra[0])}: tensor {extra[0]} is not in the base {base.path}")


# ------------------------------------------------------------------------------------------ the loop
@dataclass
class TensorRecord:
    name: str
    merged: bool
    seconds: float
    shape: tuple[int, ...]
    dtype: str


@dataclass
class MergeReport:
    method: str
    scaling: float
    params: dict  # the method's hyperparameters as used (presets filled in)
    device: str
    experts: dict[str, str]  # key -> "full" | "lora_adapter"
    tensors: list[TensorRecord] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_bytes: int = 0  # the process's peak (kernel VmHWM) at the end of the merge; else sampled per tensor
    prepass: dict | None = None  # what a method's first pass over the model found (e.g. TIES' global thresholds)
    cache: dict | None = None  # merge cache: key, dir, status (hit | stored | off); None without a cache

    def to_json(self) -> dict:
        merged = [t for t in self.tensors if t.merged]
        return {
            "method": self.method,
            "scaling": self.scaling,
            "params": self.params,
            "device": self.device,
            "experts": self.experts,
            "totals": {
                "tensors": len(self.tensors),
                "merged": len(merged),
                "kept": len(self.tensors) - len(merged),
                "merged_params": sum(_numel(t.shape) for t in merged),
                "kept_params": sum(_numel(t.shape) for t in self.tensors if not t.merged),
                "seconds": round(self.seconds, 3),
                "merge_seconds": round(sum(t.seconds for t in merged), 3),
                "peak_rss_bytes": self.peak_rss_bytes,
                "peak_rss_mb": round(self.peak_rss_bytes / 2**20, 1),
            },
            "cache": self.cache,
            "tensors": [
                {"name": t.name, "merged": t.merged, "seconds": round(t.seconds, 5), "shape": list(t.shape),
                 "dtype": t.dtype}
                for t in self.tensors
            ],
            **({"prepass": self.prepass} if self.prepass is not None else {}),
        }  # fmt: skip


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed: the same config gives the same bytes whatever order or device the tensors take."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def merge_tensors(
    base: SafetensorsCheckpoint,
    experts: list[Expert],
    method_fn: Callable,
    method_kwargs: dict,
    scaling: float,
    selection: Selection,
    *,
    seed: int = 0,
    device: str = "cpu",
    report: MergeReport | None = None,
    progress: bool = False,
    cached: SafetensorsCheckpoint | None = None,
    sink=None,
    read_ahead: bool = True,
) -> Iterator[tuple[str, "torch.Tensor"]]:
    """Yield (name, merged tensor in the base dtype) for every base tensor, in order.

    `cached`: tau_m of every merged tensor (a merge cache hit): no expert is read, no method runs. `sink`: a
    writer that receives tau_m (float32) of every merged tensor (filling the merge cache). `read_ahead`: the
    next tensor's inputs are read by a background thread while this one is computed (one tensor ahead, so
    memory stays bounded).
    """
    import torch

    from .checkpoints import torch_dtype

    if cached is None:  # a merge-cache hit already holds tau_m: no pre-pass over the experts
        method_kwargs = run_prepass(base, experts, method_fn, method_kwargs, selection, seed=seed, device=device,
                                    report=report)  # fmt: skip
    names = base.keys()
    iterator = names
    if progress:
        from tqdm import tqdm

        iterator = tqdm(names, desc="merging tensors", unit="tensor", mininterval=1.0)
    full_experts = [e for e in experts if e.weights is not None]

    def read(name: str):
        """The raw tensors one step needs: the base's, and each full expert's when this tensor is merged."""
        base_value = base.get(name)
        # NaN / Inf in any base tensor, kept ones too: one sum probes it, the exact check only when it fails.
        if base_value.is_floating_point() and not torch.isfinite(base_value.sum()) \
                and not torch.isfinite(base_value).all():
            raise MergeError(f"{base.file_of(name)}: tensor {name} of the base has NaN or Inf values")
        if not (selection.selects(name) and base_value.is_floating_point()):
            return base_value, None
        if cached is not None:
            return base_value, cached.get(name)
        return base_value, {e.key: e.weights.get(name) for e in full_experts}

    reader = None
    if read_ahead and len(names) > 1:
        # Memory bound: a step works on about (experts + 2) float32 copies of its tensor; the next step's raw
        # inputs are read ahead only while both together fit in that much of the largest tensor.
        copies = len(experts) + 2
        numel = {name: _numel(base.shape(name)) for name in names}
        bound = copies * 4 * max(numel.values())

        def fits(current: str, following: str) -> bool:
            raw = base.nbytes(following) * (1 + (len(full_experts) if cached is None else 2))
            return copies * 4 * numel[current] + raw <= bound

        reader = _ReadAhead(read, names, fits)
    try:
        for name in iterator:
            started = time.perf_counter()
            base_value, extra = reader.next(name) if reader is not None else read(name)
            if extra is None:
                yield name, base_value
                _record(report, name, False, started, base)
                continue
            theta0 = base_value.to(device=device, dtype=torch.float32)
            del base_value
            if cached is not None:
                tau_m = extra.to(device=device)
            else:
                tau_m = _merge_one(name, theta0, experts, extra, method_fn, method_kwargs, seed, device)
            if sink is not None:
                sink.write(name, tau_m if tau_m.device.type == "cpu" else tau_m.cpu())
            # theta_0 + scaling * tau_m, the same two roundings as the out-of-place form, without temporaries
            merged = theta0.add_(tau_m.mul_(scaling))
            # One probe: a sum is NaN / Inf iff an entry is (or, rarely, finite entries overflow it: then exact).
            if not torch.isfinite(merged.sum()) and not torch.isfinite(merged).all():
                raise MergeError(f"merged tensor {name} has NaN or Inf values (method output or scaling overflow)")
            out = merged.to(dtype=torch_dtype(base.dtype(name)))
            out = out if out.device.type == "cpu" else out.cpu()
            del tau_m, merged, theta0, extra
            yield name, out
            _record(report, name, True, started, base)
    finally:
        if reader is not None:
            reader.close()


def _merge_one(name, theta0, experts, raw, method_fn, method_kwargs, seed, device):
    """tau_m of one tensor: the task vectors in one float32 stack, one finiteness probe over all, the method."""
    import torch

    stack = torch.empty((len(experts), *theta0.shape), dtype=torch.float32, device=device)
    for slot, expert in zip(stack, experts):
        expert.task_vector(name, theta0, device, out=slot, raw=raw.pop(expert.key, None))  # pop: freed when used
    if not torch.isfinite(stack.sum()):  # one reduction for all experts; name the culprit only on failure
        for expert, tau in zip(experts, stack):
            if not torch.isfinite(tau).all():
                raise MergeError(f"{expert.path}: tensor {name} has NaN or Inf values (expert {expert.key})")
    task_vectors = list(stack.unbind(0))
    del stack
    generator = torch.Generator(device=device).manual_seed(tensor_seed(seed, name))
    tau_m = method_fn(task_vectors, generator=generator, **method_kwargs)
    if tau_m.shape != theta0.shape:
        raise MergeError(f"method returned shape {list(tau_m.shape)} for tensor {name} of shape {list(theta0.shape)}")
    return tau_m


class _ReadAhead:
    """Reads the inputs of the next tensor in a background thread (file reads release the GIL).

    At most one step is read ahead of the one being computed, so memory grows by one step's raw inputs
    (base + experts in their stored dtype), not with the model.
    """

    def __init__(self, read: Callable, names: list[str], fits: Callable[[str, str], bool]):
        from concurrent.futures import ThreadPoolExecutor

        self._read = read
        self._names = list(names)
        self._fits = fits
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmbench-read-ahead")
        self._position = 0
        self._pending = None

    def next(self, name: str):
        assert self._names[self._position] == name
        result = self._pending.result() if self._pending is not None else self._read(name)
        self._position += 1
        self._pending = None
        if self._position < len(self._names):
            following = self._names[self._position]
            if self._fits(name, following):
                self._pending = self._pool.submit(self._read, following)
        return result

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        self._pool.shutdown(wait=True)


def run_prepass(base, experts, method_fn, method_kwargs: dict, selection: Selection, *, seed: int, device: str,
                report: MergeReport | None = None) -> dict:  # fmt: skip
    """A method's optional first pass over the whole model, before the streaming merge.

    A method function may carry `prepare(stream, **method_kwargs) -> (extra_kwargs, summary)`; `stream()` yields
    (name, task vectors of every expert, a freshly seeded per-tensor generator) for the selected tensors, one
    tensor at a time, and may be called once per pass. `extra_kwargs` go to every per-tensor call; `summary`
    (JSON) goes to merge_report.json as "prepass". Memory stays the engine's usual working set.
    """
    prepare = getattr(method_fn, "prepare", None)
    if prepare is None:
        return method_kwargs
    started = time.perf_counter()
    stream = lambda: _selected_task_vectors(base, experts, selection, seed=seed, device=device)  # noqa: E731
    extra, summary = prepare(stream, **method_kwargs)
    if report is not None and summary is not None:
        report.prepass = {**summary, "experts": [e.key for e in experts],
                          "seconds": round(time.perf_counter() - started, 3)}  # fmt: skip
    return {**method_kwargs, **extra}


def _selected_task_vectors(base, experts, selection: Selection, *, seed: int, device: str):
    """(name, [tau_i], generator) for every tensor the merge will merge, in file order (the merge loop's inputs)."""
    import torch

    for name in base.keys():
        if not selection.selects(name):
            continue
        base_value = base.get(name)
        if not base_value.is_floating_point():
            continue
        theta0 = base_value.to(device=device, dtype=torch.float32)
        task_vectors = [expert.task_vector(name, theta0, device) for expert in experts]
        for expert, tau in zip(experts, task_vectors):
            if not torch.isfinite(tau).all():
                raise MergeError(f"{expert.path}: tensor {name} has NaN or Inf values (expert {expert.key})")
        yield name, task_vectors, torch.Generator(device=device).manual_seed(tensor_seed(seed, name))
        del task_vectors, theta0


def _record(report: MergeReport | None, name: str, merged: bool, started: float, base: SafetensorsCheckpoint):
    if report is None:
        return
    report.tensors.append(TensorRecord(name, merged, time.perf_counter() - started, base.shape(name), base.dtype(name)))
    rss = _rss_bytes()
    if rss > report.peak_rss_bytes:
        report.peak_rss_bytes = rss


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss_bytes() -> int:
    """The kernel's high-water mark of this process's resident set (VmHWM), 0 where /proc has none.

    Peaks inside a tensor's step count too, which the RSS read between tensors misses.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def resolve_device(device: str) -> str:
    """auto -> cuda when there is a GPU, else cpu; validates cpu | cuda | cuda:N."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise MergeError(f"device: expected auto, cpu, cuda or cuda:N, got {device!r}")
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeError(f"device: {device} requested but torch sees no CUDA device")
    return device


def open_model(model_cfg, family: Family) -> tuple[SafetensorsCheckpoint, dict[str, Path], list[Expert]]:
    """Resolve and open the base and every expert of a model config."""
    base, paths = open_paths(model_cfg)
    experts = [Expert(key, path, base, family) for key, path in paths.items()]
    return base, paths, experts


# ------------------------------------------------------------------------------------------ one merge
@dataclass
class MergeResult:
    report: MergeReport
    merged_dir: Path | None  # the written checkpoint, when one was asked for
    state_dict: dict | None  # name -> tensor, when the merged weights were kept in memory


def merge_model(
    model_cfg,
    method_cfg: dict,
    *,
    seed: int = 0,
    device: str = "auto",
    out_dir: Path | None = None,
    keep_in_memory: bool = False,
    shard_size_mb: float = 2000.0,
    progress: bool = False,
    cache=None,
    runs_dir: str | None = None,
) -> MergeResult:
    """Merge the experts of `model_cfg` with `method_cfg`; write to `out_dir` and/or keep the weights in memory.

    `cache`: the `merge_cache` config (enabled, dir, max_size_gb; None = no cache; dir null = $MMBENCH_CACHE,
    else <runs_dir>/merge_cache). With it, tau_m is read from the merge cache when the same merge (everything
    but the scaling) was done before, without reading any expert, and stored there otherwise (merge_cache.py).
    """

    from .families import get_family
    from .merge_cache import CacheSettings, MergeCache, cache_key
    from .methods import resolve_method
    from .methods.spec import check_method

    family = get_family(model_cfg.family)
    device = resolve_device(device)
    check_method(method_cfg, len(used_experts(model_cfg)))  # ranges and expert count, before any tensor is read
    fn, kwargs, scaling = resolve_method(method_cfg, model_cfg.finetune)
    selection = Selection(tuple(model_cfg.merge.include), tuple(model_cfg.merge.exclude))
    settings = cache if isinstance(cache, CacheSettings) else CacheSettings.from_config(cache, runs_dir)
    if settings is None:
        base, expert_paths, experts = open_model(model_cfg, family)
        return _merge(model_cfg, method_cfg["name"], base, expert_paths, experts, fn, kwargs, scaling, selection,
                      seed, device, out_dir, keep_in_memory, shard_size_mb, progress, None)  # fmt: skip

    base, expert_paths = open_paths(model_cfg)
    key, description = cache_key(base.path, expert_paths, method_cfg["name"], kwargs, selection.include,
                                 selection.exclude, seed, device)  # fmt: skip
    store = MergeCache.from_settings(settings)
    with store.entry(key) as entry:
        if entry.hit:
            log.info("merge cache: hit %s (%s): tau_m read from the cache, no expert read", key[:12], store.root)
            experts = []
        else:
            experts = [Expert(k, path, base, family) for k, path in expert_paths.items()]
        result = _merge(model_cfg, method_cfg["name"], base, expert_paths, experts, fn, kwargs, scaling, selection,
                        seed, device, out_dir, keep_in_memory, shard_size_mb, progress, entry)  # fmt: skip
        if not entry.hit and entry.writer is not None:
            entry.commit({**description, "experts": list(expert_paths), "base": str(base.path),
                          "expert_kinds": result.report.experts})  # fmt: skip
        result.report.cache = {"key": key, "dir": str(store.root),
                               "status": "hit" if entry.hit else ("stored" if entry.stored else "not stored")}
    return result


def _merge(model_cfg, method, base, expert_paths, experts, fn, kwargs, scaling, selection, seed, device, out_dir,
           keep_in_memory, shard_size_mb, progress, entry) -> MergeResult:  # fmt: skip
    """One merge pass over the base's tensors: computed (filling `entry` of the merge cache) or from a hit."""
    from .checkpoints import iter_layout

    files_from = files_source(model_cfg, base.path, expert_paths)
    kinds = entry.meta.get("expert_kinds", {}) if entry is not None and entry.hit else {e.key: e.kind for e in experts}
    report = MergeReport(method, scaling, kwargs, device, kinds)
    cached = entry.reader() if entry is not None and entry.hit else None
    sink = None
    if entry is not None and not entry.hit:
        layout = [(name, base.shape(name)) for name in base.keys()
                  if selection.selects(name) and is_floating(base.dtype(name))]  # fmt: skip
        if 4 * sum(_numel(shape) for _, shape in layout) <= entry.cache.max_bytes:
            sink = entry.start_writing(layout)
        else:
            log.info("merge cache: tau_m of this merge is larger than merge_cache.max_size_gb; not stored")
    writer, check = None, None
    if out_dir:
        writer = merged_writer(model_cfg, out_dir, list(iter_layout(base)), shard_size_mb)
        if not writes_native(model_cfg):  # the native writer translates names and files itself
            check = lambda path: verify_checkpoint(path, base)  # noqa: E731
    state_dict = {} if keep_in_memory else None
    started = time.perf_counter()
    try:
        stream = merge_tensors(base, experts, fn, kwargs, scaling, selection, seed=seed, device=device,
                               report=report, progress=progress, cached=cached, sink=sink)  # fmt: skip
        for name, tensor in stream:
            if writer is not None:
                writer.write(name, tensor)
            if state_dict is not None:
                state_dict[name] = tensor
        merged_dir = None
        if writer is not None:
            sources = [base.path] if files_from == base.path else [base.path, files_from]
            merged_dir = writer.commit(extra_files_from=sources, check=check)
            if check is not None:  # the native writer translates the files itself
                drop_stale_chat_template(merged_dir, files_from)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    report.seconds = time.perf_counter() - started
    report.peak_rss_bytes = max(report.peak_rss_bytes, _peak_rss_bytes())
    return MergeResult(report, merged_dir, state_dict)


def used_experts(model_cfg) -> dict[str, str]:
    """The experts a merge uses: all of model.experts, or the subset model.use names (in that order).

    model.use exists because a command-line `model.experts={vqa: ...}` is merged by Hydra into the YAML's dict
    and so silently keeps every expert; `model.use=[vqa,ocr]` is explicit, recorded and fingerprinted.
    """
    experts = dict(model_cfg.experts or {})
    if not experts:
        raise MergeError(f"model {model_cfg.name}: no experts given")
    use = model_cfg.get("use")
    if use is None:
        return experts
    use = list(use)
    if not use:
        raise MergeError("model.use: empty list (leave it null to merge every expert)")
    unknown = [key for key in use if key not in experts]
    if unknown:
        raise MergeError(f"model.use: {unknown[0]!r} is not an expert of model {model_cfg.name} ({', '.join(experts)})")
    if len(set(use)) != len(use):
        raise MergeError(f"model.use: an expert is named twice in {use}")
    return {key: experts[key] for key in use}


MERGED_FORMATS = ("native", "original")
CHAT_TEMPLATE_FILES = ("chat_template.json", "chat_template.jinja")


def writes_native(model_cfg) -> bool:
    """An internvl_chat merge written in transformers' native layout (merged_format: native, the default)."""
    fmt = model_cfg.get("merged_format", "native")
    if fmt not in MERGED_FORMATS:
        raise MergeError(f"model.merged_format: {fmt!r} is not one of {', '.join(MERGED_FORMATS)}")
    return model_cfg.family == "internvl_chat" and fmt == "native"


def merged_writer(model_cfg, out_dir: Path, layout: list, shard_size_mb: float):
    """The writer of a merged checkpoint: InternVL's original names written in the native layout when asked
    (merged_format: native), else the base's own layout."""
    from .checkpoints import ShardedWriter

    if writes_native(model_cfg):
        from .internvl_chat import NativeWriter  # original names merged, native names written

        return NativeWriter(out_dir, layout, int(shard_size_mb * 2**20))
    return ShardedWriter(out_dir, layout, int(shard_size_mb * 2**20))


def drop_stale_chat_template(merged_dir: Path, files_from: Path) -> None:
    """Chat templates come from files_from only: a base's legacy chat_template.json would override the
    expert's chat_template.jinja when transformers loads the processor."""
    if not any((Path(files_from) / name).is_file() for name in CHAT_TEMPLATE_FILES):
        return
    for name in CHAT_TEMPLATE_FILES:
        if not (Path(files_from) / name).is_file():
            (Path(merged_dir) / name).unlink(missing_ok=True)


def open_paths(model_cfg) -> tuple[SafetensorsCheckpoint, dict[str, Path]]:
    """The base (its header read) and the experts' resolved directories, without opening any expert."""
    base = SafetensorsCheckpoint(resolve(model_cfg.base, model_cfg.revision))
    return base, {key: resolve(src, model_cfg.revision) for key, src in used_experts(model_cfg).items()}


def is_floating(st_dtype: str) -> bool:
    """What torch's is_floating_point says of a tensor of this safetensors dtype (the engine merges only those)."""
    return st_dtype in {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def files_source(model_cfg, base_path: Path, expert_paths: dict[str, Path]) -> Path:
    """Where the non-weight files (tokenizer, processor, chat template, remote code) come from: the base, or an
    expert of model.experts (also one that model.use leaves out of the merge)."""
    key = model_cfg.files_from
    if key == "base":
        return base_path
    if key in expert_paths:
        return expert_paths[key]
    if key not in (model_cfg.experts or {}):
        raise MergeError(f"model.files_from: {key!r} is neither 'base' nor an expert ({', '.join(model_cfg.experts or {})})")
    return resolve(model_cfg.experts[key], model_cfg.revision)


def verify_checkpoint(path: Path, base: SafetensorsCheckpoint) -> None:
    """The written checkpoint has exactly the base's tensor names, shapes and dtypes."""
    written = SafetensorsCheckpoint(path)
    missing = set(base.keys()) - set(written.keys())
    extra = set(written.keys()) - set(base.keys())
    if missing or extra:
        name = sorted(missing or extra)[0]
        raise MergeError(f"{path}: tensor {name} is {'missing' if missing else 'not in the base'}")
    for name in base.keys():
        if (written.shape(name), written.dtype(name)) != (base.shape(name), base.dtype(name)):
            raise MergeError(
                f"{written.file_of(name)}: tensor {name} is {written.dtype(name)}{list(written.shape(name))}, "
                f"base has {base.dtype(name)}{list(base.shape(name))}"
            )
