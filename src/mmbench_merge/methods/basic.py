"""Weight Average and Task Arithmetic."""

from __future__ import annotations

import torch


def weight_average(task_vectors: list[torch.Tensor], *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean of the task vectors: theta_0 + mean(tau_i) is the mean of the experts (used with scaling 1)."""
    return torch.stack(task_vectors).mean(dim=0)


def task_arithmetic(task_vectors: list[torch.Tensor], *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sum of the task vectors (Ilharco et al., ICLR 2023)."""
    return torch.stack(task_vectors).sum(dim=0)
