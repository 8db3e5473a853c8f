"""Evaluation through lmms-eval: task YAMLs shipped in this package, one entry point per evaluator.

    evaluate(cfg, prepared, device) -> list[TaskScore]

`evaluator=lmms_eval` builds the lmms-eval backend of the model's family in this process and, for a merge
kept in memory, copies the merged weights into it (no checkpoint written); `evaluator=vllm` evaluates a
written checkpoint with lmms-eval's vLLM backend, in vLLM's own environment, as a child process (vllm_eval.py). Either way a task that lmms-eval did not score, or an
error lmms-eval only logged, fails the run: lmms-eval itself carries on (and exits 0) after many crashes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

TASKS_DIR = Path(__file__).parent / "tasks"


@dataclass
class TaskScore:
    task: str  # lmms-eval task name
    category: str
    metric: str
    label: str
    value: float  # 0-100
    n_samples: int
    samples: list[dict] = field(default_factory=list)  # with evaluator.log_samples: doc_id, target, response, score
    headline: bool = True  # False: a second metric of the task (the LLM judge's), kept out of the averages


EVALUATORS = ("none", "lmms_eval", "vllm")


def check(cfg, device: str) -> None:
    """Fail before merging when the evaluator cannot run here (one clear line, no wasted merge)."""
    from .. import MergeError

    name = cfg.evaluator.name
    if name not in EVALUATORS:
        raise MergeError(f"evaluator.name: unknown evaluator {name!r}; known: {', '.join(EVALUATORS)}")
    if name != "none" and not cfg.suite.tasks:
        raise MergeError(f"suite={cfg.suite.name}: no tasks to evaluate with evaluator={name}")
    if name == "vllm":
        if not device.startswith("cuda"):
            raise MergeError(f"evaluator=vllm runs on a GPU (device is {device}); use evaluator=lmms_eval on CPU")
        from .vllm_eval import check_environment

        check_environment(cfg)  # its own venv (make install-vllm): imports vllm and lmms_eval there
        if cfg.model.family == "internvl_chat" and cfg.model.get("merged_format") == "original" \
                and not cfg.model.get("trust_remote_code"):
            raise MergeError("evaluator=vllm with model.merged_format=original loads InternVL's remote code: set "
                             "model.trust_remote_code=true or keep merged_format=native")
    if name != "none":
        check_task_inputs(cfg.suite)


def check_task_inputs(suite_cfg) -> None:
    """Inputs a task needs that this project cannot ship (the paper's OCRVQA_TESTCORE key list)."""
    from .. import MergeError

    names = [t.name for t in suite_cfg.tasks]
    if "mmb_ocrvqa_testcore" in names:
        from .tasks.paper.utils import ocrvqa_testcore_keys

        try:
            ocrvqa_testcore_keys()
        except MergeError as exc:
            raise MergeError(f"suite={suite_cfg.name}: {exc}") from None


def evaluate(cfg, prepared, device: str) -> list[TaskScore]:
    """Scores of every task of cfg.suite for the prepared model (runner.PreparedModel)."""
    check(cfg, device)
    name = cfg.evaluator.name
    if name == "none":
        return []
    if name == "lmms_eval":
        from .lmms import evaluate_in_process

        return evaluate_in_process(cfg, prepared, device)
    from .vllm_eval import evaluate_with_vllm

    return evaluate_with_vllm(cfg, prepared, device)
