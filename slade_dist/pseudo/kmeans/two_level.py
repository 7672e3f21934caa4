"""Two-level k-means for large k (the idea of faiss.contrib.clustering.two_level_clustering; the
steps and their costs: docs/SCALING.md). Tests: tests/unit/test_kmeans_two_level.py,
tests/integration/test_pseudo_multirank.py (2 ranks == 1 rank, two-level).
"""

from __future__ import annotations

import hashlib
import heapq
import time

import numpy as np
import torch

from ... import dist
from ...config import PseudoConfig
from ...progress import steps
from .assign import Assigner, params_assigner
from .checkpoints import Checkpoints
from .lloyd import KMeansResult, LloydState, Run, distributed_kmeans, resume_lloyd, run_lloyd, seed_centroids
from .plan import TrainingSample, coarse_k_for

COARSE_POINTS_PER_CELL = 2000  # coarse level of two-level training: as FAISS's two_level_clustering


def allocate_fine_k(cell_sizes: np.ndarray, k: int) -> np.ndarray:
    """Centroids per coarse cell: proportional to its sample points, at least 1 for a non-empty
    cell, at most its points, exactly k in total (largest remainders get the rounding)."""
    n = np.asarray(cell_sizes, dtype=np.int64)
    if k > n.sum() or k < int((n > 0).sum()):
        raise ValueError(
            f"k-means: cannot split k={k} over cells of sizes summing to {n.sum()} ({int((n > 0).sum())} non-empty)"
        )
    quota = k * n / n.sum()
    alloc = np.clip(np.floor(quota).astype(np.int64), (n > 0).astype(np.int64), n)
    while (diff := k - int(alloc.sum())) != 0:
        room = alloc < n if diff > 0 else alloc > np.minimum(n, 1)
        score = np.where(room, quota - alloc, -np.inf if diff > 0 else np.inf)
        pick = np.argsort(-score if diff > 0 else score, kind="stable")[: min(abs(diff), int(room.sum()))]
        alloc[pick] += 1 if diff > 0 else -1
    return alloc


def cell_owners(cell_sizes: np.ndarray, fine_k: np.ndarray, world: int) -> np.ndarray:
    """Rank that trains each cell: greedy longest-processing-time on the fine Lloyd cost
    (points x centroids), so ranks finish about together. Deterministic given (sizes, world)."""
    work = np.asarray(cell_sizes, dtype=np.float64) * np.asarray(fine_k, dtype=np.float64)
    owners = np.zeros(len(work), dtype=np.int64)
    load = [(0.0, r) for r in range(world)]
    for c in np.argsort(-work, kind="stable"):
        busy, r = heapq.heappop(load)
        owners[c] = r
        heapq.heappush(load, (busy + work[c], r))
    return owners


def _coarse_subset(sample: TrainingSample, m1: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """This rank's rows of a world-size-free m1-row subset of the sample, and their positions in it."""
    if m1 >= sample.m:
        return sample.x, sample.pos
    chosen = np.sort(np.random.default_rng([seed, 10, 1]).choice(sample.m, m1, replace=False))  # keys: plan.py
    at = np.minimum(np.searchsorted(chosen, sample.pos), m1 - 1)
    mine = chosen[at] == sample.pos
    return sample.x[torch.as_tensor(mine, device=sample.x.device)], at[mine]


def _nearest(x: torch.Tensor, c: torch.Tensor, assigner: Assigner, chunk: int) -> torch.Tensor:
    assigner.set_centroids(c)
    out = [assigner.assign(xc)[0].to(x.device) for xc in torch.split(x, chunk)] if len(x) else []
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64, device=x.device)


def _send_to_owners(sample: TrainingSample, cells: torch.Tensor, owners: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """Every sample row goes to the rank that owns its cell (one all_to_all for the rows, one for
    their keys cell * m + position); returns the rows received sorted by key, i.e. grouped by cell
    and in sample order within a cell, whatever the world size. Frees sample.x."""
    cells_np = cells.cpu().numpy()
    keys = cells_np * sample.m + sample.pos
    if not dist.is_dist():
        order = torch.as_tensor(np.argsort(keys, kind="stable"), device=sample.x.device)
        x, sample.x = sample.x[order], sample.x.new_zeros((0, sample.d))  # (a [:0] view would keep it)
        return x, keys[order.cpu().numpy()]
    dest = owners[cells_np]
    order = np.argsort(dest, kind="stable")
    send = np.bincount(dest, minlength=dist.world_size())
    recv = np.array(dist.all_gather_object(send.tolist()))[:, dist.rank()]
    x_send = sample.x[torch.as_tensor(order, device=sample.x.device)]
    sample.x = sample.x.new_zeros((0, sample.d))  # peak: send and receive buffers, each ~ m / world rows
    x = dist.all_to_all_rows(x_send, send, recv)
    del x_send
    keys = dist.all_to_all_rows(torch.from_numpy(keys[order]), send, recv).numpy()
    by_key = np.argsort(keys, kind="stable")
    return x[torch.as_tensor(by_key, device=x.device)], keys[by_key]


def _train_cell(x: torch.Tensor, k_c: int, cell: int, params: PseudoConfig, assigner: Assigner) -> LloydState:
    """Local k-means of one coarse cell's sample points (no collective: one rank owns the cell)."""
    c, _ = seed_centroids(
        lambda w: x[torch.as_tensor(w, device=x.device)],
        len(x),
        k_c,
        params,
        (params.seed, 20, cell),
        distributed=False,
    )
    if params.spherical:
        c = torch.nn.functional.normalize(c, dim=1)
    st = LloydState(c=c, counts=np.zeros(k_c))
    return run_lloyd(
        list(torch.split(x, params.chunk_size)), st, assigner, params, params.niter, (params.seed, 21, cell)
    )


def _cell_from_ckpt(ckpt: Checkpoints, cell: int, k_c: int, niter: int, device: torch.device) -> LloydState | None:
    loaded = ckpt.load(f"cell-{cell:07d}")
    if loaded is None or loaded[1]["centroids"].shape[0] != k_c or len(loaded[1]["objective"]) != niter:
        return None
    meta, a = loaded
    c = torch.from_numpy(a["centroids"]).to(device)
    return LloydState(c, list(a["objective"]), a["counts"], int(meta["splits"]), niter)


def _train_my_cells(
    x: torch.Tensor, keys: np.ndarray, m: int, fine_k: np.ndarray, run: Run, assigner: Assigner
) -> tuple[dict[int, LloydState], int]:
    """Fine k-means of the cells whose rows this rank received (rows grouped by cell); each
    finished cell is checkpointed by this rank. Returns ({cell: result}, cells resumed)."""
    cells_of_rows = keys // m
    mine = np.unique(cells_of_rows)
    bounds = np.searchsorted(cells_of_rows, np.concatenate([mine, [np.iinfo(np.int64).max]]))
    out, resumed = {}, 0
    for j in steps(range(len(mine)), f"k-means cells ({len(mine)} on rank 0)"):
        cell, k_c = int(mine[j]), int(fine_k[mine[j]])
        res = _cell_from_ckpt(run.ckpt, cell, k_c, run.params.niter, x.device)
        if res is None:
            res = _train_cell(x[bounds[j] : bounds[j + 1]], k_c, cell, run.params, assigner)
            run.ckpt.save(
                f"cell-{cell:07d}",
                {"splits": res.splits},
                centroids=res.c.cpu().numpy().astype(np.float32),
                counts=res.counts,
                objective=np.asarray(res.objective, dtype=np.float64),
            )
        else:
            resumed += 1
        out[cell] = res
        run.stepped("cell", cell)
    return out, resumed


def _assemble_cells(
    done: dict[int, LloydState], fine_k: np.ndarray, d: int, niter: int, resumed: int, device: torch.device
) -> tuple[LloydState, int]:
    """All ranks' cells as one state (centroids grouped by cell, the objective summed over cells)
    and the cells resumed, all ranks."""
    k = int(fine_k.sum())
    start = np.concatenate([[0], np.cumsum(fine_k)])
    c = torch.zeros(k, d, dtype=torch.float32, device=device)
    stats = np.zeros(k + niter + 2, dtype=np.float64)  # counts, objective per iteration, splits, resumed
    for cell, res in done.items():
        c[start[cell] : start[cell + 1]] = res.c.to(device)
        stats[start[cell] : start[cell + 1]] = res.counts
        stats[k : k + niter] += np.asarray(res.objective, dtype=np.float64)
        stats[-2] += res.splits
    stats[-1] = resumed
    c = dist.staged_all_reduce_sum(c)  # each rank filled its own rows of zeros: x + 0 is exact
    stats = dist.staged_all_reduce_sum(torch.from_numpy(stats).to(device)).cpu().numpy()
    st = LloydState(c=c, objective=stats[k : k + niter].tolist(), counts=stats[:k], splits=int(round(stats[-2])))
    return st, int(round(stats[-1]))


def _train_coarse(sample: TrainingSample, k1: int, run: Run, assigner: Assigner) -> tuple[LloydState, str, int, float]:
    """The coarse level: distributed Lloyd with k1 centroids on a world-size-free subset of the
    sample (COARSE_POINTS_PER_CELL per cell, as FAISS), checkpointed as stage "coarse"."""
    m1 = min(sample.m, k1 * COARSE_POINTS_PER_CELL)
    x1, pos1 = _coarse_subset(sample, m1, run.params.seed)
    return distributed_kmeans(x1, pos1, m1, k1, run, assigner, (run.params.seed, 10), "coarse")


def _partition_by_cell(
    sample: TrainingSample, coarse: torch.Tensor, params: PseudoConfig, assigner: Assigner
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Every sample row's coarse cell, each cell's share of k, and the rows moved to the rank
    owning their cell: (rows, keys cell * m + position, centroids per cell). Frees sample.x."""
    cells = _nearest(sample.x, coarse, assigner, params.chunk_size)
    cell_sizes = dist.staged_all_reduce_sum(torch.bincount(cells, minlength=coarse.shape[0]).to(torch.float64))
    cell_sizes = np.round(cell_sizes.cpu().numpy()).astype(np.int64)
    fine_k = allocate_fine_k(cell_sizes, params.k)
    x, keys = _send_to_owners(sample, cells, cell_owners(cell_sizes, fine_k, dist.world_size()))
    return x, keys, fine_k


def train_two_level(sample: TrainingSample, run: Run, backend: str, exact: Assigner) -> KMeansResult:
    """Coarse cells, each cell's share of k trained by its owner rank, then two_level_refine_iters
    Lloyd iterations over all k centroids through the cells. The sample stays split over the ranks
    (peak ~2 m d 4 / world bytes per rank while cells exchange rows: docs/SCALING.md)."""
    times, params = [time.time()], run.params
    k1 = coarse_k_for(params)
    coarse, method, resumed_coarse, _ = _train_coarse(sample, k1, run, exact)
    coarse_np = coarse.c.cpu().numpy().astype(np.float32)
    times.append(time.time())
    x, keys, fine_k = _partition_by_cell(sample, coarse.c, params, exact)
    times.append(time.time())
    fine = run.derived(hashlib.sha256(coarse_np.tobytes()).hexdigest())  # a new coarse level never meets old cells
    st = resume_lloyd(fine.ckpt, "refine", params.k, sample.d, x.device) if params.two_level_refine_iters else None
    resumed = {"coarse": resumed_coarse, "cells": 0, "refine": st.it if st is not None else 0}
    if st is None:  # a refine checkpoint already holds everything the cells gave
        done, n_resumed = _train_my_cells(x, keys, sample.m, fine_k, fine, exact)
        st, resumed["cells"] = _assemble_cells(done, fine_k, sample.d, params.niter, n_resumed, coarse.c.device)
    times.append(time.time())
    chunks = list(torch.split(x, params.chunk_size)) if len(x) else []
    # the refine iterations repair what cell boundaries cut (a blob split between two cells got two
    # centroids, a cell's lone blobs share one): on Gaussian mixtures (k = 256..1024) 2-13% more
    # inertia than flat Lloyd without them (FAISS's two_level_clustering: the same), -2.5..+0.7%
    # after 4; each costs ~(k1 + nprobe k / k1) d per point, ~1/60 of a flat one at k = 10^6
    refine = params_assigner(params, coarse_np)
    st = run_lloyd(chunks, st, refine, params, params.two_level_refine_iters, (params.seed, 30), fine, "refine")
    times.append(time.time())
    return KMeansResult(
        centroids=st.c.cpu().numpy().astype(np.float32),
        objective=st.objective,
        sizes=np.round(st.counts).astype(np.int64),
        n_train=sample.m,
        backend=backend,
        splits=st.splits + coarse.splits,
        timings=dict(zip(("coarse_s", "exchange_s", "cells_s", "refine_s"), np.diff(times).tolist())),
        init=method,
        two_level=True,
        coarse_centroids=coarse_np,
        centroid_cell=np.repeat(np.arange(k1), fine_k),
        resumed=resumed,
    )
