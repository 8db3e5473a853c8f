"""Merges found by gradient descent on a per-matrix interference loss: WUDI and OptMerge.

Both minimise a loss of one shape,

    L(tau) = sum_i w_i ||(tau - C_i) Q_i^T||_F^2,        w_i = 1 / ||tau_i||_F^2,

(WUDI: C_i = Q_i = tau_i; OptMerge: C_i = the rank-K target, Q_i = Sigma_K V_K^T). Its gradient is affine in
tau (see QuadraticLoss), so its pieces are formed once and a step costs one matrix product instead of the 2T
of an autograd step (forward and backward through T terms). The steps are taken by torch.optim (Adam, or SGD
with momentum) on that gradient: the iterates are the reference loop's up to float rounding. Everything runs
in float32 on the task vectors' device.
"""

from __future__ import annotations

import torch

from .. import MergeError
from ._matrix import check_choice, check_fraction, matrix_method, mean_of, rank_of, sum_of, top_singular

OPTIMIZERS = ("adam", "sgd")
INITS = ("sum", "mean")
PROJECTORS = ("low_rank", "full")


class QuadraticLoss:
    """L(tau) = sum_i w_i ||(tau - C_i) Q_i^T||^2, kept as the pieces of its gradient around a start point tau_0:

        grad L(tau) = 2 (G_0 + (tau - tau_0) A),   G_0 = sum_i w_i (tau_0 - C_i) Q_i^T Q_i,   A = sum_i w_i Q_i^T Q_i.

    G_0 is formed from the differences tau_0 - C_i, and each step only multiplies the small tau - tau_0, so no
    large nearly-equal products are subtracted (float32 would lose the gradient to cancellation near a minimum).
    Terms are added one at a time, so the targets need not all be held at once. A is kept as an n x n matrix
    when that is cheaper per step (m n^2 against 2 m n R for R projector rows in all) and no larger than the
    task vectors already in memory; otherwise (tau - tau_0) A is formed as sum_i w_i (. Q_i^T) Q_i from the
    Q_i, held by reference. A term of weight 0 (a zero task vector) adds nothing.
    """

    def __init__(self, start: torch.Tensor, rows: int, n_terms: int):
        m, n = start.shape
        self.start = start
        self.g0 = torch.zeros_like(start)
        # The Gram matrix where a step is cheaper with it and it takes at most twice the task vectors' memory
        # (n^2 <= 2 T m n): down_proj's n x n Gram (4864^2) now qualifies; 1.7x faster a step than the factors.
        use_gram = n <= 2 * rows and n <= 2 * n_terms * m
        self.gram = start.new_zeros(n, n) if use_gram else None
        self.factors: list[tuple[float, torch.Tensor]] = []

    def add(self, target: torch.Tensor, projector: torch.Tensor, weight: float) -> None:
        if weight <= 0:
            return
        if self.gram is not None:
            self.gram.addmm_(projector.T, projector, alpha=weight)
        else:
            self.factors.append((weight, projector))
        self.g0.addmm_((self.start - target) @ projector.T, projector, alpha=weight)

    def gradient(self, tau: torch.Tensor) -> torch.Tensor:
        step = tau - self.start
        if self.gram is not None:
            moved = step @ self.gram
        else:
            moved = torch.zeros_like(tau)
            for weight, q in self.factors:
                moved.addmm_(step @ q.T, q, alpha=weight)
        return 2.0 * (self.g0 + moved)


def minimise(loss: QuadraticLoss, *, optimizer: str, lr: float, momentum: float, iters: int) -> torch.Tensor:
    """`iters` steps of torch.optim's Adam (default betas, eps) or SGD with momentum from the loss's start."""
    tau = loss.start.clone()
    if optimizer == "adam":
        opt = torch.optim.Adam([tau], lr=lr)
    else:
        opt = torch.optim.SGD([tau], lr=lr, momentum=momentum)
    with torch.no_grad():
        for _ in range(iters):
            tau.grad = loss.gradient(tau)
            opt.step()
    tau.grad = None
    return tau


SOLVERS = ("loop", "eigen")


def sgd_gains(evals: torch.Tensor, *, lr: float, momentum: float, iters: int) -> torch.Tensor:
    """c_T(lambda) per eigenvalue: `iters` steps of torch's SGD with momentum from x = 0 on the scalar problem
    with gradient 2 (h + lambda x) end at x = c_T(lambda) h (the iteration is linear in h with zero start):

        d_{t+1} = momentum d_t + 2 (1 + lambda c_t),    c_{t+1} = c_t - lr d_{t+1},    c_0 = d_0 = 0.
    """
    c = torch.zeros_like(evals)
    d = torch.zeros_like(evals)
    for _ in range(iters):
        d = momentum * d + 2.0 * (1.0 + evals * c)
        c = c - lr * d
    return c


def minimise_eigen(loss: QuadraticLoss, *, lr: float, momentum: float, iters: int) -> torch.Tensor:
    """What `minimise` gives with SGD (momentum), computed in the eigenbasis of A in float64.

    With x = tau - tau_0 the gradient is 2 (G_0 + x A); in the eigenbasis A = V diag(lambda) V^T every column of
    x V moves on its own, so the SGD iterates are x_T = (G_0 V) diag(c_T(lambda)) V^T (sgd_gains): two products
    and one symmetric eigendecomposition instead of `iters` products with A. When A is kept as factors
    (sum_i w_i Q_i^T Q_i, R rows in all, R < n) the eigenvectors of its range come from the R x R matrix
    B B^T (B = stacked sqrt(w_i) Q_i); the rest of the space has lambda = 0: x_T = c_T(0) G_0 +
    (G_0 V_r) diag(c_T(lambda) - c_T(0)) V_r^T.
    """
    f64 = torch.float64
    g0 = loss.g0.to(f64)
    if loss.gram is not None:
        evals, evecs = torch.linalg.eigh(loss.gram.to(f64))
    elif loss.factors:
        stacked = torch.cat([q.to(f64) * weight**0.5 for weight, q in loss.factors])  # (R, n)
        small, u = torch.linalg.eigh(stacked @ stacked.T)
        keep = small > small.max().clamp(min=0) * small.numel() * torch.finfo(f64).eps
        evals = small[keep]
        evecs = (stacked.T @ u[:, keep]) / evals.sqrt()  # orthonormal columns spanning A's range
    else:  # every weight 0: A = 0
        evals = g0.new_zeros(0)
        evecs = g0.new_zeros(g0.shape[1], 0)
    evals = evals.clamp(min=0)
    gains = sgd_gains(torch.cat([evals, evals.new_zeros(1)]), lr=lr, momentum=momentum, iters=iters)
    gain, null_gain = gains[:-1], gains[-1]
    x = (g0 @ evecs).mul_(gain - null_gain) @ evecs.T
    x.add_(g0, alpha=float(null_gain))
    return (loss.start.to(f64) + x).to(loss.start.dtype)


def _inverse_squared_norms(task_vectors: list[torch.Tensor]) -> list[float]:
    """w_i = 1 / ||tau_i||^2; a zero task vector (e.g. a LoRA expert without this tensor) gets weight 0."""
    norms = [float(torch.linalg.vector_norm(tau) ** 2) for tau in task_vectors]
    return [1.0 / v if v > 0 else 0.0 for v in norms]


def _init(task_vectors: list[torch.Tensor], init: str) -> torch.Tensor:
    return sum_of(task_vectors) if init == "sum" else mean_of(task_vectors)


def _check_steps(method: str, iters: int, lr: float, momentum: float) -> None:
    if not isinstance(iters, int) or iters < 0:
        raise MergeError(f"method.iters of {method} must be a non-negative integer, got {iters!r}")
    if not lr > 0:
        raise MergeError(f"method.lr of {method} must be positive, got {lr!r}")
    if not 0.0 <= momentum < 1.0:
        raise MergeError(f"method.momentum of {method} must be in [0, 1), got {momentum!r}")


@matrix_method
def wudi(
    task_vectors: list[torch.Tensor],
    *,
    iters: int = 300,
    lr: float = 1e-5,
    optimizer: str = "adam",
    init: str = "sum",
    momentum: float = 0.9,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """WUDI-Merging (Cheng et al., ICML 2025): minimise sum_i ||(tau - tau_i) tau_i^T||^2 / ||tau_i||^2.

    `iters` steps of `optimizer` (adam | sgd; `momentum` only for sgd) from `init` (sum | mean of the tau_i).
    """
    check_choice("wudi", "optimizer", optimizer, OPTIMIZERS)
    check_choice("wudi", "init", init, INITS)
    _check_steps("wudi", iters, lr, momentum)
    m = task_vectors[0].shape[0]
    loss = QuadraticLoss(_init(task_vectors, init), rows=len(task_vectors) * m, n_terms=len(task_vectors))
    for tau, weight in zip(task_vectors, _inverse_squared_norms(task_vectors)):
        loss.add(tau, tau, weight)
    return minimise(loss, optimizer=optimizer, lr=lr, momentum=momentum, iters=iters)


@matrix_method
def optmerge(
    task_vectors: list[torch.Tensor],
    *,
    rank_fraction: float | None = None,
    center: bool = True,
    init: str = "sum",
    optimizer: str = "adam",
    lr: float = 1e-5,
    momentum: float = 0.9,
    iters: int = 300,
    projector: str = "low_rank",
    solver: str = "loop",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """OptMerge (Wei et al., ICLR 2026): WUDI with low-rank projectors and targets.

    K = floor(rank_fraction * min(m, n)) (null = 1 / number of experts). From the SVD of each raw tau_i the
    projector P_i = Sigma_K V_K^T; the target T_i is the rank-K truncation of tau_i, or with `center` the
    rank-K truncation of tau_i - mean_j tau_j plus that mean. Minimises sum_i ||(tau - T_i) P_i^T||^2 / ||tau_i||^2
    with `iters` steps of `optimizer` from `init`. The function's defaults are the full fine-tuning preset;
    the config fills the LoRA preset (center false, init mean, sgd, lr 1e-4, momentum 0.9) from model.finetune.
    `projector`: "low_rank" (P_i = Sigma_K V_K^T) or "full" (P_i = tau_i itself, as the paper's modality
    merge, where only the target is truncated).
    `solver`: loop (the optimizer's steps) or eigen (SGD only: the same iterates in closed form in the eigenbasis
    of the loss's Gram matrix, minimise_eigen; the LoRA preset's choice).
    """
    n_tasks = len(task_vectors)
    fraction = check_fraction("optmerge", "rank_fraction", rank_fraction if rank_fraction is not None
                              else 1.0 / n_tasks)  # fmt: skip
    check_choice("optmerge", "optimizer", optimizer, OPTIMIZERS)
    check_choice("optmerge", "init", init, INITS)
    _check_steps("optmerge", iters, lr, momentum)
    check_choice("optmerge", "projector", projector, PROJECTORS)
    check_choice("optmerge", "solver", solver, SOLVERS)
    if solver == "eigen" and optimizer != "sgd":
        raise MergeError(f"method.solver=eigen of optmerge needs optimizer=sgd (got {optimizer}); use solver=loop")
    k = rank_of(fraction, task_vectors[0].shape)
    mean = mean_of(task_vectors) if center else None

    rows = n_tasks * (k if projector == "low_rank" else task_vectors[0].shape[0])
    loss = QuadraticLoss(_init(task_vectors, init), rows=rows, n_terms=n_tasks)
    for tau, weight in zip(task_vectors, _inverse_squared_norms(task_vectors)):
        u, s, vh = top_singular(tau, k)
        # Sigma_K V_K^T, (K, n), from the raw task vector; or the raw task vector itself
        q = s[:, None] * vh if projector == "low_rank" else tau
        if center:
            u, s, vh = top_singular(tau - mean, k)
            target = (u * s) @ vh + mean
        else:
            target = (u * s) @ vh
        loss.add(target, q, weight)
        del u, s, vh, target
    if solver == "eigen":
        return minimise_eigen(loss, lr=lr, momentum=momentum, iters=iters)
    return minimise(loss, optimizer=optimizer, lr=lr, momentum=momentum, iters=iters)
