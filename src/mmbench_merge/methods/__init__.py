"""Merge methods: pure per-tensor functions of the task vectors.

Contract (DESIGN.md): ``fn(task_vectors: list[Tensor], *, <hyperparameters>, generator=None) -> Tensor``
returns the merged task vector tau_m (before scaling); the engine writes theta_0 + scaling * tau_m.
The registry maps names to "module:function" so listing methods never imports torch.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable

from .. import MergeError

log = logging.getLogger("mmbench_merge")

_REGISTRY: dict[str, str] = {
    "weight_average": "basic:weight_average",
    "task_arithmetic": "basic:task_arithmetic",
    "ties": "ties:ties",
    "dare_ta": "ties:dare_ta",
    "dare_ties": "ties:dare_ties",
    "tsv": "svd:tsv",
    "iso_c": "svd:iso_c",
    "iso_cts": "svd:iso_cts",
    "wudi": "optimize:wudi",
    "optmerge": "optimize:optmerge",
}


def list_methods() -> list[str]:
    """Names of every merge method, in the order of the paper's tables."""
    return list(_REGISTRY)


def get_method(name: str) -> Callable:
    """The per-tensor function of merge method `name`."""
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; known: {', '.join(_REGISTRY)}") from None
    module_name, func_name = target.split(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, func_name)


# Hyperparameters a method takes from the model's fine-tuning regime (model.finetune) when the config leaves
# them null. OptMerge's variants are the paper's: full fine-tuning (InternVL2.5-1B), LoRA (Qwen2-VL-7B) and modality
# merging (the ModelCompose Vicuna LoRAs, model.finetune=modality).
# TIES' trim scope is the paper's per script: the InternVL script (full fine-tunes) trims over the whole model,
# the Qwen2-VL script (LoRA experts) per tensor.
PRESETS: dict[str, dict[str, dict]] = {
    # Modality merging trims per key: its merge streams the LoRA factors key by key (docs/modality.md).
    "ties": {"full": {"trim_scope": "model"}, "lora": {"trim_scope": "tensor"}, "modality": {"trim_scope": "tensor"}},
    "dare_ties": {"full": {"trim_scope": "model"}, "lora": {"trim_scope": "tensor"},
                  "modality": {"trim_scope": "tensor"}},
    "optmerge": {
        "full": {"center": True, "init": "sum", "optimizer": "adam", "lr": 1e-5, "scaling": 0.1, "solver": "loop"},
        "lora": {
            "center": False,
            "init": "mean",
            "optimizer": "sgd",
            "momentum": 0.9,
            "lr": 1e-4,
            "scaling": 1.0,
            "solver": "eigen",  # the SGD iterates in closed form (optimize.minimise_eigen)
        },
        # Modality merging (Table 5): the factors of the Vicuna LoRAs, merged as in the paper's `merge-wudi2`:
        # the target is the rank floor(min/5) truncation, the projector the full factor; SGD lr 5e-2, lambda 1.
        "modality": {
            "center": False,
            "init": "mean",
            "optimizer": "sgd",
            "momentum": 0.9,
            "lr": 5e-2,
            "rank_fraction": 0.2,
            "projector": "full",
            "scaling": 1.0,
            "solver": "loop",
        },
    },
}

_NOT_HYPERPARAMETERS = {"name", "scaling", "expert"}

# Weight Average is the mean of the experts: theta_0 + 1 * mean(tau_i). Another scaling would make it Task
# Arithmetic with a different coefficient, so it is refused rather than silently recorded under this name.
FIXED_SCALING = {"weight_average": 1.0}


def resolve_method(method_cfg: dict, finetune: str) -> tuple[Callable, dict, float]:
    """(function, keyword arguments, scaling) for a method config; null values come from the presets."""
    name = method_cfg["name"]
    fn = get_method(name)
    if name in PRESETS and finetune not in PRESETS[name]:
        known = " or ".join(PRESETS[name])
        raise MergeError(f"model.finetune: {finetune!r} selects no {name} preset; expected {known}")
    preset = PRESETS.get(name, {}).get(finetune, {})
    kwargs = {}
    for key, value in method_cfg.items():
        if key in _NOT_HYPERPARAMETERS:
            continue
        if value is None:
            value = preset.get(key)
        if value is not None:  # still null: the function's own default applies (e.g. 1 / number of experts)
            kwargs[key] = value
    scaling = method_cfg.get("scaling")
    if scaling is None:
        scaling = preset.get("scaling", 1.0)
    if name in FIXED_SCALING and scaling != FIXED_SCALING[name]:
        raise MergeError(f"method.scaling: {name} has its scaling fixed at {FIXED_SCALING[name]} (got {scaling}); "
                         "sweep scaling with task_arithmetic instead")  # fmt: skip
    from_preset = sorted(k for k, v in method_cfg.items() if v is None and k in preset)
    # The composed config shows null for preset values: say once what the run actually uses.
    values = " ".join([f"scaling={scaling}", *(f"{k}={v}" for k, v in kwargs.items())])
    source = f" (from the {finetune!r} preset: {', '.join(from_preset)})" if from_preset else ""
    log.info("method %s: %s%s", name, values, source)
    return fn, kwargs, float(scaling)
