"""One table of every merge method's hyperparameter ranges, checked before any tensor is read.

`check_method(method_cfg, n_experts)` raises one `MergeError` line naming the key (``method.density``) and the
allowed range. The method functions keep their own checks for direct callers; this table is what a run checks
first (preflight.py, engine.merge_model), so a bad value never costs a merge.

Methods that resolve interference *between* experts need at least two of them (MIN_EXPERTS):

- ties, dare_ties: the sign election over one expert elects that expert's every sign; the "merge" is plain
  magnitude pruning of one task vector, not TIES.
- tsv, iso_cts: built from the singular subspaces of several tasks, made orthogonal to each other; one task has
  nothing to decorrelate (TSV returns a re-orthogonalised low-rank copy, Iso-CTS a flattened spectrum).
- iso_c: flattens the spectrum of the *sum* to equalise the tasks' directions; one expert gives that expert with
  every singular value replaced by their mean, an altered expert, not a merge.
- wudi, optmerge: minimise the interference of the merged vector with every task; with one task the minimum
  is the expert itself (WUDI) or its rank-K truncation (OptMerge): hours of optimisation to copy or damage it.

weight_average, task_arithmetic and dare_ta are well defined for one expert (theta_0 + scaling * tau_1, with
DARE the drop-and-rescale of the DARE paper's single-model experiments); reference rows use them so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .. import MergeError


@dataclass(frozen=True)
class Range:
    """low < x (or low <= x with low_closed) and x < high (or x <= high with high_closed); None = unbounded."""

    low: float | None = None
    high: float | None = None
    low_closed: bool = False
    high_closed: bool = True
    integer: bool = False
    nullable: bool = False  # null = the preset or the function's default

    def describe(self) -> str:
        if self.integer and self.high is None:
            return f"an integer >= {self.low:g}" if self.low_closed else f"an integer > {self.low:g}"
        if self.high is None:
            return f"a finite value >= {self.low:g}" if self.low_closed else f"a finite value > {self.low:g}"
        left = "[" if self.low_closed else "("
        right = "]" if self.high_closed else ")"
        return f"a value in {left}{self.low:g}, {self.high:g}{right}"

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (value == self.low and not self.low_closed)):
            return False
        if self.high is not None and (value > self.high or (value == self.high and not self.high_closed)):
            return False
        return True


FRACTION = Range(0.0, 1.0)  # (0, 1]
SCALING = Range(0.0, None, nullable=True)  # > 0 and finite; null = the preset's (OptMerge) or 1.0
DROP_RATE = Range(0.0, 1.0, low_closed=True, high_closed=False)  # [0, 1)
ITERS = Range(0, None, low_closed=True, integer=True)
LR = Range(0.0, None, nullable=True)
MOMENTUM = Range(0.0, 1.0, low_closed=True, high_closed=False, nullable=True)
OPTIMIZERS = ("adam", "sgd")
INITS = ("sum", "mean")
TRIM_SCOPES = ("tensor", "model", None)  # null = the preset of model.finetune

# method -> key -> Range, or a tuple of allowed strings.
SPEC: dict[str, dict[str, Range | tuple[str, ...]]] = {
    "weight_average": {"scaling": SCALING},
    "task_arithmetic": {"scaling": SCALING},
    "ties": {"scaling": SCALING, "density": FRACTION, "trim_scope": TRIM_SCOPES},
    "dare_ta": {"scaling": SCALING, "drop_rate": DROP_RATE},
    "dare_ties": {"scaling": SCALING, "drop_rate": DROP_RATE, "density": FRACTION, "trim_scope": TRIM_SCOPES},
    "tsv": {"scaling": SCALING, "rank_fraction": Range(0.0, 1.0, nullable=True)},
    "iso_c": {"scaling": SCALING},
    "iso_cts": {"scaling": SCALING, "common_fraction": FRACTION},
    "wudi": {"scaling": SCALING, "iters": ITERS, "lr": LR, "optimizer": OPTIMIZERS, "init": INITS,
             "momentum": MOMENTUM},
    "optmerge": {"scaling": SCALING, "rank_fraction": Range(0.0, 1.0, nullable=True), "iters": ITERS, "lr": LR,
                 "optimizer": OPTIMIZERS + (None,), "init": INITS + (None,), "momentum": MOMENTUM,
                 "solver": ("loop", "eigen", None), "projector": ("low_rank", "full", None)},
}  # fmt: skip

MIN_EXPERTS = {"ties": 2, "dare_ties": 2, "tsv": 2, "iso_c": 2, "iso_cts": 2, "wudi": 2, "optmerge": 2}


def check_method(method_cfg: dict, n_experts: int | None = None) -> None:
    """Every hyperparameter of `method_cfg` in its range, and enough experts; else one MergeError line."""
    name = method_cfg.get("name")
    spec = SPEC.get(name)
    if spec is None:
        return  # reference rows (base, expert) have no hyperparameters; unknown names fail in get_method
    for key, allowed in spec.items():
        if key not in method_cfg:
            continue
        value = method_cfg[key]
        if isinstance(allowed, tuple):
            if value not in allowed:
                choices = ", ".join(str(c) for c in allowed if c is not None)
                raise MergeError(f"method.{key}: {name} takes one of {choices}, got {value!r}")
            continue
        if value is None and allowed.nullable:
            continue
        if not allowed.accepts(value):
            raise MergeError(f"method.{key}: {name} needs {allowed.describe()}, got {value!r}")
    need = MIN_EXPERTS.get(name, 1)
    if n_experts == 0:
        raise MergeError(f"model.experts: no experts given ({name} merges at least {need})")
    if n_experts is not None and n_experts < need:
        raise MergeError(
            f"model.experts: {name} merges at least {need} experts, got {n_experts} "
            "(with one expert use task_arithmetic, or method=expert for the expert itself)"
        )
