"""slade_dist.pseudo.kmeans in one process: agreement with faiss.Kmeans, backend agreement, the
deterministic sample, empty-cluster splitting, spherical mode, streaming assignment.
(2 real ranks vs 1 rank: tests/integration/test_pseudo_multirank.py.)"""
from __future__ import annotations

import warnings

import faiss
import numpy as np
import pytest
import torch

from slade_dist.pseudo.kmeans import (KMeansParams, TorchAssigner, assign_array, make_assigner,
                                      cap_k, choose_backend, sample_plan, train_centroids)


def blobs(n: int, d: int, k: int, seed: int = 0, spread: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d)).astype(np.float32) * spread
    y = rng.integers(k, size=n)
    return (centers[y] + rng.standard_normal((n, d))).astype(np.float32), y


def params(**kw) -> KMeansParams:
    kw.setdefault("progress", False)
    return KMeansParams(**kw)


def test_matches_faiss_kmeans_with_same_init():
    x, _ = blobs(6000, 16, 32)
    init = x[np.random.default_rng(1).choice(len(x), 32, replace=False)]
    ours = train_centroids({0: x[:2500], 7: x[2500:]}, params(k=32, niter=8, backend="faiss_cpu"),
                           init_centroids=init)
    ref = faiss.Kmeans(16, 32, niter=8, seed=1)
    ref.train(x, init_centroids=init)
    np.testing.assert_allclose(ours.centroids, ref.centroids, atol=1e-3)
    assert ours.objective[-1] == pytest.approx(float(ref.obj[-1]), rel=1e-4)
    assert ours.n_train == len(x) and ours.n_total == len(x)
    assert ours.objective[-1] < ours.objective[0]


def test_faiss_cpu_and_torch_backends_agree():
    x, _ = blobs(5000, 24, 20, seed=3)
    p = dict(k=20, niter=6, seed=5, chunk_size=1111)
    a = train_centroids({0: x}, params(backend="faiss_cpu", **p))
    b = train_centroids({0: x}, params(backend="torch", **p))
    np.testing.assert_allclose(a.centroids, b.centroids, atol=1e-4)
    np.testing.assert_allclose(a.objective, b.objective, rtol=1e-5)
    la, da = assign_array(x, a.centroids, backend="faiss_cpu")
    lb, db = assign_array(x, a.centroids, backend="torch")
    assert (la == lb).mean() > 0.999
    np.testing.assert_allclose(da, db, rtol=1e-3, atol=1e-3)


def test_torch_assigner_blocks_rows_like_one_gemm():
    x = torch.randn(1000, 8)
    c = torch.randn(50, 8)
    small, big = TorchAssigner(budget=50 * 7), TorchAssigner(budget=1 << 20)
    small.set_centroids(c)
    big.set_centroids(c)
    exact = torch.cdist(x, c).pow(2).min(1)
    for a in (small, big):
        lab, d2 = a.assign(x)
        assert torch.equal(lab, exact.indices)
        torch.testing.assert_close(d2, exact.values, rtol=1e-4, atol=1e-4)


def test_sample_plan_is_exact_deterministic_and_layout_free():
    sizes = {0: 1000, 1: 10, 2: 5000, 5: 0, 9: 777}
    plan = sample_plan(sizes, 900, seed=3)
    assert sum(len(r) for r in plan.values()) == 900
    assert set(plan) == set(sizes)
    for i, rows in plan.items():
        assert len(np.unique(rows)) == len(rows) and (rows < sizes[i]).all()
        assert np.all(np.diff(rows) > 0)
    again = sample_plan(dict(reversed(list(sizes.items()))), 900, seed=3)
    assert all(np.array_equal(plan[i], again[i]) for i in sizes)
    other = sample_plan(sizes, 900, seed=4)
    assert any(not np.array_equal(plan[i], other[i]) for i in sizes)
    full = sample_plan(sizes, 10_000, seed=3)
    assert all(np.array_equal(full[i], np.arange(sizes[i])) for i in sizes)


def test_subsampled_training_uses_k_times_max_points():
    x, _ = blobs(5000, 8, 10)
    r = train_centroids({0: x[:3000], 1: x[3000:]}, params(k=10, niter=3, max_points_per_centroid=50))
    assert r.n_train == 500 and r.n_total == 5000
    assert int(r.sizes.sum()) == 500


def test_empty_clusters_are_split_from_big_ones():
    x, _ = blobs(3000, 8, 6, seed=2)
    init = np.repeat(x[:1], 12, axis=0) + np.float32(1e3) * (np.arange(12)[:, None] >= 6)
    init[:6] = x[:6]  # 6 sensible seeds, 6 far away that win no point
    r = train_centroids({0: x}, params(k=12, niter=5, backend="torch"), init_centroids=init.astype(np.float32))
    assert r.splits >= 6
    labels, _ = assign_array(x, r.centroids, backend="torch")
    assert len(np.unique(labels)) == 12
    assert np.abs(r.centroids).max() < 100  # no centroid left out in the void


def test_kmeanspp_seeds_better_than_random_and_is_seeded():
    x, _ = blobs(4000, 16, 40, seed=4, spread=6.0)
    pp = train_centroids({0: x}, params(k=40, niter=1, init="kmeans++", seed=1))
    rnd = train_centroids({0: x}, params(k=40, niter=1, init="random", seed=1))
    assert pp.objective[0] < rnd.objective[0]
    again = train_centroids({0: x}, params(k=40, niter=1, init="kmeans++", seed=1))
    np.testing.assert_array_equal(pp.centroids, again.centroids)


def test_spherical_mode_unit_centroids_and_cosine_assignment():
    x, _ = blobs(3000, 16, 8, seed=6)
    x *= np.random.default_rng(0).uniform(0.5, 5.0, size=(len(x), 1)).astype(np.float32)  # norms vary
    r = train_centroids({0: x}, params(k=8, niter=5, spherical=True))
    np.testing.assert_allclose(np.linalg.norm(r.centroids, axis=1), 1.0, atol=1e-5)
    labels, d = assign_array(x, r.centroids, spherical=True)
    cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ r.centroids.T
    assert (labels == cos.argmax(1)).mean() > 0.999
    np.testing.assert_allclose(d, np.sqrt(np.maximum(2 - 2 * cos.max(1), 0)), atol=2e-3)


def test_streaming_assignment_from_memmap_float16(tmp_path):
    x, _ = blobs(4000, 16, 10, seed=7)
    path = tmp_path / "emb.npy"
    np.save(path, x.astype(np.float16))
    mm = np.load(path, mmap_mode="r")
    c = train_centroids({0: mm}, params(k=10, niter=4)).centroids
    one_chunk = assign_array(mm, c, chunk_size=10_000)
    streamed = assign_array(mm, c, chunk_size=333)
    np.testing.assert_array_equal(one_chunk[0], streamed[0])
    np.testing.assert_allclose(one_chunk[1], streamed[1], rtol=1e-6)
    assert streamed[0].dtype == np.int32 and streamed[1].dtype == np.float32
    ref = ((x.astype(np.float16).astype(np.float32)[:, None] - c[None]) ** 2).sum(-1)
    assert (streamed[0] == ref.argmin(1)).mean() > 0.999


def test_backend_choice_and_bad_input():
    no_gpu = not torch.cuda.is_available() and faiss.get_num_gpus() == 0
    if no_gpu:
        assert choose_backend("auto") == "faiss_cpu"
        with pytest.raises(RuntimeError, match="faiss-gpu"):
            choose_backend("faiss_gpu")
    assert choose_backend("torch") == "torch"
    with pytest.raises(ValueError, match="backend"):
        choose_backend("cuda")
    with pytest.raises(ValueError, match="lower pseudo.k"):
        train_centroids({0: np.zeros((5, 4), np.float32)}, params(k=6))
    with pytest.raises(ValueError, match="init"):
        params(k=3, init="kmeans||")
    with pytest.warns(UserWarning, match="too large"):
        assert cap_k(400, 1000) == 250
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cap_k(10, 1000) == 10


def test_two_level_ivf_assignment_close_to_exact():
    x, _ = blobs(20_000, 16, 300, seed=8)
    exact = train_centroids({0: x}, params(k=400, niter=5, backend="faiss_cpu", init="random"))
    ivf = train_centroids({0: x}, params(k=400, niter=5, backend="faiss_cpu", init="random", assign="ivf",
                                         ivf_nprobe=4))
    assert ivf.objective[-1] < 1.02 * exact.objective[-1]  # no worse clustering (trajectories differ)
    assigner = make_assigner("faiss_cpu", assign="ivf", ivf_nprobe=4)
    assigner.set_centroids(torch.from_numpy(exact.centroids))
    assert assigner.index.nlist == 10 and assigner.index.nprobe == 4  # auto: >= 39 centroids a list
    approx, d_approx = assign_array(x, assigner)
    exact_labels, d_exact = assign_array(x, exact.centroids, backend="faiss_cpu")
    assert 0.97 < (approx == exact_labels).mean()
    assert (d_approx >= d_exact - 1e-3).all()  # never closer than the true nearest centroid
    assert np.square(d_approx).sum() < 1.01 * np.square(d_exact).sum()
    with pytest.raises(ValueError, match="needs a FAISS backend"):
        make_assigner("torch", assign="ivf")
