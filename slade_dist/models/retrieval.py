"""A small exact kNN MAP@R for the trainers' own model choices (train/ must not import eval/).

Owns `knn_map_at_r`: embeddings of one labeled set searched against itself, query left out,
MAP@R as Musgrave et al. define it (the same number eval/metrics.py's `retrieval_metrics` reports
as map_at_r, up to the order of exactly tied neighbours). Exact search by chunked matrix products
in torch (on the embeddings' device), memory rows x n per chunk. Used by the pretrain stage to
compare its input and output weights on the labeled train classes. eval/metrics.py keeps its own
FAISS implementation (every metric, In-shop protocol, GPU k-selection limits).
Tests: tests/unit/test_models.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["knn_map_at_r"]


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
    scores = []
    for lo in range(0, len(x), chunk):
        scores.append(_chunk_map(x, y, r, lo, min(lo + chunk, len(x)), k))
    per_query = torch.cat(scores)
    return float(per_query[r[: len(per_query)] > 0].mean())


def _chunk_map(x: torch.Tensor, y: torch.Tensor, r: torch.Tensor, lo: int, hi: int, k: int) -> torch.Tensor:
    """MAP@R of queries lo..hi (0 for lone ones, filtered by the caller)."""
    sim = x[lo:hi] @ x.t()
    rows = torch.arange(hi - lo, device=x.device)
    sim[rows, rows + lo] = float("-inf")  # the query itself is not a neighbour
    idx = sim.topk(k, dim=1).indices
    rel = (y[idx] == y[lo:hi, None]).float()
    ranks = torch.arange(1, k + 1, device=x.device, dtype=torch.float32)
    within_r = ranks[None, :] <= r[lo:hi, None]  # only the first R_i neighbours count
    precision = rel.cumsum(1) / ranks[None, :]
    return (precision * rel * within_r).sum(1) / r[lo:hi].clamp_min(1)
