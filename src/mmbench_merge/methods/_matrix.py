"""Shared pieces of the methods that treat a task vector as a matrix (TSV, Iso-C/CTS, WUDI, OptMerge)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from .. import MergeError


def matrix_method(fn: Callable) -> Callable:
    """Run `fn` on 2-D task vectors; any other shape is averaged (as the reference code does).

    Also checks the list (non-empty, one shape) and hands `fn` float32 tensors.
    """

    @functools.wraps(fn)
    def wrapper(task_vectors: list[torch.Tensor], **kwargs) -> torch.Tensor:
        if not task_vectors:
            raise MergeError(f"method {fn.__name__}: no task vectors given")
        shape = task_vectors[0].shape
        for tau in task_vectors[1:]:
            if tau.shape != shape:
                raise MergeError(
                    f"method {fn.__name__}: task vectors of shapes {list(shape)} and {list(tau.shape)} differ"
                )
        task_vectors = [tau.float() for tau in task_vectors]
        if len(shape) != 2:
            return mean_of(task_vectors)
        return fn(task_vectors, **kwargs)

    return wrapper


def check_fraction(method: str, key: str, value: float) -> float:
    """A fraction in (0, 1], else one clear error naming the config key."""
    if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
        raise MergeError(f"method.{key} of {method} must be in (0, 1], got {value!r}")
    return float(value)


def check_choice(method: str, key: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise MergeError(f"method.{key} of {method} must be one of {', '.join(choices)}, got {value!r}")
    return value


def rank_of(fraction: float, shape: torch.Size) -> int:
    """floor(fraction * min(m, n)), at least 1 (tiny matrices would otherwise keep nothing).

    The small epsilon keeps e.g. (1/3) * 63 = 20.999... from flooring to 20.
    """
    return max(1, math.floor(fraction * min(shape) + 1e-9))


def top_singular(tau: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k singular triplets of `tau`: U_k (m, k), s_k (k,), Vh_k (k, n)."""
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    return u[:, :k], s[:k], vh[:k]


def nearest_orthogonal(x: torch.Tensor) -> torch.Tensor:
    """The (semi-)orthogonal matrix closest to `x` in Frobenius norm: P Q^T from x = P S Q^T (the polar factor)."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def sum_of(task_vectors: list[torch.Tensor]) -> torch.Tensor:
    """sum_i tau_i without stacking (a stack would hold a second copy of every task vector)."""
    total = task_vectors[0].clone()
    for tau in task_vectors[1:]:
        total += tau
    return total


def mean_of(task_vectors: list[torch.Tensor]) -> torch.Tensor:
    return sum_of(task_vectors).div_(len(task_vectors))
