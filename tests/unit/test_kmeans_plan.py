"""slade_dist.pseudo.kmeans, the training run's plan (pseudo/kmeans/plan.py): the deterministic sample
(also for N > 2^31 and > 10^9, sizes only), k x max_points_per_centroid sample rows, parameter and
input checks, k capped to the data.
(2 real ranks: tests/integration/test_pseudo_multirank.py.)"""

from __future__ import annotations

import warnings

import faiss
import numpy as np
import pytest
import torch

from slade_dist.pseudo.kmeans import (
    cap_k,
    choose_backend,
    sample_counts,
    sample_plan,
    sample_rows,
    train_centroids,
)
from tests.unit._kmeans import blobs, params


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
    with pytest.raises(ValueError, match="init"):  # a config built in code is checked as at load
        train_centroids({0: np.zeros((5, 4), np.float32)}, params(k=3, init="kmeans||"))
    with pytest.warns(UserWarning, match="too large"):
        assert cap_k(400, 1000) == 250
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cap_k(10, 1000) == 10
