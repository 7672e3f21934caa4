"""slade_dist.pseudo.kmeans, Lloyd over all ranks, in one process (pseudo/kmeans/lloyd.py through
train_centroids): agreement with faiss.Kmeans, empty-cluster splitting, k-means++ and init auto,
spherical mode.
(2 real ranks: tests/integration/test_pseudo_multirank.py.)"""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from slade_dist.pseudo.kmeans import (
    assign_array,
    resolve_init,
    train_centroids,
)
from tests.unit._kmeans import blobs, params


def test_matches_faiss_kmeans_with_same_init():
    x, _ = blobs(6000, 16, 32)
    init = x[np.random.default_rng(1).choice(len(x), 32, replace=False)]
    ours = train_centroids({0: x[:2500], 7: x[2500:]}, params(k=32, niter=8, backend="faiss_cpu"), init_centroids=init)
    ref = faiss.Kmeans(16, 32, niter=8, seed=1)
    ref.train(x, init_centroids=init)
    np.testing.assert_allclose(ours.centroids, ref.centroids, atol=1e-3)
    assert ours.objective[-1] == pytest.approx(float(ref.obj[-1]), rel=1e-4)
    assert ours.n_train == len(x) and ours.n_total == len(x)
    assert ours.objective[-1] < ours.objective[0]


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


def test_init_auto_picks_kmeanspp_below_the_threshold_and_random_above():
    assert resolve_init("auto", 2048, 2048) == "kmeans++" and resolve_init("auto", 2049, 2048) == "random"
    assert resolve_init("kmeans++", 10**6, 2048) == "kmeans++"
    x, _ = blobs(6000, 8, 60, seed=11)
    p = dict(niter=2, backend="faiss_cpu", seed=2)
    above = train_centroids({0: x}, params(k=300, kmeanspp_max_k=100, **p))
    rnd = train_centroids({0: x}, params(k=300, init="random", **p))
    assert above.init == "random"
    np.testing.assert_array_equal(above.centroids, rnd.centroids)
    below = train_centroids({0: x}, params(k=60, **p))
    pp = train_centroids({0: x}, params(k=60, init="kmeans++", **p))
    assert below.init == "kmeans++"
    np.testing.assert_array_equal(below.centroids, pp.centroids)
