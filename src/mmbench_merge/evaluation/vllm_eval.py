"""evaluator=vllm: the written checkpoint through lmms-eval's vLLM backend (GPU only; vLLM imported only here).

The prompts stay those of the model's family: the TaskManager is created with the family's lmms-eval
backend name (suites.task_manager_for), whatever backend runs the model.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack

from .. import MergeError
from . import TaskScore

log = logging.getLogger("mmbench_merge")


def vllm_kwargs(cfg, model_dir: str) -> dict:
    ev = cfg.evaluator
    kwargs = {
        "model": model_dir,
        "tensor_parallel_size": ev.tensor_parallel_size,
        "gpu_memory_utilization": ev.gpu_memory_utilization,
        "batch_size": ev.batch_size,
        "dtype": cfg.model.dtype,
        "trust_remote_code": cfg.model.family == "internvl_chat",
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


def evaluate_with_vllm(cfg, prepared, device: str) -> list[TaskScore]:
    from ..families import get_family
    from .lmms import model_view, run_tasks
    from .suites import task_manager_for

    if not device.startswith("cuda"):
        raise MergeError(f"evaluator=vllm runs on a GPU (device resolved to {device}); use evaluator=lmms_eval on CPU")
    if prepared.model_dir is None:
        raise MergeError("evaluator=vllm needs a checkpoint on disk, but the merge was kept in memory only")
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise MergeError(f"evaluator=vllm: vLLM is not installed ({exc}); pip install 'mmbench-merge[vllm]'") from None
    from lmms_eval.models import get_model

    family = get_family(cfg.model.family)
    with ExitStack() as stack:
        task_manager = task_manager_for(cfg, family, stack)
        model_dir = model_view(prepared, stack)
        log.info("evaluating %s with lmms-eval's vLLM backend (tp=%d)", model_dir, cfg.evaluator.tensor_parallel_size)
        lm = get_model("vllm")(**vllm_kwargs(cfg, model_dir))
        return run_tasks(lm, task_manager, cfg)
