"""Tests for slade_dist/eval/metrics.py (real FAISS, no mocks): agreement with
pytorch-metric-learning's AccuracyCalculator (test-only reference) on random data with exact
duplicates, brute-force recall@k, the query/gallery protocol, self exclusion with duplicates,
ties at the top-k cut-off, lone classes, chunking invariance, the top-k cap, bad inputs (NaN),
NMI against scikit-learn."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from sklearn.metrics import normalized_mutual_info_score

from slade_dist.eval.metrics import _normalise, knn_search, nmi_score, query_gallery_metrics, retrieval_metrics

PML_KEYS = {"precision_at_1": "precision_at_1", "r_precision": "r_precision", "map_at_r": "mean_average_precision_at_r"}
FAISS_DEFAULT_SEED = 1234  # PML's FaissKMeans uses faiss.Kmeans' default seed
KNN_KEYS = ["precision_at_1", "r_precision", "map_at_r"]


@pytest.fixture(autouse=True)
def _quiet_pml():
    logging.getLogger("PML").setLevel(logging.ERROR)  # its "k < max bin count" hints are expected


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clustered(n: int, classes: int, d: int = 16, spread: float = 0.8, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centers = rng.standard_normal((classes, d))
    emb = (centers[labels] + spread * rng.standard_normal((n, d))).astype(np.float32)
    return emb, labels


def _with_duplicates(emb, labels, copies: int, seed: int):
    """Overwrite `copies` rows with exact copies of others: half keep their own label (a tie across
    classes), half take the copied row's label (a tie within a class)."""
    rng = np.random.default_rng(seed + 100)
    emb, labels = emb.copy(), labels.copy()
    src, dst = rng.choice(len(emb), (2, copies), replace=False)
    emb[dst] = emb[src]
    labels[dst[: copies // 2]] = labels[src[: copies // 2]]
    return emb, labels


def _pml(emb, labels, ref=None, ref_labels=None):
    if ref is None:
        calc = AccuracyCalculator(
            include=("precision_at_1", "r_precision", "mean_average_precision_at_r", "NMI"),
            k="max_bin_count",
            device=torch.device("cpu"),
        )
        return calc.get_accuracy(_unit(emb), labels)
    calc = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        k="max_bin_count",
        device=torch.device("cpu"),
    )
    return calc.get_accuracy(_unit(emb), labels, _unit(ref), ref_labels, False)


def _brute_recall(emb, labels, ks, exclude_self=True, ref=None, ref_labels=None):
    q = _unit(emb)
    g = q if ref is None else _unit(ref)
    gl = labels if ref is None else ref_labels
    sim = q.astype(np.float64) @ g.astype(np.float64).T
    if exclude_self:
        np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")  # ties: lower index first
    r = (gl[None, :] == labels[:, None]).sum(1) - (1 if exclude_self else 0)
    valid = r > 0
    match = gl[order] == labels[:, None]
    return {k: match[valid, :k].any(1).mean() for k in ks}


def _assert_matches_pml(ours, ref, nmi=True, tol=1e-9):
    """tol 1e-9: float summation only; one neighbour ranked differently moves r_precision by
    1/(R_i x n) > 1e-6 at these sizes, so any tie handled differently fails."""
    for mine, theirs in PML_KEYS.items():
        assert ours[mine] == pytest.approx(ref[theirs], abs=tol), mine
    if nmi:  # same FAISS k-means on the same bits: identical clusters
        assert ours["nmi"] == pytest.approx(ref["NMI"], abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_self_protocol_matches_pml_with_duplicates(seed):
    emb, labels = _clustered(1500, 40, seed=seed)
    emb, labels = _with_duplicates(emb, labels, 200, seed)
    labels[:2] = [900, 901]  # two classes with a single image (lone queries)
    ours = retrieval_metrics(emb, labels, recall_k=(1, 2, 4, 8), seed=FAISS_DEFAULT_SEED)
    _assert_matches_pml(ours, _pml(emb, labels))
    assert ours["n_lone_queries"] == 2 and ours["n_queries"] == 1500
    assert 0.05 < ours["map_at_r"] < ours["r_precision"] < ours["precision_at_1"] < 1.0
    for k, v in _brute_recall(emb, labels, (1, 2, 4, 8)).items():
        assert ours[f"recall_at_{k}"] == pytest.approx(v, abs=1e-12), k
    assert ours["recall_at_1"] == ours["precision_at_1"]


def test_large_self_protocol_matches_pml_over_several_chunks():
    # rows x d above FAISS's BLAS threshold (its GEMM path, the one the 100k bench measures),
    # several query chunks, in class order
    emb, labels = _clustered(6000, 60, d=32, spread=1.2, seed=3)
    order = np.argsort(labels, kind="stable")
    emb, labels = emb[order], labels[order]
    ours = retrieval_metrics(emb, labels, recall_k=(1, 8), seed=FAISS_DEFAULT_SEED, chunk_size=4096)
    # here a handful of neighbour pairs whose cosines differ by less than float32 resolution
    # (~3e-8) come out in the other order: our q.r and PML's |q|^2 + |r|^2 - 2 q.r round
    # differently; each such swap moves a metric by <= 1/(R_i x n) ~ 2e-6
    _assert_matches_pml(ours, _pml(emb, labels), tol=1e-5)
    assert ours["recall_at_8"] == pytest.approx(_brute_recall(emb, labels, (8,))[8], abs=1e-12)


def test_query_gallery_matches_pml_and_brute_force():
    emb, labels = _clustered(900, 30, seed=5)
    emb, labels = _with_duplicates(emb, labels, 100, seed=5)
    q, ql, g, gl = emb[:300], labels[:300].copy(), emb[300:], labels[300:]
    ql[0] = 777  # a query whose item is missing from the gallery
    ours = query_gallery_metrics(q, ql, g, gl, recall_k=(1, 10, 20, 40))
    _assert_matches_pml(ours, _pml(q, ql, g, gl), nmi=False)
    for k, v in _brute_recall(q, ql, (1, 10, 20, 40), exclude_self=False, ref=g, ref_labels=gl).items():
        assert ours[f"recall_at_{k}"] == pytest.approx(v, abs=1e-12)
    assert ours["n_lone_queries"] == 1 and ours["n_queries"] == 300
    assert "nmi" not in ours


def test_query_gallery_does_not_exclude_an_identical_gallery_item():
    emb, labels = _clustered(200, 10, seed=6)
    m = query_gallery_metrics(emb, labels, emb, labels, recall_k=(1,))
    assert m["precision_at_1"] == 1.0  # each query finds itself: no self exclusion in this protocol


def test_chunking_does_not_change_results():
    emb, labels = _clustered(700, 25, seed=2)
    emb, labels = _with_duplicates(emb, labels, 100, seed=2)
    x = _unit(emb).astype(np.float32)
    ref_dist, ref_idx = knn_search(x, x, 30, chunk_size=8192, exclude_self=True)
    big = retrieval_metrics(emb, labels, nmi=False, chunk_size=8192)
    for chunk in (1, 7, 64):
        dist, idx = knn_search(x, x, 30, chunk_size=chunk, exclude_self=True)
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_array_equal(dist, ref_dist)
        small = retrieval_metrics(emb, labels, nmi=False, chunk_size=chunk)
        assert big.keys() == small.keys()
        for key in big:  # equal up to float summation order
            assert small[key] == pytest.approx(big[key], abs=1e-12), key


def test_top_k_covers_a_class_larger_than_the_chunk():
    # one class of 150 in 400 points: k = R_max = 149 > chunk_size, so a chunk holds fewer rows
    emb, labels = _clustered(400, 20, seed=4)
    labels[:150] = 0
    emb[:150] = emb[:150] + 1.5 * np.eye(16, dtype=np.float32)[0]  # keep class 0 a cluster
    small = retrieval_metrics(emb, labels, recall_k=(1, 4), chunk_size=5, seed=FAISS_DEFAULT_SEED)
    big = retrieval_metrics(emb, labels, recall_k=(1, 4), chunk_size=8192, seed=FAISS_DEFAULT_SEED)
    _assert_matches_pml(small, _pml(emb, labels))
    for key in big:
        assert small[key] == pytest.approx(big[key], abs=1e-12), key


def test_top_k_is_capped_at_the_number_of_references():
    emb, labels = _clustered(60, 3, seed=7)
    x = _unit(emb).astype(np.float32)
    dist, idx = knn_search(x, x, 1000, exclude_self=True)
    assert idx.shape == (60, 59) and dist.shape == (60, 59)
    assert all(sorted(row) == sorted(set(range(60)) - {i}) for i, row in enumerate(idx.tolist()))
    m = retrieval_metrics(emb, labels, recall_k=(1, 1000), nmi=False)
    assert m["recall_at_1000"] == 1.0  # every same-label image is within the whole set


def test_self_exclusion_with_exact_duplicates_drops_the_query_itself():
    # six identical vectors: every row ties with every other; each query must drop ITSELF (not a
    # duplicate), ties come by lower index, and query 5 (self beyond the 3 tied candidates it
    # searched) drops the last one instead
    x = np.tile(np.array([[0.6, 0.8]], np.float32), (6, 1))
    dist, idx = knn_search(x, x, 2, exclude_self=True)
    assert idx.tolist() == [[1, 2], [0, 2], [0, 1], [0, 1], [0, 1], [0, 1]]
    assert np.all(dist == dist[0, 0])


def test_ties_at_the_cut_keep_the_lower_index():
    # refs 1..4 are identical and tie for ranks 2..5: a top-3 must be 0, then 1 and 2
    refs = np.array([[1, 0], [0.8, 0.6], [0.8, 0.6], [0.8, 0.6], [0.8, 0.6], [0, 1]], np.float32)
    _, idx = knn_search(refs[:1], refs, 3)
    assert idx.tolist() == [[0, 1, 2]]


def test_ties_at_the_cut_keep_the_lower_index_when_better_ones_come_later():
    # refs 0..4 tie; 5 and 6 are nearer and come after them in the index, so FAISS's heap, full
    # of tied refs, evicts some of the lower indices for them: the top-3 must still be 5, 6, 0
    refs = np.array([[0.6, 0.8]] * 5 + [[1, 0], [0.9, np.sqrt(0.19)]], np.float32)
    _, idx = knn_search(refs[5:6], refs, 3)
    assert idx.tolist() == [[5, 6, 0]]


def test_collapsed_embeddings_stay_bounded_and_exclude_self():
    # every embedding identical (a collapsed model): the tie at the cut is wider than the re-search,
    # so FAISS's choice stands there; the run must still finish, drop each query itself and score
    emb = np.ones((500, 8), np.float32)
    labels = np.arange(500) % 10
    x = _unit(emb).astype(np.float32)
    _, idx = knn_search(x, x, 49, exclude_self=True)
    assert idx.shape == (500, 49) and not (idx == np.arange(500)[:, None]).any()
    m = retrieval_metrics(emb, labels, nmi=False)
    assert m["n_queries"] == 500 and all(0.0 <= m[k] <= 1.0 for k in KNN_KEYS)


def test_already_normalised_rows_keep_their_bits():
    # the embedder normalises; dividing again by a norm of 1 +- 1 ulp would change the bits that
    # PML (and FAISS's k-means) would see, and with them near-ties
    x = _unit(np.random.default_rng(9).standard_normal((500, 32))).astype(np.float32)
    assert not np.array_equal(x / np.linalg.norm(x, axis=1, keepdims=True), x)  # the premise
    np.testing.assert_array_equal(_normalise(x), x)
    np.testing.assert_allclose(_normalise(3 * x), x, atol=1e-7)


def test_hand_made_case_with_duplicates_and_lone_class():
    # 0 and 1 are identical vectors of different classes (a tie at similarity 1): each query must
    # drop ITSELF, not its duplicate; class 9 has a single image (lone, excluded everywhere)
    emb = np.array([[1, 0], [1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [-1, 0]], dtype=np.float32)
    labels = np.array([0, 1, 0, 1, 1, 9])
    m = retrieval_metrics(emb, labels, recall_k=(1, 2), nmi=False)
    # query 0 (class 0): neighbours 1 (wrong), 2 (right); R=1 -> P@1 0, RP 0, MAP@R 0, R@2 1
    # query 1 (class 1): 0 (wrong), 2 (wrong), 4, 3; R=2 -> P@1 0, RP 0, MAP@R 0, R@2 0
    # query 2 (class 0): 0 or 1 first (0.994 both); 0 has the lower index -> right; R=1 -> all 1
    # query 3 (class 1): 4 (right), 2 ...; R=2: top2 = 4, 2 -> RP 1/2, MAP@R (1/1)/2 = 0.5
    # query 4 (class 1): 3 (right), then 2 (0.18) vs 0/1 (0.11): 2 wrong -> RP .5, MAP .5
    assert m["n_lone_queries"] == 1 and m["n_queries"] == 6
    assert m["precision_at_1"] == pytest.approx(3 / 5)
    assert m["r_precision"] == pytest.approx((0 + 0 + 1 + 0.5 + 0.5) / 5)
    assert m["map_at_r"] == pytest.approx((0 + 0 + 1 + 0.5 + 0.5) / 5)
    assert m["recall_at_2"] == pytest.approx((1 + 0 + 1 + 1 + 1) / 5)


def test_all_lone_queries_give_nan_metrics():
    emb, _ = _clustered(10, 2, seed=8)
    m = retrieval_metrics(emb, np.arange(10), recall_k=(1, 2), nmi=False)
    assert m["n_lone_queries"] == 10
    assert all(np.isnan(m[k]) for k in KNN_KEYS + ["recall_at_1", "recall_at_2"])
    g = query_gallery_metrics(emb[:5], np.arange(5), emb[5:], np.arange(5) + 100, recall_k=(1,))
    assert g["n_lone_queries"] == 5 and np.isnan(g["precision_at_1"])


def test_nmi_matches_sklearn():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 12, 5000), rng.integers(0, 9, 5000)
    b[:2500] = a[:2500]  # partly informative
    assert nmi_score(a, b) == pytest.approx(normalized_mutual_info_score(a, b), abs=1e-10)
    assert nmi_score(a, a) == pytest.approx(1.0)
    assert nmi_score(np.zeros(5), np.zeros(5)) == 1.0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_embeddings_raise(bad):
    emb, labels = _clustered(20, 3)
    emb[4, 1] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        retrieval_metrics(emb, labels)
    with pytest.raises(ValueError, match="NaN or inf"):
        query_gallery_metrics(emb[:10], labels[:10], emb, labels)


def test_bad_inputs_raise():
    emb, labels = _clustered(20, 3)
    with pytest.raises(ValueError, match="labels for"):
        retrieval_metrics(emb, labels[:-1])
    with pytest.raises(ValueError, match="recall_k"):
        retrieval_metrics(emb, labels, recall_k=(0,))
    with pytest.raises(ValueError, match="dim"):
        query_gallery_metrics(emb, labels, emb[:, :3], labels)
    with pytest.raises(ValueError, match="at least 2"):
        retrieval_metrics(emb[:1], labels[:1], nmi=False)
