"""evaluator=vllm: lmms-eval's vLLM backend in its own environment, run as a child process on a written checkpoint.

vLLM pins torch and transformers to versions this project's environment cannot take (docs/gpu.md), so it
lives in a separate virtual environment (`make install-vllm` -> .venv-vllm, from requirements-vllm.txt).
The parent (this module) writes a JSON spec, starts that environment's interpreter on
`mmbench_merge.evaluation.vllm_child` (an argument list, no shell), streams its output, and reads the
`results.json` it leaves, which has lmms-eval's aggregated-results layout; scoring then goes through the same
`scores_from_results` as the in-process evaluator. The interpreter is `evaluator.python`, else
$MMBENCH_VLLM_PYTHON, else <repo>/.venv-vllm/bin/python.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from .. import MergeError
from . import TaskScore

log = logging.getLogger("mmbench_merge")

PYTHON_ENV = "MMBENCH_VLLM_PYTHON"
SRC_DIR = Path(__file__).resolve().parents[2]  # the directory holding the mmbench_merge package
REPO_DIR = SRC_DIR.parent
CHILD_MODULE = "mmbench_merge.evaluation.vllm_child"
ENV_CHECK = "import vllm, lmms_eval; print('vllm', vllm.__version__)"


def vllm_python(cfg) -> Path:
    configured = cfg.evaluator.get("python") or os.environ.get(PYTHON_ENV)
    return Path(configured).expanduser() if configured else REPO_DIR / ".venv-vllm" / "bin" / "python"


def child_env() -> dict:
    """The child's environment: ours, with this checkout's sources first (task YAMLs import our metrics)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC_DIR), env.get("PYTHONPATH")) if p)
    return env


def check_environment(cfg) -> str:
    """The vLLM environment exists and imports vLLM and lmms-eval; returns its version line."""
    python = vllm_python(cfg)
    if not python.is_file():
        raise MergeError(f"evaluator=vllm: no vLLM environment at {python} (run `make install-vllm`, or set "
                         f"evaluator.python / ${PYTHON_ENV} to its interpreter)")  # fmt: skip
    try:
        proc = subprocess.run([str(python), "-c", ENV_CHECK], env=child_env(), capture_output=True, text=True,
                              timeout=600, check=False)  # fmt: skip
    except OSError as exc:
        raise MergeError(f"evaluator=vllm: cannot run {python} ({exc})") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise MergeError(f"evaluator=vllm: {python} cannot import vllm and lmms_eval: {last}")
    return proc.stdout.strip()


def vllm_kwargs(cfg, model_dir: str) -> dict:
    """Constructor arguments of lmms-eval's `vllm` backend."""
    ev = cfg.evaluator
    kwargs = {
        "model": model_dir,
        "tensor_parallel_size": ev.tensor_parallel_size,
        "gpu_memory_utilization": ev.gpu_memory_utilization,
        "batch_size": ev.batch_size,
        "dtype": cfg.model.dtype,
        "trust_remote_code": bool(cfg.model.get("trust_remote_code", False)),
    }
    if ev.max_pixels:
        kwargs["max_pixels"] = ev.max_pixels
    if ev.max_new_tokens:
        kwargs["max_new_tokens"] = ev.max_new_tokens
    extra = dict(ev.model_args or {})
    if "model" in extra:
        raise MergeError("evaluator.model_args.model: set by the evaluator (the written checkpoint), drop it")
    kwargs.update(extra)
    return kwargs


def child_spec(cfg, model_dir: str, include_paths: list[str], output_dir: Path, device: str) -> dict:
    """What the child runs. evaluator.backend (default vllm) may name another lmms-eval backend (tests)."""
    from ..families import get_family
    from .lmms import backend_kwargs

    backend = cfg.evaluator.backend or "vllm"
    ev = cfg.evaluator
    model_args = vllm_kwargs(cfg, model_dir) if backend == "vllm" else backend_kwargs(backend, model_dir, cfg, device)
    return {
        "backend": backend,
        "prompts_for": get_family(cfg.model.family).lmms_backend,
        "model_args": model_args,
        "tasks": [t.name for t in cfg.suite.tasks],
        "include_paths": include_paths,
        "lmms_eval_tasks": bool(cfg.suite.lmms_eval_tasks),
        "limit": ev.limit,
        "batch_size": ev.batch_size,
        "gen_kwargs": f"max_new_tokens={ev.max_new_tokens}" if ev.max_new_tokens else None,
        "seed": cfg.seed,
        "log_samples": bool(ev.log_samples),
        "output_dir": str(output_dir),
    }


def launch(python: Path, spec: dict, work_dir: Path) -> dict:
    """Run the child on `spec` (argument list, no shell); its output goes to our stderr; returns results.json."""
    from .vllm_child import RESULTS_NAME

    spec_path = Path(work_dir) / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    argv = [str(python), "-m", CHILD_MODULE, str(spec_path)]
    log.info("evaluator=vllm: %s", " ".join(argv))
    tail: collections.deque[str] = collections.deque(maxlen=40)
    try:
        proc = subprocess.Popen(argv, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace")  # fmt: skip
    except OSError as exc:
        raise MergeError(f"evaluator=vllm: cannot start {python} ({exc})") from None
    with proc:
        for line in proc.stdout:
            sys.stderr.write(line)
            tail.append(line.rstrip())
    if proc.returncode != 0:
        cause = next((line for line in reversed(tail) if line.strip()), "(no output)")
        raise MergeError(f"evaluator=vllm: lmms-eval ({spec['backend']} backend) exited with {proc.returncode}: {cause}")
    return read_results(Path(spec["output_dir"]) / RESULTS_NAME)


def read_results(path: Path) -> dict:
    try:
        results = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MergeError(f"evaluator=vllm: the child wrote no {path}") from None
    except ValueError as exc:
        raise MergeError(f"evaluator=vllm: {path} is not valid JSON ({exc})") from None
    if not isinstance(results, dict):
        raise MergeError(f"evaluator=vllm: {path} holds no results object")
    errors = results.get("mmbench_errors") or []
    if errors:
        raise MergeError(f"lmms-eval reported {len(errors)} error(s) during evaluation; first: {errors[0]}")
    return results


def evaluate_with_vllm(cfg, prepared, device: str) -> list[TaskScore]:
    from .lmms import loadable_view, scores_from_results
    from .suites import include_paths

    if (cfg.evaluator.backend or "vllm") == "vllm" and not device.startswith("cuda"):
        raise MergeError(f"evaluator=vllm runs on a GPU (device resolved to {device}); use evaluator=lmms_eval on CPU")
    if prepared.model_dir is None:
        raise MergeError("evaluator=vllm needs a checkpoint on disk, but the merge was kept in memory only")
    python = vllm_python(cfg)
    with ExitStack() as stack:
        paths = include_paths(cfg.suite, stack)
        model_dir, _ = loadable_view(cfg, prepared, stack)  # InternVL's original layout: a native copy
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mmbench-vllm-")))
        spec = child_spec(cfg, model_dir, paths, work / "out", device)
        results = launch(python, spec, work)
    return scores_from_results(results, cfg.suite.tasks)
