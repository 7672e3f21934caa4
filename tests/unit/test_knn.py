"""slade_dist.eval.knn.exact_topk against float64 brute force and FAISS.

Small tiles and samples (tile=64, sample_size=32) push a few hundred points through every path the
100k-point benchmark takes: the threshold filter, symmetric tiles, ragged edge tiles, rows whose
threshold misses (recomputed), and the plain path.
Every test runs on both paths (the `kernel_path` fixture): the compiled fused kernel and the
portable BLAS + numba scan.
"""
from __future__ import annotations

import numpy as np
import pytest

from slade_dist.eval import knn
from slade_dist.eval.knn import exact_topk

pytestmark = pytest.mark.usefixtures("kernel_path")  # compiled kernels and portable path


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _assert_exact(q: np.ndarray, r: np.ndarray, k: int, vals: np.ndarray, idx: np.ndarray) -> None:
    """Same top-k values as float64 brute force (to float32 rounding), distinct valid indices,
    each index's value really is its similarity, rows sorted by decreasing value."""
    sims = q.astype(np.float64) @ r.astype(np.float64).T
    best = -np.sort(-sims, axis=1)[:, :k]
    assert vals.shape == idx.shape == (q.shape[0], k)
    assert np.abs(vals - best).max() < 1e-5
    assert np.abs(np.take_along_axis(sims, idx, 1) - vals).max() < 1e-5
    assert (np.diff(vals, axis=1) <= 0).all()
    assert all(len(set(row)) == k for row in idx.tolist())


@pytest.mark.parametrize("k", [1, 7, 40])
def test_symmetric_filtered_path_is_exact(k):
    x = _unit(700, 16, seed=k)  # 700 = 10 full tiles of 64 + a ragged one
    vals, idx = exact_topk(x, x, k, symmetric=True, tile=64, sample_size=32, workers=2)
    _assert_exact(x, x, k, vals, idx)
    assert (idx[:, 0] == np.arange(700)).all()  # self-similarity 1 is every row's best


def test_query_gallery_filtered_path_is_exact_and_matches_faiss():
    import faiss

    q, r = _unit(333, 24, seed=1), _unit(1111, 24, seed=2)
    vals, idx = exact_topk(q, r, 25, tile=64, sample_size=32, workers=2)
    _assert_exact(q, r, 25, vals, idx)
    index = faiss.IndexFlatIP(24)
    index.add(r)
    f_vals, f_idx = index.search(q, 25)
    assert np.abs(f_vals - vals).max() < 1e-5
    assert (f_idx == idx).mean() > 0.99  # only near-ties can swap between two GEMMs' roundings


def test_class_sorted_data_and_duplicates_fall_back_to_full_rows_and_stay_exact():
    # classes stored one after another make the strided sample's threshold too high for many
    # rows, and 30 copies of one vector tie at the top: those rows must be recomputed, not lost
    rng = np.random.default_rng(5)
    centers = rng.standard_normal((12, 8)).astype(np.float32) * 4
    x = centers.repeat(50, axis=0) + rng.standard_normal((600, 8)).astype(np.float32)
    x[100:130] = x[100]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    vals, idx = exact_topk(x, x, 45, symmetric=True, tile=64, sample_size=32, workers=2)
    _assert_exact(x, x, 45, vals, idx)


def test_threshold_misses_are_counted_as_failed_rows_and_recomputed(monkeypatch):
    seen = {}
    direct = knn._direct

    def spy(q, r, k, tile, workers):
        seen["rows"] = seen.get("rows", 0) + q.shape[0]
        return direct(q, r, k, tile, workers)

    monkeypatch.setattr(knn, "MISS_PROBABILITY", 0.5)  # thresholds far too high for many rows
    monkeypatch.setattr(knn, "_direct", spy)
    x = _unit(640, 8, seed=3)
    vals, idx = exact_topk(x, x, 30, symmetric=True, tile=64, sample_size=32, workers=1)
    _assert_exact(x, x, 30, vals, idx)
    assert 0 < seen["rows"] < 640


def test_equal_values_are_ordered_by_lower_index():
    # integer-valued vectors: many exact ties, computed exactly in float32
    x = np.random.default_rng(0).integers(-2, 3, size=(600, 4)).astype(np.float32)
    vals, idx = exact_topk(x, x, 20, symmetric=True, tile=64, sample_size=32, workers=2)
    _assert_exact(x, x, 20, vals, idx)
    same = vals[:, 1:] == vals[:, :-1]
    assert same.any() and (idx[:, 1:][same] > idx[:, :-1][same]).all()


def test_plain_path_thread_counts_and_argument_errors():
    x = _unit(300, 8, seed=4)
    one = exact_topk(x, x, 300, symmetric=True, workers=1)  # k = n: the plain path
    two = exact_topk(x, x, 300, symmetric=True, workers=2)
    _assert_exact(x, x, 300, *one)
    assert (one[0] == two[0]).all() and (one[1] == two[1]).all()
    with pytest.raises(ValueError, match="between 1 and the number of references"):
        exact_topk(x, x, 301)
    with pytest.raises(ValueError, match="same width"):
        exact_topk(x, x[:, :4], 3)
    with pytest.raises(ValueError, match="refs to be the queries"):
        exact_topk(x, x[::-1], 3, symmetric=True)
    bad = x.copy()
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        exact_topk(bad, x, 3)


def test_thresholds_are_each_rows_jth_best_sampled_similarity():
    # a wrong threshold never breaks exactness (too high: rows recomputed; too low: more kept),
    # only speed, so it is checked on its own
    q, r = _unit(150, 24, seed=6), _unit(900, 24, seed=7)
    m, k = 100, 40
    theta = knn._thresholds(q, r, k, m, 64, 2)
    sample = r[np.linspace(0, 899, m).round().astype(np.int64)]
    j = knn._poisson_quantile(k * m / 900, knn.MISS_PROBABILITY)
    want = -np.sort(-(q.astype(np.float64) @ sample.T.astype(np.float64)), axis=1)[:, j - 1]
    assert 1 < j < m and np.abs(theta - want).max() < 1e-5
