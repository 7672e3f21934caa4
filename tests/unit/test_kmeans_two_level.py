"""slade_dist.pseudo.kmeans, two-level k-means (pseudo/kmeans/two_level.py): the share of k per cell,
inertia within 2% of flat Lloyd, spherical mode, the auto threshold, the full pass's assigner
through the cells.
(2 real ranks: tests/integration/test_pseudo_multirank.py.)"""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from slade_dist.pseudo.kmeans import (
    allocate_fine_k,
    assign_array,
    params_assigner,
    train_centroids,
)
from tests.unit._kmeans import blobs, params


def test_allocate_fine_k_proportional_at_least_one_exact_total():
    sizes = np.array([1000, 10, 0, 1, 5000, 333])
    for k in (5, 17, 100, 1000, 6344):
        alloc = allocate_fine_k(sizes, k)
        assert alloc.sum() == k and (alloc <= sizes).all()
        assert (alloc[sizes > 0] >= 1).all() and alloc[sizes == 0].sum() == 0
        if k >= 100:  # (below, the floor of 1 per non-empty cell dominates)
            big = sizes >= 100
            np.testing.assert_allclose(alloc[big], k * sizes[big] / sizes.sum(), atol=2.0)
    with pytest.raises(ValueError, match="cannot split"):
        allocate_fine_k(sizes, 3)  # 5 non-empty cells need >= 5 centroids


def inertia(x: np.ndarray, c: np.ndarray) -> float:
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(np.ascontiguousarray(c, dtype=np.float32))
    return float(index.search(x, 1)[0].astype(np.float64).sum())


def test_two_level_within_2pct_of_flat_on_a_gaussian_mixture():
    x, _ = blobs(20_000, 16, 64, seed=9, spread=1.0)  # 64 overlapping components, k = 256
    p = dict(k=256, niter=10, backend="faiss_cpu")
    flat = train_centroids({0: x}, params(two_level="off", **p))
    two = train_centroids({0: x[:7000], 3: x[7000:]}, params(two_level="on", **p))
    assert not flat.two_level and two.two_level
    assert inertia(x, two.centroids) < 1.02 * inertia(x, flat.centroids)
    assert two.coarse_centroids.shape == (16, 16) and two.centroids.shape == (256, 16)
    cell_k = np.bincount(two.centroid_cell, minlength=16)
    assert cell_k.sum() == 256 and (cell_k >= 1).all()
    assert int(two.sizes.sum()) == two.n_train == 20_000
    # assign=auto: through the cells only where that cuts the distances 8x (not at k = 256)
    assert params_assigner(params(**p), two.coarse_centroids).name == "faiss_cpu"
    assert params_assigner(params(k=10**6), np.zeros((1000, 16), np.float32)).name == "faiss_ivf"
    assert params_assigner(params(k=10**6), None).name == "faiss_cpu"
    assert params_assigner(params(k=10**6, backend="torch"), np.zeros((1000, 16), np.float32)).name == "torch"
    via_cells = params_assigner(params(assign="ivf", **p), two.coarse_centroids)
    assert via_cells.name == "faiss_ivf"
    via_cells.set_centroids(torch.from_numpy(two.centroids))
    assert via_cells.index.nlist == 16  # the cells are the lists: nothing trained
    approx, _ = assign_array(x, via_cells)
    exact, _ = assign_array(x, two.centroids, backend="faiss_cpu")
    assert (approx == exact).mean() > 0.99


def test_two_level_spherical_and_auto_threshold():
    x, _ = blobs(6000, 8, 20, seed=12)
    r = train_centroids({0: x}, params(k=64, niter=4, spherical=True, two_level_min_k=64, backend="torch"))
    assert r.two_level and r.coarse_centroids.shape == (8, 8)
    np.testing.assert_allclose(np.linalg.norm(r.centroids, axis=1), 1.0, atol=1e-5)
    assert not train_centroids({0: x}, params(k=63, niter=1, two_level_min_k=64)).two_level
    with pytest.raises(ValueError, match="flat training"):
        train_centroids({0: x}, params(k=4, two_level="on"), init_centroids=x[:4])
