"""Merges built from singular value decompositions: TSV-Merge, Iso-C and Iso-CTS.

Each takes the float32 task vectors of one 2-D parameter (non-2-D tensors are averaged, see _matrix.py) and
returns tau_m before scaling. All decompositions are thin (full_matrices=False) and run on the tensors' device:
SVDs in float32 (float64 if float32 fails to converge), the orthogonalisation in float64 (_matrix.py).
"""

from __future__ import annotations

import torch

from ._matrix import check_fraction, matrix_method, nearest_orthogonal, rank_of, sum_of, svd, top_singular


@matrix_method
def tsv(
    task_vectors: list[torch.Tensor],
    *,
    rank_fraction: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """TSV-Merge (Gargiulo et al., CVPR 2025).

    Per task the top k = floor(rank_fraction * min(m, n)) singular triplets of tau_i; the U's and V's are
    concatenated and each replaced by its nearest orthogonal matrix; tau_m = U_orth diag(s) V_orth^T with the
    concatenated singular values s. `rank_fraction` null = 1 / number of experts.
    """
    fraction = check_fraction("tsv", "rank_fraction", rank_fraction if rank_fraction is not None
                              else 1.0 / len(task_vectors))  # fmt: skip
    k = rank_of(fraction, task_vectors[0].shape)
    us, ss, vhs = zip(*(top_singular(tau, k) for tau in task_vectors))
    u_orth = nearest_orthogonal(torch.cat(us, dim=1))  # (m, T k)
    vh_orth = nearest_orthogonal(torch.cat(vhs, dim=0))  # (T k, n): rows orthonormal, i.e. V orthogonalised
    return (u_orth * torch.cat(ss)) @ vh_orth


@matrix_method
def iso_c(task_vectors: list[torch.Tensor], *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Iso-C (Marczak et al., ICML 2025): SVD of sum_i tau_i with every singular value replaced by their mean."""
    total = sum_of(task_vectors)
    u, s, vh = svd(total)
    return s.mean() * (u @ vh)


@matrix_method
def iso_cts(
    task_vectors: list[torch.Tensor],
    *,
    common_fraction: float = 0.8,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Iso-CTS (Marczak et al., ICML 2025): isotropic merge in a common plus task-specific subspace.

    With r = min(m, n) and T tasks: the common subspace is the top-k singular directions of sum_i tau_i
    (k ~ common_fraction * r, adjusted so that r - k splits evenly into T blocks of s directions); each task
    contributes the top-s singular directions of tau_i with the common left subspace projected out,
    tau_i - U_cm U_cm^T tau_i. The r left and r right directions are orthogonalised together (nearest
    orthogonal matrix) and all get one singular value: the mean of the r singular values they came with.
    """
    fraction = check_fraction("iso_cts", "common_fraction", common_fraction)
    n_tasks = len(task_vectors)
    r = min(task_vectors[0].shape)
    k0 = int(fraction * r + 1e-9)
    per_task = min(round((r - k0) / n_tasks), r // n_tasks)  # s: task-specific directions per task
    k = r - per_task * n_tasks  # common directions

    total = sum_of(task_vectors)
    u_cm, s_cm, vh_cm = top_singular(total, k)
    del total
    us, ss, vhs = [u_cm], [s_cm], [vh_cm]
    if per_task > 0:
        for tau in task_vectors:
            specific = tau - u_cm @ (u_cm.T @ tau)
            u_t, s_t, vh_t = top_singular(specific, per_task)
            us.append(u_t)
            ss.append(s_t)
            vhs.append(vh_t)
    u_orth = nearest_orthogonal(torch.cat(us, dim=1))
    vh_orth = nearest_orthogonal(torch.cat(vhs, dim=0))
    return torch.cat(ss).mean() * (u_orth @ vh_orth)
