"""Pseudo-label files `pl-%06d.npz` (one per unlabeled image shard, same key order: docs/ARCHITECTURE.md
"Data formats") and their `meta.json`: atomic writing, validated reading, the shard -> label file
mapping. Joining a label file with its image shard is pseudo_join.py's.
Tests: tests/unit/test_pseudo_labels.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..fileio import atomic_path, atomic_write_json
from .shards import shard_index

META_FILE = "meta.json"


class PseudoLabelMismatch(ValueError, UserError):
    """An image shard and its pseudo-label file disagree on keys."""


def pseudo_label_path(pseudo_dir: str | os.PathLike[str], shard_path: str | os.PathLike[str]) -> Path:
    return Path(pseudo_dir) / f"pl-{shard_index(shard_path):06d}.npz"


def write_pseudo_labels(path: str | os.PathLike[str], keys: Sequence[str], cls: Any, dist: Any) -> Path:
    """Write one label file atomically (temp + rename). keys are stored as ASCII bytes when possible."""
    path = Path(path)
    keys = [str(k) for k in keys]
    cls = np.asarray(cls)
    dist = np.asarray(dist)
    if not (len(keys) == len(cls) == len(dist)) or cls.ndim != 1 or dist.ndim != 1:
        raise ValueError(
            f"{path}: keys/cls/dist must be 1-d of equal length, got {len(keys)}, {cls.shape}, {dist.shape}"
        )
    if cls.size and (not np.issubdtype(cls.dtype, np.integer) or cls.min() < 0):
        raise ValueError(f"{path}: cls must be non-negative integers (cluster ids)")
    try:
        key_arr = np.array(keys, dtype="S") if keys else np.zeros(0, dtype="S1")
        if any(k.encode("ascii") != b for k, b in zip(keys, key_arr)):  # trailing NULs would be lost
            raise UnicodeEncodeError("ascii", "", 0, 1, "lossy")
    except UnicodeEncodeError:
        key_arr = np.array(keys, dtype="U")
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, keys=key_arr, cls=cls.astype(np.int32), dist=dist.astype(np.float32))
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


def write_meta(pseudo_dir: str | os.PathLike[str], round: int, teacher_step: int, k: int, **extra: Any) -> Path:
    return atomic_write_json(
        Path(pseudo_dir) / META_FILE, {"round": round, "teacher_step": teacher_step, "k": k, **extra}
    )


def read_meta(pseudo_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(pseudo_dir) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: a pseudo-label dir carries meta.json (round, teacher_step, k)")
    return json.loads(path.read_text())
