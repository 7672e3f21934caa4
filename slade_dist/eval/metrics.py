"""Retrieval metrics with exact kNN: Recall@K, P@1, R-Precision, MAP@R, NMI.

Owns `retrieval_metrics` (test set against itself, query left out) and `query_gallery_metrics`
(In-shop protocol). numpy in, plain dict of floats out.
Tests: tests/unit/test_metrics.py (agreement with pytorch-metric-learning's AccuracyCalculator,
hand-made cases for ties, lone classes and self-exclusion). Bench: bench/eval.py.

Definitions (Musgrave et al., "A Metric Learning Reality Check", as in PML's AccuracyCalculator):
- similarity = inner product of L2-normalised embeddings (= cosine), exact search: on CPU
  `slade_dist.eval.knn.exact_topk` (tiled BLAS + threshold filter, and half the work for the
  self protocol by symmetry; see its docstring), on GPU FAISS's flat index (k <= 2048). The
  metrics are accumulated over query chunks of `chunk_size`; the kNN itself holds n x k results.
- R_i = number of references with query i's label (self protocol: the query itself excluded).
- recall@k: 1 if any of the k nearest references shares the label. precision_at_1 = recall@1.
- r_precision: (same-label references among the R_i nearest) / R_i.
- map_at_r: (1/R_i) * sum_{j <= R_i} P(j) * rel(j), P(j) = precision of the top j.
- Lone queries (R_i = 0: a class with a single image, or a query label absent from the gallery)
  can never score and are left out of every kNN metric (PML does the same); `n_lone_queries`
  reports how many.
- Self exclusion: we search k + 1 neighbours and drop the query's own index wherever it appears
  (an exact duplicate may outrank it); if it is not among them the last one is dropped.
- Ties: the definitions assume one ranking; ours is deterministic: among the returned
  neighbours, equal similarities are ordered by lower reference index (FAISS's heap leaves them
  in arbitrary order). Which of several tied candidates makes it into the top k at the cut-off
  is arbitrary; it cannot change any metric except when that tie straddles rank k.
- nmi: k-means (FAISS's, niter 20, `seed`; on CPU reproduced exactly with fewer distance
  computations by `slade_dist.eval.lloyd`) on the normalised embeddings with as many clusters as
  labels, NMI with the arithmetic-mean normaliser (sklearn's default), computed here.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from slade_dist.eval.lloyd import faiss_kmeans_assign

__all__ = ["retrieval_metrics", "query_gallery_metrics", "knn_search", "nmi_score", "kmeans_assign"]


def _faiss():
    import faiss  # imported lazily: importing the package must not require faiss

    return faiss


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array, got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise ValueError(f"{bad.size} embeddings contain NaN or inf (first rows: {bad[:5].tolist()}); "
                         "a diverged model or a corrupt embedding file")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _labels(y: np.ndarray, n: int, what: str) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"{what}: {y.shape[0]} labels for {n} embeddings")
    return y


def _faiss_gpus() -> int:
    from slade_dist.pseudo.kmeans import faiss_gpu_count  # lazily: that module imports torch

    return faiss_gpu_count()


def _drop_self(dist: np.ndarray, idx: np.ndarray, lo: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove query (lo + row)'s own index from each row (or the last column if absent)."""
    n = idx.shape[0]
    own = idx == np.arange(lo, lo + n)[:, None]
    own[~own.any(axis=1), -1] = True  # self not found (only with many exact ties): drop the farthest
    keep = ~own
    return dist[keep].reshape(n, -1), idx[keep].reshape(n, -1)


def _gpu_search(queries: np.ndarray, refs: np.ndarray, k: int, chunk_size: int):
    """Yield (lo, hi, dist, idx) from FAISS's GPU flat index, rows ordered by (-dist, idx)."""
    faiss = _faiss()
    index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(refs.shape[1]))
    index.add(refs)
    for lo in range(0, queries.shape[0], chunk_size):
        hi = min(lo + chunk_size, queries.shape[0])
        dist, idx = index.search(queries[lo:hi], k)
        order = np.lexsort((idx, -dist), axis=-1)  # FAISS leaves equal similarities in any order
        yield lo, hi, np.take_along_axis(dist, order, 1), np.take_along_axis(idx, order, 1)


def _chunks(queries: np.ndarray, refs: np.ndarray, k: int, chunk_size: int, exclude_self: bool):
    """Yield (lo, hi, dist, idx) of exact top-k inner-product neighbours, chunk by chunk; rows by
    decreasing similarity, equal similarities by lower index. exclude_self: queries is refs."""
    k_search = min(k + (1 if exclude_self else 0), refs.shape[0])
    if k_search <= 2048 and _faiss_gpus() > 0:  # GPU k-selection is limited to k <= 2048
        found = _gpu_search(queries, refs, k_search, chunk_size)
    else:
        from slade_dist.eval.knn import exact_topk  # lazily: compiled kernels, numba import

        all_dist, all_idx = exact_topk(queries, refs, k_search, symmetric=exclude_self)
        found = ((lo, min(lo + chunk_size, len(all_dist)), all_dist[lo:lo + chunk_size], all_idx[lo:lo + chunk_size])
                 for lo in range(0, len(all_dist), chunk_size))
    for lo, hi, dist, idx in found:
        if exclude_self:
            dist, idx = _drop_self(dist, idx, lo)
        yield lo, hi, dist, idx


def knn_search(queries: np.ndarray, refs: np.ndarray, k: int, chunk_size: int = 8192,
               exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner-product neighbours (inputs already normalised), chunked over queries.
    exclude_self: queries[i] is refs[i]; its own index is removed from row i."""
    parts = [(d, i) for _, _, d, i in _chunks(queries, refs, k, chunk_size, exclude_self)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _rank_metrics(match: np.ndarray, r: np.ndarray, recall_k: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-query metric values from the (n, k) same-label matrix and R per query."""
    n, k = match.shape
    cols = np.arange(1, k + 1)
    within_r = cols[None, :] <= r[:, None]
    hits_r = match & within_r
    cum = np.cumsum(hits_r, axis=1)
    r_safe = np.maximum(r, 1).astype(np.float64)
    out = {"precision_at_1": match[:, 0].astype(np.float64),
           "r_precision": hits_r.sum(axis=1) / r_safe,
           "map_at_r": (cum * hits_r / cols[None, :]).sum(axis=1) / r_safe}
    any_hit = np.cumsum(match, axis=1) > 0
    for kk in recall_k:
        out[f"recall_at_{kk}"] = any_hit[:, min(kk, k) - 1].astype(np.float64)
    return out


def _evaluate(q: np.ndarray, q_labels: np.ndarray, g: np.ndarray, g_labels: np.ndarray,
              recall_k: Sequence[int], chunk_size: int, self_protocol: bool) -> dict[str, float]:
    if len(recall_k) == 0 or min(recall_k) < 1:
        raise ValueError(f"recall_k must be a non-empty list of positive ints, got {list(recall_k)}")
    classes, g_counts = np.unique(g_labels, return_counts=True)
    pos = np.searchsorted(classes, q_labels)
    pos_c = np.minimum(pos, len(classes) - 1)
    r = np.where(classes[pos_c] == q_labels, g_counts[pos_c], 0) - (1 if self_protocol else 0)
    r = np.maximum(r, 0)
    n_ref = g.shape[0] - (1 if self_protocol else 0)
    if n_ref < 1:
        raise ValueError("need at least 2 embeddings to evaluate retrieval")
    k = int(min(max(int(r.max(initial=0)), max(recall_k)), n_ref))
    valid = r > 0
    result: dict[str, float] = {"n_queries": int(q.shape[0]), "n_lone_queries": int((~valid).sum())}
    sums: dict[str, float] = {}
    # bound memory: the (rows x k) matrices of one chunk hold about chunk_size * 64 entries
    rows = max(1, min(chunk_size, (chunk_size * 64) // max(k, 1)))
    for lo, hi, _, idx in _chunks(q, g, k, rows, exclude_self=self_protocol):
        match = g_labels[idx] == q_labels[lo:hi, None]
        v = valid[lo:hi]
        for name, vals in _rank_metrics(match[v], r[lo:hi][v], recall_k).items():
            sums[name] = sums.get(name, 0.0) + float(vals.sum())
    n_valid = int(valid.sum())
    for kk in recall_k:
        result[f"recall_at_{kk}"] = sums.get(f"recall_at_{kk}", 0.0) / n_valid if n_valid else float("nan")
    for name in ("precision_at_1", "r_precision", "map_at_r"):
        result[name] = sums.get(name, 0.0) / n_valid if n_valid else float("nan")
    return result


def kmeans_assign(x: np.ndarray, k: int, seed: int = 0, niter: int = 20) -> np.ndarray:
    """Each point's cluster after FAISS k-means (`faiss.Kmeans(..., niter, seed)` + a final search).
    On CPU `lloyd.faiss_kmeans_assign` gives FAISS's exact answer with fewer distance computations;
    FAISS itself runs when that cannot vouch for the result, and on GPU."""
    faiss = _faiss()
    gpu = _faiss_gpus() > 0
    if not gpu:
        assign = faiss_kmeans_assign(np.ascontiguousarray(x, dtype=np.float32), int(k), seed=seed, niter=niter)
        if assign is not None:
            return assign
    # min_points_per_centroid only governs FAISS's "too few points" warning (test sets have ~40
    # images per class, below its default 39 x k); the clustering itself is unchanged.
    km = faiss.Kmeans(x.shape[1], int(k), niter=niter, seed=seed, gpu=gpu, verbose=False, min_points_per_centroid=1)
    km.train(x)
    _, assign = km.index.search(x, 1)
    return assign.reshape(-1)


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0].astype(np.float64)
    p /= p.sum()
    return float(-(p * np.log(p)).sum())


def nmi_score(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """NMI = I(U;V) / ((H(U) + H(V)) / 2) (natural log; 1.0 when both have a single cluster)."""
    _, u = np.unique(np.asarray(labels_true), return_inverse=True)
    _, v = np.unique(np.asarray(labels_pred), return_inverse=True)
    u, v = u.reshape(-1), v.reshape(-1)
    nu, nv, n = u.max(initial=-1) + 1, v.max(initial=-1) + 1, u.shape[0]
    if (nu == nv == 1) or (nu == nv == 0):
        return 1.0
    joint = np.bincount(u * nv + v, minlength=nu * nv).reshape(nu, nv).astype(np.float64)
    pu, pv = joint.sum(1), joint.sum(0)
    nz = joint > 0
    pij = joint[nz] / n
    mi = float((pij * (np.log(joint[nz]) + np.log(n) - np.log(pu[np.nonzero(nz)[0]])
                       - np.log(pv[np.nonzero(nz)[1]]))).sum())
    mi = max(mi, 0.0)
    denom = (_entropy(pu) + _entropy(pv)) / 2.0
    return float(mi / max(denom, np.finfo(np.float64).eps))


def retrieval_metrics(emb: np.ndarray, labels: np.ndarray, recall_k: Sequence[int] = (1, 2, 4, 8),
                      chunk_size: int = 8192, nmi: bool = True, seed: int = 0) -> dict[str, float]:
    """Test set against itself (each query left out of its own ranking)."""
    x = _normalise(emb)
    y = _labels(labels, x.shape[0], "retrieval_metrics")
    out = _evaluate(x, y, x, y, recall_k, chunk_size, self_protocol=True)
    if nmi:
        n_classes = len(np.unique(y))
        out["nmi"] = nmi_score(y, kmeans_assign(x, n_classes, seed=seed)) if n_classes > 1 else float("nan")
    return out


def query_gallery_metrics(q_emb: np.ndarray, q_labels: np.ndarray, g_emb: np.ndarray, g_labels: np.ndarray,
                          recall_k: Sequence[int] = (1, 10, 20, 40), chunk_size: int = 8192) -> dict[str, float]:
    """In-shop protocol: every query ranked against the gallery (no self exclusion)."""
    q, g = _normalise(q_emb), _normalise(g_emb)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query dim {q.shape[1]} != gallery dim {g.shape[1]}")
    qy = _labels(q_labels, q.shape[0], "queries")
    gy = _labels(g_labels, g.shape[0], "gallery")
    return _evaluate(q, qy, g, gy, recall_k, chunk_size, self_protocol=False)
