"""MAP@R and NMI, once: `map_at_r` (the per-query formula, Musgrave et al.) for eval/metrics.py's FAISS
search and `knn_map_at_r`, an exact kNN MAP@R (chunked matrix products in torch, self protocol,
query left out) for the pretrain stage's choice of its input or output weights: train/ must not
import eval/, so the formula lives here. `nmi_from_table`: the NMI of eval's k-means and of the
cluster stage's pseudo labels against the truth (pseudo/ and eval/ may not import each other).
Tests: tests/unit/test_models.py, tests/unit/test_metrics.py.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["knn_map_at_r", "map_at_r", "nmi_from_table"]


def map_at_r(hits: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Per-query MAP@R = (1/R_i) sum_{j <= R_i} P(j) rel(j), P(j) = precision of the top j.

    hits: (n, k) bool, neighbour j of query i shares its label AND j <= R_i (k >= max R_i);
    r: (n,) R_i, the references sharing query i's label. 0 for a query with R_i = 0."""
    cols = np.arange(1, hits.shape[1] + 1)
    return (np.cumsum(hits, axis=1) * hits / cols[None, :]).sum(axis=1) / np.maximum(r, 1).astype(np.float64)


def knn_map_at_r(emb: torch.Tensor, labels: torch.Tensor, chunk: int = 2048) -> float:
    """MAP@R of (n, d) embeddings (normalised here) with (n,) labels, self protocol.

    R_i = the other images of query i's class; queries without any (lone) are left out; nan when
    every query is lone."""
    x = F.normalize(emb.float(), dim=1)
    y = labels.view(-1).to(x.device)
    counts = torch.bincount(y - y.min())[y - y.min()]
    r = counts - 1
    k = int(r.max()) if len(r) else 0
    if k < 1:
        return float("nan")
    per_query = np.concatenate([_chunk_map(x, y, r, lo, min(lo + chunk, len(x)), k) for lo in range(0, len(x), chunk)])
    return float(per_query[r.cpu().numpy() > 0].mean())


def _chunk_map(x: torch.Tensor, y: torch.Tensor, r: torch.Tensor, lo: int, hi: int, k: int) -> np.ndarray:
    """MAP@R of queries lo..hi (0 for lone ones, filtered by the caller)."""
    sim = x[lo:hi] @ x.t()
    rows = torch.arange(hi - lo, device=x.device)
    sim[rows, rows + lo] = float("-inf")  # the query itself is not a neighbour
    idx = sim.topk(k, dim=1).indices
    within_r = torch.arange(1, k + 1, device=x.device)[None, :] <= r[lo:hi, None]  # only the first R_i count
    hits = (y[idx] == y[lo:hi, None]) & within_r
    return map_at_r(hits.cpu().numpy(), r[lo:hi].cpu().numpy())


def nmi_from_table(table: np.ndarray) -> float:
    """NMI of a contingency table (rows: true classes, columns: clusters, counts) = I / ((H_true +
    H_pred) / 2), natural log (sklearn's default normalisation); 1.0 when both sides are one class."""
    table = np.asarray(table, dtype=np.float64)
    n = table.sum()
    p_true, p_pred = table.sum(1) / n, table.sum(0) / n
    rows, cols = np.nonzero(table)
    p = table[rows, cols] / n
    mi = float((p * (np.log(p) - np.log(p_true[rows]) - np.log(p_pred[cols]))).sum())
    denom = (_entropy(p_true) + _entropy(p_pred)) / 2
    return min(max(mi / denom, 0.0), 1.0) if denom > 0 else 1.0


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())
