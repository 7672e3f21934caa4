"""Tests for slade_dist/eval/lloyd.py against real FAISS (no mocks): the same final assignment and
the same centroids as faiss.Kmeans + index.search(x, 1) on several data sets / seeds / niter, the
documented None cases (subsampling, empty cluster, k >= n, bad input), NMI equality, FAISS's own
near-tie decisions reproduced at a row's block offset, and the exact early-stop check path."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from slade_dist.eval import lloyd
from slade_dist.eval.lloyd import faiss_kmeans_assign
from slade_dist.eval.metrics import nmi_score

pytestmark = pytest.mark.usefixtures("kernel_path")  # compiled kernels and portable path


def _blobs(n: int, d: int, k: int, spread: float, seed: int, normalise: bool = True):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    x = (rng.standard_normal((k, d))[labels] + spread * rng.standard_normal((n, d))).astype(np.float32)
    if normalise:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


def _faiss(x: np.ndarray, k: int, seed: int, niter: int):
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, min_points_per_centroid=1)
    km.train(x)
    return km.index.search(x, 1)[1].reshape(-1), km


CASES = {  # name: (n, d, k, spread, normalise, data seed, kmeans seed, niter)
    "well_separated": (5000, 32, 50, 0.5, False, 0, 1234, 20),
    "poorly_separated": (5000, 32, 50, 2.0, True, 1, 1234, 20),
    "other_seed_short": (5000, 32, 50, 1.0, True, 2, 7, 5),
    "converges_early": (4000, 16, 40, 1.0, True, 3, 99, 60),
    "no_iteration": (3000, 8, 30, 1.0, True, 4, 5, 0),
    "one_iteration": (3000, 8, 30, 1.0, True, 4, 5, 1),
    "large_norms": (6000, 24, 60, 1.5, False, 5, 11, 15),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_assignment_and_centroids_as_faiss(name):
    n, d, k, spread, normalise, dseed, seed, niter = CASES[name]
    x, _ = _blobs(n, d, k, spread, dseed, normalise)
    if name == "large_norms":
        x = x * 50.0
    ref, km = _faiss(x, k, seed, niter)
    stats: dict = {}
    got = faiss_kmeans_assign(x, k, seed, niter, stats=stats)
    assert got is not None, stats
    assert got.dtype == np.int64 and got.shape == (n,)
    np.testing.assert_array_equal(got, ref)
    assert np.abs(stats["centroids"] - km.centroids).max() <= 1e-6  # in fact bitwise equal


def test_bench_like_embeddings_exercise_the_mover_path():
    """Unit-norm, well-clustered data as bench/eval.py (smaller): several iterations use the
    changed-centroid GEMM instead of recomputing every point."""
    from bench.eval import make_embeddings

    x, _ = make_embeddings(20_000, 64, 200, seed=3)
    ref, km = _faiss(x, 200, 1234, 20)
    stats: dict = {}
    got = faiss_kmeans_assign(x, 200, 1234, 20, stats=stats)
    np.testing.assert_array_equal(got, ref)
    assert np.abs(stats["centroids"] - km.centroids).max() <= 1e-6
    assert any(t is not None for t in stats["tau"])            # mover iterations happened
    assert min(stats["recomputed"]) < 0.1 * x.shape[0]        # ... and skipped most points


def test_nmi_equals_nmi_of_faiss_assignment():
    x, labels = _blobs(5000, 32, 50, 1.5, seed=8)
    ref, _ = _faiss(x, 50, 1234, 20)
    got = faiss_kmeans_assign(x, 50, 1234, 20)
    assert got is not None
    assert nmi_score(labels, got) == nmi_score(labels, ref)


def test_near_ties_are_decided_by_faiss_at_the_row_block_offset():
    """FAISS's BLAS distances depend on a row's place in its 4096-query block: searching a subset
    gives other float values, searching it at the same offsets reproduces them exactly."""
    for n, d, k in [(9000, 64, 80), (5000, 32, 50), (3000, 16, 30)]:  # the last: non-BLAS path
        x, _ = _blobs(n, d, k, 1.0, seed=n)
        run = lloyd._Lloyd(x, k, 3, 1, {})
        index = faiss.IndexFlatL2(d)
        index.add(run.c)
        _, full = index.search(x, 1)
        rng = np.random.default_rng(0)
        for pool in (np.arange(n), np.arange(n - n % 4096, n)):  # anywhere / tail block only
            pts = np.sort(rng.choice(pool, min(pool.size, 500), replace=False))
            np.testing.assert_array_equal(run._faiss_decide(pts), full[pts, 0])


def test_exact_early_stop_check_path(monkeypatch):
    """With no noise margin every iteration counts as possibly stopped, so FAISS's objectives are
    recomputed with its own search; the answer must still be FAISS's."""
    monkeypatch.setattr(lloyd, "_SIGMAS", 1e12)
    x, _ = _blobs(4000, 32, 40, 2.0, seed=9)
    ref, _ = _faiss(x, 40, 1234, 8)
    stats: dict = {}
    got = faiss_kmeans_assign(x, 40, 1234, 8, stats=stats)
    np.testing.assert_array_equal(got, ref)
    assert stats["exact_checks"] > 0


def test_none_when_faiss_would_subsample():
    x, _ = _blobs(2600, 8, 10, 1.0, seed=10)  # 2600 > 256 * 10: FAISS trains on a random subset
    assert faiss_kmeans_assign(x, 10, 1234, 5) is None
    assert faiss_kmeans_assign(x[:2560], 10, 1234, 5) is not None


def test_none_when_a_cluster_becomes_empty():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    x[:200] = x[0]  # duplicate initial centroids: FAISS assigns ties to the lower index
    km = faiss.Kmeans(8, 20, niter=5, seed=0, min_points_per_centroid=1)
    km.train(x)
    assert km.iteration_stats[0]["nsplit"] > 0  # FAISS had to split clusters with its RNG
    assert faiss_kmeans_assign(x, 20, 0, 5) is None


@pytest.mark.parametrize("seed", [1, 1234])
def test_none_exactly_when_faiss_splits_a_cluster(seed):
    x, _ = _blobs(5000, 32, 50, 0.3, seed=0, normalise=False)  # tight blobs: random init can empty one
    _, km = _faiss(x, 50, seed, 20)
    splits = sum(s["nsplit"] for s in km.iteration_stats)
    assert (faiss_kmeans_assign(x, 50, seed, 20) is None) == (splits > 0)


@pytest.mark.parametrize("case", ["k_gt_n", "k_eq_n", "float64", "nan", "1d", "negative_seed"])
def test_none_for_unsupported_input(case):
    x, _ = _blobs(200, 8, 5, 1.0, seed=11)
    k, seed = 5, 1234
    if case == "k_gt_n":
        k = 201
    elif case == "k_eq_n":
        k = 200
    elif case == "float64":
        x = x.astype(np.float64)
    elif case == "nan":
        x[3, 2] = np.nan
    elif case == "1d":
        x = x[:, 0]
    elif case == "negative_seed":
        seed = -1
    assert faiss_kmeans_assign(x, k, seed, 5) is None
