"""A k-means run before its first Lloyd iteration: its parameters checked, the choices derived
from them (two-level, coarse k, k capped to the data) and the training sample, the same rows at
any world size (sample_counts; each rank reads its own parts' rows, draw_sample).
Tests: tests/unit/test_kmeans_plan.py, tests/integration/test_pseudo_multirank.py (same sample on 2 ranks).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ... import dist
from ...config import PseudoConfig
from .assign import to_float

HYPERGEOMETRIC_LIMIT = 10**9  # numpy's hypergeometric needs ngood, nbad < 10^9
# Every random draw of a run has its own generator keyed [seed, purpose, ...] (0 the sample counts,
# 1 a part's rows; appended to a stage's key: 2/3 init, 4 Lloyd's splits; two-level stages 10 coarse,
# 20/21 a cell's init/Lloyd, 30 refine): a draw depends on neither the world size nor on the draws
# made before it, so 1 rank and N ranks draw alike and a resumed run draws what the first one did.


def two_level_mode(params: PseudoConfig) -> str:
    """ "auto" | "on" | "off"; YAML reads a bare on / off as true / false."""
    mode = params.two_level
    return ("on" if mode else "off") if isinstance(mode, bool) else mode


def use_two_level(params: PseudoConfig) -> bool:
    if two_level_mode(params) == "auto":  # flat Lloyd's 2 d S k per iteration: docs/SCALING.md
        return params.k >= params.two_level_min_k
    return two_level_mode(params) == "on"


def coarse_k_for(params: PseudoConfig) -> int:
    return int(min(params.k, params.coarse_k or max(1, round(math.sqrt(params.k)))))


def cap_k(k: int, n: int, min_points_per_centroid: int = 4) -> int:
    """k so that every centroid has on average >= min_points_per_centroid points (warns when capped):
    k-means with fewer points per cluster mostly splits noise, and FAISS refuses n < k outright."""
    cap = max(1, n // min_points_per_centroid)
    if k > cap:
        warnings.warn(
            f"pseudo.k={k} is too large for {n} points: using k={cap} "
            f"(>= {min_points_per_centroid} points per cluster on average)",
            stacklevel=2,
        )
        return cap
    return k


def sample_counts(sizes: Mapping[int, int], m: int, seed: int) -> dict[int, int]:
    """How many training-sample rows each part gives: exactly m in total, each <= its size, from
    (all parts' sizes, m, seed) only, never from which rank owns what. m is split down a fixed
    binary tree over the sorted part ids, one vectorised draw per level (~log2(parts) numpy calls,
    milliseconds for 10^5 parts whatever N)."""
    ids = sorted(int(i) for i in sizes)
    n = np.array([int(sizes[i]) for i in ids], dtype=np.int64)
    if m >= int(n.sum()):
        return dict(zip(ids, n.tolist()))
    return dict(zip(ids, _split_down_tree(n, m, np.random.default_rng([seed, 0])).tolist()))


def _split_down_tree(n: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros(len(n), dtype=np.int64)
    csum = np.concatenate([[0], np.cumsum(n)])
    lo, hi, want = np.array([0]), np.array([len(n)]), np.array([m], dtype=np.int64)
    while len(lo):
        leaf = hi - lo == 1
        out[lo[leaf]] = want[leaf]
        keep = ~leaf & (want > 0)  # a node that takes nothing gives nothing to its children
        lo, hi, want = lo[keep], hi[keep], want[keep]
        mid = (lo + hi) // 2
        left = _draw_left_share(csum[mid] - csum[lo], csum[hi] - csum[mid], want, rng)
        lo, hi = np.concatenate([lo, mid]), np.concatenate([mid, hi])
        want = np.concatenate([left, want - left])
    return out


def _draw_left_share(left_n: np.ndarray, right_n: np.ndarray, want: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rows the left child gives of `want` drawn without replacement from left_n + right_n rows."""
    out = np.zeros(len(want), dtype=np.int64)
    # hypergeometric: the exact law of a uniform m-subset of all rows
    exact = (left_n < HYPERGEOMETRIC_LIMIT) & (right_n < HYPERGEOMETRIC_LIMIT)
    if exact.any():
        out[exact] = rng.hypergeometric(left_n[exact], right_n[exact], want[exact])
    big = ~exact  # past numpy's limit, binomial: only the count variance differs, by 1/(1 - m/N)
    if big.any():
        p = left_n[big] / (left_n[big] + right_n[big])
        draw = rng.binomial(want[big], p)
        out[big] = np.clip(draw, np.maximum(want[big] - right_n[big], 0), np.minimum(want[big], left_n[big]))
    return out


def sample_rows(part_id: int, size: int, count: int, seed: int) -> np.ndarray:
    """The sorted rows part `part_id` gives to the sample (its own seeded draw: any rank can make it)."""
    if count >= size:
        return np.arange(size, dtype=np.int64)
    rows = np.random.default_rng([seed, 1, int(part_id)]).choice(int(size), int(count), replace=False)
    return np.sort(rows).astype(np.int64)


def sample_plan(sizes: Mapping[int, int], m: int, seed: int, parts: Any = None) -> dict[int, np.ndarray]:
    """Sorted sample rows per part id (of `parts`, default all); see sample_counts."""
    counts = sample_counts(sizes, m, seed)
    wanted = sorted(counts) if parts is None else sorted(int(i) for i in parts)
    return {i: sample_rows(i, int(sizes[i]), counts[i], seed) for i in wanted}


@dataclass
class TrainingSample:
    """This rank's rows of the training sample."""

    x: torch.Tensor  # (n_local, d) float32, unit rows in spherical mode
    pos: np.ndarray  # (n_local,) int64 in [0, m): global position (parts in id order), any world size
    m: int  # sample rows, all ranks
    d: int
    sizes: dict[int, int]  # every part's size, all ranks
    seconds: float = 0.0


def draw_sample(parts: Mapping[int, Any], params: PseudoConfig, device: torch.device | None = None) -> TrainingSample:
    """Read this rank's rows of the training sample (collective: sizes and dims are gathered)."""
    t0 = time.time()
    sizes = _gather_sizes(parts)
    n_total = sum(sizes.values())
    d = _dims(parts) if n_total else 0
    if n_total < params.k:
        raise ValueError(
            f"k-means: {n_total} points for k={params.k} clusters; lower pseudo.k (at most the number of points)"
        )
    m = min(n_total, params.k * params.max_points_per_centroid)
    counts = sample_counts(sizes, m, params.seed)
    offsets = dict(zip(sorted(counts), np.concatenate([[0], np.cumsum([counts[i] for i in sorted(counts)])])))
    device = device or torch.device("cpu")
    xs, pos = [], []
    for i in sorted(int(i) for i in parts):
        rows = sample_rows(i, sizes[i], counts[i], params.seed)
        if len(rows):
            xs.append(to_float(_take_rows(parts[i], rows, sizes[i]), params.spherical, device))
            pos.append(int(offsets[i]) + np.arange(len(rows), dtype=np.int64))
    x = torch.cat(xs) if xs else torch.zeros(0, d, device=device)
    p = np.concatenate(pos) if pos else np.zeros(0, np.int64)
    return TrainingSample(x=x, pos=p, m=m, d=d, sizes=sizes, seconds=time.time() - t0)


def _gather_sizes(parts: Mapping[int, Any]) -> dict[int, int]:
    local = {int(i): int(a.shape[0]) for i, a in parts.items()}
    merged: dict[int, int] = {}
    for r, d in enumerate(dist.all_gather_object(local)):
        for i, n in d.items():
            if i in merged:
                raise ValueError(
                    f"k-means: part {i} is owned by more than one rank (rank {r} too); "
                    f"each rank must own disjoint parts"
                )
            merged[i] = n
    return merged


def _dims(parts: Mapping[int, Any]) -> int:
    dims = {int(a.shape[1]) for a in parts.values() if a.ndim == 2}
    all_dims = set().union(*dist.all_gather_object(dims))
    if len(all_dims) != 1:
        raise ValueError(f"k-means: parts must share one dimension, got {sorted(all_dims)}")
    return all_dims.pop()


def _take_rows(part: Any, rows: np.ndarray, n: int) -> Any:
    if len(rows) == n:
        return part
    if isinstance(part, torch.Tensor):
        return part[torch.as_tensor(rows, device=part.device)]
    return np.asarray(part)[rows]  # memmap: reads only these rows


def rows_by_position(local_x: torch.Tensor, local_pos: np.ndarray, wanted: np.ndarray, d: int) -> torch.Tensor:
    """The sample rows at global positions `wanted` (row j = position wanted[j]), on every rank."""
    out = torch.zeros(len(wanted), d, dtype=torch.float32, device=local_x.device)
    order = np.argsort(wanted, kind="stable")
    sorted_wanted = np.asarray(wanted)[order]
    at = np.searchsorted(sorted_wanted, local_pos)
    hit = at < len(sorted_wanted)
    hit[hit] = sorted_wanted[at[hit]] == local_pos[hit]
    if hit.any():
        dst = torch.as_tensor(order[at[hit]], device=local_x.device)
        src = torch.as_tensor(np.flatnonzero(hit), device=local_x.device)
        out[dst] = local_x[src]
    return dist.staged_all_reduce_sum(out)  # each rank filled the rows it holds, the rest are 0
