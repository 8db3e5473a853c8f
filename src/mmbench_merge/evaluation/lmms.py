"""lmms-eval in this process: build the family's backend, put merged weights into it, run the suite's tasks.

lmms-eval's Python API takes a model instance (`simple_evaluate(model=<lmms>)`), so a merge kept in memory
is evaluated without writing a checkpoint: the backend loads the base (or the chosen files' checkpoint)
the usual way, then `weights.load_into_model` overwrites every parameter with the merged tensor.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path

from .. import MergeError
from . import TaskScore

log = logging.getLogger("mmbench_merge")

WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def evaluate_in_process(cfg, prepared, device: str) -> list[TaskScore]:
    from ..families import backend_for, get_family
    from .suites import task_manager_for

    family = get_family(cfg.model.family)
    backend_name = backend_for(cfg.model, cfg.evaluator.backend)
    with ExitStack() as stack:
        task_manager = task_manager_for(cfg, family, stack)
        pretrained, native = loadable_view(cfg, prepared, stack)
        lm = build_backend(backend_name, pretrained, cfg, device)
        if prepared.state_dict is not None:
            from .weights import load_into_model

            state = prepared.state_dict
            if native:  # merged under the original InternVL names: the same tensors under the native ones
                from ..internvl_chat import to_native_state_dict

                state = to_native_state_dict(state)
            load = getattr(lm, "load_merged_weights", None)  # a backend with its own format (the omni model)
            n = load(state) if load else load_into_model(lm.model, state, source="merged weights (in memory)")
            state.clear()
            prepared.state_dict.clear()  # copied into the model: free the second copy before generating
            log.info("evaluating the merged weights in memory (%d tensors) with lmms-eval backend %s", n, backend_name)
        else:
            log.info("evaluating %s with lmms-eval backend %s", pretrained, backend_name)
        return run_tasks(lm, task_manager, cfg)


# ------------------------------------------------------------------------------------------ the model
def loadable_view(cfg, prepared, stack: ExitStack) -> tuple[str, bool]:
    """(directory the backend loads, whether it was translated from InternVL's original layout).

    An internvl_chat checkpoint in its original layout, without trust_remote_code, is converted tensor by
    tensor into a temporary native directory (weights from the checkpoint, config / processor / tokenizer /
    chat template translated from files_from; no .py file is copied): transformers' own InternVL class then
    loads it, and no code from the checkpoint ever runs.
    """
    from ..families import needs_native_view

    weights_dir = Path(prepared.model_dir or prepared.base_dir)
    if needs_native_view(cfg.model):
        from ..internvl_chat import is_original, native_view

        if not is_original(weights_dir):
            return str(weights_dir), False  # a native merge written by NativeWriter: complete, files translated
        files_dir = Path(prepared.files_dir) if prepared.files_dir else weights_dir
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mmbench-internvl-native-")))
        log.info("translating %s (InternVL original layout) to transformers' native InternVL", weights_dir)
        return str(native_view(weights_dir, files_dir, tmp / "model")), True
    return model_view(prepared, stack), False


def model_view(prepared, stack: ExitStack) -> str:
    """A directory the backend can load: weights from one checkpoint, tokenizer/processor/config from another.

    When both come from the same directory that directory is used as is; otherwise a temporary directory of
    symlinks (the weights' checkpoint, then every non-weight file of files_dir on top), like the merged
    checkpoint the engine would write.
    """
    weights_dir = Path(prepared.model_dir or prepared.base_dir)
    files_dir = Path(prepared.files_dir) if prepared.files_dir else weights_dir
    if files_dir.resolve() == weights_dir.resolve():
        return str(weights_dir)
    view = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mmbench-model-view-")))
    from ..engine import CHAT_TEMPLATE_FILES

    files_template = any((files_dir / name).is_file() for name in CHAT_TEMPLATE_FILES)
    for source, weights in ((weights_dir, True), (files_dir, False)):
        for path in source.iterdir():
            is_weight = path.name.endswith(WEIGHT_FILES) or path.name in WEIGHT_INDEXES
            if weights and files_template and path.name in CHAT_TEMPLATE_FILES:
                continue  # the template comes from files_dir alone (a stale .json would override its .jinja)
            if path.is_file() and (weights or not is_weight):
                target = view / path.name
                if target.exists() or target.is_symlink():
                    target.unlink()
                target.symlink_to(path.resolve())
    return str(view)


def backend_kwargs(backend_name: str, pretrained: str, cfg, device: str) -> dict:
    """Constructor arguments for an lmms-eval backend (device given once: in the constructor, not twice)."""
    ev = cfg.evaluator
    kwargs = {"pretrained": pretrained, "device": device, "batch_size": ev.batch_size}
    if backend_name in ("qwen2_vl", "internvl_hf", "internvl2"):
        kwargs["device_map"] = device
    if backend_name in ("llava_hf", "mmbench_omni"):
        kwargs["dtype"] = cfg.model.dtype
    if backend_name == "mmbench_omni" and cfg.model.get("revision"):
        kwargs["revision"] = cfg.model.revision
    if backend_name == "qwen2_vl" and ev.max_pixels:
        kwargs["max_pixels"] = ev.max_pixels
    extra = dict(ev.model_args or {})
    for key in ("pretrained", "device"):
        if key in extra:
            raise MergeError(f"evaluator.model_args.{key}: set by the evaluator (from the model and `device`), drop it")
    kwargs.update(extra)
    return kwargs


def build_backend(backend_name: str, pretrained: str, cfg, device: str):
    import torch
    from lmms_eval.models import get_model

    if backend_name == "mmbench_omni":  # this project's backend (also an lmms_eval.models entry point)
        from ..modality.backend import register

        register()
    try:
        cls = get_model(backend_name)
    except Exception as exc:  # noqa: BLE001 (import errors of any kind: one clear line)
        raise MergeError(f"evaluator.backend: lmms-eval has no usable backend {backend_name!r} ({exc})") from None
    try:
        lm = cls(**backend_kwargs(backend_name, pretrained, cfg, device))
    except MergeError:
        raise
    except Exception as exc:  # noqa: BLE001 (a backend that cannot load the model: one line, not a traceback)
        raise MergeError(f"lmms-eval backend {backend_name}: could not load {pretrained} "
                         f"({type(exc).__name__}: {exc})") from None
    dtype = getattr(torch, cfg.model.dtype, None)
    if isinstance(dtype, torch.dtype) and lm.model.dtype != dtype:
        lm.model.to(dtype)  # every backend picks its own dtype; model.dtype is what the config asks for
    return lm


# ------------------------------------------------------------------------------------------ the tasks
def run_tasks(lm, task_manager, cfg) -> list[TaskScore]:
    """simple_evaluate over the suite's tasks; any task without its headline score is an error."""
    from lmms_eval.evaluator import simple_evaluate

    ev = cfg.evaluator
    names = [t.name for t in cfg.suite.tasks]
    gen_kwargs = f"max_new_tokens={ev.max_new_tokens}" if ev.max_new_tokens else None
    with lmms_errors() as errors, judge_env(ev.judge, ev.get("judge_url")):
        results = simple_evaluate(
            model=lm,
            tasks=names,
            limit=ev.limit,
            batch_size=ev.batch_size,
            task_manager=task_manager,
            log_samples=bool(ev.log_samples),
            gen_kwargs=gen_kwargs,
            bootstrap_iters=0,
            verbosity="WARNING",
            random_seed=cfg.seed,
            numpy_random_seed=cfg.seed,
            torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.seed,
            process_docs_parallel=1,
        )
    if errors:
        raise MergeError(f"lmms-eval reported {len(errors)} error(s) during evaluation; first: {errors[0]}")
    return scores_from_results(results, cfg.suite.tasks)


def scores_from_results(results, tasks) -> list[TaskScore]:
    """The headline metric of every task from what simple_evaluate returned (None / missing = failure)."""
    if not results or "results" not in results:
        raise MergeError("lmms-eval returned no results (the evaluation crashed; see the log above)")
    scores = []
    for spec in tasks:
        task_results = results["results"].get(spec.name)
        if task_results is None:
            raise MergeError(f"lmms-eval returned no results for task {spec.name}")
        value = task_results.get(f"{spec.metric},none", task_results.get(spec.metric))
        if value is None:
            metrics = sorted(k.split(",")[0] for k in task_results if "," in k and "stderr" not in k)
            raise MergeError(f"task {spec.name}: lmms-eval returned no metric {spec.metric!r} (has: {', '.join(metrics)})")
        if not isinstance(value, (int, float)) or math.isnan(value):
            raise MergeError(f"task {spec.name}: metric {spec.metric} is {value!r}, not a number")
        n = (results.get("n-samples") or {}).get(spec.name, {}).get("effective")
        if not n:
            raise MergeError(f"task {spec.name}: evaluated no samples")
        samples = [
            {"doc_id": s.get("doc_id"), "target": s.get("target"), "response": _first(s.get("filtered_resps")),
             spec.metric: s.get(spec.metric)}
            for s in (results.get("samples") or {}).get(spec.name, [])
        ]  # fmt: skip
        scores.append(TaskScore(spec.name, spec.category, spec.metric, spec.label or spec.name,
                                float(value) * spec.scale, int(n), samples))  # fmt: skip
        judged = task_results.get(f"{spec.metric}_judge,none")  # evaluator.judge: reported beside the headline
        if isinstance(judged, (int, float)) and not math.isnan(judged):
            scores.append(TaskScore(spec.name, spec.category, f"{spec.metric}_judge", spec.label or spec.name,
                                    float(judged) * spec.scale, int(n), headline=False))  # fmt: skip
    return scores


def _first(responses):
    while isinstance(responses, (list, tuple)) and responses:
        responses = responses[0]
    return getattr(responses, "text", responses)


@contextmanager
def lmms_errors():
    """Collect what lmms-eval logs at ERROR level: its backends catch generation errors and answer ''."""
    from loguru import logger

    errors: list[str] = []
    sink = logger.add(lambda message: errors.append(message.record["message"].strip()), level="ERROR")
    try:
        yield errors
    finally:
        logger.remove(sink)


@contextmanager
def judge_env(judge: str | None, url: str | None = None):
    """evaluator.judge / judge_url for the task hooks (evaluation/judge.py); the API key comes from the environment."""
    from .judge import MODEL_ENV, URL_ENV

    if not judge:
        yield
        return
    saved = {k: os.environ.get(k) for k in (MODEL_ENV, URL_ENV)}
    os.environ[MODEL_ENV] = judge
    if url:
        os.environ[URL_ENV] = url
    else:
        os.environ.pop(URL_ENV, None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
