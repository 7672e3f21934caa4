"""An image shard joined with its pseudo-label file (`zip_pseudo_labels`, `check_zip`: a key mismatch
raises PseudoLabelMismatch naming both files) and the per-cluster filters (`cluster_percentile`, the
one percentile rule; `cluster_thresholds`, the one-process reference the cluster stage's distributed
summaries are tested against; `keep_sample`).
Tests: tests/unit/test_pseudo_join.py, tests/unit/test_pseudo_index.py, tests/integration/test_readers_multirank.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .pseudo_labels import PseudoLabelMismatch, pseudo_label_path, read_pseudo_labels
from .tars import TarSamples

__all__ = ["zip_pseudo_labels", "check_zip", "cluster_percentile", "cluster_thresholds", "keep_sample"]


def zip_pseudo_labels(
    samples: Iterable[dict[str, Any]],
    keys: Sequence[str],
    cls: np.ndarray,
    dist: np.ndarray,
    shard_name: str,
    pl_name: str,
    ended_early: Callable[[], bool] | None = None,
    on_unlabeled: Callable[[dict[str, Any]], None] | None = None,
) -> Iterator[tuple[dict[str, Any], int, float]]:
    """Pair each image sample (dict with `__key__`) with its pseudo label, in shard order.

    The label keys must appear in the image shard in the same order. Image samples absent from the
    label file are passed to `on_unlabeled` and skipped (the embed stage leaves out images it could
    not decode). A label key met out of order, or never met by the end of an intact shard, raises
    PseudoLabelMismatch naming both files; a truncated shard (`ended_early()` true) just ends.
    """
    position = {k: i for i, k in enumerate(keys)}
    if len(position) != len(keys):
        raise PseudoLabelMismatch(f"{pl_name} has duplicate keys: it cannot belong to image shard {shard_name}")
    nxt = 0
    for sample in samples:
        key = sample["__key__"]
        i = position.get(key)
        if i is None:
            if on_unlabeled is not None:
                on_unlabeled(sample)
            continue
        if i != nxt:
            raise PseudoLabelMismatch(
                f"key mismatch between image shard {shard_name} and pseudo-label file {pl_name}: sample "
                f"{key!r} is label row {i} but row {nxt} ({keys[nxt] if nxt < len(keys) else 'end'!r}) "
                f"was expected (re-run the cluster stage for this shard)"
            )
        nxt += 1
        yield sample, int(cls[i]), float(dist[i])
    if nxt < len(keys) and not (ended_early is not None and ended_early()):
        raise PseudoLabelMismatch(
            f"key mismatch between image shard {shard_name} and pseudo-label file {pl_name}: {len(keys) - nxt} "
            f"label keys (first {keys[nxt]!r}) are not in the image shard (wrong shard or stale labels; "
            f"re-run the cluster stage)"
        )


def cluster_percentile(dist: np.ndarray, percentile: float) -> float:
    """The distance threshold of one cluster (numpy's linear interpolation, on float32 distances)."""
    return float(np.percentile(dist, percentile))


def cluster_thresholds(
    pl_paths: Sequence[str | os.PathLike[str]],
    percentile: float,
    min_cluster_size: int,
    max_points: int = 1 << 24,
    seed: int = 0,
) -> np.ndarray:
    """Per-cluster distance threshold: keep a sample iff dist <= thr[cls] (thr -inf drops the cluster).

    Cluster sizes are exact (over every file). The percentile of each cluster's distances is taken on
    all points when there are at most `max_points`, else on a uniform random subsample (bounded memory
    at web scale). percentile 100 keeps every point of the clusters that are large enough.
    """
    cls_parts, sizes_total = [], 0
    counts = np.zeros(0, dtype=np.int64)
    for p in pl_paths:
        _, c, _ = read_pseudo_labels(p)
        if c.size:
            more = np.bincount(c, minlength=len(counts))
            more[: len(counts)] += counts
            counts, sizes_total = more, sizes_total + c.size
    thr = np.full(len(counts), np.inf, dtype=np.float64)
    thr[counts < min_cluster_size] = -np.inf
    if percentile >= 100.0 or sizes_total == 0:
        return thr
    rng = np.random.default_rng(seed)
    frac = min(1.0, max_points / sizes_total)
    dist_parts = []
    for p in pl_paths:
        _, c, d = read_pseudo_labels(p)
        if frac < 1.0:
            keep = rng.random(c.size) < frac
            c, d = c[keep], d[keep]
        cls_parts.append(c)
        dist_parts.append(d)
    c_all = np.concatenate(cls_parts) if cls_parts else np.zeros(0, np.int32)
    d_all = np.concatenate(dist_parts) if dist_parts else np.zeros(0, np.float32)
    order = np.lexsort((d_all, c_all))
    c_all, d_all = c_all[order], d_all[order]
    starts = np.searchsorted(c_all, np.arange(len(counts)), side="left")
    ends = np.searchsorted(c_all, np.arange(len(counts)), side="right")
    for cid in np.nonzero((counts >= min_cluster_size) & (ends > starts))[0]:
        thr[cid] = cluster_percentile(d_all[starts[cid] : ends[cid]], percentile)
    return thr


def keep_sample(thresholds: np.ndarray | None, cls: int, dist: float) -> bool:
    if thresholds is None:
        return True
    if cls >= len(thresholds):
        return False
    return dist <= thresholds[cls]


def check_zip(shard_path: str | os.PathLike[str], pseudo: str | os.PathLike[str]) -> int:
    """Zip one image shard with its label file (`pseudo` = the file, or the dir holding it) and
    return the number of labeled samples; raises PseudoLabelMismatch on a key mismatch."""
    pl = Path(pseudo)
    if pl.is_dir():
        pl = pseudo_label_path(pl, shard_path)
    keys, cls, dist = read_pseudo_labels(pl)
    tar = TarSamples(shard_path)
    return sum(
        1 for _ in zip_pseudo_labels(tar, keys, cls, dist, str(shard_path), str(pl), ended_early=lambda: tar.truncated)
    )
