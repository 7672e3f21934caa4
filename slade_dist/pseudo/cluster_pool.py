"""Which points the cluster stage (pseudo/cluster.py) clusters and the student draws: curation's
keep masks (data/curation.py) and balance (`curate.cluster_cap`, `curate.collapse_share`).
Tests: tests/unit/test_curate.py, tests/unit/test_cluster.py, tests/integration/test_curate_multirank.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..data.curation import CurationMissing, read_keep, read_summary
from ..data.pseudo_index import index_rows, key_crc
from ..data.transforms import DEFAULT_LIMITS, ImageLimits
from ..stages import RunLayout
from . import embed as embed_files


def curation_summary(cfg: Config, layout: RunLayout) -> dict[str, Any]:
    """The round's curate summary when curate.enabled ({} when off); a clear error when missing."""
    if not cfg.curate.enabled:
        return {}
    summary = read_summary(layout.stage_dir("curate"))
    if summary is None:
        raise CurationMissing(
            f"cluster round {cfg.run.round}: curate.enabled is true but {layout.stage_dir('curate')} holds no "
            f"complete curation (curate.json); run the curate stage first"
        )
    return summary


def keep_mask(layout: RunLayout, emb_dir: Path, shard: Path) -> np.ndarray:
    """The shard's keep mask, one entry per embedded sample in the embed stage's order."""
    return read_keep(layout.stage_dir("curate"), shard, embed_files.read_keys(emb_dir, shard))


def kept_rows(emb: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    """The rows k-means trains on: all (the memmap itself), or the kept ones (read into memory)."""
    return emb if keep is None or keep.all() else np.asarray(emb[keep])


def kept_index_rows(
    tar: Path,
    pos: int,
    keys: list[str],
    cls: np.ndarray,
    dists: np.ndarray,
    pl_name: str,
    keep: np.ndarray | None,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> tuple[np.ndarray, int]:
    """index_rows of the samples curation kept (`keep` None: all), and the label rows a truncated
    tar lost. index_rows yields the label rows in order and a cut tar loses a tail, so its rows are
    the first len(rows) label rows (their key checksums say so)."""
    rows, lost = index_rows(tar, pos, keys, cls, dists, pl_name, limits)
    if keep is None:
        return rows, lost
    if [int(c) for c in rows["crc"]] != [key_crc(k) for k in keys[: len(rows)]]:
        raise RuntimeError(f"{pl_name}: the member rows of {Path(tar).name} are not its first label rows in order")
    return rows[keep[: len(rows)]], int(keep[len(rows) :].sum())


def cap_size(factor: float, n: int, k: int) -> int:
    """curate.cluster_cap as a member count: that multiple of the mean cluster size (0: no cap)."""
    return 0 if factor <= 0 or k <= 0 else max(1, math.ceil(factor * n / k))


def cap_clusters(rows: np.ndarray, arrays: dict[str, np.ndarray], cap: int) -> dict[str, int]:
    """Keep at most `cap` members of each cluster (in place): the nearest, as a cluster's rows are
    sorted by distance, so its threshold becomes the last kept member's distance."""
    over = np.flatnonzero(arrays["kept"] > cap) if cap > 0 else np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum(arrays["sizes"])])
    dropped = int((arrays["kept"][over] - cap).sum())
    arrays["thresholds"][over] = rows["dist"][starts[over] + cap - 1]
    arrays["kept"][over] = cap
    return {"capped_clusters": int(len(over)), "capped_members": dropped}


def collapse(sizes: np.ndarray, share_limit: float) -> dict[str, Any]:
    """The largest cluster's share of the points, and a warning text when it holds more than
    share_limit of them and more than twice an equal share (so a small k never warns by itself)."""
    n, k = int(sizes.sum()), len(sizes)
    c = int(np.argmax(sizes)) if k else 0
    share = float(sizes[c] / n) if n else 0.0
    limit = max(share_limit, 2.0 / k) if k else 1.0
    warning = ""
    if share > limit:
        warning = (
            f"collapse: cluster {c} holds {int(sizes[c])} of {n} points ({share:.1%}; an equal share is {1 / k:.2%}, "
            f"the warning limit {limit:.1%}); imbalance {imbalance_factor(sizes):.2f}. Look at its images "
            f"(TensorBoard pseudo_class/*), bound what the student draws from it with curate.cluster_cap, or check "
            f"the teacher's embeddings"
        )
    return {"largest": c, "size": int(sizes[c]) if k else 0, "share": share, "limit": limit, "warning": warning}


def imbalance_factor(sizes: np.ndarray) -> float:
    """k * sum(size^2) / n^2 (FAISS's definition): 1 for equal sizes, k when one cluster has all."""
    sizes = np.asarray(sizes, dtype=np.float64)
    n = sizes.sum()
    return float(len(sizes) * np.square(sizes).sum() / (n * n)) if n else 0.0
