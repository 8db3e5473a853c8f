"""TIES-Merging (Yadav et al., NeurIPS 2023) and DARE (Yu et al., ICML 2024) on top of TA or TIES.

The trim follows the paper's code: keep `|x| >= t`, t the m-th smallest magnitude, m = int(n * (1 - density)),
over one tensor (`trim_scope: tensor`, the Qwen2-VL script) or over every merged tensor of the expert
(`trim_scope: model`, the InternVL script). An entry whose trimmed sum is exactly 0 takes the majority elected
sign of the same scope. With `trim_scope: model` the engine calls `prepare` first, which streams the selected
tensors and returns the model-wide thresholds and majority sign (methods/_global_trim.py).
"""

from __future__ import annotations

import torch

from .. import MergeError
from .basic import task_arithmetic

TRIM_SCOPES = ("tensor", "model")


def _trim_into(out: torch.Tensor, tau: torch.Tensor, threshold) -> None:
    """Write into `out` the entries of `tau` with |x| >= threshold, zeros elsewhere (one copy per expert)."""
    torch.mul(tau, tau.abs() >= threshold, out=out)


def _tensor_threshold(tau: torch.Tensor, density: float):
    """The paper's per-tensor threshold: the int(n * (1 - density))-th smallest magnitude (0: keep all)."""
    rank = int(tau.numel() * (1.0 - density))
    if rank <= 0:
        return 0.0
    magnitude = tau.abs().view(-1)
    return _kth_largest(magnitude, magnitude.numel() - rank + 1)  # = kthvalue(rank), bit for bit


def _kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a 1-D float tensor (1 <= k <= numel), exactly: the value of
    ``values.kthvalue(numel - k + 1)``, bit for bit (NaN counts as the largest, as in kthvalue).

    On the CPU by introselect (numpy's partition: linear time, about a tenth of kthvalue's on a 4864 x 896
    matrix); elsewhere by a radix select on the float bit patterns (_radix_kth_largest).
    """
    n = values.numel()
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        import numpy as np

        index = n - k
        return torch.tensor(np.partition(values.detach().numpy(), index)[index], dtype=values.dtype)
    if values.dtype == torch.float32:
        return _radix_kth_largest(values, k)
    return values.kthvalue(n - k + 1).values


def _radix_kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """k-th largest of a 1-D float32 tensor by a two-pass radix select on its bit patterns.

    Signed int32 patterns order like the floats for non-negative values; negative floats are mapped with
    x ^ 0x7FFFFFFF (their order reverses), NaN (positive pattern above inf) counts as the largest. Pass 1
    histograms the top 16 bits and finds the bucket holding the k-th largest; pass 2 selects that bucket's
    entries (few) and takes the exact value among them.
    """
    bits = values.view(torch.int32)
    key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone in the float value, as a signed int
    hi = (key >> 16) + 32768  # 0 .. 65535
    counts = torch.bincount(hi, minlength=65536)
    at_or_above = counts.flip(0).cumsum(0)  # [j]: entries in the top j + 1 buckets
    j = int(torch.searchsorted(at_or_above, torch.tensor([k], device=values.device)).item())
    bucket = 65535 - j
    above = int(at_or_above[j - 1].item()) if j > 0 else 0
    inside = values[hi == bucket]
    return inside.kthvalue(inside.numel() - (k - above) + 1).values


def _ties_merge(trimmed: torch.Tensor, majority_sign: float | None = None) -> torch.Tensor:
    """Elect a sign per entry from the sum (exact zeros take the majority sign), then average the entries that
    agree with it (disjoint mean)."""
    total = torch.zeros_like(trimmed[0])
    for tau in trimmed:  # a running sum, in the order _global_trim.elected_sign_balance adds
        total += tau
    elected = torch.sign(total)
    del total
    if majority_sign is None:  # tensor scope: the majority over this tensor's elected signs
        majority_sign = float(_sign(int((elected > 0).sum()) - int((elected < 0).sum())))
    if majority_sign != 0.0:
        elected[elected == 0] = majority_sign
    kept_sum = torch.zeros_like(elected)
    count = torch.zeros_like(elected)
    for tau in trimmed:  # one expert at a time: temporaries of one tensor, not of the whole stack
        agrees = (torch.sign(tau) == elected) & (tau != 0)
        kept_sum += tau * agrees
        count += agrees
    return kept_sum / count.clamp(min=1)  # where no entry agrees, kept_sum is 0: the result is 0


def _sign(value: int) -> int:
    return (value > 0) - (value < 0)


def ties(
    task_vectors: list[torch.Tensor],
    *,
    density: float = 0.2,
    trim_scope: str = "tensor",
    thresholds: list[float] | None = None,
    majority_sign: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Trim each task vector (per tensor, or with the model-wide `thresholds` from `prepare`), elect signs,
    disjoint mean."""
    _check_ties_args(density, trim_scope)
    if trim_scope == "model" and (thresholds is None or majority_sign is None):
        raise MergeError("method.trim_scope=model needs the model-wide thresholds of the engine's first pass "
                         "(merge through the engine, or call ties.prepare first)")  # fmt: skip
    first = task_vectors[0]
    trimmed = torch.empty((len(task_vectors), *first.shape), dtype=first.dtype, device=first.device)
    for i, (slot, tau) in enumerate(zip(trimmed, task_vectors)):
        tau = tau.contiguous()
        threshold = thresholds[i] if trim_scope == "model" else _tensor_threshold(tau, density)
        _trim_into(slot, tau, threshold)
    return _ties_merge(trimmed, majority_sign if trim_scope == "model" else None)


def _dare(tau: torch.Tensor, drop_rate: float, generator: torch.Generator | None) -> torch.Tensor:
    """Drop each entry with probability `drop_rate` and rescale the survivors by 1 / (1 - drop_rate)."""
    if drop_rate == 0.0:
        return tau
    keep = torch.rand(tau.shape, generator=generator, device=tau.device) >= drop_rate
    return torch.where(keep, tau / (1.0 - drop_rate), torch.zeros_like(tau))


def dare_ta(
    task_vectors: list[torch.Tensor], *, drop_rate: float = 0.2, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DARE on each task vector, then Task Arithmetic."""
    _check_fraction("drop_rate", drop_rate, upper_open=True)
    return task_arithmetic([_dare(tau, drop_rate, generator) for tau in task_vectors])


def dare_ties(
    task_vectors: list[torch.Tensor],
    *,
    drop_rate: float = 0.2,
    density: float = 0.2,
    trim_scope: str = "tensor",
    thresholds: list[float] | None = None,
    majority_sign: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE on each task vector, then TIES."""
    _check_fraction("drop_rate", drop_rate, upper_open=True)
    _check_ties_args(density, trim_scope)
    dropped = [_dare(tau, drop_rate, generator) for tau in task_vectors]
    return ties(dropped, density=density, trim_scope=trim_scope, thresholds=thresholds, majority_sign=majority_sign)


# ------------------------------------------------------------------------------------------ the first pass
def _prepare(stream, *, density: float = 0.2, trim_scope: str = "tensor", drop_rate: float | None = None, **_):
    """Engine hook: for `trim_scope: model`, the model-wide thresholds and majority sign (three passes over the
    selected tensors); nothing for `tensor`. `stream()` yields (name, task vectors, fresh per-tensor generator).
    Returns (extra keyword arguments for every per-tensor call, a summary for merge_report.json)."""
    from . import _global_trim

    if drop_rate is not None:
        _check_fraction("drop_rate", drop_rate, upper_open=True)
    _check_ties_args(density, trim_scope)
    if trim_scope == "tensor":
        return {}, None

    def vectors():
        for _name, task_vectors, generator in stream():
            if drop_rate is None:
                yield task_vectors
            else:  # the same draws, in the same order, as dare_ties will make in the merge pass
                yield [_dare(tau, drop_rate, generator) for tau in task_vectors]

    thresholds, n_entries, kept = _global_trim.kth_magnitudes(vectors, density)
    if not thresholds:
        return {"thresholds": [], "majority_sign": 0.0}, {"trim_scope": "model", "entries": 0}
    balance = _global_trim.elected_sign_balance(vectors, thresholds)
    majority = float(_sign(balance))
    summary = {
        "trim_scope": "model", "passes": 3, "entries": n_entries,
        "mask_rank": _global_trim.mask_rank(n_entries, density), "thresholds": thresholds, "kept": kept,
        "elected_sign_balance": balance, "majority_sign": majority,
    }  # fmt: skip
    return {"thresholds": thresholds, "majority_sign": majority}, summary


ties.prepare = _prepare
dare_ties.prepare = _prepare


def _check_ties_args(density: float, trim_scope: str) -> None:
    _check_fraction("density", density)
    if trim_scope not in TRIM_SCOPES:
        raise MergeError(f"method.trim_scope must be one of {', '.join(TRIM_SCOPES)}, got {trim_scope!r}")


def _check_fraction(name: str, value: float, upper_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and (0.0 <= value < 1.0 if upper_open else 0.0 < value <= 1.0)
    if not ok:
        interval = "[0, 1)" if upper_open else "(0, 1]"
        raise MergeError(f"method.{name} must be in {interval}, got {value!r}")
