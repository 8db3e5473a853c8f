"""Structured-config schemas, registered in Hydra's ConfigStore.

Every YAML in conf/ names one of these schemas in its defaults list, so an unknown key or a wrongly typed
value fails when Hydra composes the config, with Hydra's own message, before anything is loaded.
Method schemas carry the method's hyperparameters under the same names as the method function's keywords.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


# --------------------------------------------------------------------------------------------- model
@dataclass
class MergeSelection:
    include: List[str] = field(default_factory=list)  # regexes (re.search); empty = every tensor
    exclude: List[str] = field(default_factory=list)  # regexes; an excluded tensor keeps the base value


@dataclass
class ModelConfig:
    name: str = MISSING
    family: str = MISSING  # qwen2_vl | internvl | internvl_chat | llava (see families.py)
    finetune: str = "full"  # full | lora | modality: selects method presets (OptMerge's variant, scaling)
    base: str = MISSING  # local directory or hub id
    experts: Dict[str, str] = field(default_factory=dict)  # capability -> dir, hub id or PEFT adapter dir
    use: Optional[List[str]] = None  # the experts to merge (model.use=[vqa,ocr]); null = every expert
    merge: MergeSelection = field(default_factory=MergeSelection)
    files_from: str = "base"  # "base" or an expert's key: where tokenizer/processor/chat template come from
    dtype: str = "bfloat16"  # dtype the evaluator loads the model in
    revision: Optional[str] = None  # hub revision for every hub id of this model
    # family=omni only (modality merging, docs/modality.md): each modality's encoder (dir or hub id) and the
    # space the LoRAs are merged in: factor (A and B separately, the paper) | product_dense | product_svd
    encoders: Dict[str, str] = field(default_factory=dict)
    merge_space: str = "factor"
    # Run the checkpoint's own Python code (InternVL's original layout ships some). Off: it is never imported;
    # internvl_chat checkpoints are then evaluated through transformers' native InternVL (internvl_chat.py).
    trust_remote_code: bool = False
    merged_format: str = "native"  # internvl_chat, save_merged=true: native (transformers' InternVL) | original


# --------------------------------------------------------------------------------------------- methods
@dataclass
class MethodConfig:
    name: str = MISSING
    scaling: Optional[float] = 1.0  # merged = theta_0 + scaling * tau_m; null = the method's preset (else 1.0)


@dataclass
class WeightAverageConfig(MethodConfig):
    name: str = "weight_average"
    scaling: float = 1.0  # fixed: the mean of the experts


@dataclass
class TaskArithmeticConfig(MethodConfig):
    name: str = "task_arithmetic"
    scaling: float = 0.3


@dataclass
class TiesConfig(MethodConfig):
    name: str = "ties"
    scaling: float = 1.0
    density: float = 0.2
    trim_scope: Optional[str] = None  # tensor | model; null = the finetune preset (full: model, lora: tensor)


@dataclass
class DareTaConfig(MethodConfig):
    name: str = "dare_ta"
    scaling: float = 0.3
    drop_rate: float = 0.2


@dataclass
class DareTiesConfig(MethodConfig):
    name: str = "dare_ties"
    scaling: float = 1.0
    drop_rate: float = 0.2
    density: float = 0.2
    trim_scope: Optional[str] = None  # tensor | model; null = the finetune preset (full: model, lora: tensor)


@dataclass
class TsvConfig(MethodConfig):
    name: str = "tsv"
    scaling: float = 1.0
    rank_fraction: Optional[float] = None  # top singular triplets kept per task; null = 1 / number of experts


@dataclass
class IsoCConfig(MethodConfig):
    name: str = "iso_c"
    scaling: float = 1.0


@dataclass
class IsoCtsConfig(MethodConfig):
    name: str = "iso_cts"
    scaling: float = 1.0
    common_fraction: float = 0.8  # share of min(m, n) given to the common subspace


@dataclass
class WudiConfig(MethodConfig):
    name: str = "wudi"
    scaling: float = 1.0
    iters: int = 300
    lr: float = 1e-5
    optimizer: str = "adam"  # adam | sgd
    init: str = "sum"  # sum | mean of the task vectors
    momentum: float = 0.9  # sgd only


@dataclass
class OptMergeConfig(MethodConfig):
    """null = taken from methods.PRESETS["optmerge"][model.finetune] (full | lora)."""

    name: str = "optmerge"
    scaling: Optional[float] = None  # full 0.1, lora 1.0
    rank_fraction: Optional[float] = None  # null = 1 / number of experts
    center: Optional[bool] = None  # full true, lora false
    init: Optional[str] = None  # full sum, lora mean
    optimizer: Optional[str] = None  # full adam, lora sgd
    lr: Optional[float] = None  # full 1e-5, lora 1e-4
    momentum: Optional[float] = None  # sgd only: lora 0.9
    iters: int = 300
    projector: Optional[str] = None  # low_rank (Sigma_K V_K^T) | full (tau_i); modality preset: full
    solver: Optional[str] = None  # loop | eigen (sgd only: closed form in H's eigenbasis); full loop, lora eigen


@dataclass
class BaseModelConfig(MethodConfig):
    """Reference row: evaluate the base model unchanged."""

    name: str = "base"


@dataclass
class ExpertModelConfig(MethodConfig):
    """Reference row: evaluate one expert unchanged (`method.expert=ocr`)."""

    name: str = "expert"
    expert: str = MISSING


# --------------------------------------------------------------------------------------------- suite / evaluator
@dataclass
class TaskSpec:
    name: str = MISSING  # lmms-eval task name
    category: str = MISSING  # VQA | Geometry | Chart | OCR | Grounding | ...
    metric: str = MISSING  # the headline metric key in lmms-eval's results
    label: Optional[str] = None  # column name in tables (defaults to name)
    scale: float = 100.0  # lmms-eval's value x scale = the row's 0-100 value


@dataclass
class SuiteConfig:
    name: str = MISSING
    tasks: List[TaskSpec] = field(default_factory=list)
    packaged: Optional[str] = None  # task YAMLs shipped in mmbench_merge/evaluation/tasks/<packaged>/
    include_path: Optional[str] = None  # extra directory of lmms-eval task YAMLs
    lmms_eval_tasks: bool = False  # also index lmms-eval's own tasks (slow; suite=general needs it)
    profile: Optional[str] = None  # MiniBench build profile (suite=minibench)
    data_dir: Optional[str] = None  # suite=modality: the folder of the released test files and their media


@dataclass
class EvaluatorConfig:
    name: str = "none"  # none | lmms_eval | vllm
    limit: Optional[int] = None  # evaluate the first N samples of each task
    batch_size: int = 1
    backend: Optional[str] = None  # lmms-eval model backend; None = chosen from the model's family
    model_args: Dict[str, Any] = field(default_factory=dict)  # extra backend arguments
    max_new_tokens: Optional[int] = None  # overrides every task's generation length
    log_samples: bool = False  # write every model answer to <run dir>/samples.jsonl
    judge: Optional[str] = None  # LLM that extracts MathVista / MathVision answers: a model name served at
    # judge_url (OpenAI-compatible) or hf:<dir or hub id>; reported as geo_acc_judge beside the rule-based geo_acc
    judge_url: Optional[str] = None  # OpenAI-compatible base URL (default $OPENAI_BASE_URL, else api.openai.com/v1)
    # vLLM only
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.8
    max_pixels: Optional[int] = None
    python: Optional[str] = None  # the vLLM environment's interpreter (default $MMBENCH_VLLM_PYTHON, .venv-vllm)


# --------------------------------------------------------------------------------------------- logger
@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb
    project: str = "mmbench-merge"
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online | disabled (WANDB_MODE in the environment wins)
    # files in <run dir>/wandb/; project/entity default to WANDB_PROJECT / WANDB_ENTITY (conf/logger/wandb.yaml)
    tags: List[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- merge cache
@dataclass
class MergeCacheConfig:
    """tau_m stored once per merge identity (everything but scaling): see merge_cache.py."""

    enabled: bool = True
    dir: Optional[str] = None  # null = $MMBENCH_CACHE, else <runs_dir>/merge_cache
    max_size_gb: float = 50.0  # least recently used entries are evicted past this size


# --------------------------------------------------------------------------------------------- top level
@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    method: MethodConfig = MISSING
    suite: SuiteConfig = MISSING
    evaluator: EvaluatorConfig = MISSING
    logger: LoggerConfig = MISSING
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    save_merged: bool = False  # write the merged checkpoint to <run dir>/merged/
    rerun: bool = False  # run again even if complete results for the same resolved config exist under runs_dir
    runs_dir: str = "runs"  # where runs are written and where completed runs are looked up (skip-on-rerun)
    shard_size_mb: float = 2000.0  # merged checkpoints are written in shards of at most this many MB
    merge_cache: MergeCacheConfig = field(default_factory=MergeCacheConfig)


METHOD_SCHEMAS: Dict[str, type] = {
    "weight_average": WeightAverageConfig,
    "task_arithmetic": TaskArithmeticConfig,
    "ties": TiesConfig,
    "dare_ta": DareTaConfig,
    "dare_ties": DareTiesConfig,
    "tsv": TsvConfig,
    "iso_c": IsoCConfig,
    "iso_cts": IsoCtsConfig,
    "wudi": WudiConfig,
    "optmerge": OptMergeConfig,
    "base": BaseModelConfig,
    "expert": ExpertModelConfig,
}


def register_configs() -> None:
    """Register every schema at the top level (so `--help` lists only real choices of each group); a group's YAML
    names its schema as `defaults: [/<group>_schema@_here_]` (methods: `/method_<name>_schema@_here_`)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(name="model_schema", node=ModelConfig)
    cs.store(name="suite_schema", node=SuiteConfig)
    cs.store(name="evaluator_schema", node=EvaluatorConfig)
    cs.store(name="logger_schema", node=LoggerConfig)
    for name, schema in METHOD_SCHEMAS.items():
        cs.store(name=f"method_{name}_schema", node=schema)
    register_resolvers()


def _minibench_path(family: str, item: str) -> str:
    from .minibench import resolve_path  # lazy: builds the MiniBench on first use, torch only then

    return resolve_path(family, item)


def register_resolvers() -> None:
    """`${minibench:family,item}` (conf/model/mini_*.yaml): a path in the built MiniBench."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("minibench", _minibench_path, replace=True)
