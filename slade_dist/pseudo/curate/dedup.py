"""Near-duplicate groups inside the pool (after decontamination): one representative each.

Owns `near_duplicates` (collective): the candidates' histograms are split into coarse cells
(`coarse_cells`: spherical k-means of pseudo/kmeans, about `curate.dedup_cell_size` images each);
each rank owns a range of cells (data/pseudo_index.owner_bounds) and receives their rows
(dist.all_to_all_records); inside each cell FAISS finds each image's `candidates` nearest within the
radius, the pixel check confirms copies. An image is also sent to every other of its `dedup_probe`
nearest cells whose centroid lies within (nearest centroid distance + 2 x radius): by the triangle
inequality, every cell that can hold a candidate within the radius (`cell_targets`;
`unresolved_borders` counts images whose last probed cell still qualifies). Rank 0 joins every
rank's pairs into connected components (`duplicate_groups`: the first row in shard order
represents its group) and writes `duplicates.npy`; `groups_of` reads a shard's rows out of it.
Tests: tests/unit/test_curate.py, tests/integration/test_curate_multirank.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from ... import dist
from ...config import Config
from ...data.copies import HIST_DIM, THUMB
from ...data.pseudo_index import owner_bounds
from ..kmeans import train_centroids
from .calibration import PairCheck
from .scan import PoolShard, save_arrays
from .search import FlatIndex, cut, summed_int, unit_rows

DUPLICATES_FILE = "duplicates.npy"
CELL_KMEANS_MIN = 2  # fewer cells than this: one cell, no k-means
DUP = np.dtype([("row", "<i8"), ("rep", "<i8")])  # duplicates.npy: a grouped pool row and its representative


def near_duplicates(pool: list[PoolShard], check: PairCheck, out_dir: Path, cfg: Config) -> dict[str, Any]:
    """Group the copies among the rows left after decontamination (collective); writes
    duplicates.npy and returns its facts."""
    n_cand = summed_int(sum(int(s.candidates.sum()) for s in pool))
    cells, centroids = _cells(pool, n_cand, cfg)
    mine, unresolved = _rows_for_cells(pool, centroids, min(cfg.curate.dedup_probe, cells), check.radius)
    bounds = owner_bounds(cells, dist.world_size())
    got = dist.all_to_all_records(mine, np.searchsorted(bounds, mine["cell"], side="right") - 1)
    pairs, checked = _search_my_cells(got, bounds, check, cfg.curate.candidates)
    save_arrays(out_dir / f"pairs-{dist.rank():05d}.npy", pairs)
    dist.barrier()
    facts = _groups_on_rank0(out_dir) if dist.is_main() else None
    facts = dist.broadcast_object(facts)
    facts.update(
        cells=cells,
        candidates=n_cand,
        rows_sent=summed_int(len(mine)),
        pairs_checked=summed_int(checked),
        unresolved_borders=summed_int(unresolved),
    )
    return facts


def _cells(pool: list[PoolShard], n_cand: int, cfg: Config) -> tuple[int, np.ndarray | None]:
    """(cells, their centroids) of the candidates' histograms: about dedup_cell_size images each
    (k-means, collective); one cell needs no centroids."""
    cells = max(1, round(n_cand / cfg.curate.dedup_cell_size))
    if cells < CELL_KMEANS_MIN:
        return 1, None
    return cells, unit_rows(coarse_cells({s.pos: s.scan["hist"][s.candidates] for s in pool}, cells, cfg))


def coarse_cells(parts: dict[int, np.ndarray], cells: int, cfg: Config) -> np.ndarray:
    """Centroids of `cells` cells of the points of every rank's parts: spherical k-means on the
    cluster stage's backend, flat, 10 Lloyd iterations on a 64-points-per-cell sample (cells only
    need to be compact; the borders are handled exactly). Collective."""
    params = dataclasses.replace(
        cfg.pseudo,
        k=cells,
        niter=10,
        max_points_per_centroid=64,
        spherical=True,
        seed=cfg.curate.seed,
        two_level="off",
        assign="exact",
    )
    return train_centroids(parts, params).centroids


def _rows_for_cells(
    pool: list[PoolShard], centroids: np.ndarray | None, probe: int, radius: float
) -> tuple[np.ndarray, int]:
    """This rank's candidates as rows, one per cell each must be searched in (cell_targets), and
    how many have a probed cell still within reach at the end of their probe list."""
    index = FlatIndex(centroids) if centroids is not None else None
    sent, unresolved = [np.zeros(0, _row_dtype())], 0
    for s in pool:
        src = np.flatnonzero(s.candidates)
        if index is None:
            i, cell = np.arange(len(src)), np.zeros(len(src), np.int64)
        else:
            i, cell, unres = cell_targets(*index.search(unit_rows(s.scan["hist"][src]), probe), radius)
            unresolved += int(unres.sum()) if probe < index.n else 0
        rows = np.empty(len(i), _row_dtype())
        rows["row"], rows["cell"] = s.first + src[i], cell
        for field in ("hist", "thumb", "shape"):
            rows[field] = s.scan[field][src[i]]
        sent.append(rows)
    return np.concatenate(sent), unresolved


def _search_my_cells(got: np.ndarray, bounds: np.ndarray, check: PairCheck, k: int) -> tuple[np.ndarray, int]:
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
    save_arrays(out_dir / DUPLICATES_FILE, dup)
    sizes = np.unique(dup["rep"], return_counts=True)[1] if len(dup) else np.zeros(0, np.int64)
    return {
        "copy_pairs": int(len(pairs)),
        "groups": int(len(sizes)),
        "grouped_images": int(sizes.sum()),
        "removed": int(sizes.sum() - len(sizes)),
        "largest_group": int(sizes.max()) if len(sizes) else 0,
        "group_sizes": {str(k): int(v) for k, v in zip(*np.unique(sizes, return_counts=True))},
    }


def groups_of(s: PoolShard, dup: np.ndarray) -> np.ndarray:
    """Representative row of each of the shard's rows (-1 outside any group)."""
    group = np.full(s.n, -1, np.int64)
    lo, hi = np.searchsorted(dup["row"], [s.first, s.first + s.n])
    group[dup["row"][lo:hi] - s.first] = dup["rep"][lo:hi]
    return group


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


def _cell_pairs(rows: np.ndarray, check: PairCheck, k: int) -> tuple[np.ndarray, int]:
    """Copy pairs (row a < row b) among the rows of ONE cell, and the candidate pairs checked."""
    if len(rows) < 2:
        return np.zeros((0, 2), np.int64), 0
    d, nn = FlatIndex(unit_rows(rows["hist"])).search(unit_rows(rows["hist"]), k + 1)
    i, j = np.nonzero((d <= check.radius) & (nn >= 0))
    a, b = rows["row"][i], rows["row"][nn[i, j]]
    keep = a != b  # an image meets itself (and only once per cell: each cell gets it once)
    cand = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1)[keep], axis=0)
    pos = {int(r): p for p, r in enumerate(rows["row"])}
    copies = [
        (x, y)
        for x, y in cand
        if check.passes(
            check.match(
                cut(rows["thumb"][pos[x]], rows["shape"][pos[x]]), cut(rows["thumb"][pos[y]], rows["shape"][pos[y]])
            )
        )
    ]
    return np.array(copies, np.int64).reshape(-1, 2), len(cand)


def _row_dtype() -> np.dtype:
    """What a rank sends of a pool image to the owner of a cell: enough to search and check it."""
    return np.dtype(
        [
            ("row", "<i8"),
            ("cell", "<i4"),
            ("hist", "<f2", (HIST_DIM,)),
            ("thumb", "u1", (THUMB, THUMB, 3)),
            ("shape", "u1", (2,)),
        ]
    )
