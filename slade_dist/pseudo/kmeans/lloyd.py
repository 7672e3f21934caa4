"""Lloyd's algorithm over all ranks (docs/SCALING.md "What else changes at scale"): seeding,
iterations all-reduced in float64, empty-cluster splits, spherical mode, checkpoint and resume.
Tests: tests/unit/test_kmeans_lloyd.py, tests/integration/test_pseudo_multirank.py (2 ranks == 1 rank).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ... import dist
from ...config import PseudoConfig
from ...progress import steps
from .assign import Assigner, temporarily
from .checkpoints import Checkpoints
from .plan import rows_by_position

SPLIT_EPS = 1.0 / 1024.0  # relative perturbation when a large cluster is split (as FAISS)
KMEANSPP_POOL_PER_CENTROID = 4  # k-means++ runs on a pool of 4k sample points (it is O(k * pool * d))


@dataclass
class KMeansResult:
    centroids: np.ndarray  # (k, d) float32 (two-level: grouped by coarse cell)
    objective: list[float]  # sum of squared distances on the training sample, per iteration
    # (two-level: the cells' sum per iteration, then the refine iterations)
    sizes: np.ndarray  # (k,) training-sample cluster sizes of the last iteration
    n_train: int  # points in the training sample (all ranks)
    backend: str
    splits: int  # empty clusters re-seeded, all iterations together
    n_total: int = 0  # points in all parts (all ranks)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    init: str = ""  # the init actually used ("kmeans++" | "random" | "given")
    two_level: bool = False
    coarse_centroids: np.ndarray | None = None  # (coarse_k, d) two-level only
    centroid_cell: np.ndarray | None = None  # (k,) coarse cell of each centroid, two-level only
    resumed: dict[str, int] = field(default_factory=dict)  # per stage: iterations (cells) read from checkpoints


def resolve_init(init: str, k: int, kmeanspp_max_k: int) -> str:
    if init == "auto":  # k-means++'s k sequential D^2 steps: ~0.5-3 us x k^2 on one rank, the others waiting
        return "kmeans++" if k <= kmeanspp_max_k else "random"  # random sample points: FAISS's default
    return init


def _kmeans_pp(pool: torch.Tensor, k: int, rng: np.random.Generator) -> torch.Tensor:
    n = pool.shape[0]
    chosen = [int(rng.integers(n))]
    d2 = ((pool - pool[chosen[0]]) ** 2).sum(1)
    for _ in range(1, k):
        cdf = np.cumsum(d2.double().cpu().numpy())
        total = cdf[-1]
        nxt = (
            int(min(np.searchsorted(cdf, rng.random() * total, side="right"), n - 1))
            if total > 0
            else int(rng.integers(n))
        )
        chosen.append(nxt)
        d2 = torch.minimum(d2, ((pool - pool[nxt]) ** 2).sum(1))
    return pool[chosen].clone()


def seed_centroids(
    pick_rows: Callable[[np.ndarray], torch.Tensor], m: int, k: int, params: PseudoConfig, key: tuple, distributed: bool
) -> tuple[torch.Tensor, str]:
    """k initial centroids among m sample rows (pick_rows(positions) -> those rows; collective when
    distributed). The draws depend only on `key` (seed and stage), never on the world size."""
    method = resolve_init(params.init, k, params.kmeanspp_max_k)
    rng = np.random.default_rng([*key, 2])
    if method == "random":
        return pick_rows(rng.choice(m, k, replace=False)), method
    pool_n = min(m, max(k * KMEANSPP_POOL_PER_CENTROID, k))
    pool = pick_rows(np.sort(rng.choice(m, pool_n, replace=False)) if pool_n < m else np.arange(m))
    pp_rng = np.random.default_rng([*key, 3])
    if not distributed:
        return _kmeans_pp(pool, k, pp_rng), method
    c = _kmeans_pp(pool, k, pp_rng) if dist.is_main() else torch.zeros(k, pool.shape[1], device=pool.device)
    return dist.staged_all_reduce_sum(c), method  # broadcast of rank 0's seeding


def _split_empty(c: torch.Tensor, counts: np.ndarray, rng: np.random.Generator) -> int:
    """Re-seed empty clusters by splitting big ones (FAISS's rule): an empty cluster takes a copy
    of cluster j, drawn with probability ~ (size_j - 1); both copies move apart by +-SPLIT_EPS per
    dimension and share j's count. Global counts: every rank does the same."""
    empties = np.flatnonzero(counts == 0)
    w = np.maximum(counts - 1, 0).astype(np.float64)
    if len(empties) == 0 or w.sum() <= 0:  # nothing empty, or nothing left to split
        return 0
    donors = rng.choice(len(counts), size=len(empties), p=w / w.sum())  # one call: O(k + empties) at k = 10^6
    sign = torch.ones(c.shape[1], device=c.device)
    sign[1::2] = -1.0
    for ci, cj in zip(empties.tolist(), donors.tolist()):
        c[ci] = c[cj] * (1 + SPLIT_EPS * sign)
        c[cj] = c[cj] * (1 - SPLIT_EPS * sign)
        counts[ci] = counts[cj] // 2
        counts[cj] -= counts[ci]
    return len(empties)


def _lloyd_step(
    chunks: list[torch.Tensor], c: torch.Tensor, assigner: Assigner, distributed: bool = True
) -> tuple[torch.Tensor, np.ndarray, float]:
    """One assignment pass over this rank's points: (sums (k,d) f64, counts, objective), summed
    over ranks when distributed."""
    k, d = c.shape
    acc_dev = chunks[0].device if chunks else c.device
    # accumulated in place on the points' device, in the one buffer that crosses ranks (one collective)
    packed = torch.zeros(k * d + k + 1, dtype=torch.float64, device=acc_dev)
    sums, counts, obj = packed[: k * d].view(k, d), packed[k * d : k * d + k], packed[k * d + k :]
    window = _SumWindow(sums)
    assigner.set_centroids(c)
    for x in chunks:
        lab, d2 = assigner.assign(x)
        lab = lab.to(acc_dev)
        window.add(lab, x)
        counts += torch.bincount(lab, minlength=k).to(torch.float64)
        obj += d2.to(acc_dev, torch.float64).sum()
    window.flush()
    if distributed:
        packed = dist.staged_all_reduce_sum(packed)
    return packed[: k * d].view(k, d), packed[k * d : k * d + k].cpu().numpy(), float(packed[-1])


class _SumWindow:
    """Per-cluster sums: index_add_ of each chunk into a float32 (k, d) buffer, folded into the
    float64 sums once at least k rows went in (and at the end): float32 within a window of
    max(chunk, k) rows, float64 across windows and ranks. Float32 index_add_ is ~2x faster than
    float64, converting each chunk to float64 7x slower still (CPU, 65536 x 128 chunks: 5 ms vs
    11 ms vs 34 ms); a fold costs k x d only every >= k rows, never per chunk at k = 10^6."""

    def __init__(self, sums: torch.Tensor):
        self.sums = sums
        self.buf = torch.zeros(sums.shape, dtype=torch.float32, device=sums.device)
        self.rows = 0

    def add(self, lab: torch.Tensor, x: torch.Tensor) -> None:
        # memory bound: on CPU, OpenMP threads only add stalls (3x slower with 2 on a loaded 2-core machine)
        cpu = x.device.type == "cpu"
        with temporarily(torch.get_num_threads, torch.set_num_threads, 1) if cpu else contextlib.nullcontext():
            self.buf.index_add_(0, lab, x.to(torch.float32))
        self.rows += len(x)
        if self.rows >= self.sums.shape[0]:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.sums += self.buf
            self.buf.zero_()
            self.rows = 0


def _update_centroids(
    c: torch.Tensor, sums: torch.Tensor, counts: np.ndarray, rng: np.random.Generator, spherical: bool
) -> tuple[torch.Tensor, int]:
    """Means of the non-empty clusters, empty ones re-seeded by splitting; (centroids, splits)."""
    nonempty = torch.as_tensor(counts > 0, device=c.device)
    denom = torch.as_tensor(np.maximum(counts, 1), dtype=torch.float64, device=c.device)
    new_c = (sums.to(c.device) / denom[:, None]).to(torch.float32)
    c = torch.where(nonempty[:, None], new_c, c)
    splits = _split_empty(c, counts, rng)
    if spherical:
        c = torch.nn.functional.normalize(c, dim=1)
    return c, splits


@dataclass
class LloydState:
    """Where one k-means stage stands: everything a checkpoint holds (its splits' draws are keyed
    by iteration, so no generator state is saved)."""

    c: torch.Tensor
    objective: list[float] = field(default_factory=list)
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0))
    splits: int = 0
    it: int = 0  # iterations done


@dataclass
class Run:
    """What the distributed stages of one training run share; on_step: train_centroids'."""

    params: PseudoConfig
    ckpt: Checkpoints
    on_step: Callable[[str, int], None] | None = None

    def derived(self, extra: str) -> Run:
        return dataclasses.replace(self, ckpt=self.ckpt.derived(extra))

    def stepped(self, stage: str, step: int) -> None:
        if self.on_step is not None:
            self.on_step(stage, step)


def run_lloyd(
    chunks: list[torch.Tensor],
    st: LloydState,
    assigner: Assigner,
    params: PseudoConfig,
    niter: int,
    rng_key: tuple,
    run: Run | None = None,
    stage: str = "",
) -> LloydState:
    """Lloyd iterations st.it .. niter: over all ranks, checkpointed by rank 0 every
    ckpt_every_iters iterations and at the end, as stage `stage` of `run`; without a run, over this
    rank's chunks alone (a two-level cell)."""
    every = params.ckpt_every_iters
    its = range(st.it, niter)
    # one bar for a distributed run; a cell's local run (one of thousands) shows none
    for it in steps(its, f"k-means {stage} k={st.c.shape[0]}") if run else its:
        sums, counts, obj = _lloyd_step(chunks, st.c, assigner, distributed=run is not None)
        st.c, splits = _update_centroids(st.c, sums, counts, np.random.default_rng([*rng_key, it]), params.spherical)
        st.objective.append(obj)
        st.counts, st.splits, st.it = counts, st.splits + splits, it + 1
        if run is not None:
            if dist.is_main() and (st.it == niter or (every and st.it % every == 0)):
                _save_lloyd(run.ckpt, stage, st)
            run.stepped(stage, st.it)
    return st


def _save_lloyd(ckpt: Checkpoints, stage: str, st: LloydState) -> None:
    ckpt.save(
        stage,
        {"iteration": st.it, "objective": st.objective, "splits": st.splits},
        centroids=st.c.detach().cpu().numpy().astype(np.float32),
        counts=st.counts,
    )


def resume_lloyd(ckpt: Checkpoints, stage: str, k: int, d: int, device: torch.device) -> LloydState | None:
    """The stage's latest checkpoint, as rank 0 reads it, on every rank (None: start afresh); one
    reader, then broadcasts: ranks never disagree, even without a shared file system."""
    loaded = ckpt.load(stage) if dist.is_main() else None
    if loaded is not None and loaded[1]["centroids"].shape != (k, d):
        loaded = None
    meta = dist.broadcast_object(loaded[0] if loaded is not None else None)
    if meta is None:
        return None
    c = torch.zeros(k, d, dtype=torch.float32, device=device)
    counts = torch.zeros(k, dtype=torch.float64, device=device)
    if loaded is not None:
        c.copy_(torch.from_numpy(loaded[1]["centroids"]))
        counts.copy_(torch.from_numpy(loaded[1]["counts"].astype(np.float64)))
    c, counts = dist.staged_broadcast(c), dist.staged_broadcast(counts)
    dist.get_logger().info(f"[k-means] {stage}: resuming from the checkpoint of iteration {meta['iteration']}")
    return LloydState(
        c=c,
        objective=[float(v) for v in meta["objective"]],
        counts=counts.cpu().numpy(),
        splits=int(meta["splits"]),
        it=int(meta["iteration"]),
    )


def distributed_kmeans(
    x: torch.Tensor,
    pos: np.ndarray,
    m: int,
    k: int,
    run: Run,
    assigner: Assigner,
    key: tuple,
    stage: str,
    init_centroids: np.ndarray | None = None,
) -> tuple[LloydState, str, int, float]:
    """k-means over all ranks' rows (x, global positions pos in [0, m)), stage `stage` of `run`,
    resumed from its checkpoint when one matches: (final state, init used, iterations resumed,
    init seconds)."""
    t0, params, d = time.time(), run.params, x.shape[1]
    st = resume_lloyd(run.ckpt, stage, k, d, x.device)
    resumed = st.it if st is not None else 0
    method = "resumed"
    if st is None:
        if init_centroids is not None:
            c, method = torch.as_tensor(np.asarray(init_centroids, dtype=np.float32), device=x.device).clone(), "given"
        else:
            c, method = seed_centroids(lambda w: rows_by_position(x, pos, w, d), m, k, params, key, True)
        if params.spherical:
            c = torch.nn.functional.normalize(c, dim=1)
        st = LloydState(c=c, counts=np.zeros(k))
    init_s = time.time() - t0
    chunks = list(torch.split(x, params.chunk_size)) if len(x) else []
    st = run_lloyd(chunks, st, assigner, params, params.niter, (*key, 4), run, stage)
    return st, method, resumed, init_s
