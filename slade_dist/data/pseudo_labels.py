"""Pseudo-label files: `pl-%06d.npz` beside a `meta.json`, one file per unlabeled image shard.

Owns: the on-disk format of DESIGN.md "Data formats" (arrays `keys`, `cls` int32 cluster id,
`dist` float32 distance to the centroid, same index and key order as the image shard
`<prefix>-%06d.tar`), atomic writing, validated reading, the shard -> label file mapping, the zip
of an image-sample stream with its label file (fails loudly on a key mismatch, naming both files)
and the per-cluster filters (distance percentile, minimum cluster size) the reader applies.
Tests: tests/unit/test_pseudo_labels.py, tests/integration/test_readers_multirank.py.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ..fileio import atomic_write_json

META_FILE = "meta.json"
_INDEX_RE = re.compile(r"(\d+)\.tar$")


class PseudoLabelMismatch(ValueError):
    """An image shard and its pseudo-label file disagree on keys."""


def shard_index(shard_path: str | os.PathLike[str]) -> int:
    """The integer index in a shard file name: `train-000012.tar` -> 12, img2dataset `00012.tar` -> 12."""
    m = _INDEX_RE.search(Path(shard_path).name)
    if not m:
        raise ValueError(f"shard file name {Path(shard_path).name!r} does not end in <digits>.tar")
    return int(m.group(1))


def pseudo_label_path(pseudo_dir: str | os.PathLike[str], shard_path: str | os.PathLike[str]) -> Path:
    return Path(pseudo_dir) / f"pl-{shard_index(shard_path):06d}.npz"


def write_pseudo_labels(path: str | os.PathLike[str], keys: Sequence[str], cls: Any, dist: Any) -> Path:
    """Write one label file atomically (temp + rename). keys are stored as ASCII bytes when possible."""
    path = Path(path)
    keys = [str(k) for k in keys]
    cls = np.asarray(cls)
    dist = np.asarray(dist)
    if not (len(keys) == len(cls) == len(dist)) or cls.ndim != 1 or dist.ndim != 1:
        raise ValueError(f"{path}: keys/cls/dist must be 1-d of equal length, got {len(keys)}, "
                         f"{cls.shape}, {dist.shape}")
    if cls.size and (not np.issubdtype(cls.dtype, np.integer) or cls.min() < 0):
        raise ValueError(f"{path}: cls must be non-negative integers (cluster ids)")
    try:
        key_arr = np.array(keys, dtype="S") if keys else np.zeros(0, dtype="S1")
        if any(k.encode("ascii") != b for k, b in zip(keys, key_arr)):  # trailing NULs would be lost
            raise UnicodeEncodeError("ascii", "", 0, 1, "lossy")
    except UnicodeEncodeError:
        key_arr = np.array(keys, dtype="U")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
    try:
        np.savez_compressed(tmp, keys=key_arr, cls=cls.astype(np.int32), dist=dist.astype(np.float32))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_pseudo_labels(path: str | os.PathLike[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(keys, cls int32, dist float32) of one label file; a clear error when it is not one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"pseudo-label file {path} is missing (did the cluster stage finish?)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"keys", "cls", "dist"} - set(z.files)
            if missing:
                raise ValueError(f"{path}: not a pseudo-label file, arrays {sorted(missing)} missing")
            raw_keys, cls, dist = z["keys"], z["cls"], z["dist"]
    except (OSError, ValueError) as e:
        if isinstance(e, ValueError) and str(path) in str(e):
            raise
        raise ValueError(f"{path}: unreadable pseudo-label file ({e})") from e
    if not (len(raw_keys) == len(cls) == len(dist)):
        raise ValueError(f"{path}: keys/cls/dist lengths differ ({len(raw_keys)}, {len(cls)}, {len(dist)})")
    keys = [k.decode("ascii") if isinstance(k, bytes) else str(k) for k in raw_keys.tolist()]
    return keys, cls.astype(np.int32, copy=False), dist.astype(np.float32, copy=False)


def write_meta(pseudo_dir: str | os.PathLike[str], round: int, teacher_step: int, k: int,
               **extra: Any) -> Path:
    return atomic_write_json(Path(pseudo_dir) / META_FILE,
                             {"round": round, "teacher_step": teacher_step, "k": k, **extra})


def read_meta(pseudo_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(pseudo_dir) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: a pseudo-label dir carries meta.json (round, teacher_step, k)")
    return json.loads(path.read_text())


def zip_pseudo_labels(samples: Iterable[dict[str, Any]], keys: Sequence[str], cls: np.ndarray,
                      dist: np.ndarray, shard_name: str, pl_name: str,
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
                f"was expected (re-run the cluster stage for this shard)")
        nxt += 1
        yield sample, int(cls[i]), float(dist[i])
    if nxt < len(keys) and not (ended_early is not None and ended_early()):
        raise PseudoLabelMismatch(
            f"key mismatch between image shard {shard_name} and pseudo-label file {pl_name}: {len(keys) - nxt} "
            f"label keys (first {keys[nxt]!r}) are not in the image shard (wrong shard or stale labels; "
            f"re-run the cluster stage)")


def cluster_thresholds(pl_paths: Sequence[str | os.PathLike[str]], percentile: float, min_cluster_size: int,
                       max_points: int = 1 << 24, seed: int = 0) -> np.ndarray:
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
            counts = _add_counts(counts, np.bincount(c))
            sizes_total += c.size
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
        thr[cid] = np.percentile(d_all[starts[cid]:ends[cid]], percentile)
    return thr


def _add_counts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    n = max(len(a), len(b))
    out = np.zeros(n, dtype=np.int64)
    out[: len(a)] += a
    out[: len(b)] += b
    return out


def keep_sample(thresholds: np.ndarray | None, cls: int, dist: float) -> bool:
    if thresholds is None:
        return True
    if cls >= len(thresholds):
        return False
    return dist <= thresholds[cls]


def check_zip(shard_path: str | os.PathLike[str], pseudo: str | os.PathLike[str]) -> int:
    """Zip one image shard with its label file (`pseudo` = the file, or the dir holding it) and
    return the number of labeled samples; raises PseudoLabelMismatch on a key mismatch."""
    from .readers import TarSamples  # readers imports this module

    pl = Path(pseudo)
    if pl.is_dir():
        pl = pseudo_label_path(pl, shard_path)
    keys, cls, dist = read_pseudo_labels(pl)
    tar = TarSamples(shard_path)
    return sum(1 for _ in zip_pseudo_labels(tar, keys, cls, dist, str(shard_path), str(pl),
                                            ended_early=lambda: tar.truncated))
