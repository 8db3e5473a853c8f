"""Weight Average, Task Arithmetic, TIES and DARE against independent NumPy formulas on random tensors."""

import numpy as np
import pytest
import torch

from mmbench_merge.methods import get_method, list_methods


def _random_task_vectors(n=5, shape=(17, 23), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def test_registry_lists_the_first_methods_in_table_order():
    names = list_methods()
    assert names[:5] == ["weight_average", "task_arithmetic", "ties", "dare_ta", "dare_ties"]
    with pytest.raises(KeyError, match="unknown merge method 'nope'"):
        get_method("nope")


def test_weight_average_and_task_arithmetic():
    taus = _random_task_vectors()
    arr = np.stack([t.numpy() for t in taus])
    np.testing.assert_allclose(get_method("weight_average")(taus).numpy(), arr.sum(0) / len(taus), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(get_method("task_arithmetic")(taus).numpy(), arr.sum(0), rtol=1e-6, atol=1e-6)


def _ties_reference(arr: np.ndarray, density: float) -> np.ndarray:
    """TIES as the paper's code computes it, per tensor, written out entry by entry: the threshold is the
    m-th smallest magnitude, m = int(n * (1 - density)) (all kept when m = 0); entries whose trimmed sum is
    exactly 0 take the majority elected sign of the tensor; disjoint mean."""
    n, size = arr.shape[0], arr[0].size
    m = int(size * (1.0 - density))
    trimmed = np.zeros_like(arr)
    for i in range(n):
        threshold = np.sort(np.abs(arr[i].ravel()))[m - 1] if m > 0 else 0.0
        trimmed[i] = np.where(np.abs(arr[i]) >= threshold, arr[i], 0.0)
    total = np.zeros(arr.shape[1:], dtype=arr.dtype)
    for t in trimmed:
        total += t
    signs = np.sign(total)
    majority = np.sign(np.sum(signs))
    result = np.zeros(arr.shape[1:], dtype=arr.dtype)
    for idx in np.ndindex(*arr.shape[1:]):
        vals = trimmed[(slice(None), *idx)]
        sign = signs[idx] if signs[idx] != 0 else majority
        agree = [v for v in vals if v != 0 and np.sign(v) == sign]
        result[idx] = np.mean(agree) if agree else 0.0
    return result


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_reference(density):
    taus = _random_task_vectors(seed=1)
    arr = np.stack([t.numpy() for t in taus])
    got = get_method("ties")(taus, density=density).numpy()
    np.testing.assert_allclose(got, _ties_reference(arr, density), rtol=1e-5, atol=1e-6)


def test_dare_drops_and_rescales_with_the_generator():
    taus = _random_task_vectors(seed=2, shape=(64, 64))
    drop = 0.3
    got = get_method("dare_ta")(taus, drop_rate=drop, generator=torch.Generator().manual_seed(7)).numpy()
    # Reproduce the masks independently: the same generator draws one uniform field per task vector, in order.
    g = torch.Generator().manual_seed(7)
    expected = np.zeros((64, 64), dtype=np.float32)
    for tau in taus:
        keep = torch.rand(tau.shape, generator=g).numpy() >= drop
        expected += np.where(keep, tau.numpy() / (1 - drop), 0.0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # About drop_rate of each task vector's entries were dropped.
    g = torch.Generator().manual_seed(7)
    dropped = np.mean([(torch.rand(t.shape, generator=g) < drop).float().mean().item() for t in taus])
    assert abs(dropped - drop) < 0.03


def test_dare_ties_is_ties_of_the_dropped_vectors():
    taus = _random_task_vectors(seed=3)
    got = get_method("dare_ties")(taus, drop_rate=0.2, density=0.4, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    dropped = [torch.where(torch.rand(t.shape, generator=g) >= 0.2, t / 0.8, torch.zeros_like(t)) for t in taus]
    expected = _ties_reference(np.stack([t.numpy() for t in dropped]), 0.4)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,kwargs", [("ties", {"density": 0.0}), ("ties", {"density": 1.5}),
                                         ("dare_ta", {"drop_rate": 1.0}), ("dare_ties", {"drop_rate": -0.1})])
def test_out_of_range_hyperparameters_fail_clearly(name, kwargs):
    from mmbench_merge import MergeError

    with pytest.raises(MergeError, match=r"method\.(density|drop_rate) must be in"):
        get_method(name)(_random_task_vectors(), **kwargs)


def test_weight_average_scaling_is_fixed():
    from mmbench_merge import MergeError
    from mmbench_merge.methods import resolve_method

    _, kwargs, scaling = resolve_method({"name": "weight_average", "scaling": 1.0}, "full")
    assert (kwargs, scaling) == ({}, 1.0)
    with pytest.raises(MergeError, match="method.scaling: weight_average has its scaling fixed at 1.0"):
        resolve_method({"name": "weight_average", "scaling": 0.5}, "full")
