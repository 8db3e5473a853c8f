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


def svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float32; if LAPACK's divide-and-conquer fails to converge, again in float64.

    A wide matrix goes through its transpose (x^T = V S U^T): LAPACK is several times slower on the wide
    orientation of the same matrix (896 x 4864: 3.4x, bench/methods_speed.py).
    """
    if x.shape[-2] < x.shape[-1]:
        v, s, uh = svd(x.mT)
        return uh.mT, s, v.mT
    try:
        return torch.linalg.svd(x, full_matrices=False)
    except torch.linalg.LinAlgError:
        u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
        return u.to(x.dtype), s.to(x.dtype), vh.to(x.dtype)


def top_singular(tau: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k singular triplets of `tau`: U_k (m, k), s_k (k,), Vh_k (k, n)."""
    u, s, vh = svd(tau)
    return u[:, :k], s[:k], vh[:k]


def nearest_orthogonal(x: torch.Tensor) -> torch.Tensor:
    """The matrix with orthonormal columns (rows, if wide) closest to `x`: the polar factor P Q^T of x = P S Q^T.

    Computed as x (x^T x)^(-1/2) (or (x x^T)^(-1/2) x) from a float64 eigendecomposition of the smaller Gram
    matrix. The matrices orthogonalised here are concatenations of orthonormal blocks, with many singular values
    at exactly 1: float32 divide-and-conquer SVD fails to converge on some of them (seen on a 3584 x 3584
    Iso-CTS merge), while the symmetric eigensolver deflates repeated values. Directions with a zero singular
    value (an exactly rank-deficient x) are left out rather than invented.
    """
    x64 = x.double()
    tall = x.shape[0] >= x.shape[1]
    gram = x64.T @ x64 if tall else x64 @ x64.T
    try:
        evals, evecs = torch.linalg.eigh(gram)
    except torch.linalg.LinAlgError:
        p, _, qh = torch.linalg.svd(x64, full_matrices=False)
        return (p @ qh).to(x.dtype)
    tol = evals.max().clamp(min=0) * gram.shape[0] * torch.finfo(torch.float64).eps
    inv_sqrt = torch.where(evals > tol, evals.clamp(min=tol).rsqrt(), torch.zeros_like(evals))
    root = (evecs * inv_sqrt) @ evecs.T
    return (x64 @ root if tall else root @ x64).to(x.dtype)


def sum_of(task_vectors: list[torch.Tensor]) -> torch.Tensor:
    """sum_i tau_i without stacking (a stack would hold a second copy of every task vector)."""
    total = task_vectors[0].clone()
    for tau in task_vectors[1:]:
        total += tau
    return total


def mean_of(task_vectors: list[torch.Tensor]) -> torch.Tensor:
    return sum_of(task_vectors).div_(len(task_vectors))
