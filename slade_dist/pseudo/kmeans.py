"""Distributed k-means: each rank owns a disjoint set of point arrays ("parts", e.g. one per shard).

Owns:
* the deterministic training sample (k x max_points_per_centroid points drawn across all ranks,
  the same points whatever the world size, for any N): per-part counts come from vectorised
  hypergeometric (binomial past numpy's 10^9 limit) splits down a fixed binary tree of part ids,
  then each rank draws the rows of its own parts only;
* init: auto (k-means++ up to kmeanspp_max_k, random sample points above: k-means++ is O(k^2) on
  one rank while the others wait) | kmeans++ | random;
* flat training: Lloyd iterations whose partial sums, counts and objective are accumulated by torch
  on the device of the points (index_add_ into float64) and all-reduced in float64 (1 rank and N
  ranks give the same centroids up to float noise), empty-cluster re-seeding by splitting large
  clusters (FAISS's rule), spherical (cosine) mode;
* two-level training for large k (the idea of faiss.contrib.clustering.two_level_clustering):
  ~sqrt(k) coarse cells by distributed Lloyd, then each cell's share of k (proportional to its
  sample size) trained by the one rank that owns the cell, on the sample points sent to it
  (all_to_all), and the fine centroids all-gathered;
* checkpoints under the caller's ckpt_dir (Lloyd every ckpt_every_iters iterations, the coarse
  result, each finished cell), fingerprinted by (params, sizes, tag) so other inputs never resume;
* the per-rank assignment backends (FAISS GPU, torch matmul, FAISS CPU, FAISS IVF over the fine
  centroids or through the coarse cells) and the streaming full assignment pass over memory-mapped
  arrays (memory bounded whatever n).
Tests: tests/unit/test_kmeans.py (backends agree, vs faiss.Kmeans, splitting, streaming, sample at
N > 10^9, init auto, two-level vs flat, checkpoint resume), tests/integration/test_pseudo_multirank.py
(2 real ranks == 1 rank, flat and two-level; identical sample; a killed 2-rank run resumes).
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import math
import os
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import dist
from ..fileio import atomic_path
from ..progress import steps

__all__ = [
    "KMeansParams",
    "KMeansResult",
    "TrainingSample",
    "Assigner",
    "TorchAssigner",
    "FaissCPUAssigner",
    "FaissGPUAssigner",
    "FaissIVFAssigner",
    "choose_backend",
    "make_assigner",
    "params_assigner",
    "train_centroids",
    "assign_array",
    "sample_plan",
    "sample_counts",
    "sample_rows",
    "draw_sample",
    "kmeans_pp",
    "resolve_init",
    "use_two_level",
    "coarse_k_for",
    "allocate_fine_k",
    "cap_k",
]

BACKENDS = ("auto", "faiss_gpu", "torch", "faiss_cpu")
INITS = ("auto", "kmeans++", "random")
TWO_LEVEL_MODES = ("auto", "on", "off")
ASSIGN_MODES = ("auto", "exact", "ivf")
SPLIT_EPS = 1.0 / 1024.0  # relative perturbation when a large cluster is split (as FAISS)
KMEANSPP_POOL_PER_CENTROID = 4  # k-means++ runs on a pool of 4k sample points (it is O(k * pool * d))
COARSE_POINTS_PER_CELL = 2000  # coarse level of two-level training: as FAISS's two_level_clustering
HYPERGEOMETRIC_LIMIT = 10**9  # numpy's hypergeometric needs ngood, nbad < 10^9
# assign=auto takes the IVF path only where it computes 8x fewer distances: an IVF list scan costs
# ~9x a GEMM per distance (measured on CPU, d = 32, k = 4096: exact 0.37 s vs 0.89 s for 1/4 of the
# distances); at k = 10^6 with 1000 cells and nprobe 16 it computes ~60x fewer
IVF_MIN_SAVING = 8
CKPT_VERSION = 1


@dataclass
class KMeansParams:
    k: int
    niter: int = 20
    max_points_per_centroid: int = 256
    init: str = "auto"  # "auto" | "kmeans++" | "random" (see resolve_init)
    kmeanspp_max_k: int = 2048  # init=auto: k-means++ up to this many centroids, random above
    spherical: bool = False
    backend: str = "auto"  # see choose_backend()
    chunk_size: int = 65536  # points per assignment chunk
    seed: int = 0
    gpu_tf32: bool = True  # torch backend on CUDA: TF32 distance matmuls
    assign: str = "auto"  # "auto" | "exact" | "ivf" (see params_assigner)
    ivf_nlist: int = 0  # coarse lists of the IVF assignment (0: ~4 sqrt(k))
    ivf_nprobe: int = 16  # lists (or coarse cells) searched per point
    two_level: str = "auto"  # "auto" | "on" | "off" (see use_two_level)
    two_level_min_k: int = 16384  # two_level=auto: two-level training from this k
    coarse_k: int = 0  # coarse cells of two-level training (0: round(sqrt(k)))
    two_level_refine_iters: int = 4  # global Lloyd iterations over all k after the cells
    ckpt_every_iters: int = 5  # Lloyd iterations between checkpoints (0: only at stage ends)
    progress: bool = True  # tqdm on rank 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k-means: k must be >= 1, got {self.k}")
        if isinstance(self.two_level, bool):  # YAML reads a bare on/off as true/false
            self.two_level = "on" if self.two_level else "off"
        for name, allowed in (
            ("init", INITS),
            ("backend", BACKENDS),
            ("assign", ASSIGN_MODES),
            ("two_level", TWO_LEVEL_MODES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"k-means: {name} must be one of {allowed}, got {getattr(self, name)!r}")

    @classmethod
    def from_config(cls, pseudo_cfg: Any, k: int | None = None, **over: Any) -> KMeansParams:
        """From config.PseudoConfig: every field the config has (k may be overridden, e.g. after
        capping it to the data); fields it lacks keep their defaults here."""
        kw = {
            f.name: getattr(pseudo_cfg, f.name)
            for f in fields(cls)
            if f.name not in ("k", "progress") and hasattr(pseudo_cfg, f.name)
        }
        kw["k"] = pseudo_cfg.k if k is None else k
        kw.update(over)
        return cls(**kw)


@dataclass
class KMeansResult:
    centroids: np.ndarray  # (k, d) float32 (two-level: grouped by coarse cell)
    objective: list[float]  # sum of squared distances on the training sample, per iteration
    # (two-level: the cells' sum per iteration, then the refine iterations)
    sizes: np.ndarray  # (k,) training-sample cluster sizes of the last iteration
    n_train: int  # points in the training sample (all ranks)
    n_total: int  # points in all parts (all ranks)
    backend: str
    seconds: float
    splits: int  # empty clusters re-seeded, all iterations together
    timings: dict[str, float] = field(default_factory=dict)
    init: str = ""  # the init actually used ("kmeans++" | "random" | "given")
    two_level: bool = False
    coarse_centroids: np.ndarray | None = None  # (coarse_k, d) two-level only
    centroid_cell: np.ndarray | None = None  # (k,) coarse cell of each centroid, two-level only
    resumed: dict[str, int] = field(default_factory=dict)  # per stage: iterations (cells) read from checkpoints


# ------------------------------------------------------------------------------ assignment backends
class Assigner:
    """Nearest centroid (squared L2) for chunks of points. set_centroids() once per iteration."""

    name = "base"
    device = torch.device("cpu")

    def set_centroids(self, c: torch.Tensor) -> None:
        raise NotImplementedError

    def assign(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (n, d) float32 -> (labels int64 (n,), squared distances float32 (n,)), on self.device."""
        raise NotImplementedError


class TorchAssigner(Assigner):
    """argmin_c ||x - c||^2 = argmin_c (||c||^2 - 2 x.c) with one GEMM per block of rows.

    Rows are blocked so the (rows x k) score matrix stays under `budget` elements whatever k.
    On CUDA, TF32 matmuls (gpu_tf32) are ~8x faster than fp32 on Hopper; only near-ties can flip.
    """

    name = "torch"

    def __init__(self, device: torch.device | str = "cpu", gpu_tf32: bool = True, budget: int | None = None):
        self.device = torch.device(device)
        self.tf32 = gpu_tf32 and self.device.type == "cuda"
        self.budget = budget or (1 << 28 if self.device.type == "cuda" else 1 << 22)
        self.c: torch.Tensor | None = None
        self.c_sq: torch.Tensor | None = None

    def set_centroids(self, c: torch.Tensor) -> None:
        self.c = c.to(self.device, torch.float32).contiguous()
        self.c_sq = (self.c * self.c).sum(1)

    @contextlib.contextmanager
    def _precision(self) -> Iterator[None]:
        if not self.tf32:
            yield
            return
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(old)

    def assign(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.c is not None and self.c_sq is not None, "set_centroids() first"
        x = x.to(self.device, torch.float32)
        rows = max(1, self.budget // self.c.shape[0])
        labels = torch.empty(x.shape[0], dtype=torch.int64, device=self.device)
        d2 = torch.empty(x.shape[0], dtype=torch.float32, device=self.device)
        ct = self.c.t()
        with self._precision():
            for s in range(0, x.shape[0], rows):
                xb = x[s : s + rows]
                scores = torch.addmm(self.c_sq, xb, ct, beta=1.0, alpha=-2.0)
                best, idx = scores.min(dim=1)
                labels[s : s + rows] = idx
                d2[s : s + rows] = (best + (xb * xb).sum(1)).clamp_min_(0.0)
        return labels, d2


class FaissCPUAssigner(Assigner):
    """FAISS IndexFlatL2 search with k=1 (BLAS GEMM + fused argmin)."""

    name = "faiss_cpu"

    def __init__(self) -> None:
        import faiss

        self.faiss = faiss
        self.index = None

    def set_centroids(self, c: torch.Tensor) -> None:
        c_np = np.ascontiguousarray(c.detach().cpu().numpy(), dtype=np.float32)
        if self.index is None or self.index.d != c_np.shape[1]:
            self.index = self._new_index(c_np)  # built once; later calls only swap the centroids
        self.index.reset()
        self.index.add(c_np)

    def _new_index(self, c_np: np.ndarray) -> Any:
        return self.faiss.IndexFlatL2(c_np.shape[1])

    def assign(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.is_cuda:  # a GPU index and points already on its GPU: searched in place (torch_utils)
            d2, idx = self.index.search(x.to(torch.float32).contiguous(), 1)
            return idx[:, 0], d2[:, 0].clamp_min(0.0)
        x_np = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        d2, idx = self.index.search(x_np, 1)
        return torch.from_numpy(idx[:, 0].astype(np.int64)), torch.from_numpy(np.maximum(d2[:, 0], 0))


def _faiss_gpu_device(device_id: int) -> torch.device:
    """Where the FAISS GPU backends want the points: their GPU, so a chunk is searched and its sums
    accumulated there without a host round trip. faiss.contrib.torch_utils lets FAISS indexes
    search CUDA tensors (it patches the index classes; numpy arrays keep working)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")  # faiss-gpu with a CPU-only torch: points stay on the host
    import faiss.contrib.torch_utils  # noqa: F401

    return torch.device("cuda", device_id)


class FaissGPUAssigner(FaissCPUAssigner):
    """FAISS GpuIndexFlatL2 on this rank's GPU (faiss-gpu); the points live on that GPU too."""

    name = "faiss_gpu"

    def __init__(self, device_id: int = 0) -> None:
        super().__init__()
        self.res = self.faiss.StandardGpuResources()
        self.device_id = device_id
        self.device = _faiss_gpu_device(device_id)

    def _new_index(self, c_np: np.ndarray) -> Any:
        cfg = self.faiss.GpuIndexFlatConfig()
        cfg.device = self.device_id
        return self.faiss.GpuIndexFlatL2(self.res, c_np.shape[1], cfg)


class FaissIVFAssigner(FaissCPUAssigner):
    """Two-level assignment for very large k: the k centroids go into an IndexIVFFlat, and each
    point is compared with the centroids of its `nprobe` nearest groups only, so the cost per point
    is ~(nlist + nprobe * k / nlist) * d instead of k * d. Approximate: a point whose nearest
    centroid sits in an unprobed group gets the best one among the probed groups.

    The groups come either from `coarse` (the coarse cells of two-level training: no training at
    all, and each fine centroid lies in its own cell since a Voronoi cell is convex) or from a
    coarse quantizer (nlist groups) trained once on the first centroids it sees. Later
    set_centroids() calls keep the quantizer (centroids move little between iterations) and only
    re-add the centroids."""

    name = "faiss_ivf"

    def __init__(
        self, nlist: int = 0, nprobe: int = 16, gpu_device: int | None = None, coarse: np.ndarray | None = None
    ) -> None:
        super().__init__()
        self.nlist, self.nprobe, self.gpu_device = nlist, nprobe, gpu_device
        self.coarse = None if coarse is None else np.ascontiguousarray(coarse, dtype=np.float32)
        self.res = self.faiss.StandardGpuResources() if gpu_device is not None else None
        if gpu_device is not None:
            self.device = _faiss_gpu_device(gpu_device)

    @staticmethod
    def auto_nlist(k: int) -> int:
        return int(max(1, min(k // 39, round(4 * math.sqrt(k)))))  # >= 39 centroids per list to train

    def _new_index(self, c_np: np.ndarray) -> Any:
        k, d = c_np.shape
        quantizer = self.faiss.IndexFlatL2(d)
        if self.coarse is not None:
            quantizer.add(self.coarse)  # an IVF whose quantizer holds nlist vectors is trained
            nlist = len(self.coarse)
            index = self.faiss.IndexIVFFlat(quantizer, d, nlist, self.faiss.METRIC_L2)
        else:
            nlist = min(self.nlist or self.auto_nlist(k), k)
            index = self.faiss.IndexIVFFlat(quantizer, d, nlist, self.faiss.METRIC_L2)
            index.cp.seed = 1234
            index.train(c_np)
        assert index.is_trained
        if self.res is not None:
            index = self.faiss.index_cpu_to_gpu(self.res, self.gpu_device, index)
        self._quantizer = quantizer  # keep the Python reference alive with the index
        index.nprobe = min(self.nprobe, nlist)
        return index


def params_assigner(params: KMeansParams, coarse: np.ndarray | None = None) -> Assigner:
    """The assigner of the full pass (and of two-level refinement). assign=auto: through the coarse
    cells (IVF, ivf_nprobe cells) when the centroids come from two-level training (`coarse` given),
    a FAISS backend runs and it cuts the distances per point IVF_MIN_SAVING-fold; else exact."""
    assign = params.assign
    if assign == "auto":
        probed = 0 if coarse is None else len(coarse) + params.ivf_nprobe * params.k / len(coarse)
        pays = coarse is not None and probed * IVF_MIN_SAVING <= params.k
        assign = "ivf" if pays and choose_backend(params.backend) != "torch" else "exact"
    return make_assigner(params.backend, params.gpu_tf32, assign, params.ivf_nlist, params.ivf_nprobe, coarse)


def choose_backend(name: str = "auto") -> str:
    """auto: FAISS GPU if faiss has GPUs, else torch on CUDA, else FAISS CPU. Explicit names are
    checked so a wrong choice fails here, not mid-run."""
    if name not in BACKENDS:
        raise ValueError(f"k-means backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        if dist.faiss_gpu_count() > 0:
            return "faiss_gpu"
        return "torch" if torch.cuda.is_available() else "faiss_cpu"
    if name == "faiss_gpu" and dist.faiss_gpu_count() == 0:
        raise RuntimeError(
            "pseudo.backend=faiss_gpu but faiss sees no GPU (install the faiss-gpu "
            "package, not faiss-cpu, on a GPU node) - or use backend=auto"
        )
    return name


def make_assigner(
    backend: str,
    gpu_tf32: bool = True,
    assign: str = "exact",
    ivf_nlist: int = 0,
    ivf_nprobe: int = 16,
    coarse: np.ndarray | None = None,
) -> Assigner:
    backend = choose_backend(backend)
    if assign == "auto":  # (params_assigner also weighs the saving; here k is not known yet)
        assign = "ivf" if coarse is not None and backend != "torch" else "exact"
    if assign == "ivf":
        if backend == "torch":
            raise ValueError(
                "pseudo.assign=ivf (two-level assignment) needs a FAISS backend: set "
                "pseudo.backend=faiss_gpu (faiss-gpu installed) or faiss_cpu, or assign=exact"
            )
        gpu = dist.local_rank() % max(dist.faiss_gpu_count(), 1) if backend == "faiss_gpu" else None
        return FaissIVFAssigner(ivf_nlist, ivf_nprobe, gpu, coarse)
    if backend == "faiss_gpu":
        return FaissGPUAssigner(dist.local_rank() % max(dist.faiss_gpu_count(), 1))
    if backend == "torch":
        return TorchAssigner(dist.device(), gpu_tf32=gpu_tf32)
    return FaissCPUAssigner()


# ------------------------------------------------------------------------------------- sampling
def sample_counts(sizes: Mapping[int, int], m: int, seed: int) -> dict[int, int]:
    """How many training-sample rows each part gives: exactly m in total, each <= its size.

    Depends only on (all parts' sizes, m, seed), never on which rank owns what. m is split down a
    fixed binary tree over the sorted part ids: at each node the left child's share is drawn
    hypergeometric (the exact law of a uniform m-subset of all rows), or binomial clipped to what
    both children hold where a child has >= 10^9 rows (numpy's hypergeometric limit; at that size
    only the count variance differs, by the factor 1/(1 - m/N)). One vectorised draw per tree level:
    ~log2(parts) numpy calls, milliseconds for 10^5 parts whatever N.
    """
    ids = sorted(int(i) for i in sizes)
    n = np.array([int(sizes[i]) for i in ids], dtype=np.int64)
    if m >= int(n.sum()):
        return dict(zip(ids, n.tolist()))
    return dict(zip(ids, _split_down_tree(n, m, np.random.default_rng([seed, 0])).tolist()))


def _split_down_tree(n: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros(len(n), dtype=np.int64)
    csum = np.concatenate([[0], np.cumsum(n)])
    lo, hi, want = np.array([0]), np.array([len(n)]), np.array([m], dtype=np.int64)
    while len(lo):
        leaf = hi - lo == 1
        out[lo[leaf]] = want[leaf]
        keep = ~leaf & (want > 0)  # a node that takes nothing gives nothing to its children
        lo, hi, want = lo[keep], hi[keep], want[keep]
        mid = (lo + hi) // 2
        left = _draw_left_share(csum[mid] - csum[lo], csum[hi] - csum[mid], want, rng)
        lo, hi = np.concatenate([lo, mid]), np.concatenate([mid, hi])
        want = np.concatenate([left, want - left])
    return out


def _draw_left_share(left_n: np.ndarray, right_n: np.ndarray, want: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rows the left child gives of `want` drawn without replacement from left_n + right_n rows."""
    out = np.zeros(len(want), dtype=np.int64)
    exact = (left_n < HYPERGEOMETRIC_LIMIT) & (right_n < HYPERGEOMETRIC_LIMIT)
    if exact.any():
        out[exact] = rng.hypergeometric(left_n[exact], right_n[exact], want[exact])
    big = ~exact
    if big.any():
        p = left_n[big] / (left_n[big] + right_n[big])
        draw = rng.binomial(want[big], p)
        out[big] = np.clip(draw, np.maximum(want[big] - right_n[big], 0), np.minimum(want[big], left_n[big]))
    return out


def sample_rows(part_id: int, size: int, count: int, seed: int) -> np.ndarray:
    """The sorted rows part `part_id` gives to the sample (its own seeded draw: any rank can make it)."""
    if count >= size:
        return np.arange(size, dtype=np.int64)
    rows = np.random.default_rng([seed, 1, int(part_id)]).choice(int(size), int(count), replace=False)
    return np.sort(rows).astype(np.int64)


def sample_plan(sizes: Mapping[int, int], m: int, seed: int, parts: Any = None) -> dict[int, np.ndarray]:
    """Which rows of each part (of `parts`, default all) form the training sample: sorted row
    indices per part id; see sample_counts (world-size free, exactly m rows in total)."""
    counts = sample_counts(sizes, m, seed)
    wanted = sorted(counts) if parts is None else sorted(int(i) for i in parts)
    return {i: sample_rows(i, int(sizes[i]), counts[i], seed) for i in wanted}


@dataclass
class TrainingSample:
    """This rank's rows of the training sample. pos = each row's global sample position (parts in
    id order, rows in row order), the same whatever the world size."""

    x: torch.Tensor  # (n_local, d) float32, unit rows in spherical mode
    pos: np.ndarray  # (n_local,) int64 in [0, m)
    m: int  # sample rows, all ranks
    d: int
    sizes: dict[int, int]  # every part's size, all ranks
    seconds: float = 0.0


def draw_sample(parts: Mapping[int, Any], params: KMeansParams, device: torch.device | None = None) -> TrainingSample:
    """Read this rank's rows of the training sample (collective: sizes and dims are gathered)."""
    t0 = time.time()
    sizes = _gather_sizes(parts)
    n_total = sum(sizes.values())
    d = _dims(parts) if n_total else 0
    if n_total < params.k:
        raise ValueError(
            f"k-means: {n_total} points for k={params.k} clusters; lower pseudo.k (at most the number of points)"
        )
    m = min(n_total, params.k * params.max_points_per_centroid)
    counts = sample_counts(sizes, m, params.seed)
    offsets = dict(zip(sorted(counts), np.concatenate([[0], np.cumsum([counts[i] for i in sorted(counts)])])))
    device = device or torch.device("cpu")
    xs, pos = [], []
    for i in sorted(int(i) for i in parts):
        rows = sample_rows(i, sizes[i], counts[i], params.seed)
        if len(rows):
            xs.append(_to_float(_take_rows(parts[i], rows, sizes[i]), params.spherical, device))
            pos.append(int(offsets[i]) + np.arange(len(rows), dtype=np.int64))
    x = torch.cat(xs) if xs else torch.zeros(0, d, device=device)
    p = np.concatenate(pos) if pos else np.zeros(0, np.int64)
    return TrainingSample(x=x, pos=p, m=m, d=d, sizes=sizes, seconds=time.time() - t0)


def _gather_sizes(parts: Mapping[int, Any]) -> dict[int, int]:
    local = {int(i): int(a.shape[0]) for i, a in parts.items()}
    merged: dict[int, int] = {}
    for r, d in enumerate(dist.all_gather_object(local)):
        for i, n in d.items():
            if i in merged:
                raise ValueError(
                    f"k-means: part {i} is owned by more than one rank (rank {r} too); "
                    f"each rank must own disjoint parts"
                )
            merged[i] = n
    return merged


def _dims(parts: Mapping[int, Any]) -> int:
    dims = {int(a.shape[1]) for a in parts.values() if a.ndim == 2}
    all_dims = set().union(*dist.all_gather_object(dims))
    if len(all_dims) != 1:
        raise ValueError(f"k-means: parts must share one dimension, got {sorted(all_dims)}")
    return all_dims.pop()


def _to_float(a: Any, spherical: bool, device: torch.device | None = None) -> torch.Tensor:
    """Rows (numpy/memmap of any float dtype, or a torch tensor on any device) -> float32 tensor
    on `device` (default: where they are), unit-normalised in spherical mode."""
    if isinstance(a, torch.Tensor):
        x = a.to(device or a.device, torch.float32)
    else:
        x = torch.from_numpy(np.array(a, dtype=np.float32))  # a private copy: memmaps are read-only
        x = x.to(device) if device is not None else x
    if spherical:  # cosine: unit points make L2 argmin == cosine argmax
        x = torch.nn.functional.normalize(x, dim=1)
    return x


def _take_rows(part: Any, rows: np.ndarray, n: int) -> Any:
    if len(rows) == n:
        return part
    if isinstance(part, torch.Tensor):
        return part[torch.as_tensor(rows, device=part.device)]
    return np.asarray(part)[rows]  # memmap: reads only these rows


def _rows_by_position(local_x: torch.Tensor, local_pos: np.ndarray, wanted: np.ndarray, d: int) -> torch.Tensor:
    """The sample rows at global positions `wanted` (row j = position wanted[j]), on every rank:
    each rank fills the rows it holds, the rest stay 0, and a sum all-reduce assembles them."""
    out = torch.zeros(len(wanted), d, dtype=torch.float32, device=local_x.device)
    order = np.argsort(wanted, kind="stable")
    sorted_wanted = np.asarray(wanted)[order]
    at = np.searchsorted(sorted_wanted, local_pos)
    hit = at < len(sorted_wanted)
    hit[hit] = sorted_wanted[at[hit]] == local_pos[hit]
    if hit.any():
        dst = torch.as_tensor(order[at[hit]], device=local_x.device)
        src = torch.as_tensor(np.flatnonzero(hit), device=local_x.device)
        out[dst] = local_x[src]
    return dist.staged_all_reduce_sum(out)


# ----------------------------------------------------------------------------------------- init
def resolve_init(init: str, k: int, kmeanspp_max_k: int) -> str:
    """auto -> k-means++ where it is cheap (k <= kmeanspp_max_k: its k sequential D^2 steps cost
    ~0.5-3 us x k^2 on one rank while the others wait), random sample points above (FAISS's default)."""
    if init == "auto":
        return "kmeans++" if k <= kmeanspp_max_k else "random"
    return init


def kmeans_pp(pool: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling) on `pool`; deterministic given the seed."""
    return _kmeans_pp(pool, k, np.random.default_rng([seed, 3]))


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


def _init_centroids(
    pick_rows: Callable[[np.ndarray], torch.Tensor], m: int, k: int, params: KMeansParams, key: tuple, distributed: bool
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


# ------------------------------------------------------------------------------------ checkpoints
class _Checkpoints:
    """Files of one training run under `root`, each stamped with the inputs' fingerprint: a file
    written for other inputs (params, part sizes, caller's tag) is never loaded. Writes are
    atomic (fileio.atomic_path): a killed writer leaves the previous file or none, never half of one."""

    def __init__(self, root: str | os.PathLike[str] | None, fingerprint: str):
        self.root = Path(root) if root is not None else None
        self.fingerprint = fingerprint
        if self.root is not None and dist.is_main():
            self.root.mkdir(parents=True, exist_ok=True)

    def derived(self, extra: str) -> _Checkpoints:
        """Checkpoints of later stages that are valid only after this `extra` result (e.g. the
        coarse centroids' hash): a recomputed coarse level never meets stale cells."""
        return _Checkpoints(self.root, hashlib.sha256(f"{self.fingerprint}:{extra}".encode()).hexdigest())

    def save(self, name: str, meta: dict[str, Any], **arrays: np.ndarray) -> None:
        if self.root is None:
            return
        body = json.dumps({**meta, "fingerprint": self.fingerprint, "version": CKPT_VERSION})
        with atomic_path(self.root / f"{name}.npz") as tmp:
            np.savez(tmp, meta=np.array(body), **arrays)

    def load(self, name: str) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        if self.root is None:
            return None
        try:
            with np.load(self.root / f"{name}.npz", allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta.get("fingerprint") != self.fingerprint or meta.get("version") != CKPT_VERSION:
                    return None
                return meta, {key: z[key] for key in z.files if key != "meta"}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None  # missing or unreadable: start that stage afresh


def _fingerprint(
    params: KMeansParams,
    sample: TrainingSample,
    two_level: bool,
    coarse_k: int,
    init_centroids: np.ndarray | None,
    tag: Any,
) -> str:
    """What a checkpoint must match to be resumed: the inputs of the training (not the backend,
    chunking or world size, which change the centroids by float noise only)."""
    sizes = json.dumps(sorted(sample.sizes.items()))
    body = {
        "version": CKPT_VERSION,
        "k": params.k,
        "niter": params.niter,
        "d": sample.d,
        "max_points_per_centroid": params.max_points_per_centroid,
        "init": params.init,
        "kmeanspp_max_k": params.kmeanspp_max_k,
        "spherical": params.spherical,
        "seed": params.seed,
        "two_level": two_level,
        "coarse_k": coarse_k,
        "refine_iters": params.two_level_refine_iters if two_level else 0,
        "sizes": hashlib.sha256(sizes.encode()).hexdigest(),
        "init_centroids": None
        if init_centroids is None
        else hashlib.sha256(np.ascontiguousarray(init_centroids, dtype=np.float32).tobytes()).hexdigest(),
        "tag": tag,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------------- training
def _split_empty(c: torch.Tensor, counts: np.ndarray, rng: np.random.Generator) -> int:
    """Re-seed empty clusters by splitting big ones (FAISS's rule): an empty cluster takes a copy
    of cluster j, drawn with probability ~ (size_j - 1); both copies move apart by +-SPLIT_EPS per
    dimension and share j's count. The donors are drawn in one call (O(k + empties), not
    O(k x empties) as a per-cluster draw would be at k = 10^6). Runs on global counts, so every
    rank does the same."""
    empties = np.flatnonzero(counts == 0)
    w = np.maximum(counts - 1, 0).astype(np.float64)
    if len(empties) == 0 or w.sum() <= 0:  # nothing empty, or nothing left to split
        return 0
    donors = rng.choice(len(counts), size=len(empties), p=w / w.sum())
    sign = torch.ones(c.shape[1], device=c.device)
    sign[1::2] = -1.0
    for ci, cj in zip(empties.tolist(), donors.tolist()):
        c[ci] = c[cj] * (1 + SPLIT_EPS * sign)
        c[cj] = c[cj] * (1 - SPLIT_EPS * sign)
        counts[ci] = counts[cj] // 2
        counts[cj] -= counts[ci]
    return len(empties)


@contextlib.contextmanager
def _one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """The scatter-add is memory bound: on CPU, OpenMP threads only add synchronisation stalls
    (measured 3x slower with 2 threads on a loaded 2-core machine)."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _lloyd_step(
    chunks: list[torch.Tensor], c: torch.Tensor, assigner: Assigner, distributed: bool = True
) -> tuple[torch.Tensor, np.ndarray, float]:
    """One assignment pass over this rank's points: (sums (k,d) f64, counts, objective), summed
    over ranks when distributed. Everything is accumulated in place on the device of the points,
    in one float64 buffer that is the only thing crossing ranks (one collective per iteration)."""
    k, d = c.shape
    acc_dev = chunks[0].device if chunks else c.device
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
    float64 sums once at least k rows went in (and at the end). Float32 index_add_ is ~2x faster
    than float64 and converting each chunk to float64 costs 7x more still (measured on CPU,
    65536 x 128 chunks: 5 ms vs 11 ms vs 34 ms), while a fold costs k x d only every >= k rows -
    no per-chunk k x d work at k = 10^6 (the old per-chunk conversion: 2000 floats per point).
    Precision: float32 within a window of max(chunk, k) rows, float64 across windows and ranks."""

    def __init__(self, sums: torch.Tensor):
        self.sums = sums
        self.buf = torch.zeros(sums.shape, dtype=torch.float32, device=sums.device)
        self.rows = 0

    def add(self, lab: torch.Tensor, x: torch.Tensor) -> None:
        with _one_thread_on_cpu(x.device):
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
class _Lloyd:
    """Where one k-means stage stands: everything a checkpoint holds. Its random draws (empty
    splits) are seeded by (seed, stage key, iteration), so no generator state needs saving."""

    c: torch.Tensor
    objective: list[float] = field(default_factory=list)
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0))
    splits: int = 0
    it: int = 0  # iterations done


def _run_lloyd(
    chunks: list[torch.Tensor],
    st: _Lloyd,
    assigner: Assigner,
    params: KMeansParams,
    niter: int,
    rng_key: tuple,
    distributed: bool,
    stage: str = "",
    ckpt: _Checkpoints | None = None,
    on_step: Callable[[str, int], None] | None = None,
) -> _Lloyd:
    """Lloyd iterations st.it .. niter. Distributed stages are checkpointed by rank 0 every
    ckpt_every_iters iterations and at the end, then on_step(stage, iterations done) runs."""
    every = params.ckpt_every_iters
    desc = f"k-means {stage} k={st.c.shape[0]}"
    for it in _bar(range(st.it, niter), params.progress and distributed, desc):
        sums, counts, obj = _lloyd_step(chunks, st.c, assigner, distributed)
        st.c, splits = _update_centroids(st.c, sums, counts, np.random.default_rng([*rng_key, it]), params.spherical)
        st.objective.append(obj)
        st.counts, st.splits, st.it = counts, st.splits + splits, it + 1
        if ckpt is not None and dist.is_main() and (st.it == niter or (every and st.it % every == 0)):
            _save_lloyd(ckpt, stage, st)
        if on_step is not None:
            on_step(stage, st.it)
    return st


def _save_lloyd(ckpt: _Checkpoints, stage: str, st: _Lloyd) -> None:
    ckpt.save(
        stage,
        {"iteration": st.it, "objective": st.objective, "splits": st.splits},
        centroids=st.c.detach().cpu().numpy().astype(np.float32),
        counts=st.counts,
    )


def _resume_lloyd(ckpt: _Checkpoints, stage: str, k: int, d: int, device: torch.device) -> _Lloyd | None:
    """The stage's latest checkpoint, as rank 0 reads it, on every rank (None: start afresh).
    One reader, then broadcasts: ranks never disagree, even without a shared file system."""
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
    return _Lloyd(
        c=c,
        objective=[float(v) for v in meta["objective"]],
        counts=counts.cpu().numpy(),
        splits=int(meta["splits"]),
        it=int(meta["iteration"]),
    )


def _distributed_kmeans(
    x: torch.Tensor,
    pos: np.ndarray,
    m: int,
    d: int,
    k: int,
    params: KMeansParams,
    assigner: Assigner,
    key: tuple,
    stage: str,
    ckpt: _Checkpoints,
    on_step: Callable[[str, int], None] | None,
    init_centroids: np.ndarray | None = None,
) -> tuple[_Lloyd, str, int, float]:
    """k-means over all ranks' rows (x, global positions pos in [0, m)), resumed from its
    checkpoint when one matches: (final state, init used, iterations resumed, init seconds)."""
    t0 = time.time()
    st = _resume_lloyd(ckpt, stage, k, d, x.device)
    resumed = st.it if st is not None else 0
    method = "resumed"
    if st is None:
        if init_centroids is not None:
            c, method = torch.as_tensor(np.asarray(init_centroids, dtype=np.float32), device=x.device).clone(), "given"
        else:
            c, method = _init_centroids(lambda w: _rows_by_position(x, pos, w, d), m, k, params, key, True)
        if params.spherical:
            c = torch.nn.functional.normalize(c, dim=1)
        st = _Lloyd(c=c, counts=np.zeros(k))
    init_s = time.time() - t0
    chunks = list(torch.split(x, params.chunk_size)) if len(x) else []
    st = _run_lloyd(chunks, st, assigner, params, params.niter, (*key, 4), True, stage, ckpt, on_step)
    return st, method, resumed, init_s


def use_two_level(params: KMeansParams) -> bool:
    """two_level=auto: on from two_level_min_k centroids, where flat Lloyd's k x sample cost
    (10^6 x 2.6 x 10^8 x d per iteration at k = 10^6) is out of reach and the coarse level
    cuts it ~sqrt(k)-fold."""
    if params.two_level == "auto":
        return params.k >= params.two_level_min_k
    return params.two_level == "on"


def coarse_k_for(params: KMeansParams) -> int:
    return int(min(params.k, params.coarse_k or max(1, round(math.sqrt(params.k)))))


def train_centroids(
    parts: Mapping[int, Any],
    params: KMeansParams,
    init_centroids: np.ndarray | None = None,
    *,
    ckpt_dir: str | os.PathLike[str] | None = None,
    ckpt_tag: Any = None,
    on_step: Callable[[str, int], None] | None = None,
) -> KMeansResult:
    """Train k centroids on the points of all ranks' parts (call on every rank, collectively).

    parts: {global part id: (n_i, d) array-like (np.memmap welcome)} owned by THIS rank; ids are
    disjoint across ranks. The sample (k x max_points_per_centroid points) is read into memory in
    float32 (on the device of the assignment backend). Flat or two-level (use_two_level; explicit
    init_centroids means flat). ckpt_dir: where checkpoints go and are resumed from (every rank
    passes the same dir; shared by all ranks for two-level training, whose cells are written by
    their owners); ckpt_tag: anything else that identifies the inputs (e.g. the embeddings'
    teacher hash). on_step(stage, step): called on every rank after each distributed Lloyd
    iteration ("lloyd" | "coarse" | "refine", iterations done) and after each finished cell
    ("cell", cell id) on the rank that trained it.
    """
    t0 = time.time()
    backend = choose_backend(params.backend)
    if params.two_level == "on" and init_centroids is not None:
        raise ValueError("k-means: init_centroids (k centroids) need flat training; set two_level=off")
    two_level = use_two_level(params) and init_centroids is None  # given k centroids: flat (auto)
    # flat: exact, or IVF when assign=ivf ("auto" is exact without cells); two-level: exact for
    # its small coarse level and cells, the refine stage makes its own
    assigner = make_assigner(backend, params.gpu_tf32) if two_level else params_assigner(params)
    sample = draw_sample(parts, params, _sample_device(backend, assigner))
    k1 = coarse_k_for(params) if two_level else 0
    ckpt = _Checkpoints(ckpt_dir, _fingerprint(params, sample, two_level, k1, init_centroids, ckpt_tag))
    if two_level:
        res = _train_two_level(sample, params, backend, assigner, ckpt, on_step)
    else:
        res = _train_flat(sample, params, assigner, backend, ckpt, on_step, init_centroids)
    res.n_total = sum(sample.sizes.values())
    res.seconds = time.time() - t0
    res.timings = {"sample_s": sample.seconds, **res.timings}
    return res


def _sample_device(backend: str, assigner: Assigner) -> torch.device:
    """The points live where they are searched: the GPU for torch-on-CUDA and FAISS GPU, so the
    sums are accumulated there too; the host for FAISS CPU."""
    return assigner.device if backend in ("torch", "faiss_gpu") else torch.device("cpu")


def _train_flat(
    sample: TrainingSample,
    params: KMeansParams,
    assigner: Assigner,
    backend: str,
    ckpt: _Checkpoints,
    on_step: Callable[[str, int], None] | None,
    init_centroids: np.ndarray | None,
) -> KMeansResult:
    if init_centroids is not None and np.shape(init_centroids) != (params.k, sample.d):
        raise ValueError(f"init_centroids has shape {np.shape(init_centroids)}, expected {(params.k, sample.d)}")
    t0 = time.time()
    st, method, resumed, init_s = _distributed_kmeans(
        sample.x,
        sample.pos,
        sample.m,
        sample.d,
        params.k,
        params,
        assigner,
        (params.seed,),
        "lloyd",
        ckpt,
        on_step,
        init_centroids,
    )
    return KMeansResult(
        centroids=st.c.cpu().numpy().astype(np.float32),
        objective=st.objective,
        sizes=st.counts.astype(np.int64),
        n_train=sample.m,
        n_total=0,
        backend=backend,
        seconds=0.0,
        splits=st.splits,
        timings={"init_s": init_s, "lloyd_s": time.time() - t0 - init_s},
        init=method,
        resumed={"lloyd": resumed},
    )


# ---------------------------------------------------------------------------------- two-level
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
    chosen = np.sort(np.random.default_rng([seed, 10, 1]).choice(sample.m, m1, replace=False))
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


@dataclass
class _Cell:
    centroids: torch.Tensor
    counts: np.ndarray
    objective: np.ndarray  # (niter,)
    splits: int


def _train_cell(x: torch.Tensor, k_c: int, cell: int, params: KMeansParams, assigner: Assigner) -> _Cell:
    """Local k-means of one coarse cell's sample points (no collective: one rank owns the cell)."""
    c, _ = _init_centroids(
        lambda w: x[torch.as_tensor(w, device=x.device)],
        len(x),
        k_c,
        params,
        (params.seed, 20, cell),
        distributed=False,
    )
    if params.spherical:
        c = torch.nn.functional.normalize(c, dim=1)
    st = _Lloyd(c=c, counts=np.zeros(k_c))
    st = _run_lloyd(
        list(torch.split(x, params.chunk_size)), st, assigner, params, params.niter, (params.seed, 21, cell), False
    )
    return _Cell(st.c, st.counts, np.asarray(st.objective, dtype=np.float64), st.splits)


def _cell_from_ckpt(ckpt: _Checkpoints, cell: int, k_c: int, niter: int, device: torch.device) -> _Cell | None:
    loaded = ckpt.load(f"cell-{cell:07d}")
    if loaded is None or loaded[1]["centroids"].shape[0] != k_c or len(loaded[1]["objective"]) != niter:
        return None
    meta, a = loaded
    return _Cell(torch.from_numpy(a["centroids"]).to(device), a["counts"], a["objective"], int(meta["splits"]))


def _train_my_cells(
    x: torch.Tensor,
    keys: np.ndarray,
    m: int,
    fine_k: np.ndarray,
    params: KMeansParams,
    assigner: Assigner,
    ckpt: _Checkpoints,
    on_step: Callable[[str, int], None] | None,
) -> tuple[dict[int, _Cell], int]:
    """Fine k-means of the cells whose rows this rank received (rows grouped by cell); each
    finished cell is checkpointed by this rank. Returns ({cell: result}, cells resumed)."""
    cells_of_rows = keys // m
    mine = np.unique(cells_of_rows)
    bounds = np.searchsorted(cells_of_rows, np.concatenate([mine, [np.iinfo(np.int64).max]]))
    out, resumed = {}, 0
    for j in _bar(range(len(mine)), params.progress, f"k-means cells ({len(mine)} on rank 0)"):
        cell, k_c = int(mine[j]), int(fine_k[mine[j]])
        res = _cell_from_ckpt(ckpt, cell, k_c, params.niter, x.device)
        if res is None:
            res = _train_cell(x[bounds[j] : bounds[j + 1]], k_c, cell, params, assigner)
            ckpt.save(
                f"cell-{cell:07d}",
                {"splits": res.splits},
                centroids=res.centroids.cpu().numpy().astype(np.float32),
                counts=res.counts,
                objective=res.objective,
            )
        else:
            resumed += 1
        out[cell] = res
        if on_step is not None:
            on_step("cell", cell)
    return out, resumed


def _assemble_cells(
    done: dict[int, _Cell], fine_k: np.ndarray, d: int, niter: int, resumed: int, device: torch.device
) -> tuple[_Lloyd, int]:
    """All ranks' cells as one state: (k, d) centroids grouped by cell, counts, the per-iteration
    objective summed over cells, splits; and the cells resumed, all ranks. Each rank fills its
    own rows of zeroed buffers and sum all-reduces assemble them (x + 0 is exact)."""
    k = int(fine_k.sum())
    start = np.concatenate([[0], np.cumsum(fine_k)])
    c = torch.zeros(k, d, dtype=torch.float32, device=device)
    stats = np.zeros(k + niter + 2, dtype=np.float64)  # counts, objective per iteration, splits, resumed
    for cell, res in done.items():
        c[start[cell] : start[cell + 1]] = res.centroids.to(device)
        stats[start[cell] : start[cell + 1]] = res.counts
        stats[k : k + niter] += res.objective
        stats[-2] += res.splits
    stats[-1] = resumed
    c = dist.staged_all_reduce_sum(c)
    stats = dist.staged_all_reduce_sum(torch.from_numpy(stats).to(device)).cpu().numpy()
    st = _Lloyd(c=c, objective=stats[k : k + niter].tolist(), counts=stats[:k], splits=int(round(stats[-2])))
    return st, int(round(stats[-1]))


def _train_coarse(
    sample: TrainingSample,
    k1: int,
    params: KMeansParams,
    assigner: Assigner,
    ckpt: _Checkpoints,
    on_step: Callable[[str, int], None] | None,
) -> tuple[_Lloyd, str, int, float]:
    """The coarse level: distributed Lloyd with k1 centroids on a world-size-free subset of the
    sample (COARSE_POINTS_PER_CELL per cell, as FAISS), checkpointed as stage "coarse"."""
    m1 = min(sample.m, k1 * COARSE_POINTS_PER_CELL)
    x1, pos1 = _coarse_subset(sample, m1, params.seed)
    return _distributed_kmeans(x1, pos1, m1, sample.d, k1, params, assigner, (params.seed, 10), "coarse", ckpt, on_step)


def _partition_by_cell(
    sample: TrainingSample, coarse: torch.Tensor, params: KMeansParams, assigner: Assigner
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Every sample row's coarse cell, each cell's share of k, and the rows moved to the rank
    owning their cell: (rows, keys cell * m + position, centroids per cell). Frees sample.x."""
    cells = _nearest(sample.x, coarse, assigner, params.chunk_size)
    cell_sizes = dist.staged_all_reduce_sum(torch.bincount(cells, minlength=coarse.shape[0]).to(torch.float64))
    cell_sizes = np.round(cell_sizes.cpu().numpy()).astype(np.int64)
    fine_k = allocate_fine_k(cell_sizes, params.k)
    x, keys = _send_to_owners(sample, cells, cell_owners(cell_sizes, fine_k, dist.world_size()))
    return x, keys, fine_k


def _train_two_level(
    sample: TrainingSample,
    params: KMeansParams,
    backend: str,
    exact: Assigner,
    ckpt: _Checkpoints,
    on_step: Callable[[str, int], None] | None,
) -> KMeansResult:
    """Coarse cells by distributed Lloyd on a subset of the sample; each cell's share of k trained
    by its owner rank on all of the cell's sample points; the fine centroids all-gathered; then
    two_level_refine_iters distributed Lloyd iterations over all k centroids, assigning through
    the coarse cells (params_assigner with the coarse centroids: IVF on FAISS backends), which
    repair what the cell boundaries cut (a blob split between two cells gets two centroids while a
    cell's lone blobs share one). Measured on Gaussian mixtures (k = 256..1024): without them 2-13%
    more inertia than flat Lloyd (FAISS's two_level_clustering: the same), after 4 iterations
    -2.5%..+0.7%; each costs ~(k1 + nprobe k / k1) d per point, ~1/60 of a flat one at k = 10^6.

    Memory: the sample is m = k x max_points_per_centroid rows (k = 10^6, d = 128, 256 points per
    centroid: 1.3 x 10^11 bytes in float32 - 131 GB, too much for any one rank), so it stays split:
    each rank holds ~m / world rows, then exchanges them so it holds its cells' rows (~m / world
    again); peak ~2 m d 4 / world bytes per rank (4 GB at 64 ranks, 2 GB with mppc 64 at 32)."""
    times = [time.time()]
    k1 = coarse_k_for(params)
    coarse, method, resumed_coarse, _ = _train_coarse(sample, k1, params, exact, ckpt, on_step)
    coarse_np = coarse.c.cpu().numpy().astype(np.float32)
    times.append(time.time())
    x, keys, fine_k = _partition_by_cell(sample, coarse.c, params, exact)
    times.append(time.time())
    fine_ckpt = ckpt.derived(hashlib.sha256(coarse_np.tobytes()).hexdigest())
    st = _resume_lloyd(fine_ckpt, "refine", params.k, sample.d, x.device) if params.two_level_refine_iters else None
    resumed = {"coarse": resumed_coarse, "cells": 0, "refine": st.it if st is not None else 0}
    if st is None:  # a refine checkpoint already holds everything the cells gave
        done, n_resumed = _train_my_cells(x, keys, sample.m, fine_k, params, exact, fine_ckpt, on_step)
        st, resumed["cells"] = _assemble_cells(done, fine_k, sample.d, params.niter, n_resumed, coarse.c.device)
    times.append(time.time())
    chunks = list(torch.split(x, params.chunk_size)) if len(x) else []
    st = _run_lloyd(
        chunks,
        st,
        params_assigner(params, coarse_np),
        params,
        params.two_level_refine_iters,
        (params.seed, 30),
        True,
        "refine",
        fine_ckpt,
        on_step,
    )
    times.append(time.time())
    return KMeansResult(
        centroids=st.c.cpu().numpy().astype(np.float32),
        objective=st.objective,
        sizes=np.round(st.counts).astype(np.int64),
        n_train=sample.m,
        n_total=0,
        backend=backend,
        seconds=0.0,
        splits=st.splits + coarse.splits,
        timings=dict(zip(("coarse_s", "exchange_s", "cells_s", "refine_s"), np.diff(times).tolist())),
        init=method,
        two_level=True,
        coarse_centroids=coarse_np,
        centroid_cell=np.repeat(np.arange(k1), fine_k),
        resumed=resumed,
    )


def _bar(it: Any, enabled: bool, desc: str) -> Any:
    """Rank 0's progress, moved after every Lloyd iteration (or cell): a bar on a terminal, a log
    line in a job log, where a bar's redraws would only show when it closes (tb.steps)."""
    return steps(it, desc) if enabled else it


# ---------------------------------------------------------------------------------- full pass
def assign_array(
    x: Any,
    centroids: np.ndarray | torch.Tensor | Assigner,
    *,
    spherical: bool = False,
    chunk_size: int = 65536,
    backend: str = "auto",
    gpu_tf32: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row of x (np.memmap welcome), streaming `chunk_size` rows at a
    time, so memory is O(chunk_size x d + k x d) whatever len(x).

    Returns (labels int32, dist float32) where dist is the Euclidean (not squared) distance to the
    centroid, of the unit-normalised point in spherical mode.
    """
    if isinstance(centroids, Assigner):
        assigner = centroids
    else:
        assigner = make_assigner(backend, gpu_tf32)
        assigner.set_centroids(
            centroids
            if isinstance(centroids, torch.Tensor)
            else torch.as_tensor(np.asarray(centroids, dtype=np.float32))
        )
    n = int(x.shape[0])
    labels = np.empty(n, dtype=np.int32)
    dists = np.empty(n, dtype=np.float32)
    for s in range(0, n, chunk_size):
        chunk = _to_float(x[s : s + chunk_size], spherical, assigner.device)
        lab, d2 = assigner.assign(chunk)
        labels[s : s + len(chunk)] = lab.cpu().numpy()
        dists[s : s + len(chunk)] = d2.sqrt().cpu().numpy()
    return labels, dists


def cap_k(k: int, n: int, min_points_per_centroid: int = 4) -> int:
    """k so that every centroid has on average >= min_points_per_centroid points (warns when capped).

    k-means with fewer points per cluster mostly splits noise, and FAISS refuses n < k outright.
    """
    cap = max(1, n // min_points_per_centroid)
    if k > cap:
        warnings.warn(
            f"pseudo.k={k} is too large for {n} points: using k={cap} "
            f"(>= {min_points_per_centroid} points per cluster on average)",
            stacklevel=2,
        )
        return cap
    return k
