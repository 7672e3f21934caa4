"""slade_dist.pseudo.kmeans in one process: agreement with faiss.Kmeans, backend agreement, the
deterministic sample (also for N > 2^31 and > 10^9, sizes only), init auto, empty-cluster
splitting, spherical mode, streaming assignment, two-level training vs flat, checkpoint resume.
(2 real ranks vs 1 rank, and a killed 2-rank run resuming: tests/integration/test_pseudo_multirank.py.)"""

from __future__ import annotations

import warnings

import faiss
import numpy as np
import pytest
import torch

from slade_dist.pseudo.kmeans import (
    KMeansParams,
    TorchAssigner,
    allocate_fine_k,
    assign_array,
    cap_k,
    choose_backend,
    make_assigner,
    params_assigner,
    resolve_init,
    sample_counts,
    sample_plan,
    sample_rows,
    train_centroids,
)


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
    ours = train_centroids({0: x[:2500], 7: x[2500:]}, params(k=32, niter=8, backend="faiss_cpu"), init_centroids=init)
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


# ------------------------------------------------------------------ sample at any N, init, two-level
@pytest.mark.parametrize(
    "sizes",
    [
        {i: 2**26 + 7 * i for i in range(40)},  # 2.7e9 rows in 40 parts: > 2^31
        {0: 3 * 10**9, 1: 5, 2: 2**31 + 1, 3: 0, 9: 10**9},  # single parts beyond 10^9 and 2^31
        {i: 10**9 // 3 for i in range(3)},  # just under 10^9: exact hypergeometric
    ],
)
def test_sample_counts_valid_for_sizes_beyond_int32_and_1e9(sizes):
    m = 256 * 10**6  # k = 10^6 x 256 points per centroid
    counts = sample_counts(sizes, m, seed=7)
    assert sum(counts.values()) == m and set(counts) == set(sizes)
    n = sum(sizes.values())
    for i, c in counts.items():
        assert 0 <= c <= sizes[i]
        p = sizes[i] / n
        assert abs(c - m * p) <= 6 * np.sqrt(m * p * (1 - p)) + 1  # about proportional
    assert counts == sample_counts(dict(reversed(list(sizes.items()))), m, seed=7)  # layout free
    assert counts != sample_counts(sizes, m, seed=8)
    rows = sample_rows(1, sizes[1], counts[1], seed=7)
    assert len(rows) == counts[1] and (rows < sizes[1]).all() and np.all(np.diff(rows) > 0)
    big = max(sizes, key=sizes.get)
    few = sample_rows(big, sizes[big], 1000, seed=7)  # rows of a > 2^31-row part: int64, valid
    assert few.dtype == np.int64 and len(np.unique(few)) == 1000 and few.max() < sizes[big]


def test_sample_plan_of_some_parts_matches_the_full_plan():
    sizes = {0: 1000, 1: 10, 2: 5000, 5: 0, 9: 777}
    full = sample_plan(sizes, 900, seed=3)
    mine = sample_plan(sizes, 900, seed=3, parts=[9, 1])
    assert set(mine) == {1, 9} and all(np.array_equal(mine[i], full[i]) for i in mine)


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


class Killed(Exception):
    """Raised from on_step: the training stops there as a preempted job would."""


def kill_at(stage: str, step: int):
    def hook(s: str, i: int) -> None:
        if s == stage and i == step:
            raise Killed(f"{s} {i}")

    return hook


def test_flat_checkpoint_resumes_and_matches_an_uninterrupted_run(tmp_path):
    x, _ = blobs(5000, 8, 16, seed=13)
    parts = {0: x[:2000], 4: x[2000:]}
    p = params(k=16, niter=7, backend="faiss_cpu", ckpt_every_iters=2)
    whole = train_centroids(parts, p)
    with pytest.raises(Killed):
        train_centroids(parts, p, ckpt_dir=tmp_path, on_step=kill_at("lloyd", 3))
    assert (tmp_path / "lloyd.npz").exists()
    resumed = train_centroids(parts, p, ckpt_dir=tmp_path)
    assert resumed.resumed == {"lloyd": 2} and resumed.init == "resumed"
    np.testing.assert_allclose(resumed.centroids, whole.centroids, atol=1e-6)
    np.testing.assert_allclose(resumed.objective, whole.objective, rtol=1e-9)
    assert resumed.splits == whole.splits
    # finished: a rerun reads the final checkpoint and iterates no more
    assert train_centroids(parts, p, ckpt_dir=tmp_path).resumed == {"lloyd": 7}
    # other inputs never resume: another seed, other sizes, another tag
    assert train_centroids(parts, params(k=16, niter=7, backend="faiss_cpu", seed=1), ckpt_dir=tmp_path).resumed == {
        "lloyd": 0
    }
    tmp2 = tmp_path / "b"
    train_centroids(parts, p, ckpt_dir=tmp2, ckpt_tag="teacher-a")
    assert train_centroids({0: x[:2001], 4: x[2001:]}, p, ckpt_dir=tmp2, ckpt_tag="teacher-a").resumed == {"lloyd": 0}
    assert train_centroids(parts, p, ckpt_dir=tmp2, ckpt_tag="teacher-b").resumed == {"lloyd": 0}
    assert train_centroids(parts, p, ckpt_dir=tmp2, ckpt_tag="teacher-b").resumed == {"lloyd": 7}
    (tmp2 / "lloyd.npz").write_bytes(b"not a zip")  # unreadable: trained afresh
    assert train_centroids(parts, p, ckpt_dir=tmp2, ckpt_tag="teacher-b").resumed == {"lloyd": 0}


def test_two_level_checkpoints_resume_cells_and_refine(tmp_path):
    x, _ = blobs(8000, 8, 40, seed=14, spread=2.0)
    p = params(k=100, niter=5, backend="faiss_cpu", two_level="on", ckpt_every_iters=1, two_level_refine_iters=3)
    whole = train_centroids({0: x}, p)
    first_cells = []

    def kill_after_two_cells(stage: str, step: int) -> None:
        if stage == "cell":
            first_cells.append(step)
            if len(first_cells) == 2:
                raise Killed("cells")

    with pytest.raises(Killed):
        train_centroids({0: x}, p, ckpt_dir=tmp_path, on_step=kill_after_two_cells)
    with pytest.raises(Killed):
        train_centroids({0: x}, p, ckpt_dir=tmp_path, on_step=kill_at("refine", 2))
    resumed = train_centroids({0: x}, p, ckpt_dir=tmp_path)
    assert resumed.resumed == {"coarse": 5, "cells": 0, "refine": 2}  # the cells live in "refine"
    np.testing.assert_allclose(resumed.centroids, whole.centroids, atol=1e-6)
    np.testing.assert_allclose(resumed.objective, whole.objective, rtol=1e-9)
    # without a refine checkpoint, finished cells are read back, the rest trained
    (tmp_path / "refine.npz").unlink()
    for f in sorted(tmp_path.glob("cell-*.npz"))[2:]:
        f.unlink()
    partial = train_centroids({0: x}, p, ckpt_dir=tmp_path)
    assert partial.resumed == {"coarse": 5, "cells": 2, "refine": 0}
    np.testing.assert_allclose(partial.centroids, whole.centroids, atol=1e-6)
