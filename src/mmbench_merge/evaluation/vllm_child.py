"""The evaluation half of evaluator=vllm, run by the vLLM environment's interpreter (a separate venv).

    <.venv-vllm>/bin/python -m mmbench_merge.evaluation.vllm_child SPEC.json

SPEC.json (written by vllm_eval.py) names the checkpoint, the backend and its arguments, the tasks, the
task directories and the prompt family. This process builds lmms-eval's TaskManager with the family's
prompts, the backend (`vllm` in production), runs simple_evaluate and writes `results.json` into the spec's
output directory: lmms-eval's aggregated results (its `*_results.json` layout: results, n-samples, configs,
samples when asked) plus `mmbench_errors`, what lmms-eval logged at ERROR level. It imports nothing of
mmbench_merge beyond this light package, so the vLLM environment needs only vLLM and lmms-eval.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS_NAME = "results.json"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m mmbench_merge.evaluation.vllm_child SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager
    from lmms_eval.utils import handle_non_serializable
    from loguru import logger

    errors: list[str] = []
    logger.add(lambda message: errors.append(message.record["message"].strip()), level="ERROR")
    manager = TaskManager("WARNING", include_path=spec["include_paths"] or None,
                          include_defaults=bool(spec.get("lmms_eval_tasks")), model_name=spec["prompts_for"])  # fmt: skip
    lm = get_model(spec["backend"])(**spec["model_args"])
    seed = spec.get("seed", 0)
    results = simple_evaluate(
        model=lm, tasks=spec["tasks"], limit=spec.get("limit"), batch_size=spec.get("batch_size", 1),
        task_manager=manager, log_samples=bool(spec.get("log_samples")), gen_kwargs=spec.get("gen_kwargs"),
        bootstrap_iters=0, verbosity="WARNING", random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed,
    )  # fmt: skip
    results = dict(results or {})
    results["mmbench_errors"] = errors
    out = Path(spec["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
    (out / (RESULTS_NAME + ".tmp")).write_text(text)
    (out / (RESULTS_NAME + ".tmp")).replace(out / RESULTS_NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
