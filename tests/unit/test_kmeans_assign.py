"""slade_dist.pseudo.kmeans, the assignment backends and the full pass (pseudo/kmeans/assign.py): FAISS
CPU and torch agree, row blocking, streaming from a float16 memmap, IVF assignment close to exact.
(2 real ranks: tests/integration/test_pseudo_multirank.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slade_dist.pseudo.kmeans import (
    TorchAssigner,
    assign_array,
    make_assigner,
    train_centroids,
)
from tests.unit._kmeans import blobs, params


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


def test_two_level_ivf_assignment_close_to_exact():
    x, _ = blobs(20_000, 16, 300, seed=8)
    exact = train_centroids({0: x}, params(k=400, niter=5, backend="faiss_cpu", init="random"))
    ivf = train_centroids(
        {0: x}, params(k=400, niter=5, backend="faiss_cpu", init="random", assign="ivf", ivf_nprobe=4)
    )
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
