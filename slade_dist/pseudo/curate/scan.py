"""Decontamination: each unlabeled shard scanned once against the test images.

Owns `scan_pool`: the rank owning a shard (round-robin, as embed) signs each of its samples
(search.shard_signatures), looks its bytes up among the test images' (`curate.hash_check`) and
checks its `curate.candidates` nearest test images by colour histogram (FAISS) with the pixel check
(calibration.PairCheck); the scan (`scan-%06d.npz`: signatures, same-bytes test row, copied test
row, the best structure score and smallest colour difference seen) is written once
(fileio.atomic_path) and read back by a rerun with the same test sets and thresholds (the stage
checks `scan.json`). `PoolShard` is one scanned shard with its pool rows (numbered across all ranks
in index order) and its reason codes after decontamination (data/curation.py: KEPT, NEAR_TEST,
SAME_BYTES, UNREADABLE).
Tests: tests/unit/test_curate.py, tests/integration/test_curate_multirank.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ... import dist
from ...config import Config
from ...data.curation import KEPT, NEAR_TEST, SAME_BYTES, UNREADABLE
from ...data.shards import shard_index
from ...fileio import atomic_path
from ...progress import steps
from .calibration import PairCheck
from .references import TestImages
from .search import FlatIndex, cut, shard_signatures, unit_rows


@dataclass
class PoolShard:
    """One scanned unlabeled shard of this rank."""

    path: Path
    pos: int  # position in the unlabeled index
    first: int  # pool row of its first sample
    scan: dict[str, np.ndarray]
    reason: np.ndarray  # uint8 per sample after decontamination (KEPT, NEAR_TEST, SAME_BYTES, UNREADABLE)

    @property
    def n(self) -> int:
        return len(self.reason)

    @property
    def candidates(self) -> np.ndarray:
        return self.reason == KEPT


def scan_pool(shards: list[Path], out_dir: Path, tests: TestImages, check: PairCheck, cfg: Config) -> list[PoolShard]:
    """This rank's shards, scanned (or read back), with pool rows numbered across all ranks."""
    index = FlatIndex(tests.hist)
    mine = [(pos, p) for pos, p in enumerate(shards)][dist.rank() :: dist.world_size()]
    scans = {pos: _scan_shard(p, out_dir, tests, index, check, cfg) for pos, p in steps(mine, "curate scan")}
    every: dict[int, int] = {}
    for part in dist.all_gather_object({pos: len(s["keys"]) for pos, s in scans.items()}):
        every.update(part)
    firsts = np.concatenate([[0], np.cumsum([every[i] for i in range(len(shards))])])
    return [PoolShard(p, pos, int(firsts[pos]), scans[pos], _decontaminated(scans[pos], cfg)) for pos, p in mine]


def _decontaminated(scan: dict[str, np.ndarray], cfg: Config) -> np.ndarray:
    """Reason code per sample: SAME_BYTES, NEAR_TEST, UNREADABLE or KEPT."""
    reason = np.where(scan["readable"], KEPT, UNREADABLE).astype(np.uint8)
    if cfg.curate.decontaminate:
        reason[scan["copy_row"] >= 0] = NEAR_TEST
        reason[scan["same_row"] >= 0] = SAME_BYTES
    return reason


def _scan_path(out_dir: Path, shard: Path) -> Path:
    return out_dir / f"scan-{shard_index(shard):06d}.npz"


def _scan_shard(
    shard: Path, out_dir: Path, tests: TestImages, index: FlatIndex, check: PairCheck, cfg: Config
) -> dict[str, np.ndarray]:
    """Signatures of one unlabeled shard and its decontamination check: the test row whose bytes
    it has (-1 none) and the test row it is a copy of (-1 none) with the best score seen;
    written once, read back by a rerun with the same thresholds."""
    path = _scan_path(out_dir, shard)
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    scan = shard_signatures(shard)
    n = len(scan["keys"])
    same = np.full(n, -1, np.int64)
    copy_of = np.full(n, -1, np.int64)
    best = np.full(n, -1.0, np.float32)
    colour = np.full(n, 255.0, np.float32)
    ok = np.flatnonzero(scan["readable"])
    if cfg.curate.hash_check:
        same[ok] = [tests.digest_row.get(scan["digest"][i].tobytes(), -1) for i in ok]
    d, nn = index.search(unit_rows(scan["hist"][ok]), cfg.curate.candidates)
    for i, ds, ns in zip(ok, d, nn):
        if same[i] < 0:  # same bytes already decide it
            copy_of[i], best[i], colour[i] = _first_copy(cut(scan["thumb"][i], scan["shape"][i]), ds, ns, tests, check)
    scan.update(same_row=same, copy_row=copy_of, test_score=best, test_colour=colour)
    save_arrays(path, scan)
    return scan


def _first_copy(
    thumb: np.ndarray, dists: np.ndarray, rows: np.ndarray, tests: TestImages, check: PairCheck
) -> tuple[int, float, float]:
    """(the first candidate test row it is a copy of or -1, and that copy's structure score and
    colour difference, or the best of each seen) over candidates in order of histogram distance,
    those within the radius only."""
    best, colour = -1.0, 255.0
    for d, j in zip(dists, rows):
        if j < 0 or d > check.radius:
            continue
        m = check.match(thumb, tests.thumb(int(j)))
        if check.passes(m):
            return int(j), m.structure, m.colour
        best, colour = max(best, m.structure), min(colour, m.colour)
    return -1, best, colour


def save_arrays(path: Path, arrays: dict[str, np.ndarray] | np.ndarray) -> None:
    """An .npz of arrays (or an .npy of one), atomically."""
    with atomic_path(path) as tmp:
        if isinstance(arrays, dict):
            np.savez(tmp, **arrays)
        else:
            np.save(tmp, arrays)
