#!/usr/bin/env bash
# GPU check for the days a GPU is lent (about 5-8 minutes on one H100; nothing here runs without CUDA):
#   1. every merge method on device=cuda against the CPU result, InternVL2.5-1B's real shapes (bench/gpu_check.py),
#      timed, with the GPU's peak memory;
#   2. one tiny evaluation (shipped MiniBench InternVL, 2 samples per task) through evaluator=lmms_eval on the GPU;
#   3. the same through evaluator=vllm when its environment exists (make install-vllm), else says it skipped.
# Results: bench/results/gpu_check.json (part 1) and the lines printed here (parts 2-3); copy them into
# docs/benchmarks.md with the device name printed first.
#   bash bench/gpu_check.sh            # PY=path/to/python to use another interpreter than .venv/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
RUNS=$(mktemp -d /tmp/gpu-check-runs.XXXXXX)
trap 'rm -rf "$RUNS"' EXIT

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"

echo "== 1. merge: every method, cuda vs cpu (InternVL2.5-1B shapes, 1 LLM layer + projector)"
timeout 330 "$PY" bench/gpu_check.py --layers 1 --out bench/results/gpu_check.json

evaluate() {  # $1 = evaluator, rest = extra overrides
  local evaluator=$1; shift
  local start=$SECONDS
  timeout 150 "$PY" run.py model=mini_internvl method=task_arithmetic suite=minibench evaluator="$evaluator" \
    evaluator.limit=2 device=cuda logger=none rerun=true runs_dir="$RUNS" hydra.run.dir="$RUNS/$evaluator" "$@" \
    | grep -E "^(minibench_|avg:all|==)" || { echo "evaluator=$evaluator: FAILED"; return 1; }
  echo "evaluator=$evaluator on cuda: $((SECONDS - start)) s (merge + load + 10 generations)"
}

echo "== 2. evaluator=lmms_eval on the GPU"
evaluate lmms_eval

echo "== 3. evaluator=vllm"
if [ -x .venv-vllm/bin/python ]; then
  evaluate vllm evaluator.gpu_memory_utilization=0.3
else
  echo "skipped: no .venv-vllm (make install-vllm builds it: vLLM is not in the project's environment)"
fi
