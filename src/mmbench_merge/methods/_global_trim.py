"""Model-wide statistics for TIES' trim (`trim_scope: model`), computed over a stream of tensors.

The paper's InternVL script flattens every merged tensor of an expert into one vector and keeps the entries with
`|x| >= kthvalue(|x|, m)`, m = int(N * mask_rate), N the number of merged entries; the elected sign, where the
sum of the trimmed vectors is exactly 0, becomes the majority sign over the whole vector. The engine streams one
tensor at a time, so the same numbers come from passes over the tensors, with memory bounded by the largest one:

1. a histogram per expert of the top 16 bits of the float32 bit pattern of |x| (32768 bins: the sign bit is 0).
   For non-negative floats the bit pattern orders like the value, so the bin holding the m-th smallest magnitude
   and the rank inside it follow from the cumulative counts;
2. a histogram per expert of the low 16 bits of the entries in that bin (65536 bins): the m-th smallest bit
   pattern, i.e. the exact float32 threshold (no rounding, ties counted as kthvalue counts them);
3. the elected signs of the trimmed vectors, counted over all entries: the majority sign.

`stream()` yields, per selected tensor, the list of task vectors of all experts (float32, any device), already
transformed as the merge will see them (DARE's drop). It is called once per pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

HIGH_BINS = 1 << 15  # bit 31 (sign) of |x| is 0: the top 16 bits take 2^15 values
LOW_BINS = 1 << 16


def _bits(tau: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns of |tau| as int32 (monotone in the magnitude), flattened."""
    return tau.detach().to(torch.float32).abs().reshape(-1).contiguous().view(torch.int32)


def _first_reaching(cumulative: torch.Tensor, rank: int) -> int:
    """The first index whose cumulative count reaches `rank` (1-based)."""
    return int(torch.searchsorted(cumulative, torch.tensor([rank], dtype=cumulative.dtype)).item())


def mask_rank(n_entries: int, density: float) -> int:
    """The paper's trim rank: the m-th smallest magnitude is the threshold, m = int(n * (1 - density))."""
    return int(n_entries * (1.0 - density))


def kth_magnitudes(stream: Callable[[], Iterable[Sequence[torch.Tensor]]], density: float):
    """Per expert, the exact m-th smallest |x| over every tensor of the stream (two passes).

    Returns (thresholds: list[float], n_entries: int, kept: list[int]): keep `|x| >= threshold`; a threshold of
    0.0 keeps everything (m = 0, e.g. density 1).
    """
    high: list[torch.Tensor] | None = None
    n_entries = 0
    for task_vectors in stream():  # pass 1: coarse histograms
        if high is None:
            high = [torch.zeros(HIGH_BINS, dtype=torch.int64) for _ in task_vectors]
        for counts, tau in zip(high, task_vectors):
            counts += torch.bincount(_bits(tau) >> 16, minlength=HIGH_BINS).cpu()
        n_entries += task_vectors[0].numel()
    if high is None:  # nothing selected
        return [], 0, []
    rank = mask_rank(n_entries, density)
    if rank <= 0:
        return [0.0] * len(high), n_entries, [n_entries] * len(high)
    bins, ranks_in_bin, below = [], [], []
    for counts in high:
        cumulative = counts.cumsum(0)
        b = _first_reaching(cumulative, rank)
        before = int(cumulative[b - 1]) if b > 0 else 0
        bins.append(b)
        ranks_in_bin.append(rank - before)
        below.append(before)
    low = [torch.zeros(LOW_BINS, dtype=torch.int64) for _ in high]
    for task_vectors in stream():  # pass 2: the chosen bin at full resolution
        for counts, tau, b in zip(low, task_vectors, bins):
            bits = _bits(tau)
            inside = bits[(bits >> 16) == b]
            if inside.numel():
                counts += torch.bincount(inside & 0xFFFF, minlength=LOW_BINS).cpu()
    thresholds, kept = [], []
    for counts, b, r, before in zip(low, bins, ranks_in_bin, below):
        cumulative = counts.cumsum(0)
        lo = _first_reaching(cumulative, r)
        pattern = torch.tensor([(b << 16) | lo], dtype=torch.int32)
        thresholds.append(float(pattern.view(torch.float32).item()))
        smaller = before + (int(cumulative[lo - 1]) if lo > 0 else 0)  # entries strictly below the threshold
        kept.append(n_entries - smaller)
    return thresholds, n_entries, kept


def elected_sign_balance(stream: Callable[[], Iterable[Sequence[torch.Tensor]]], thresholds: Sequence[float]) -> int:
    """(#entries elected +) - (#entries elected -) over the stream, after trimming with `thresholds` (pass 3)."""
    balance = 0
    for task_vectors in stream():
        # The same float operations, in the same order, as the merge (ties._trim_into, then a running sum).
        total = torch.zeros_like(task_vectors[0], dtype=torch.float32)
        for tau, threshold in zip(task_vectors, thresholds):
            total += tau * (tau.abs() >= threshold)
        balance += int((total > 0).sum()) - int((total < 0).sum())
    return balance
