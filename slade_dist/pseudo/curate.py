"""The "curate" stage: the unlabeled pool checked once, before anything reads it.

Runs first in the chain when `curate.enabled` (stages.pipeline_plan); every round's cluster stage
then uses only the samples it keeps (data/curation.py), and so does the student drawing from the
clusters. What it does:
1. **Decontamination**: a pool image that is a copy of an image of a test set (data.test_shards,
   data.query_shards, data.gallery_shards: each one set) is removed, and so is one whose bytes
   equal a test image's (blake2b; `curate.hash_check`).
2. **Near-duplicate groups** among the images left: copies of one another are joined (connected
   components); the group's first row in shard order stays, the others are removed.
3. **Balance** is the cluster stage's (pseudo/cluster.py: `curate.cluster_cap`, the collapse warning).
How a copy is found (data/copies.py): each image gets a signature (a colour histogram and a
grayscale thumbnail). FAISS finds each image's `candidates` nearest by histogram (exact inner
product; on a GPU where faiss-gpu sees one); a candidate within `candidate_radius` gets the pixel
check (`copy_score`: gradient maps correlated over the crops, scales and rotations of the copy
ranges), and a score from `match_threshold` makes it a copy. Not the teacher embedding: a
metric-learning embedding puts every image of a class together by design, so it cannot tell a copy
of a test image from another photo of its class (measured on the demo, docs/SCALING.md), and a
check on pixels needs no teacher, so the pool is curated once, before pretrain.
**Calibration** (calibration.json, rank 0): `calibration_images` test images each get one edited
copy (data/copies.make_copy within the `curate.copy_*` ranges). The radius keeps the
`copy_quantile` of copy-to-original histogram distances; the match threshold keeps the
`copy_quantile` of their scores and, when distinct test images' candidate pairs leave room, is
raised halfway to the score only `distinct_quantile` of those pairs reach; when the two overlap a
WARNING gives the expected false-positive share. Values set in the config are used as given.
Near-duplicates inside the pool: the histograms are split into coarse cells (k-means through
cluster.coarse_cells, about `dedup_cell_size` images each); each rank owns a range of cells and
searches inside each; an image is also sent to every other of its `dedup_probe` nearest cells whose
centroid lies within (nearest centroid distance + 2 x radius): by the triangle inequality, every
cell that can hold a candidate within the radius (`unresolved_borders` counts images whose last
probed cell still qualifies).
Distributed and resumable like embed: the per-shard scan (signatures, same-bytes test row, the
decontamination check: `scan-%06d.npz`) is done by the rank owning the shard and kept for a rerun
with the same test sets and thresholds (`scan.json`).
Outputs (<run>/curate/): `cur-%06d.npz` + `curate.json` (format: data/curation.py, what the
cluster stage reads), `decontaminated.tsv` (every removed-for-test image, its score and the test
image it copies), `calibration.json`, `duplicates.npy`, TensorBoard `tb/curate`.
Tests: tests/unit/test_curate.py, tests/integration/test_curate_multirank.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import dist
from ..config import Config
from ..data.copies import HIST_DIM, THUMB, CopyEdits, copy_score, make_copy, signature
from ..data.curation import (
    DUPLICATE,
    KEPT,
    NEAR_TEST,
    REASONS,
    SAME_BYTES,
    SUMMARY_FILE,
    UNREADABLE,
    decisions_path,
    key_ids,
    write_decisions,
)
from ..data.pseudo_index import owner_bounds
from ..data.shards import shard_index, shard_paths
from ..data.tars import TarSamples, image_bytes
from ..fileio import atomic_write_json, atomic_write_text, explained_writes
from ..provenance import shard_dir_id
from ..stages import RunLayout
from ..tb import TBWriter
from .cluster import coarse_cells, send_rows_to_owners

__all__ = [
    "run",
    "test_set_dirs",
    "shard_signatures",
    "choose_thresholds",
    "unit_distances",
    "duplicate_groups",
    "cell_targets",
]

TEST_SETS = ("test", "query", "gallery")  # data.<name>_shards, in this order
FINGERPRINT_FILE = "scan.json"
CALIBRATION_FILE = "calibration.json"
REMOVED_FILE = "decontaminated.tsv"
DUPLICATES_FILE = "duplicates.npy"
CELL_KMEANS_MIN = 2  # fewer cells than this: one cell, no k-means
DUP = np.dtype([("row", "<i8"), ("rep", "<i8")])  # duplicates.npy: a grouped pool row and its representative
QUANTILES = (0.0, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.995, 0.998, 0.999, 1.0)


# ------------------------------------------------------------------------------------ search
def unit_distances(sim: np.ndarray) -> np.ndarray:
    """Euclidean distance between unit vectors from their inner product."""
    return np.sqrt(np.clip(2.0 - 2.0 * sim, 0.0, 4.0)).astype(np.float32)


class _Flat:
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


# -------------------------------------------------------------------------------- signatures
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
            rows.append((False, b"\0" * 16, np.zeros(HIST_DIM, np.float32), np.zeros((THUMB, THUMB), np.uint8), (0, 0)))
    n = len(keys)
    return {
        "keys": np.array(keys, dtype=str),
        "key_id": key_ids(keys),
        "readable": np.array([r[0] for r in rows], dtype=bool),
        "digest": np.frombuffer(b"".join(r[1] for r in rows), dtype=np.uint8).reshape(n, 16),
        "hist": np.array([r[2] for r in rows], dtype=np.float16).reshape(n, HIST_DIM),
        "thumb": np.array([r[3] for r in rows], dtype=np.uint8).reshape(n, THUMB, THUMB),
        "shape": np.array([r[4] for r in rows], dtype=np.uint8).reshape(n, 2),
    }


def _cut(thumb: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    return thumb[: int(shape[0]), : int(shape[1])]


def _hist(x: np.ndarray) -> np.ndarray:
    """float32 unit rows (histograms are stored in float16)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ------------------------------------------------------------------------------- test sets
def test_set_dirs(cfg: Config) -> dict[str, str]:
    """{set name: shard dir} of every test set the config names (each one is checked against)."""
    return {name: getattr(cfg.data, f"{name}_shards") for name in TEST_SETS if getattr(cfg.data, f"{name}_shards")}


@dataclass
class TestImages:
    names: list[str]  # test set names
    set_of: np.ndarray  # (T,) index into names
    shards: list[Path]  # the test sets' tars
    shard_of: np.ndarray  # (T,) index into shards (keys repeat across sets: query and gallery)
    keys: list[str]
    sig: dict[str, np.ndarray]  # readable test images' signatures, sets concatenated (shard, tar order)
    digest_row: dict[bytes, int]  # image digest -> first test row with those bytes
    byte_twin: np.ndarray  # (T,) the first row with the same bytes (the row itself if none)
    unreadable: int

    @property
    def hist(self) -> np.ndarray:
        return _hist(self.sig["hist"])

    def thumb(self, row: int) -> np.ndarray:
        return _cut(self.sig["thumb"][row], self.sig["shape"][row])


def _test_images(sets: dict[str, str]) -> TestImages:
    """Each rank signs its share of the test sets' shards; every rank gets all of them."""
    jobs = [(s, p) for s, d in enumerate(sets.values()) for p in shard_paths(d)]
    if not jobs:
        raise _no_test_images(sets)
    mine = {i: shard_signatures(p) for i, (_, p) in list(enumerate(jobs))[dist.rank() :: dist.world_size()]}
    parts: dict[int, dict[str, np.ndarray]] = {}
    for part in dist.all_gather_object(mine):
        parts.update(part)
    sigs = [parts[i] for i in range(len(jobs))]
    ok = [s["readable"] for s in sigs]
    sig = {k: np.concatenate([s[k][m] for s, m in zip(sigs, ok)]) for k in ("keys", "digest", "hist", "thumb", "shape")}
    set_of = np.concatenate([np.full(int(m.sum()), s, np.int64) for (s, _), m in zip(jobs, ok)])
    shard_of = np.concatenate([np.full(int(m.sum()), i, np.int64) for i, m in enumerate(ok)])
    keys = [str(k) for k in sig["keys"]]
    if not keys:
        raise _no_test_images(sets)
    digest_row: dict[bytes, int] = {}
    twin = np.arange(len(keys))
    for row, d in enumerate(sig["digest"]):
        twin[row] = digest_row.setdefault(d.tobytes(), row)
    unreadable = int(sum((~m).sum() for m in ok))
    shards = [p for _, p in jobs]
    return TestImages(list(sets), set_of, shards, shard_of, keys, sig, digest_row, twin, unreadable)


def _no_test_images(sets: dict[str, str]) -> ValueError:
    return ValueError(
        f"curate: the test sets ({', '.join(f'{n}: {d}' for n, d in sets.items())}) hold no readable image: "
        f"nothing to decontaminate against; point data.test_shards (or query / gallery) at the evaluation "
        f"images, or set curate.enabled=false"
    )


# ------------------------------------------------------------------------------ calibration
def choose_thresholds(
    copy_dist: np.ndarray, copy_scores: np.ndarray, distinct_scores: np.ndarray, copy_q: float, distinct_q: float
) -> dict[str, Any]:
    """Radius: keeps copy_q of the copies' histogram distances. Match threshold: keeps copy_q of the
    copies' scores; raised halfway to the score only distinct_q of the distinct pairs reach when
    that lies above, else (`overlap`) the copy quantile alone."""
    if len(copy_scores) == 0:
        raise ValueError("curate: the calibration has no copies (too few readable test images?)")
    radius = float(np.quantile(copy_dist, copy_q))
    t_copy = float(np.quantile(copy_scores, 1.0 - copy_q))
    t_distinct = float(np.quantile(distinct_scores, 1.0 - distinct_q)) if len(distinct_scores) else -1.0
    overlap = t_distinct >= t_copy
    t = t_copy if overlap else (t_copy + t_distinct) / 2
    return {
        "candidate_radius": radius,
        "match_threshold": t,
        "copy_quantile_score": t_copy,
        "distinct_quantile_score": t_distinct,
        "overlap": overlap,
    }


def _describe(x: np.ndarray) -> dict[str, Any]:
    if len(x) == 0:
        return {"n": 0}
    hist, edges = np.histogram(x, bins=40, range=(float(x.min()), max(float(x.max()), float(x.min()) + 1e-6)))
    return {
        "n": int(len(x)),
        "quantiles": {str(q): round(float(np.quantile(x, q)), 5) for q in QUANTILES},
        "histogram": {"edges": [round(float(e), 5) for e in edges], "counts": hist.tolist()},
    }


def _edits(cfg: Config) -> CopyEdits:
    c = cfg.curate
    return CopyEdits(
        min_area=c.copy_min_area,
        max_rotation=c.copy_max_rotation,
        min_scale=c.copy_min_scale,
        max_scale=c.copy_max_scale,
        min_quality=c.copy_min_quality,
    )


class _Check:
    """The copy decision of a candidate pair: within the radius, then the pixel check."""

    def __init__(self, radius: float, threshold: float, cfg: Config) -> None:
        self.radius, self.threshold = radius, threshold
        self.min_area, self.max_rotation = cfg.curate.copy_min_area, cfg.curate.copy_max_rotation
        self.checked = 0

    def score(self, a: np.ndarray, b: np.ndarray, stop: bool = True) -> float:
        self.checked += 1
        return copy_score(a, b, self.min_area, self.max_rotation, self.threshold if stop else 2.0)


def _calibrate(tests: TestImages, out_dir: Path, cfg: Config) -> dict[str, Any]:
    """Rank 0 measures copies and distinct pairs and picks the thresholds; every rank gets them."""
    report = _calibration_report(tests, out_dir, cfg) if dist.is_main() else None
    report = dist.broadcast_object(report)
    if report["calibrated"]["overlap"] and report["match_threshold_source"] == "calibrated" and dist.is_main():
        c = report["calibrated"]
        dist.get_logger().warning(
            f"[curate] copies and distinct test images overlap: the score {1 - cfg.curate.copy_quantile:.3g} of the "
            f"copies stay under ({c['copy_quantile_score']:.4f}) is below the one {cfg.curate.distinct_quantile:.3g} "
            f"of distinct candidate pairs reach ({c['distinct_quantile_score']:.4f}); at threshold "
            f"{report['match_threshold']:.4f} {report['estimates']['distinct_flagged_share']:.2%} of distinct test "
            f"images would be flagged (calibration.json)"
        )
    return report


def _calibration_report(tests: TestImages, out_dir: Path, cfg: Config) -> dict[str, Any]:
    c = cfg.curate
    rng = np.random.default_rng([c.seed, 1])
    rows = np.sort(rng.choice(len(tests.keys), min(c.calibration_images, len(tests.keys)), replace=False))
    copies, edits = _copies(tests, rows, cfg, rng)
    index = _Flat(tests.hist)
    probe = _Check(2.0, 2.0, cfg)
    copy_dist = np.linalg.norm(_hist(copies["hist"]) - tests.hist[rows], axis=1)
    copy_scores = np.array(
        [
            probe.score(_cut(t, s), tests.thumb(int(r)), stop=False)
            for t, s, r in zip(copies["thumb"], copies["shape"], rows)
        ]
    )
    queries = np.sort(rng.choice(len(tests.keys), min(2 * c.calibration_images, len(tests.keys)), replace=False))
    loose = float(np.quantile(copy_dist, c.copy_quantile)) if c.candidate_radius is None else c.candidate_radius
    distinct, distinct_best = _distinct_scores(tests, index, queries, loose, probe, c.candidates)
    cal = choose_thresholds(copy_dist, copy_scores, distinct, c.copy_quantile, c.distinct_quantile)
    radius = c.candidate_radius if c.candidate_radius is not None else cal["candidate_radius"]
    threshold = c.match_threshold if c.match_threshold is not None else cal["match_threshold"]
    found = _retrieved(index, _hist(copies["hist"]), rows, c.candidates)
    report = {
        "rule": (
            f"candidate radius = the {c.copy_quantile} quantile of copy-to-original colour-histogram distances; "
            f"match threshold = the score all but {1 - c.copy_quantile:.3g} of copies reach, raised halfway to the "
            f"score only {c.distinct_quantile} of distinct test-image candidate pairs reach when that lies above "
            f"(else the copy quantile alone, with a warning). A pool image is a copy of a test image when one of its "
            f"{c.candidates} nearest test images by histogram lies within the radius and scores >= the threshold"
        ),
        "candidate_radius": float(radius),
        "candidate_radius_source": "config" if c.candidate_radius is not None else "calibrated",
        "match_threshold": float(threshold),
        "match_threshold_source": "config" if c.match_threshold is not None else "calibrated",
        "calibrated": cal,
        "estimates": {
            "copy_recall": float(np.mean(found & (copy_dist <= radius) & (copy_scores >= threshold))),
            "copy_original_among_candidates": float(np.mean(found)),
            "distinct_flagged_share": float(np.mean(distinct_best >= threshold)) if len(distinct_best) else 0.0,
        },
        "copies": {
            "histogram_distance": _describe(copy_dist),
            "score": _describe(copy_scores),
            "edits": vars(_edits(cfg)),
            "examples": edits[:20],
        },
        "distinct": {
            "score": _describe(distinct),
            "what": (
                f"pixel-check scores of {len(queries)} test images against their candidates among the other test "
                f"images (other bytes, within the radius): the hardest distinct pairs the check meets"
            ),
        },
        "test_images": len(tests.keys),
    }
    atomic_write_json(out_dir / CALIBRATION_FILE, report, indent=1)
    return report


def _copies(
    tests: TestImages, rows: np.ndarray, cfg: Config, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], list[str]]:
    """One edited copy of each chosen test image, read again from its tar, and its signature."""
    wanted: dict[int, dict[str, int]] = {}
    for r in rows:
        wanted.setdefault(int(tests.shard_of[r]), {})[tests.keys[int(r)]] = int(r)
    made: dict[int, tuple] = {}
    for i in sorted(wanted):
        for sample in TarSamples(tests.shards[i]):
            r = wanted[i].get(sample.get("__key__", ""))
            if r is not None and r not in made:
                data, edit = make_copy(image_bytes(sample), rng, _edits(cfg))
                made[r] = (*signature(data), edit)
    order = [int(r) for r in rows]
    return {
        "hist": np.array([made[r][0] for r in order], np.float32),
        "thumb": np.array([made[r][1] for r in order], np.uint8),
        "shape": np.array([made[r][2] for r in order], np.uint8),
    }, [made[r][3] for r in order]


def _distinct_scores(
    tests: TestImages, index: _Flat, queries: np.ndarray, radius: float, check: _Check, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Scores of each query test image against its candidates among the OTHER test images (other
    bytes, within the radius), and each query's best score (-1 without a candidate)."""
    d, nn = index.search(tests.hist[queries], k + 1)
    scores, best = [], []
    for q, ds, ns in zip(queries, d, nn):
        top = -1.0
        for dj, j in zip(ds, ns):
            if j < 0 or dj > radius or tests.byte_twin[j] == tests.byte_twin[q]:
                continue
            s = check.score(tests.thumb(int(q)), tests.thumb(int(j)), stop=False)
            scores.append(s)
            top = max(top, s)
        best.append(top)
    return np.asarray(scores, np.float32), np.asarray(best, np.float32)


def _retrieved(index: _Flat, hists: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Whether each copy's original is among its k nearest test images by histogram."""
    _, nn = index.search(hists, k)
    return (nn == rows[:, None]).any(axis=1)


# ------------------------------------------------------------------------------------- scan
def _scan_path(out_dir: Path, shard: Path) -> Path:
    return out_dir / f"scan-{shard_index(shard):06d}.npz"


def _scan_shard(
    shard: Path, out_dir: Path, tests: TestImages, index: _Flat, check: _Check, cfg: Config
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
    ok = np.flatnonzero(scan["readable"])
    if cfg.curate.hash_check:
        same[ok] = [tests.digest_row.get(scan["digest"][i].tobytes(), -1) for i in ok]
    d, nn = index.search(_hist(scan["hist"][ok]), cfg.curate.candidates)
    for i, ds, ns in zip(ok, d, nn):
        if same[i] < 0:  # same bytes already decide it
            copy_of[i], best[i] = _first_copy(_cut(scan["thumb"][i], scan["shape"][i]), ds, ns, tests, check)
    scan.update(same_row=same, copy_row=copy_of, test_score=best)
    _save(path, scan)
    return scan


def _first_copy(
    thumb: np.ndarray, dists: np.ndarray, rows: np.ndarray, tests: TestImages, check: _Check
) -> tuple[int, float]:
    """(the first candidate test row it is a copy of or -1, the best score seen) over candidates
    in order of histogram distance, those within the radius only."""
    best = -1.0
    for d, j in zip(dists, rows):
        if j < 0 or d > check.radius:
            continue
        best = max(best, check.score(thumb, tests.thumb(int(j))))
        if best >= check.threshold:
            return int(j), best
    return -1, best


def _save(path: Path, arrays: dict[str, np.ndarray] | np.ndarray) -> None:
    """An .npz of arrays (or an .npy of one), atomically."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    with explained_writes(path):
        if isinstance(arrays, dict):
            np.savez(tmp, **arrays)
        else:
            np.save(tmp, arrays)
        tmp.replace(path)


# --------------------------------------------------------------------------- near-duplicates
def cell_targets(cd: np.ndarray, cells: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each point must be searched: (point index, cell) for its nearest cell and every probed
    cell whose centroid lies within (nearest centroid distance + 2 x radius), and a mask of the
    points whose last probed cell still qualifies (a candidate could sit in a cell not probed).
    cd, cells: (n, probe) centroid distances (ascending) and cell ids."""
    within = cd <= cd[:, :1] + 2 * radius + 1e-6
    within[:, 0] = True
    i, j = np.nonzero(within)
    unresolved = within[:, -1] if cd.shape[1] > 1 else np.zeros(len(cd), bool)
    return i, cells[i, j], unresolved


def duplicate_groups(pairs: np.ndarray) -> np.ndarray:
    """DUP rows (row, rep) of every pool row in a pair: connected components of the pairs, each
    represented by its smallest row (the first in shard order), sorted by row."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(pairs) == 0:
        return np.zeros(0, DUP)
    nodes, compact = np.unique(np.asarray(pairs).reshape(-1), return_inverse=True)
    compact = compact.reshape(-1, 2)
    graph = coo_matrix((np.ones(len(compact), np.int8), (compact[:, 0], compact[:, 1])), shape=(len(nodes),) * 2)
    _, label = connected_components(graph, directed=False)
    rep = np.full(int(label.max()) + 1, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(rep, label, nodes)  # the first row of each component
    out = np.empty(len(nodes), DUP)
    out["row"], out["rep"] = nodes, rep[label]
    return out


def _cell_pairs(rows: np.ndarray, check: _Check, k: int) -> tuple[np.ndarray, int]:
    """Copy pairs (row a < row b) among the rows of ONE cell, and the candidate pairs checked."""
    if len(rows) < 2:
        return np.zeros((0, 2), np.int64), 0
    d, nn = _Flat(_hist(rows["hist"])).search(_hist(rows["hist"]), k + 1)
    i, j = np.nonzero((d <= check.radius) & (nn >= 0))
    a, b = rows["row"][i], rows["row"][nn[i, j]]
    keep = a != b  # an image meets itself (and only once per cell: each cell gets it once)
    cand = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1)[keep], axis=0)
    pos = {int(r): p for p, r in enumerate(rows["row"])}
    copies = [
        (x, y)
        for x, y in cand
        if check.score(
            _cut(rows["thumb"][pos[x]], rows["shape"][pos[x]]), _cut(rows["thumb"][pos[y]], rows["shape"][pos[y]])
        )
        >= check.threshold
    ]
    return np.array(copies, np.int64).reshape(-1, 2), len(cand)


def _row_dtype() -> np.dtype:
    """What a rank sends of a pool image to the owner of a cell: enough to search and check it."""
    return np.dtype(
        [
            ("row", "<i8"),
            ("cell", "<i4"),
            ("hist", "<f2", (HIST_DIM,)),
            ("thumb", "u1", (THUMB, THUMB)),
            ("shape", "u1", (2,)),
        ]
    )


def _near_duplicates(pool: list[_Shard], check: _Check, out_dir: Path, cfg: Config) -> dict[str, Any]:
    """Group the copies among the rows left after decontamination (collective); writes
    duplicates.npy and returns its facts."""
    n_cand = int(_sum(sum(int(s.candidates.sum()) for s in pool)))
    cells, centroids = _cells(pool, n_cand, cfg)
    mine, unresolved = _rows_for_cells(pool, centroids, min(cfg.curate.dedup_probe, cells), check.radius)
    bounds = owner_bounds(cells, dist.world_size())
    got = send_rows_to_owners(mine, np.searchsorted(bounds, mine["cell"], side="right") - 1)
    pairs, checked = _search_my_cells(got, bounds, check, cfg.curate.candidates)
    _save(out_dir / f"pairs-{dist.rank():05d}.npy", pairs)
    dist.barrier()
    facts = _groups_on_rank0(out_dir) if dist.is_main() else None
    facts = dist.broadcast_object(facts)
    facts.update(
        cells=cells,
        candidates=n_cand,
        rows_sent=int(_sum(len(mine))),
        pairs_checked=int(_sum(checked)),
        unresolved_borders=int(_sum(unresolved)),
    )
    return facts


def _cells(pool: list[_Shard], n_cand: int, cfg: Config) -> tuple[int, np.ndarray | None]:
    """(cells, their centroids) of the candidates' histograms: about dedup_cell_size images each
    (k-means through the cluster stage's entry, collective); one cell needs no centroids."""
    cells = max(1, round(n_cand / cfg.curate.dedup_cell_size))
    if cells < CELL_KMEANS_MIN:
        return 1, None
    return cells, _hist(coarse_cells({s.pos: s.scan["hist"][s.candidates] for s in pool}, cells, cfg))


def _rows_for_cells(
    pool: list[_Shard], centroids: np.ndarray | None, probe: int, radius: float
) -> tuple[np.ndarray, int]:
    """This rank's candidates as rows, one per cell each must be searched in (cell_targets), and
    how many have a probed cell still within reach at the end of their probe list."""
    index = _Flat(centroids) if centroids is not None else None
    sent, unresolved = [np.zeros(0, _row_dtype())], 0
    for s in pool:
        src = np.flatnonzero(s.candidates)
        if index is None:
            i, cell = np.arange(len(src)), np.zeros(len(src), np.int64)
        else:
            i, cell, unres = cell_targets(*index.search(_hist(s.scan["hist"][src]), probe), radius)
            unresolved += int(unres.sum()) if probe < index.n else 0
        rows = np.empty(len(i), _row_dtype())
        rows["row"], rows["cell"] = s.first + src[i], cell
        for field in ("hist", "thumb", "shape"):
            rows[field] = s.scan[field][src[i]]
        sent.append(rows)
    return np.concatenate(sent), unresolved


def _search_my_cells(got: np.ndarray, bounds: np.ndarray, check: _Check, k: int) -> tuple[np.ndarray, int]:
    """Copy pairs inside every cell this rank owns, and the candidate pairs checked."""
    got = got[np.argsort(got["cell"], kind="stable")]
    starts = np.searchsorted(got["cell"], np.arange(bounds[dist.rank()], bounds[dist.rank() + 1] + 1))
    pairs, checked = [np.zeros((0, 2), np.int64)], 0
    for a, b in zip(starts[:-1], starts[1:]):
        p, n = _cell_pairs(got[a:b], check, k)
        pairs.append(p)
        checked += n
    return np.unique(np.concatenate(pairs), axis=0).astype(np.int64), checked


def _groups_on_rank0(out_dir: Path) -> dict[str, Any]:
    """Rank 0: components of every rank's pairs -> duplicates.npy (read back by every rank)."""
    files = sorted(out_dir.glob("pairs-*.npy"))
    pairs = np.unique(np.concatenate([np.load(f) for f in files]), axis=0) if files else np.zeros((0, 2), np.int64)
    dup = duplicate_groups(pairs)
    _save(out_dir / DUPLICATES_FILE, dup)
    sizes = np.unique(dup["rep"], return_counts=True)[1] if len(dup) else np.zeros(0, np.int64)
    return {
        "copy_pairs": int(len(pairs)),
        "groups": int(len(sizes)),
        "grouped_images": int(sizes.sum()),
        "removed": int(sizes.sum() - len(sizes)),
        "largest_group": int(sizes.max()) if len(sizes) else 0,
        "group_sizes": {str(k): int(v) for k, v in zip(*np.unique(sizes, return_counts=True))},
    }


def _groups_of(s: _Shard, dup: np.ndarray) -> np.ndarray:
    """Representative row of each of the shard's rows (-1 outside any group)."""
    group = np.full(s.n, -1, np.int64)
    lo, hi = np.searchsorted(dup["row"], [s.first, s.first + s.n])
    group[dup["row"][lo:hi] - s.first] = dup["rep"][lo:hi]
    return group


# ------------------------------------------------------------------------------------ stage
@dataclass
class _Shard:
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


def _sum_counts(counts: np.ndarray) -> np.ndarray:
    """Counts summed over ranks (float64 on the wire: exact to 2^53)."""
    t = torch.from_numpy(np.asarray(counts, dtype=np.float64))
    if dist.is_dist() and torch.distributed.get_backend() == "nccl":
        t = dist.all_reduce_sum(t.to(dist.device())).cpu()
    else:
        t = dist.all_reduce_sum(t)
    return t.numpy().round().astype(np.int64)


def _sum(v: int) -> int:
    return int(_sum_counts(np.array([v]))[0])


def _unlabeled_shards(cfg: Config) -> list[Path]:
    if not cfg.data.unlabeled_shards:
        raise ValueError("data.unlabeled_shards must be set for the curate stage")
    shards = shard_paths(cfg.data.unlabeled_shards)
    if not shards:
        raise ValueError(f"no shards listed in {cfg.data.unlabeled_shards}/index.json")
    return shards


def _test_sets(cfg: Config) -> dict[str, str]:
    sets = test_set_dirs(cfg)
    if not sets:
        raise ValueError(
            "curate: no test set to decontaminate against: set data.test_shards (or data.query_shards / "
            "data.gallery_shards), or curate.enabled=false"
        )
    return sets


def _reset(out_dir: Path, fingerprint: dict[str, Any]) -> None:
    """Rank 0, at start: the completion mark and the global steps' files always go; the per-shard
    scans stay only when made against these test sets with these thresholds and ranges."""
    for name in (SUMMARY_FILE, DUPLICATES_FILE):
        (out_dir / name).unlink(missing_ok=True)
    for p in out_dir.glob("pairs-*.npy"):
        p.unlink()
    try:
        same = json.loads((out_dir / FINGERPRINT_FILE).read_text()) == json.loads(json.dumps(fingerprint))
    except (FileNotFoundError, json.JSONDecodeError):
        same = False
    if not same:
        for p in [*out_dir.glob("scan-*.npz"), *out_dir.glob("cur-*.npz")]:
            p.unlink()
        atomic_write_json(out_dir / FINGERPRINT_FILE, fingerprint)


def run(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Curate the unlabeled pool; every rank calls it (collectives inside)."""
    t0 = time.time()
    layout = RunLayout(run_dir)
    out_dir = layout.stage_dir("curate")
    shards = _unlabeled_shards(cfg)
    sets = _test_sets(cfg)
    if dist.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
    tests = _test_images(sets)
    report = _calibrate(tests, out_dir, cfg)
    check = _Check(report["candidate_radius"], report["match_threshold"], cfg)
    fingerprint = {
        "tests": {name: shard_dir_id(d) for name, d in sets.items()},
        "shards": [p.name for p in shards],
        "check": [check.radius, check.threshold, check.min_area, check.max_rotation, cfg.curate.candidates],
        "hash_check": cfg.curate.hash_check,
    }
    if dist.is_main():
        _reset(out_dir, fingerprint)
    dist.barrier()
    t_scan = time.time()
    pool = _scan_pool(shards, out_dir, tests, check, cfg)
    t_scan = time.time() - t_scan
    t_dedup = time.time()
    groups: dict[str, Any] = {"enabled": False}
    dup = np.zeros(0, DUP)
    if cfg.curate.dedup:
        groups = {"enabled": True, **_near_duplicates(pool, check, out_dir, cfg)}
        dup = np.load(out_dir / DUPLICATES_FILE)
    t_dedup = time.time() - t_dedup
    removed_rows, counts = _write_decisions(pool, dup, tests, out_dir)
    summary = _summary(cfg, tests, report, groups, counts, len(shards))
    summary["pixel_checks"] = int(_sum(check.checked))
    summary["seconds"] = {"scan": round(t_scan, 2), "dedup": round(t_dedup, 2), "total": round(time.time() - t0, 2)}
    if dist.is_main():
        _write_removed_list(out_dir, removed_rows)
        _tensorboard(layout.tb_dir("curate"), report, summary)
        atomic_write_json(out_dir / SUMMARY_FILE, {**summary, "token": f"{time.time_ns()}-{os.getpid()}"}, indent=1)
    dist.barrier()
    dist.get_logger().info(_closing_line(summary))
    return summary


def _scan_pool(shards: list[Path], out_dir: Path, tests: TestImages, check: _Check, cfg: Config) -> list[_Shard]:
    """This rank's shards, scanned (or read back), with pool rows numbered across all ranks."""
    index = _Flat(tests.hist)
    mine = [(pos, p) for pos, p in enumerate(shards)][dist.rank() :: dist.world_size()]
    scans = {pos: _scan_shard(p, out_dir, tests, index, check, cfg) for pos, p in mine}
    every: dict[int, int] = {}
    for part in dist.all_gather_object({pos: len(s["keys"]) for pos, s in scans.items()}):
        every.update(part)
    firsts = np.concatenate([[0], np.cumsum([every[i] for i in range(len(shards))])])
    return [_Shard(p, pos, int(firsts[pos]), scans[pos], _decontaminated(scans[pos], cfg)) for pos, p in mine]


def _decontaminated(scan: dict[str, np.ndarray], cfg: Config) -> np.ndarray:
    """Reason code per sample: SAME_BYTES, NEAR_TEST, UNREADABLE or KEPT."""
    reason = np.where(scan["readable"], KEPT, UNREADABLE).astype(np.uint8)
    if cfg.curate.decontaminate:
        reason[scan["copy_row"] >= 0] = NEAR_TEST
        reason[scan["same_row"] >= 0] = SAME_BYTES
    return reason


def _write_decisions(
    pool: list[_Shard], dup: np.ndarray, tests: TestImages, out_dir: Path
) -> tuple[list[tuple], dict[str, Any]]:
    """Each rank writes its shards' cur-%06d.npz; returns the removed-for-test rows (gathered) and
    the counts summed over ranks."""
    rows: list[tuple] = []
    codes = (KEPT, NEAR_TEST, SAME_BYTES, DUPLICATE, UNREADABLE)
    totals = np.zeros(1 + len(codes), np.int64)  # pool, then one count per code
    per_set = np.zeros((len(tests.names), 2), np.int64)  # per test set: copies (pixel check), same bytes
    for s in pool:
        reason = s.reason.copy()
        group = _groups_of(s, dup)
        reason[(reason == KEPT) & (group >= 0) & (group != s.first + np.arange(s.n))] = DUPLICATE
        write_decisions(decisions_path(out_dir, s.path), s.scan["key_id"], reason, group, s.scan["test_score"])
        totals += [s.n, *((reason == code).sum() for code in codes)]
        for i in np.flatnonzero(np.isin(reason, (NEAR_TEST, SAME_BYTES))):
            same = reason[i] == SAME_BYTES
            t_row = int(s.scan["same_row"][i] if same else s.scan["copy_row"][i])
            per_set[tests.set_of[t_row], int(same)] += 1
            rows.append((s.path.name, str(s.scan["keys"][i]), REASONS[int(reason[i])],
                         1.0 if same else float(s.scan["test_score"][i]),
                         tests.names[int(tests.set_of[t_row])], tests.keys[t_row]))  # fmt: skip
    totals, per_set = _sum_counts(totals), _sum_counts(per_set)
    counts = dict(zip(("pool", "kept", "near_test", "same_bytes", "duplicates", "unreadable"), map(int, totals)))
    counts["per_test_set"] = {
        name: {
            "images": int((tests.set_of == j).sum()),
            "removed": int(per_set[j].sum()),
            "copies": int(per_set[j, 0]),
            "same_bytes": int(per_set[j, 1]),
        }
        for j, name in enumerate(tests.names)
    }
    return sorted(row for part in dist.all_gather_object(rows) for row in part), counts


def _summary(
    cfg: Config,
    tests: TestImages,
    report: dict[str, Any],
    groups: dict[str, Any],
    counts: dict[str, Any],
    n_shards: int,
) -> dict[str, Any]:
    return {
        "pool": counts["pool"],
        "kept": counts["kept"],
        "removed": {k: counts[k] for k in ("near_test", "same_bytes", "duplicates")},
        "unreadable": counts["unreadable"],
        "per_test_set": counts["per_test_set"],
        "decontaminate": cfg.curate.decontaminate,
        "candidate_radius": report["candidate_radius"],
        "match_threshold": report["match_threshold"],
        "thresholds_source": {k: report[f"{k}_source"] for k in ("candidate_radius", "match_threshold")},
        "calibration": report["estimates"],
        "duplicate_groups": groups,
        "shards": n_shards,
        "world_size": dist.world_size(),
        "data": {
            "images_read": counts["pool"],
            "unreadable": counts["unreadable"],
            "test_images": len(tests.keys),
            "test_images_unreadable": tests.unreadable,
            "removed_for_tests": counts["near_test"] + counts["same_bytes"],
            "removed_duplicates": counts["duplicates"],
        },
    }


def _write_removed_list(out_dir: Path, rows: list[tuple]) -> None:
    head = "shard\tkey\treason\tscore\ttest_set\ttest_key\n"
    body = "".join(f"{a}\t{b}\t{c}\t{d:.4f}\t{e}\t{f}\n" for a, b, c, d, e, f in rows)
    atomic_write_text(out_dir / REMOVED_FILE, head + body)


def _tensorboard(tb_dir: Path, report: dict[str, Any], summary: dict[str, Any]) -> None:
    with TBWriter(tb_dir, enabled=True) as tb:
        tb.scalars(
            {
                "curate/candidate_radius": summary["candidate_radius"],
                "curate/match_threshold": summary["match_threshold"],
                "curate/removed_copies": summary["removed"]["near_test"],
                "curate/removed_same_bytes": summary["removed"]["same_bytes"],
                "curate/removed_duplicates": summary["removed"]["duplicates"],
                "curate/kept": summary["kept"],
                **{f"curate/calibration_{k}": v for k, v in summary["calibration"].items()},
            },
            0,
        )
        tb.text(
            "curate/calibration",
            "```\n" + json.dumps({k: report[k] for k in ("rule", "calibrated")}, indent=1) + "\n```",
        )


def _closing_line(s: dict[str, Any]) -> str:
    per_set = ", ".join(f"{n}: {v['removed']}" for n, v in s["per_test_set"].items())
    g = s["duplicate_groups"]
    dups = (
        f"{g['groups']} near-duplicate groups, {s['removed']['duplicates']} removed" if g.get("enabled") else "no dedup"
    )
    for_tests = s["removed"]["near_test"] + s["removed"]["same_bytes"]
    return (
        f"[curate] pool {s['pool']}, kept {s['kept']}; removed as copies of test images {for_tests} ({per_set}; "
        f"{s['removed']['same_bytes']} same bytes); {dups}; threshold {s['match_threshold']:.4f} within "
        f"{s['candidate_radius']:.4f}; {s['pixel_checks']} pixel checks"
    )
