"""Weight Average and Task Arithmetic."""

from __future__ import annotations

import torch


def weight_average(task_vectors: list[torch.Tensor], *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean of the task vectors: theta_0 + mean(tau_i) is the mean of the experts (used with scaling 1)."""
    return task_arithmetic(task_vectors) / len(task_vectors)


def task_arithmetic(task_vectors: list[torch.Tensor], *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sum of the task vectors (Ilharco et al., ICLR 2023). A running sum: no stacked copy of the inputs."""
    total = task_vectors[0].clone()
    for tau in task_vectors[1:]:
        total += tau
    return total
