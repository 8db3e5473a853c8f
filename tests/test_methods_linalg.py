"""TSV-Merge, Iso-C, Iso-CTS, WUDI and OptMerge against independent computations on small random matrices.

The references here are written from the formulas: orthogonalisation by the polar factor P Q^T of a float64 SVD
(the methods use x (x^T x)^(-1/2) from an eigendecomposition), and plain autograd loops with torch.optim for the
two optimisation methods (the methods use a closed-form gradient).
"""

from __future__ import annotations

import math

import pytest
import torch

from mmbench_merge import MergeError
from mmbench_merge.methods import PRESETS, get_method, resolve_method

LINALG_METHODS = ["tsv", "iso_c", "iso_cts", "wudi", "optmerge"]
SHAPES = [(24, 16), (16, 24), (20, 20)]


def random_task_vectors(shape, n_tasks=3, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    # A shared component makes the tasks interfere, as real task vectors do.
    shared = torch.randn(shape, generator=gen)
    return [scale * (0.5 * shared + torch.randn(shape, generator=gen)) for _ in range(n_tasks)]


def polar(x: torch.Tensor) -> torch.Tensor:
    """Nearest matrix with orthonormal columns (rows if wide): P Q^T from a float64 SVD x = P S Q^T."""
    p, _, qh = torch.linalg.svd(x.double(), full_matrices=False)
    return p @ qh


orthonormal_columns = orthonormal_rows = polar


def top_k(tau: torch.Tensor, k: int):
    u, s, vh = torch.linalg.svd(tau.double(), full_matrices=False)
    return u[:, :k], s[:k], vh[:k]


def svals(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x.double())


def assert_close(actual, expected, rtol=1e-4):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=rtol * scale)


# ------------------------------------------------------------------------------------------------- TSV
@pytest.mark.parametrize("shape", SHAPES)
def test_tsv_matches_concatenate_and_orthogonalise(shape):
    tvs = random_task_vectors(shape, n_tasks=3)
    k = int(min(shape) / 3)
    parts = [top_k(t, k) for t in tvs]
    u = orthonormal_columns(torch.cat([p[0] for p in parts], dim=1))
    s = torch.cat([p[1] for p in parts])
    vh = orthonormal_rows(torch.cat([p[2] for p in parts], dim=0))
    expected = u @ torch.diag(s) @ vh

    merged = get_method("tsv")(tvs)
    assert merged.dtype == torch.float32 and merged.shape == shape
    assert_close(merged, expected)
    # U_orth and V_orth are orthonormal, so the merged spectrum is exactly the concatenated singular values.
    top = svals(merged)[: len(s)]
    torch.testing.assert_close(top, s.sort(descending=True).values, rtol=1e-4, atol=1e-4)
    if len(s) < min(shape):
        assert svals(merged)[len(s) :].max() < 1e-4 * s.max()


def test_tsv_defaults_to_one_over_number_of_experts_and_is_exact_for_one_full_rank_task():
    tvs = random_task_vectors((12, 10), n_tasks=4, seed=1)
    tsv = get_method("tsv")
    assert torch.equal(tsv(tvs), tsv(tvs, rank_fraction=0.25))
    assert not torch.allclose(tsv(tvs), tsv(tvs, rank_fraction=0.5))
    (one,) = random_task_vectors((12, 10), n_tasks=1, seed=2)
    assert_close(tsv([one], rank_fraction=1.0), one, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- Iso-C
@pytest.mark.parametrize("shape", SHAPES)
def test_iso_c_is_the_sum_with_a_flat_spectrum(shape):
    tvs = random_task_vectors(shape, n_tasks=3, seed=3)
    total = sum(t.double() for t in tvs)
    mean_sval = svals(total).mean()
    if shape[0] >= shape[1]:
        direction = orthonormal_columns(total)
    else:
        direction = orthonormal_rows(total)
    merged = get_method("iso_c")(tvs)
    assert_close(merged, mean_sval * direction)
    spectrum = svals(merged)
    torch.testing.assert_close(spectrum, torch.full_like(spectrum, mean_sval.item()), rtol=1e-4, atol=0)


# ------------------------------------------------------------------------------------------------- Iso-CTS
def iso_cts_reference(tvs, common_fraction):
    """Iso-CTS written from the paper: common top-k of the sum, task-specific top-s outside it, isotropic."""
    n_tasks, r = len(tvs), min(tvs[0].shape)
    per_task = min(round((r - math.floor(common_fraction * r)) / n_tasks), r // n_tasks)
    k = r - per_task * n_tasks
    u_cm, s_cm, vh_cm = top_k(sum(t.double() for t in tvs), k)
    us, ss, vhs = [u_cm], [s_cm], [vh_cm]
    for t in tvs:
        outside = t.double() - u_cm @ u_cm.T @ t.double()
        u, s, vh = top_k(outside, per_task)
        us.append(u), ss.append(s), vhs.append(vh)
    u_star = orthonormal_columns(torch.cat(us, dim=1))
    vh_star = orthonormal_rows(torch.cat(vhs, dim=0))
    return torch.cat(ss).mean() * u_star @ vh_star, u_cm, k, per_task


@pytest.mark.parametrize("shape", SHAPES)
def test_iso_cts_matches_the_paper_and_keeps_the_common_subspace(shape):
    tvs = random_task_vectors(shape, n_tasks=3, seed=4)
    expected, u_cm, k, per_task = iso_cts_reference(tvs, 0.8)
    assert per_task >= 1 and k >= 1
    merged = get_method("iso_cts")(tvs, common_fraction=0.8)
    assert_close(merged, expected)
    # Isotropic: min(m, n) equal singular values.
    spectrum = svals(merged)
    torch.testing.assert_close(spectrum, torch.full_like(spectrum, spectrum.mean().item()), rtol=1e-4, atol=0)
    # The task-specific left directions are orthogonal to U_cm, so orthogonalisation leaves U_cm in place:
    # U_cm^T merged has orthogonal rows of norm sigma.
    proj = u_cm.T @ merged.double()
    torch.testing.assert_close(proj @ proj.T, spectrum.mean() ** 2 * torch.eye(k, dtype=torch.float64),
                               rtol=0, atol=1e-4 * spectrum.mean().item() ** 2)  # fmt: skip


def test_iso_cts_with_the_whole_space_common_is_iso_c():
    tvs = random_task_vectors((18, 14), n_tasks=3, seed=5)
    assert_close(get_method("iso_cts")(tvs, common_fraction=1.0), get_method("iso_c")(tvs))


# ------------------------------------------------------------------------------------------------- WUDI / OptMerge
def weighted_loss(tau, targets, projectors, norms):
    return sum(((tau - c) @ q.T).pow(2).sum() / n for c, q, n in zip(targets, projectors, norms) if n > 0)


def reference_loop(init, loss_fn, optimizer, lr, momentum, iters):
    """The plain loop: autograd through the loss, torch.optim step."""
    tau = torch.nn.Parameter(init.clone())
    opt = (
        torch.optim.Adam([tau], lr=lr)
        if optimizer == "adam"
        else torch.optim.SGD([tau], lr=lr, momentum=momentum)
    )
    for _ in range(iters):
        opt.zero_grad()
        loss_fn(tau).backward()
        opt.step()
    return tau.detach()


def wudi_pieces(tvs):
    return list(tvs), list(tvs), [t.pow(2).sum().item() for t in tvs]


def optmerge_pieces(tvs, center):
    k = int(min(tvs[0].shape) / len(tvs))
    mean = sum(tvs) / len(tvs)
    targets, projectors = [], []
    for t in tvs:
        _, s, vh = top_k(t, k)
        projectors.append((torch.diag(s) @ vh).float())
        u_t, s_t, vh_t = top_k(t - mean if center else t, k)
        targets.append((u_t @ torch.diag(s_t) @ vh_t + (mean.double() if center else 0)).float())
    return targets, projectors, [t.pow(2).sum().item() for t in tvs]


CASES = [
    # method, shape, kwargs (the wide shapes take the factored gradient path, the others the n x n one)
    ("wudi", (24, 16), {"optimizer": "adam", "lr": 1e-2, "init": "sum", "iters": 60}),
    ("wudi", (6, 40), {"optimizer": "sgd", "lr": 1e-2, "momentum": 0.9, "init": "mean", "iters": 60}),
    ("wudi", (20, 20), {}),  # the defaults: adam, lr 1e-5, 300 steps from the sum
    ("optmerge", (24, 16), {"center": True, "init": "sum", "optimizer": "adam", "lr": 1e-2, "iters": 60}),
    (
        "optmerge",
        (8, 48),
        {"center": False, "init": "mean", "optimizer": "sgd", "lr": 1e-2, "momentum": 0.9, "iters": 60},
    ),
    ("optmerge", (20, 20), {**PRESETS["optmerge"]["full"], "iters": 300}),  # the two presets, as configured
    ("optmerge", (16, 24), {**PRESETS["optmerge"]["lora"], "iters": 300}),
]


@pytest.mark.parametrize(
    "method,shape,kwargs", CASES, ids=lambda v: str(v) if not isinstance(v, dict) else ""
)
def test_optimisation_matches_a_reference_loop_and_lowers_the_loss(method, shape, kwargs):
    kwargs = {k: v for k, v in kwargs.items() if k != "scaling"}
    tvs = random_task_vectors(shape, n_tasks=3, seed=6, scale=0.01)
    fn = get_method(method)
    defaults = {"optimizer": "adam", "lr": 1e-5, "init": "sum", "momentum": 0.9, "iters": 300}
    settings = {**defaults, **kwargs}
    if method == "wudi":
        targets, projectors, norms = wudi_pieces(tvs)
    else:
        targets, projectors, norms = optmerge_pieces(tvs, center=settings.get("center", True))

    def loss(tau):
        return weighted_loss(tau, targets, projectors, norms)

    init = sum(tvs) if settings["init"] == "sum" else sum(tvs) / len(tvs)
    expected = reference_loop(init, loss, settings["optimizer"], settings["lr"], settings["momentum"],
                              settings["iters"])  # fmt: skip

    merged = fn(tvs, **kwargs)
    with torch.no_grad():
        start, got, want = loss(init).item(), loss(merged).item(), loss(expected).item()
    assert got < start, f"loss did not decrease: {start} -> {got}"
    assert got == pytest.approx(want, rel=1e-3, abs=1e-6 * start)
    assert_close(merged, expected, rtol=1e-3)


def test_fewer_steps_leave_a_higher_loss():
    tvs = random_task_vectors((16, 16), n_tasks=3, seed=7, scale=0.01)
    targets, projectors, norms = optmerge_pieces(tvs, center=True)
    losses = [weighted_loss(get_method("optmerge")(tvs, lr=1e-3, iters=n), targets, projectors, norms).item()
              for n in (0, 10, 100)]  # fmt: skip
    assert losses[0] > losses[1] > losses[2]


def test_zero_task_vector_drops_out_of_the_loss():
    """A LoRA expert without an adapter on this tensor gives a zero task vector: no division by zero."""
    tvs = random_task_vectors((12, 12), n_tasks=3, seed=8, scale=0.01)
    tvs.append(torch.zeros(12, 12))
    for method in ("wudi", "optmerge"):
        merged = get_method(method)(tvs, lr=1e-3, iters=30)
        assert torch.isfinite(merged).all()
    targets, projectors, norms = wudi_pieces(tvs)

    def loss(tau):
        return weighted_loss(tau, targets, projectors, norms)

    expected = reference_loop(sum(tvs), loss, "adam", 1e-3, 0.9, 30)
    assert_close(get_method("wudi")(tvs, lr=1e-3, iters=30), expected, rtol=1e-3)


# ------------------------------------------------------------------------------------------------- shared rules
@pytest.mark.parametrize("method", LINALG_METHODS)
@pytest.mark.parametrize("shape", [(7,), (3, 4, 5), ()])
def test_non_matrix_tensors_are_averaged(method, shape):
    gen = torch.Generator().manual_seed(9)
    tvs = [torch.randn(shape, generator=gen) for _ in range(3)]
    torch.testing.assert_close(get_method(method)(tvs), (tvs[0] + tvs[1] + tvs[2]) / 3)


@pytest.mark.parametrize("method", LINALG_METHODS)
def test_deterministic_float32_and_input_untouched(method):
    tvs = random_task_vectors((16, 12), n_tasks=3, seed=10, scale=0.01)
    copies = [t.clone() for t in tvs]
    kwargs = {"iters": 20} if method in ("wudi", "optmerge") else {}
    first = get_method(method)(tvs, generator=torch.Generator().manual_seed(0), **kwargs)
    second = get_method(method)(tvs, generator=torch.Generator().manual_seed(1), **kwargs)
    assert first.dtype == torch.float32
    assert torch.equal(first, second)
    assert all(torch.equal(a, b) for a, b in zip(tvs, copies))
    # bf16 inputs are computed in float32 as well
    assert get_method(method)([t.bfloat16() for t in tvs], **kwargs).dtype == torch.float32


@pytest.mark.parametrize(
    "method,kwargs,message",
    [
        ("tsv", {"rank_fraction": 0.0}, "method.rank_fraction"),
        ("iso_cts", {"common_fraction": 1.5}, "method.common_fraction"),
        ("wudi", {"optimizer": "rmsprop"}, "method.optimizer"),
        ("wudi", {"iters": -1}, "method.iters"),
        ("optmerge", {"init": "zeros"}, "method.init"),
        ("optmerge", {"lr": 0.0}, "method.lr"),
    ],
)
def test_bad_hyperparameters_name_the_key(method, kwargs, message):
    tvs = random_task_vectors((8, 8), n_tasks=2)
    with pytest.raises(MergeError, match=message):
        get_method(method)(tvs, **kwargs)


def test_nearest_orthogonal_handles_repeated_and_zero_singular_values():
    from mmbench_merge.methods._matrix import nearest_orthogonal

    gen = torch.Generator().manual_seed(11)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen))
    # Orthonormal blocks plus overlapping ones: many singular values exactly 1, as in TSV / Iso-CTS.
    x = torch.cat([q[:, :20], q[:, 18:30] + 0.1 * q[:, 28:40], q[:, 30:38]], dim=1)  # 40 x 40
    for m in (x, x.T.contiguous(), x[:, :35], x[:35]):
        out = nearest_orthogonal(m)
        assert_close(out, polar(m), rtol=1e-5)
        small = min(m.shape)
        gram = out.T @ out if m.shape[0] >= m.shape[1] else out @ out.T
        torch.testing.assert_close(gram, torch.eye(small), rtol=0, atol=1e-5)
    # A rank-deficient input: the null direction is dropped, the rest is the polar factor of the range.
    dup = torch.cat([q[:, :5], q[:, :1]], dim=1)
    out = nearest_orthogonal(dup)
    assert torch.isfinite(out).all()
    assert torch.linalg.matrix_rank(out) == 5
    torch.testing.assert_close(
        svals(out), torch.tensor([1.0] * 5 + [0.0], dtype=torch.float64), rtol=0, atol=1e-5
    )


def test_mismatched_shapes_are_a_merge_error():
    with pytest.raises(MergeError, match=r"\[4, 4\] and \[4, 5\]"):
        get_method("tsv")([torch.zeros(4, 4), torch.zeros(4, 5)])


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_optmerge_null_config_values_come_from_the_finetune_preset(finetune):
    cfg = {"name": "optmerge", "scaling": None, "rank_fraction": None, "center": None, "init": None,
           "optimizer": None, "lr": None, "momentum": None, "iters": 300}  # fmt: skip
    fn, kwargs, scaling = resolve_method(cfg, finetune)
    assert fn is get_method("optmerge")
    if finetune == "full":
        assert kwargs == {"center": True, "init": "sum", "optimizer": "adam", "lr": 1e-5, "iters": 300}
        assert scaling == 0.1
    else:
        assert kwargs == {"center": False, "init": "mean", "optimizer": "sgd", "momentum": 0.9, "lr": 1e-4,
                          "iters": 300}  # fmt: skip
        assert scaling == 1.0
    # an explicit value wins over the preset
    _, kwargs, scaling = resolve_method({**cfg, "lr": 3e-3, "scaling": 0.5}, finetune)
    assert kwargs["lr"] == 3e-3 and scaling == 0.5


def test_optmerge_with_an_unknown_finetune_regime_is_a_merge_error():
    with pytest.raises(MergeError, match="model.finetune: 'qlora'"):
        resolve_method({"name": "optmerge", "center": None, "iters": 300}, "qlora")
