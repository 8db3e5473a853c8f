"""The fast paths give the slow paths' results: the TIES threshold, the finiteness probe, the read-ahead."""

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from mmbench_merge import MergeError
from mmbench_merge.engine import merge_model
from mmbench_merge.methods.ties import _kth_largest, _radix_kth_largest


def _inputs():
    g = torch.Generator().manual_seed(0)
    yield torch.randn(10_007, generator=g)
    yield torch.randn(4096, generator=g).abs()
    yield torch.randn(3000, generator=g).bfloat16().float()  # many ties
    yield torch.randint(-3, 4, (2000,), generator=g).float()  # mostly ties, zeros included
    yield torch.full((64,), 0.5)
    yield torch.tensor([float("inf"), 1.0, -float("inf"), 0.0, 3.0])
    yield torch.tensor([2.5])
    x = torch.randn(5000, generator=g)
    x[::7] = float("nan")
    yield x.abs()  # NaN counts as the largest, as in kthvalue
    yield (torch.rand(65_536, generator=g) * 1e-30)  # denormals and tiny exponents


@pytest.mark.parametrize("select", [_kth_largest, _radix_kth_largest], ids=["cpu", "radix"])
def test_kth_largest_is_kthvalues_value_bit_for_bit(select):
    for values in _inputs():
        n = values.numel()
        for k in sorted({1, 2, n // 5, n // 2, n - 1, n}):
            if not 1 <= k <= n:
                continue
            expected = values.kthvalue(n - k + 1).values
            got = select(values, k)
            assert got.dtype == values.dtype and got.shape == expected.shape
            assert torch.equal(got.view(torch.int32), expected.view(torch.int32)) or (
                got.isnan() and expected.isnan()
            ), (n, k, got, expected)


def _family(root, nan_in=None):
    g = torch.Generator().manual_seed(1)
    shapes = {f"l{i}.weight": (40 + 8 * i, 24) for i in range(4)}
    base = {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in shapes.items()}
    (root / "base").mkdir(parents=True)
    save_file(base, str(root / "base" / "model.safetensors"))
    for i, key in enumerate(["vqa", "ocr", "chart"]):
        expert = {n: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(v.dtype) for n, v in base.items()}
        if key == nan_in:
            expert["l2.weight"][3, 4] = float("nan")
        (root / key).mkdir()
        save_file(expert, str(root / key / "model.safetensors"))
    return OmegaConf.create({
        "name": "toy", "family": "qwen2_vl", "finetune": "full", "base": str(root / "base"),
        "experts": {k: str(root / k) for k in ("vqa", "ocr", "chart")}, "merge": {"include": [], "exclude": []},
        "files_from": "base", "revision": None,
    })  # fmt: skip


def test_one_probe_still_names_the_expert_with_nan(tmp_path):
    model = _family(tmp_path, nan_in="ocr")
    with pytest.raises(MergeError, match=r"ocr: tensor l2.weight has NaN or Inf values \(expert ocr\)"):
        merge_model(model, {"name": "ties", "density": 0.5}, device="cpu", keep_in_memory=True)
    with pytest.raises(MergeError, match=r"merged tensor l0.weight has NaN or Inf values"):
        merge_model(_family(tmp_path / "b"), {"name": "task_arithmetic", "scaling": 1e39}, device="cpu",
                    keep_in_memory=True)  # fmt: skip


def test_read_ahead_and_the_written_checkpoint_equal_the_plain_loop(tmp_path, monkeypatch):
    from mmbench_merge import engine
    from mmbench_merge.checkpoints import SafetensorsCheckpoint

    model = _family(tmp_path)
    method = {"name": "ties", "density": 0.3, "scaling": 0.8}
    ahead = merge_model(model, method, device="cpu", keep_in_memory=True, out_dir=tmp_path / "out").state_dict
    real = engine.merge_tensors
    monkeypatch.setattr(engine, "merge_tensors", lambda *a, **kw: real(*a, **{**kw, "read_ahead": False}))
    plain = merge_model(model, method, device="cpu", keep_in_memory=True).state_dict
    written = SafetensorsCheckpoint(tmp_path / "out")
    for name, tensor in plain.items():
        assert torch.equal(ahead[name].view(torch.int16), tensor.view(torch.int16))
        assert torch.equal(written.get(name).view(torch.int16), tensor.view(torch.int16))


@pytest.mark.parametrize("keep_gram", [True, False], ids=["gram", "factors"])
def test_optmerge_eigen_solver_gives_the_sgd_loops_iterates(keep_gram):
    from mmbench_merge.methods.optimize import QuadraticLoss, minimise, minimise_eigen

    g = torch.Generator().manual_seed(3)
    m, n, k = 30, 20, 4
    start = torch.randn(m, n, generator=g, dtype=torch.float64)
    loss = QuadraticLoss(start, rows=3 * k, n_terms=3)
    if not keep_gram:
        loss.gram = None  # A as its factors: eigenvectors from the R x R matrix (R = 12 < n)
    for i in range(3):
        loss.add(torch.randn(m, n, generator=g, dtype=torch.float64),
                 torch.randn(k, n, generator=g, dtype=torch.float64), weight=0.5 + i)  # fmt: skip
    lam = max(float(torch.linalg.matrix_norm(q, 2) ** 2) * w for w, q in loss.factors) if loss.factors else float(
        torch.linalg.eigvalsh(loss.gram).max())  # fmt: skip
    lr = 0.02 / (3 * lam)
    loop = minimise(loss, optimizer="sgd", lr=lr, momentum=0.9, iters=300)
    eigen = minimise_eigen(loss, lr=lr, momentum=0.9, iters=300)
    moved = float(torch.linalg.vector_norm(loop - start))
    assert moved > 1e-3  # the iterates went somewhere
    assert float(torch.linalg.vector_norm(eigen - loop)) <= 1e-6 * moved


def test_optmerge_lora_preset_eigen_equals_its_loop_in_float32():
    from mmbench_merge.methods import PRESETS
    from mmbench_merge.methods.optimize import optmerge

    g = torch.Generator().manual_seed(4)
    taus = [0.01 * torch.randn(48, 64, generator=g) for _ in range(4)]
    preset = {k: v for k, v in PRESETS["optmerge"]["lora"].items() if k not in ("scaling", "solver")}
    assert PRESETS["optmerge"]["lora"]["solver"] == "eigen"
    loop = optmerge(taus, **preset, solver="loop")
    eigen = optmerge(taus, **preset, solver="eigen")
    assert not torch.equal(loop, optmerge(taus, **{**preset, "iters": 0}))
    torch.testing.assert_close(eigen, loop, rtol=2e-4, atol=1e-7)
    with pytest.raises(MergeError, match="solver=eigen of optmerge needs optimizer=sgd"):
        optmerge(taus, optimizer="adam", solver="eigen")


def test_wide_svd_goes_through_the_transpose_and_is_a_thin_svd():
    from mmbench_merge.methods._matrix import svd

    x = torch.randn(12, 40, generator=torch.Generator().manual_seed(5))
    u, s, vh = svd(x)
    assert (u.shape, s.shape, vh.shape) == ((12, 12), (12,), (12, 40))
    torch.testing.assert_close((u * s) @ vh, x, rtol=0, atol=1e-5)
    torch.testing.assert_close(u.T @ u, torch.eye(12), rtol=0, atol=1e-5)
    torch.testing.assert_close(vh @ vh.T, torch.eye(12), rtol=0, atol=1e-5)
    torch.testing.assert_close(s, torch.linalg.svdvals(x), rtol=1e-5, atol=0)
