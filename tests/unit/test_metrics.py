"""Tests for slade_dist/eval/metrics.py: agreement with pytorch-metric-learning's
AccuracyCalculator (test-only reference), brute-force recall@k, self exclusion with duplicates,
lone classes, chunking, query/gallery protocol, NMI against scikit-learn."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from sklearn.metrics import normalized_mutual_info_score

from slade_dist.eval.metrics import nmi_score, query_gallery_metrics, retrieval_metrics

PML_KEYS = {"precision_at_1": "precision_at_1", "r_precision": "r_precision",
            "map_at_r": "mean_average_precision_at_r"}
FAISS_DEFAULT_SEED = 1234  # PML's FaissKMeans uses faiss.Kmeans' default seed


def _clustered(n: int, classes: int, d: int = 16, spread: float = 0.8, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centers = rng.standard_normal((classes, d))
    emb = (centers[labels] + spread * rng.standard_normal((n, d))).astype(np.float32)
    return emb, labels


def _pml(emb, labels, ref=None, ref_labels=None):
    calc = AccuracyCalculator(include=("precision_at_1", "r_precision", "mean_average_precision_at_r", "NMI"),
                              k="max_bin_count", device=torch.device("cpu"))
    norm = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    if ref is None:
        return calc.get_accuracy(norm, labels)
    calc = AccuracyCalculator(include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
                              k="max_bin_count", device=torch.device("cpu"))
    return calc.get_accuracy(norm, labels, ref / np.linalg.norm(ref, axis=1, keepdims=True), ref_labels, False)


def _brute_recall(emb, labels, ks, exclude_self=True, ref=None, ref_labels=None):
    q = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    g = q if ref is None else ref / np.linalg.norm(ref, axis=1, keepdims=True)
    gl = labels if ref is None else ref_labels
    sim = q.astype(np.float64) @ g.astype(np.float64).T
    if exclude_self:
        np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")
    r = (gl[None, :] == labels[:, None]).sum(1) - (1 if exclude_self else 0)
    valid = r > 0
    match = gl[order] == labels[:, None]
    return {k: match[valid, :k].any(1).mean() for k in ks}


@pytest.mark.parametrize("seed", [0, 1])
def test_self_protocol_matches_pml_accuracy_calculator(seed):
    emb, labels = _clustered(1500, 40, seed=seed)
    labels[:2] = [900, 901]  # two classes with a single image (lone queries)
    ours = retrieval_metrics(emb, labels, recall_k=(1, 2, 4, 8), seed=FAISS_DEFAULT_SEED)
    ref = _pml(emb, labels)
    for mine, theirs in PML_KEYS.items():
        assert ours[mine] == pytest.approx(ref[theirs], abs=1e-5), mine
    assert ours["nmi"] == pytest.approx(ref["NMI"], abs=1e-5)
    assert ours["n_lone_queries"] == 2
    assert 0.05 < ours["map_at_r"] < ours["r_precision"] < ours["precision_at_1"] < 1.0
    for k, v in _brute_recall(emb, labels, (1, 2, 4, 8)).items():
        assert ours[f"recall_at_{k}"] == pytest.approx(v, abs=1e-9), k
    assert ours["recall_at_1"] == ours["precision_at_1"]


def test_large_self_protocol_matches_pml_on_the_threshold_filtered_knn():
    # n > 2 x 2048 takes exact_topk's sampled-threshold path with its default sizes (the one the
    # 100k benchmark measures), in class order so some thresholds miss and rows are recomputed
    emb, labels = _clustered(6000, 60, d=32, spread=1.2, seed=3)
    order = np.argsort(labels, kind="stable")
    emb, labels = emb[order], labels[order]
    ours = retrieval_metrics(emb, labels, recall_k=(1, 8), seed=FAISS_DEFAULT_SEED)
    ref = _pml(emb, labels)
    for mine, theirs in PML_KEYS.items():
        assert ours[mine] == pytest.approx(ref[theirs], abs=1e-5), mine
    assert ours["nmi"] == pytest.approx(ref["NMI"], abs=1e-5)
    brute = _brute_recall(emb, labels, (1, 8))
    assert ours["recall_at_8"] == pytest.approx(brute[8], abs=1e-9)


def test_query_gallery_matches_pml_and_brute_force():
    emb, labels = _clustered(900, 30, seed=5)
    q, ql, g, gl = emb[:300], labels[:300], emb[300:], labels[300:]
    ql = ql.copy()
    ql[0] = 777  # a query whose item is missing from the gallery
    ours = query_gallery_metrics(q, ql, g, gl, recall_k=(1, 10, 20, 40))
    ref = _pml(q, ql, g, gl)
    for mine, theirs in PML_KEYS.items():
        assert ours[mine] == pytest.approx(ref[theirs], abs=1e-5), mine
    for k, v in _brute_recall(q, ql, (1, 10, 20, 40), exclude_self=False, ref=g, ref_labels=gl).items():
        assert ours[f"recall_at_{k}"] == pytest.approx(v, abs=1e-9)
    assert ours["n_lone_queries"] == 1


def test_chunking_does_not_change_results():
    emb, labels = _clustered(700, 25, seed=2)
    big = retrieval_metrics(emb, labels, nmi=False, chunk_size=8192)
    small = retrieval_metrics(emb, labels, nmi=False, chunk_size=7)
    assert big.keys() == small.keys()
    for key in big:  # equal up to float summation order
        assert small[key] == pytest.approx(big[key], abs=1e-12), key


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
    assert m["n_lone_queries"] == 1
    assert m["precision_at_1"] == pytest.approx(3 / 5)
    assert m["r_precision"] == pytest.approx((0 + 0 + 1 + 0.5 + 0.5) / 5)
    assert m["map_at_r"] == pytest.approx((0 + 0 + 1 + 0.5 + 0.5) / 5)
    assert m["recall_at_2"] == pytest.approx((1 + 0 + 1 + 1 + 1) / 5)


def test_nmi_matches_sklearn():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 12, 5000), rng.integers(0, 9, 5000)
    b[:2500] = a[:2500]  # partly informative
    assert nmi_score(a, b) == pytest.approx(normalized_mutual_info_score(a, b), abs=1e-10)
    assert nmi_score(a, a) == pytest.approx(1.0)
    assert nmi_score(np.zeros(5), np.zeros(5)) == 1.0


def test_bad_inputs_raise():
    emb, labels = _clustered(20, 3)
    with pytest.raises(ValueError, match="labels for"):
        retrieval_metrics(emb, labels[:-1])
    with pytest.raises(ValueError, match="recall_k"):
        retrieval_metrics(emb, labels, recall_k=(0,))
    with pytest.raises(ValueError, match="dim"):
        query_gallery_metrics(emb, labels, emb[:, :3], labels)
