"""TIES / DARE-TIES trim scope: `model` against an independent whole-model computation (every merged tensor of
an expert concatenated into one NumPy vector, as the paper's InternVL script does), the paper's trim count and
zero-sign rule per tensor, and bad values as one MergeError line."""

import json

import numpy as np
import pytest
import torch

from mmbench_merge import MergeError
from mmbench_merge.checkpoints import SafetensorsCheckpoint
from mmbench_merge.engine import Expert, MergeReport, Selection, merge_tensors, tensor_seed
from mmbench_merge.methods import get_method, resolve_method

from .conftest import run_cli
from .test_methods_basic import _ties_reference

# Tensors of very different scales (the paper's case: a model-wide threshold keeps most of the large tensor and
# little of the small one), a 1-D tensor, and one tensor the selection leaves alone.
SHAPES = {"big.weight": ((40, 30), 1e-2), "small.weight": ((25, 16), 2e-3), "tiny.weight": ((12, 10), 1e-4),
          "vec.weight": ((50,), 5e-3), "skip.bias": ((7,), 1.0)}  # fmt: skip
SELECT = Selection(include=[r"\.weight$"])
N_EXPERTS = 3


def _write_model(root, seed=0, cancellations=True):
    """base + 3 float32 experts; in `small.weight` some entries cancel exactly (+c, -c, 0), so that the
    zero-sign rule decides them."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(shape, generator=g) for n, (shape, _) in SHAPES.items()}
    taus = [{n: scale * torch.randn(shape, generator=g) for n, (shape, scale) in SHAPES.items()}
            for _ in range(N_EXPERTS)]  # fmt: skip
    if cancellations:
        flat = [t["small.weight"].view(-1) for t in taus]
        for j in range(0, 40, 4):  # large enough to survive any trim
            flat[0][j], flat[1][j], flat[2][j] = 0.05, -0.05, 0.0
    paths = {}
    for key, tensors in [("base", base)] + [(f"e{i}", {n: base[n] + t[n] for n in base}) for i, t in enumerate(taus)]:
        (root / key).mkdir(parents=True)
        save_file({n: v.contiguous() for n, v in tensors.items()}, str(root / key / "model.safetensors"))
        paths[key] = root / key
    return paths


def _merge(paths, method, kwargs, scaling=1.0, seed=0):
    base = SafetensorsCheckpoint(paths["base"])
    experts = [Expert(f"e{i}", paths[f"e{i}"], base, None) for i in range(N_EXPERTS)]
    report = MergeReport(method, scaling, kwargs, "cpu", {})
    merged = dict(merge_tensors(base, experts, get_method(method), kwargs, scaling, SELECT, seed=seed, report=report))
    return base, experts, merged, report


def _task_vectors(base, experts, names):
    return {n: [(e.weights.get(n).float() - base.get(n).float()).numpy() for e in experts] for n in names}


def _whole_model_ties(taus: dict, names: list, density: float):
    """The InternVL script's TIES on NumPy vectors: flatten (sorted names, as it does), one threshold per expert,
    majority sign over the whole vector, disjoint mean; split back per tensor."""
    names = sorted(names)
    flat = np.stack([np.concatenate([taus[n][i].ravel() for n in names]) for i in range(N_EXPERTS)])
    size = flat.shape[1]
    m = int(size * (1.0 - density))
    thresholds = [np.sort(np.abs(row))[m - 1] for row in flat]
    trimmed = np.stack([np.where(np.abs(row) >= t, row, 0.0).astype(np.float32) for row, t in zip(flat, thresholds)])
    total = np.zeros(size, dtype=np.float32)
    for row in trimmed:
        total += row
    signs = np.sign(total)
    signs[signs == 0] = np.sign(signs.sum())
    keep = ((signs > 0) & (trimmed > 0)) | ((signs < 0) & (trimmed < 0))
    merged = (trimmed * keep).sum(0) / np.maximum((trimmed * keep != 0).sum(0), 1)
    out, offset = {}, 0
    for n in names:
        count = taus[n][0].size
        out[n] = merged[offset : offset + count].reshape(taus[n][0].shape)
        offset += count
    return out, thresholds, int(np.sign(np.sign(total).sum()))


@pytest.mark.parametrize("density", [0.2, 0.5])
def test_model_scope_equals_the_whole_model_computation(tmp_path, density):
    paths = _write_model(tmp_path)
    base, experts, merged, report = _merge(paths, "ties", {"density": density, "trim_scope": "model"}, scaling=0.7)
    names = [n for n in base.keys() if SELECT.selects(n)]
    taus = _task_vectors(base, experts, names)
    expected, thresholds, majority = _whole_model_ties(taus, names, density)
    for n in names:
        np.testing.assert_allclose(merged[n].numpy(), base.get(n).numpy() + 0.7 * expected[n], rtol=1e-6, atol=1e-8)
    assert torch.equal(merged["skip.bias"], base.get("skip.bias"))  # not selected: the base's bytes
    # The exact thresholds (float32 bit patterns), the entry count and the majority sign are in the report.
    prepass = json.loads(json.dumps(report.to_json()))["prepass"]
    assert prepass["thresholds"] == [float(t) for t in thresholds]
    assert prepass["entries"] == sum(taus[n][0].size for n in names)
    assert prepass["majority_sign"] == majority and prepass["experts"] == ["e0", "e1", "e2"]
    # The scope matters on this fixture: per tensor, the tiny tensor keeps its own top entries.
    _, _, per_tensor, _ = _merge(paths, "ties", {"density": density, "trim_scope": "tensor"}, scaling=0.7)
    diff = (per_tensor["tiny.weight"] - merged["tiny.weight"]).abs().max().item()
    assert diff > 1e-5


def test_model_scope_keeps_the_paper_count_of_small_and_large_entries(tmp_path):
    """Globally, the 1e-4-scale tensor loses (almost) everything; the 1e-2 one keeps more than 20%."""
    paths = _write_model(tmp_path, cancellations=False)
    base, experts, merged, report = _merge(paths, "ties", {"density": 0.2, "trim_scope": "model"})
    taus = _task_vectors(base, experts, ["big.weight", "tiny.weight"])
    t0 = report.prepass["thresholds"][0]
    kept_big = np.mean(np.abs(taus["big.weight"][0]) >= t0)
    assert kept_big > 0.25 and np.mean(np.abs(taus["tiny.weight"][0]) >= t0) == 0.0
    n = report.prepass["entries"]
    # kept = n - m + 1 entries with distinct magnitudes (the paper's count), m = int(0.8 n)
    assert report.prepass["kept"] == [n - int(n * 0.8) + 1] * N_EXPERTS


def test_dare_ties_model_scope_is_whole_model_ties_of_the_dropped_vectors(tmp_path):
    paths = _write_model(tmp_path)
    kwargs = {"drop_rate": 0.3, "density": 0.2, "trim_scope": "model"}
    base, experts, merged, _ = _merge(paths, "dare_ties", kwargs, seed=5)
    names = [n for n in base.keys() if SELECT.selects(n)]
    taus = _task_vectors(base, experts, names)
    for n in names:  # DARE's draws: one generator per tensor, seeded from (seed, name), experts in order
        g = torch.Generator().manual_seed(tensor_seed(5, n))
        taus[n] = [np.where(torch.rand(t.shape, generator=g).numpy() >= 0.3, t / np.float32(0.7), 0.0) for t in taus[n]]
    expected, _, _ = _whole_model_ties(taus, names, 0.2)
    for n in names:
        np.testing.assert_allclose(merged[n].numpy(), base.get(n).numpy() + expected[n], rtol=1e-6, atol=1e-7)


def test_tensor_scope_zero_sums_take_the_tensor_majority_sign():
    g = torch.Generator().manual_seed(3)
    taus = [torch.randn(20, 20, generator=g) * 0.01 for _ in range(3)]
    # Exact cancellations with large magnitudes: the elected sign is 0 and the reference replaces it.
    for j in range(0, 60, 3):
        i, k = divmod(j, 20)
        taus[0][i, k], taus[1][i, k], taus[2][i, k] = 1.0, -1.0, 0.0
    arr = np.stack([t.numpy() for t in taus])
    got = get_method("ties")(taus, density=0.2).numpy()
    expected = _ties_reference(arr, 0.2)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    # The cancelled entries are no longer 0: they keep the expert whose sign is the majority's.
    assert np.all(np.abs(got[0, ::3]) == 1.0)


def test_trim_count_is_the_papers():
    """kthvalue(int(0.8 n)) as threshold keeps n - int(0.8 n) + 1 distinct magnitudes (one more than 20%)."""
    tau = torch.arange(1, 101, dtype=torch.float32).reshape(10, 10)
    out = get_method("ties")([tau], density=0.2)
    assert int((out != 0).sum()) == 100 - 80 + 1
    assert float(out[out != 0].min()) == 80.0


def test_presets_and_bad_values():
    _, kwargs, _ = resolve_method({"name": "ties", "scaling": 1.0, "density": 0.2, "trim_scope": None}, "full")
    assert kwargs["trim_scope"] == "model"
    _, kwargs, _ = resolve_method({"name": "dare_ties", "scaling": 1.0, "drop_rate": 0.2, "density": 0.2,
                                   "trim_scope": None}, "lora")  # fmt: skip
    assert kwargs["trim_scope"] == "tensor"
    _, kwargs, _ = resolve_method({"name": "ties", "scaling": 1.0, "density": 0.2, "trim_scope": "tensor"}, "full")
    assert kwargs["trim_scope"] == "tensor"  # an explicit value wins over the preset
    taus = [torch.ones(4, 4)]
    with pytest.raises(MergeError, match=r"method\.trim_scope must be one of tensor, model, got 'foo'"):
        get_method("ties")(taus, trim_scope="foo")
    with pytest.raises(MergeError, match=r"method\.density must be in \(0, 1\], got 1\.5"):
        get_method("ties").prepare(lambda: iter(()), density=1.5, trim_scope="model")
    with pytest.raises(MergeError, match="needs the model-wide thresholds"):
        get_method("ties")(taus, trim_scope="model")


def _one_error_line(proc):
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def test_cli_bad_values_and_report(tiny_conf, tmp_path):
    common = ["--config-dir", str(tiny_conf), "evaluator=none", "logger=none", "suite=none", "model=tiny_internvl"]
    proc = run_cli(*common, f"hydra.run.dir={tmp_path / 'a'}", "method=ties", "method.trim_scope=foo", check=False)
    # The CLI checks every hyperparameter before any tensor is read (methods/spec.py), with spec's wording.
    assert "method.trim_scope: ties takes one of tensor, model, got 'foo'" in _one_error_line(proc)
    proc = run_cli(*common, f"hydra.run.dir={tmp_path / 'b'}", "method=dare_ties", "method.density=1.5", check=False)
    assert "method.density: dare_ties needs a value in (0, 1], got 1.5" in _one_error_line(proc)
    proc = run_cli(*common, f"hydra.run.dir={tmp_path / 'c'}", "method=dare_ties", "method.drop_rate=1", check=False)
    assert "method.drop_rate: dare_ties needs a value in [0, 1), got 1" in _one_error_line(proc)
    # The InternVL fixture is a full fine-tune: the preset trims over the model, and the report says so.
    run_cli(*common, f"hydra.run.dir={tmp_path / 'd'}", "method=ties")
    report = json.loads((tmp_path / "d" / "merge_report.json").read_text())
    assert report["params"]["trim_scope"] == "model" and report["prepass"]["trim_scope"] == "model"
    assert len(report["prepass"]["thresholds"]) == len(report["experts"])
