"""The curate stage's decisions on disk: which unlabeled samples the cluster stage may use, and why not.

Owns the files of `<run>/curate/` (RunLayout.stage_dir("curate")) that other stages read (the stage itself is
slade_dist/pseudo/curate/):
- `cur-%06d.npz`, one per unlabeled shard, one row per sample of the tar in tar order: `key_id`
  (uint64 digest of each key: readers look their keys up by it, a key it lacks is an error),
  `keep` (bool), `reason` (uint8: KEPT, NEAR_TEST, SAME_BYTES, DUPLICATE, UNREADABLE), `group`
  (int64: the pool row of the near-duplicate group's representative, -1 outside any group; pool
  rows number every shard's samples in index order), `test_score` (float32: the pixel check's
  structure score against the test image it copies, else the best among its candidates, -1 when
  none was close enough to check);
- `decontaminated.tsv`: a row per image removed as a test copy (shard, key, reason, scores, the
  test image it copies); SwAV's pretraining leaves these keys out (`test_copies`);
- `curate.json`: the stage's summary (pool size, what was removed per test set and why, the
  thresholds, the duplicate groups, a `token` unique to the run that wrote it); written last, so
  its presence marks complete decisions. The cluster stage keys its centroids to the token, the
  eval stage prints the removal counts from it.
Tests: tests/unit/test_curate.py, tests/unit/test_multicrop.py (test_copies).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..fileio import atomic_path, atomic_write_text
from .shards import shard_index

__all__ = [
    "KEPT",
    "NEAR_TEST",
    "SAME_BYTES",
    "DUPLICATE",
    "UNREADABLE",
    "REASONS",
    "SUMMARY_FILE",
    "decisions_path",
    "key_ids",
    "write_decisions",
    "read_decisions",
    "read_keep",
    "read_summary",
    "test_copies",
    "write_removed_list",
    "REMOVED_FILE",
    "CurationMissing",
]

KEPT, NEAR_TEST, SAME_BYTES, DUPLICATE, UNREADABLE = 0, 1, 2, 3, 4
REASONS = {
    KEPT: "kept",
    NEAR_TEST: "copy of a test image",
    SAME_BYTES: "same bytes as a test image",
    DUPLICATE: "duplicate",
    UNREADABLE: "unreadable",  # no decodable image: every stage skips it anyway
}
SUMMARY_FILE = "curate.json"
REMOVED_FILE = "decontaminated.tsv"
REMOVED_HEADER = "shard\tkey\treason\tscore\tcolour_difference\ttest_set\ttest_key\n"


class CurationMissing(FileNotFoundError, UserError):
    """curate.enabled is set but the round's curate outputs are missing or do not fit the shards."""


def decisions_path(curate_dir: str | os.PathLike[str], shard: str | os.PathLike[str] | int) -> Path:
    i = shard if isinstance(shard, int) else shard_index(shard)
    return Path(curate_dir) / f"cur-{i:06d}.npz"


def key_ids(keys: Sequence[str]) -> np.ndarray:
    """uint64 digests of sample keys (64 bits: no two keys of a shard collide in practice)."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(k.encode("utf-8"), digest_size=8).digest(), "little") for k in keys),
        dtype=np.uint64,
        count=len(keys),
    )


def write_decisions(
    path: Path, key_id: np.ndarray, reason: np.ndarray, group: np.ndarray, test_score: np.ndarray
) -> None:
    """One shard's decisions, atomically (temp + rename)."""
    reason = np.asarray(reason, dtype=np.uint8)
    if not (len(key_id) == len(reason) == len(group) == len(test_score)):
        raise ValueError(
            f"{path.name}: {len(key_id)} keys, {len(reason)} reasons, {len(group)} groups, {len(test_score)} scores"
        )
    with atomic_path(path) as tmp:
        np.savez(
            tmp,
            key_id=np.asarray(key_id, dtype=np.uint64),
            keep=reason == KEPT,
            reason=reason,
            group=np.asarray(group, dtype=np.int64),
            test_score=np.asarray(test_score, dtype=np.float32),
        )


def read_decisions(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def read_keep(curate_dir: str | os.PathLike[str], shard: str | os.PathLike[str], keys: Sequence[str]) -> np.ndarray:
    """The keep mask of these keys of one shard (e.g. the embed stage's keys of it)."""
    path = decisions_path(curate_dir, shard)
    if not path.exists():
        raise CurationMissing(f"{path} is missing: run the curate stage (curate.enabled is true)")
    d = read_decisions(path)
    order = np.argsort(d["key_id"], kind="stable")
    ids = key_ids(keys)
    at = np.minimum(np.searchsorted(d["key_id"], ids, sorter=order), max(len(order) - 1, 0))
    rows = order[at] if len(order) else at
    found = d["key_id"][rows] == ids if len(order) else np.zeros(len(ids), bool)
    if not found.all():
        first = keys[int(np.flatnonzero(~found)[0])]
        raise CurationMissing(
            f"{path} has no decision for {int((~found).sum())} of the {len(keys)} samples of {Path(shard).name} "
            f"(first: {first!r}): the shard changed after curation; run the curate stage again"
        )
    return d["keep"][rows]


def write_removed_list(curate_dir: str | os.PathLike[str], rows: Sequence[tuple]) -> None:
    """decontaminated.tsv: one row per pool image removed as a test copy (rank 0, atomically)."""
    body = "".join(f"{a}\t{b}\t{c}\t{d:.4f}\t{e:.2f}\t{f}\t{g}\n" for a, b, c, d, e, f, g in rows)
    atomic_write_text(Path(curate_dir) / REMOVED_FILE, REMOVED_HEADER + body)


def test_copies(curate_dir: str | os.PathLike[str], shards: Sequence[Path]) -> dict[Path, frozenset[int]]:
    """{shard: key ids of its samples the curate stage found to be copies of a test image} (a near
    copy or the same bytes): what no stage trains on, SwAV's pretraining included. Read from
    decontaminated.tsv, whose size follows what was removed, not the pool: every rank reads it."""
    path = Path(curate_dir) / REMOVED_FILE
    if not path.exists():
        raise CurationMissing(f"{path} is missing: run the curate stage (curate.enabled is true)")
    by_name = {Path(s).name: Path(s) for s in shards}
    keys: dict[Path, list[str]] = {p: [] for p in by_name.values()}
    with path.open() as f:
        next(f)  # the header
        for line in f:
            shard, key = line.split("\t", 2)[:2]
            if shard in by_name:
                keys[by_name[shard]].append(key)
    return {p: frozenset(key_ids(k).tolist()) for p, k in keys.items()}


def read_summary(curate_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """curate.json, or None when the stage has not completed there."""
    try:
        return json.loads((Path(curate_dir) / SUMMARY_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
