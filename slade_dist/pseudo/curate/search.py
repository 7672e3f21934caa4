"""What the curate stage searches with: an image's signature, the exact FAISS index, rank totals.

Owns `shard_signatures` (every sample of a tar: key ids, readable or not, a blake2b digest of its
bytes, its copy signature of data/copies.py: a colour histogram and a colour thumbnail),
`FlatIndex` (exact inner-product kNN over unit rows; on a GPU where faiss-gpu sees one),
`unit_rows` / `unit_distances` / `cut` (the forms the rows are searched and checked in) and
`summed` (counts summed over ranks through dist.staged_all_reduce_sum).
Tests: tests/unit/test_curate.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ... import dist
from ...data.copies import HIST_DIM, THUMB, signature
from ...data.curation import key_ids
from ...data.tars import TarSamples, image_bytes


def unit_distances(sim: np.ndarray) -> np.ndarray:
    """Euclidean distance between unit vectors from their inner product."""
    return np.sqrt(np.clip(2.0 - 2.0 * sim, 0.0, 4.0)).astype(np.float32)


class FlatIndex:
    """Exact inner-product kNN over fixed unit rows (FAISS; on a GPU where faiss has one)."""

    def __init__(self, x: np.ndarray) -> None:
        import faiss  # here: importing the stage module must not need faiss (the launcher plans without it)

        index = faiss.IndexFlatIP(int(x.shape[1]))
        index.add(np.ascontiguousarray(x, dtype=np.float32))
        if dist.faiss_gpu_count() > 0:
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, dist.local_rank() % dist.faiss_gpu_count(), index)
        self.index, self.n = index, int(x.shape[0])

    def search(self, q: np.ndarray, k: int, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """(distances, rows) of the k nearest, k capped at n (and at 2048 by FAISS GPU)."""
        k = max(1, min(k, self.n, 2048))
        ds, rs = [np.zeros((0, k), np.float32)], [np.zeros((0, k), np.int64)]
        for s in range(0, len(q), chunk):
            sim, rows = self.index.search(np.ascontiguousarray(q[s : s + chunk], dtype=np.float32), k)
            ds.append(unit_distances(sim))
            rs.append(rows.astype(np.int64))
        return np.concatenate(ds), np.concatenate(rs)


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def shard_signatures(shard: Path) -> dict[str, np.ndarray]:
    """Every sample of a tar, in tar order: key ids, keys, whether its image decodes, its bytes'
    digest, its copy signature (colour histogram float16, thumbnail and thumbnail shape)."""
    keys: list[str] = []
    rows: list[tuple] = []
    for sample in TarSamples(shard):
        if "__key__" not in sample:
            continue
        keys.append(sample["__key__"])
        try:
            data = image_bytes(sample)
            hist, thumb, shape = signature(data)
            rows.append((True, _digest(data), hist, thumb, shape))
        except Exception:  # noqa: BLE001 (any undecodable image: PIL raises many types) counted as unreadable
            blank = np.zeros((THUMB, THUMB, 3), np.uint8)
            rows.append((False, b"\0" * 16, np.zeros(HIST_DIM, np.float32), blank, (0, 0)))
    n = len(keys)
    return {
        "keys": np.array(keys, dtype=str),
        "key_id": key_ids(keys),
        "readable": np.array([r[0] for r in rows], dtype=bool),
        "digest": np.frombuffer(b"".join(r[1] for r in rows), dtype=np.uint8).reshape(n, 16),
        "hist": np.array([r[2] for r in rows], dtype=np.float16).reshape(n, HIST_DIM),
        "thumb": np.array([r[3] for r in rows], dtype=np.uint8).reshape(n, THUMB, THUMB, 3),
        "shape": np.array([r[4] for r in rows], dtype=np.uint8).reshape(n, 2),
    }


def cut(thumb: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    return thumb[: int(shape[0]), : int(shape[1])]


def unit_rows(x: np.ndarray) -> np.ndarray:
    """float32 unit rows (histograms are stored in float16)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def summed(counts: np.ndarray) -> np.ndarray:
    """Counts summed over ranks (float64 on the wire: exact to 2^53; staged through the GPU under NCCL)."""
    t = torch.from_numpy(np.asarray(counts, dtype=np.float64).copy())
    return dist.staged_all_reduce_sum(t).numpy().round().astype(np.int64)


def summed_int(v: int) -> int:
    return int(summed(np.array([v]))[0])
