"""Retrieval metrics with exact FAISS kNN (IndexFlatIP on L2-normalised rows), numpy in, a dict of
floats out: `retrieval_metrics` (test set against itself, query left out) and
`query_gallery_metrics` (In-shop). Definitions as Musgrave et al., "A Metric Learning Reality
Check" (PML's AccuracyCalculator): R_i = references with query i's label (self protocol: the query
excluded); recall@k: any of the k nearest shares the label; precision_at_1 = recall@1;
r_precision: same-label among the R_i nearest / R_i; map_at_r: (1/R_i) sum_{j <= R_i} P(j) rel(j)
(models/retrieval.py's map_at_r, shared with the trainers); lone queries (R_i = 0) can never score
and are left out of every kNN metric (as PML), counted in `n_lone_queries`; nmi: faiss.Kmeans
with as many clusters as labels, arithmetic-mean normaliser (sklearn's default).
Tests: tests/unit/test_metrics.py (against PML; ties, lone classes, self-exclusion, chunking, top-k
cap). Bench: bench/eval.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from ..dist import faiss_gpu_count
from ..models.retrieval import map_at_r, nmi_from_table

__all__ = ["retrieval_metrics", "query_gallery_metrics", "knn_search", "drop_self", "nmi_score", "kmeans_assign"]

GPU_MAX_K = 2048  # FAISS GPU k-selection handles k <= 2048 only (wider searches run on the CPU copy)
# (rows x k) entries of one chunk's result: 8192 x 64 = 512k, i.e. 6 MB of FAISS output and a few
# tens of MB of per-chunk metric temporaries, whatever n and k are
ENTRIES_PER_CHUNK_ROW = 64
# FAISS's CPU flat search multiplies 4096-query blocks by 1024-vector database blocks; wider
# database blocks spend less time in its per-block result bookkeeping (~15% less CPU time measured
# at 40k x 128, k = 60, on 2 AVX2 cores)
FAISS_DATABASE_BLOCK = 4096
TIE_WIDEN = 8  # re-search width (x k + 1) for rows with exact ties at the top-k cut-off
UNIT_NORM_TOLERANCE = 1e-6  # float32 rounding of an already normalised row


def _faiss():
    import faiss  # imported lazily: importing the package must not require faiss

    return faiss


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array, got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise ValueError(
            f"{bad.size} embeddings contain NaN or inf (first rows: {bad[:5].tolist()}); "
            "a diverged model or a corrupt embedding file"
        )
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    # rows already of unit norm (the embedder normalises) keep their bits: dividing by a norm of
    # 1 +- 1 ulp would only reshuffle near-ties against what the caller's vectors say
    unit = np.abs(norms - 1.0) <= UNIT_NORM_TOLERANCE
    return np.where(unit, x, x / np.maximum(norms, 1e-12))


def _labels(y: np.ndarray, n: int, what: str) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"{what}: {y.shape[0]} labels for {n} embeddings")
    return y


@contextmanager
def _wide_database_blocks() -> Iterator[None]:
    """Temporarily widen FAISS's BLAS database block (a process-global FAISS setting, restored)."""
    faiss = _faiss()
    old = faiss.cvar.distance_compute_blas_database_bs
    faiss.cvar.distance_compute_blas_database_bs = max(old, FAISS_DATABASE_BLOCK)
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_database_bs = old


def _searcher(refs: np.ndarray):
    """search(x, width) -> (sim, idx) over refs, exact inner product: FAISS's flat index, on the
    GPUs when FAISS has them and the width allows (else on the CPU copy)."""
    faiss = _faiss()
    cpu = faiss.IndexFlatIP(refs.shape[1])
    cpu.add(np.ascontiguousarray(refs, dtype=np.float32))
    gpu = faiss.index_cpu_to_all_gpus(cpu) if faiss_gpu_count() > 0 else None

    def search(x: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        if gpu is not None and width <= GPU_MAX_K:
            return gpu.search(x, width)
        with _wide_database_blocks():
            return cpu.search(x, width)

    return search


def _order_ties(dist: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows by decreasing similarity, equal similarities by lower index (FAISS leaves ties in any
    order; PML's L2 search orders exact ties so)."""
    order = np.lexsort((idx, -dist), axis=-1)
    return np.take_along_axis(dist, order, 1), np.take_along_axis(idx, order, 1)


def _top_k(search, x: np.ndarray, k: int, n_ref: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of each row of x, ties broken by lower index also at the cut-off.

    FAISS's heap keeps an arbitrary one of the candidates tied at rank k (its inner-product heap
    evicts the lower index, its L2 heap, which PML uses, the higher). So we search one more: where
    the k-th similarity is above the last one returned, every candidate tied with it was returned
    and the sort settles them. Rows where it is not (exact duplicates at the cut) are searched
    again TIE_WIDEN times as wide, in groups no larger than the first search: exact unless more
    candidates than that tie there (degenerate, e.g. collapsed, embeddings: FAISS's choice stands,
    and time and memory stay bounded). Cosines that differ below float32 resolution can still swap
    against PML (|q|^2 + |r|^2 - 2 q.r rounds otherwise): bench/eval.py prints the metric
    differences (0 at 20k, ~1e-7 at 50k)."""
    width = min(k + 1, n_ref)
    dist, idx = _order_ties(*search(x, width))
    unsure = np.flatnonzero((dist[:, k - 1] == dist[:, -1]) & (width < n_ref))  # all refs in: none missed
    dist, idx = dist[:, :k].copy(), idx[:, :k].copy()
    wide = min(TIE_WIDEN * width, n_ref)
    group = max(1, len(x) * width // wide)
    for lo in range(0, len(unsure), group):
        rows = unsure[lo : lo + group]
        d, i = _order_ties(*search(x[rows], wide))
        dist[rows], idx[rows] = d[:, :k], i[:, :k]
    return dist, idx


def drop_self(dist: np.ndarray, idx: np.ndarray, own: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own index own[row] (or its last column if absent) from a search of k + 1."""
    n = idx.shape[0]
    own = idx == np.asarray(own)[:, None]
    own[~own.any(axis=1), -1] = True  # self not found (only with many exact ties): drop the farthest
    keep = ~own
    return dist[keep].reshape(n, -1), idx[keep].reshape(n, -1)


def _chunks(queries: np.ndarray, refs: np.ndarray, k: int, rows: int, exclude_self: bool):
    """Yield (lo, hi, dist, idx): exact top-k neighbours of queries[lo:hi], `rows` queries at a time.
    exclude_self: queries is refs; each query's own index is dropped."""
    k_search = min(k + (1 if exclude_self else 0), refs.shape[0])
    search = _searcher(refs)
    for lo in range(0, queries.shape[0], rows):
        hi = min(lo + rows, queries.shape[0])
        dist, idx = _top_k(search, queries[lo:hi], k_search, refs.shape[0])
        if exclude_self:
            dist, idx = drop_self(dist, idx, np.arange(lo, hi))
        yield lo, hi, dist, idx


def knn_search(
    queries: np.ndarray, refs: np.ndarray, k: int, chunk_size: int = 8192, exclude_self: bool = False
) -> tuple[np.ndarray, np.ndarray]:
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
    out = {
        "precision_at_1": match[:, 0].astype(np.float64),
        "r_precision": hits_r.sum(axis=1) / np.maximum(r, 1).astype(np.float64),
        "map_at_r": map_at_r(hits_r, r),
    }
    any_hit = np.cumsum(match, axis=1) > 0
    for kk in recall_k:
        out[f"recall_at_{kk}"] = any_hit[:, min(kk, k) - 1].astype(np.float64)
    return out


def _relevant_counts(q_labels: np.ndarray, g_labels: np.ndarray, self_protocol: bool) -> np.ndarray:
    """R_i per query: references sharing its label (the query itself not counted)."""
    classes, g_counts = np.unique(g_labels, return_counts=True)
    pos = np.minimum(np.searchsorted(classes, q_labels), len(classes) - 1)
    r = np.where(classes[pos] == q_labels, g_counts[pos], 0) - (1 if self_protocol else 0)
    return np.maximum(r, 0)


def _evaluate(
    q: np.ndarray,
    q_labels: np.ndarray,
    g: np.ndarray,
    g_labels: np.ndarray,
    recall_k: Sequence[int],
    chunk_size: int,
    self_protocol: bool,
) -> dict[str, float]:
    if len(recall_k) == 0 or min(recall_k) < 1:
        raise ValueError(f"recall_k must be a non-empty list of positive ints, got {list(recall_k)}")
    n_ref = g.shape[0] - (1 if self_protocol else 0)
    if n_ref < 1:
        raise ValueError("need at least 2 embeddings to evaluate retrieval")
    r = _relevant_counts(q_labels, g_labels, self_protocol)
    k = int(min(max(int(r.max(initial=0)), max(recall_k)), n_ref))  # no metric looks further
    # memory: the index plus one (rows x k) result, rows x k <= ENTRIES_PER_CHUNK_ROW x chunk_size
    valid = r > 0
    rows = max(1, min(chunk_size, (chunk_size * ENTRIES_PER_CHUNK_ROW) // k))
    sums: dict[str, float] = {}
    for lo, hi, _, idx in _chunks(q, g, k, rows, exclude_self=self_protocol):
        v = valid[lo:hi]
        match = g_labels[idx[v]] == q_labels[lo:hi][v, None]
        for name, vals in _rank_metrics(match, r[lo:hi][v], recall_k).items():
            sums[name] = sums.get(name, 0.0) + float(vals.sum())
    n_valid = int(valid.sum())
    names = [f"recall_at_{kk}" for kk in recall_k] + ["precision_at_1", "r_precision", "map_at_r"]
    result: dict[str, float] = {"n_queries": int(q.shape[0]), "n_lone_queries": int((~valid).sum())}
    for name in names:
        result[name] = sums.get(name, 0.0) / n_valid if n_valid else float("nan")
    return result


def kmeans_assign(x: np.ndarray, k: int, seed: int = 0, niter: int = 20) -> np.ndarray:
    """Each point's cluster after `faiss.Kmeans(..., niter, seed)` and a search of its centroids."""
    faiss = _faiss()
    x = np.ascontiguousarray(x, dtype=np.float32)
    # min_points_per_centroid only governs FAISS's "too few points" warning (test sets have ~40
    # images per class, below its default 39 x k); the clustering itself is unchanged.
    km = faiss.Kmeans(
        x.shape[1], int(k), niter=niter, seed=seed, gpu=faiss_gpu_count() > 0, verbose=False, min_points_per_centroid=1
    )
    km.train(x)
    _, assign = km.index.search(x, 1)
    return assign.reshape(-1)


def nmi_score(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """NMI of two labelings (models/retrieval.nmi_from_table)."""
    _, u = np.unique(np.asarray(labels_true), return_inverse=True)
    _, v = np.unique(np.asarray(labels_pred), return_inverse=True)
    u, v = u.reshape(-1), v.reshape(-1)
    nu, nv = u.max(initial=-1) + 1, v.max(initial=-1) + 1
    if nu == 0 or nv == 0:
        return 1.0
    return nmi_from_table(np.bincount(u * nv + v, minlength=nu * nv).reshape(nu, nv))


def retrieval_metrics(
    emb: np.ndarray,
    labels: np.ndarray,
    recall_k: Sequence[int] = (1, 2, 4, 8),
    chunk_size: int = 8192,
    nmi: bool = True,
    seed: int = 0,
) -> dict[str, float]:
    """Test set against itself (each query left out of its own ranking)."""
    x = _normalise(emb)
    y = _labels(labels, x.shape[0], "retrieval_metrics")
    out = _evaluate(x, y, x, y, recall_k, chunk_size, self_protocol=True)
    if nmi:
        n_classes = len(np.unique(y))
        out["nmi"] = nmi_score(y, kmeans_assign(x, n_classes, seed=seed)) if n_classes > 1 else float("nan")
    return out


def query_gallery_metrics(
    q_emb: np.ndarray,
    q_labels: np.ndarray,
    g_emb: np.ndarray,
    g_labels: np.ndarray,
    recall_k: Sequence[int] = (1, 10, 20, 40),
    chunk_size: int = 8192,
) -> dict[str, float]:
    """In-shop protocol: every query ranked against the gallery (no self exclusion)."""
    q, g = _normalise(q_emb), _normalise(g_emb)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query dim {q.shape[1]} != gallery dim {g.shape[1]}")
    qy = _labels(q_labels, q.shape[0], "queries")
    gy = _labels(g_labels, g.shape[0], "gallery")
    return _evaluate(q, qy, g, gy, recall_k, chunk_size, self_protocol=False)
