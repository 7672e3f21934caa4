"""Distributed k-means: each rank owns a disjoint set of point arrays ("parts", e.g. one per shard).

Owns: the deterministic training sample (k x max_points_per_centroid points drawn across all ranks,
the same points whatever the world size), k-means++ / random init, Lloyd iterations whose partial
sums, counts and objective are all-reduced in float64 (so 1 rank and N ranks give the same
centroids up to float noise), empty-cluster re-seeding by splitting large clusters (FAISS's rule),
spherical (cosine) mode, the per-rank assignment backends (FAISS GPU, torch matmul, FAISS CPU) and
the streaming full assignment pass over memory-mapped arrays (memory bounded whatever n).
Tests: tests/unit/test_kmeans.py (backends agree, vs faiss.Kmeans, splitting, streaming),
tests/integration/test_pseudo_multirank.py (2 real ranks == 1 rank).
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from .. import dist

__all__ = ["KMeansParams", "KMeansResult", "Assigner", "TorchAssigner", "FaissCPUAssigner",
           "FaissGPUAssigner", "FaissIVFAssigner", "choose_backend", "make_assigner", "params_assigner", "train_centroids", "assign_array",
           "sample_plan", "kmeans_pp"]

BACKENDS = ("auto", "faiss_gpu", "torch", "faiss_cpu")
SPLIT_EPS = 1.0 / 1024.0       # relative perturbation when a large cluster is split (as FAISS)
KMEANSPP_POOL_PER_CENTROID = 4  # k-means++ runs on a pool of 4k sample points (it is O(k * pool * d))


@dataclass
class KMeansParams:
    k: int
    niter: int = 20
    max_points_per_centroid: int = 256
    init: str = "kmeans++"            # "kmeans++" | "random"
    spherical: bool = False
    backend: str = "auto"             # see choose_backend()
    chunk_size: int = 65536           # points per assignment chunk
    seed: int = 0
    gpu_tf32: bool = True             # torch backend on CUDA: TF32 distance matmuls
    assign: str = "exact"             # "exact" | "ivf" (two-level, FAISS backends; for very large k)
    ivf_nlist: int = 0                # coarse lists of the two-level assignment (0: ~4 sqrt(k))
    ivf_nprobe: int = 16              # lists searched per point
    progress: bool = True             # tqdm on rank 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k-means: k must be >= 1, got {self.k}")
        if self.init not in ("kmeans++", "random"):
            raise ValueError(f"k-means: init must be 'kmeans++' or 'random', got {self.init!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"k-means: backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.assign not in ("exact", "ivf"):
            raise ValueError(f"k-means: assign must be 'exact' or 'ivf', got {self.assign!r}")

    @classmethod
    def from_config(cls, pseudo_cfg: Any, k: int | None = None, **over: Any) -> "KMeansParams":
        """From config.PseudoConfig (k may be overridden, e.g. after capping it to the data)."""
        kw = dict(k=pseudo_cfg.k if k is None else k, niter=pseudo_cfg.niter,
                  max_points_per_centroid=pseudo_cfg.max_points_per_centroid, init=pseudo_cfg.init,
                  spherical=pseudo_cfg.spherical, backend=pseudo_cfg.backend,
                  chunk_size=pseudo_cfg.chunk_size, seed=pseudo_cfg.seed,
                  gpu_tf32=getattr(pseudo_cfg, "gpu_tf32", True),
                  assign=getattr(pseudo_cfg, "assign", "exact"),
                  ivf_nlist=getattr(pseudo_cfg, "ivf_nlist", 0),
                  ivf_nprobe=getattr(pseudo_cfg, "ivf_nprobe", 16))
        kw.update(over)
        return cls(**kw)


@dataclass
class KMeansResult:
    centroids: np.ndarray            # (k, d) float32
    objective: list[float]           # sum of squared distances on the training sample, per iteration
    sizes: np.ndarray                # (k,) training-sample cluster sizes of the last iteration
    n_train: int                     # points in the training sample (all ranks)
    n_total: int                     # points in all parts (all ranks)
    backend: str
    seconds: float
    splits: int                      # empty clusters re-seeded, all iterations together
    timings: dict[str, float] = field(default_factory=dict)


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

    def __init__(self, device: torch.device | str = "cpu", gpu_tf32: bool = True,
                 budget: int | None = None):
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
                xb = x[s:s + rows]
                scores = torch.addmm(self.c_sq, xb, ct, beta=1.0, alpha=-2.0)
                best, idx = scores.min(dim=1)
                labels[s:s + rows] = idx
                d2[s:s + rows] = (best + (xb * xb).sum(1)).clamp_min_(0.0)
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
        x_np = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        d2, idx = self.index.search(x_np, 1)
        return torch.from_numpy(idx[:, 0].astype(np.int64)), torch.from_numpy(np.maximum(d2[:, 0], 0))


class FaissGPUAssigner(FaissCPUAssigner):
    """FAISS GpuIndexFlatL2 on this rank's GPU (faiss-gpu); points go host -> device per chunk."""

    name = "faiss_gpu"

    def __init__(self, device_id: int = 0) -> None:
        super().__init__()
        self.res = self.faiss.StandardGpuResources()
        self.device_id = device_id

    def _new_index(self, c_np: np.ndarray) -> Any:
        cfg = self.faiss.GpuIndexFlatConfig()
        cfg.device = self.device_id
        return self.faiss.GpuIndexFlatL2(self.res, c_np.shape[1], cfg)


class FaissIVFAssigner(FaissCPUAssigner):
    """Two-level assignment for very large k: the k centroids go into an IndexIVFFlat whose
    coarse quantizer (nlist groups of centroids) is trained once, on the first centroids it sees;
    each point is compared with the centroids of its `nprobe` nearest groups only, so the cost
    per point is ~(nlist + nprobe * k / nlist) * d instead of k * d. Approximate: a point whose
    nearest centroid sits in an unprobed group gets the best one among the probed groups.
    Later set_centroids() calls keep the quantizer (centroids move little between iterations)
    and only re-add the centroids."""

    name = "faiss_ivf"

    def __init__(self, nlist: int = 0, nprobe: int = 16, gpu_device: int | None = None) -> None:
        super().__init__()
        self.nlist, self.nprobe, self.gpu_device = nlist, nprobe, gpu_device
        self.res = self.faiss.StandardGpuResources() if gpu_device is not None else None

    @staticmethod
    def auto_nlist(k: int) -> int:
        return int(max(1, min(k // 39, round(4 * math.sqrt(k)))))  # >= 39 centroids per list to train

    def _new_index(self, c_np: np.ndarray) -> Any:
        k, d = c_np.shape
        nlist = min(self.nlist or self.auto_nlist(k), k)
        quantizer = self.faiss.IndexFlatL2(d)
        index = self.faiss.IndexIVFFlat(quantizer, d, nlist, self.faiss.METRIC_L2)
        index.cp.seed = 1234
        index.train(c_np)
        if self.res is not None:
            index = self.faiss.index_cpu_to_gpu(self.res, self.gpu_device, index)
        self._quantizer = quantizer  # keep the Python reference alive with the index
        index.nprobe = min(self.nprobe, nlist)
        return index


def params_assigner(params: "KMeansParams") -> Assigner:
    return make_assigner(params.backend, params.gpu_tf32, params.assign, params.ivf_nlist, params.ivf_nprobe)


def faiss_gpu_count() -> int:
    """GPUs FAISS can use (0 with faiss-cpu, or without faiss at all)."""
    try:
        import faiss

        return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    except ImportError:
        return 0


def choose_backend(name: str = "auto") -> str:
    """auto: FAISS GPU if faiss has GPUs, else torch on CUDA, else FAISS CPU. Explicit names are
    checked so a wrong choice fails here, not mid-run."""
    if name not in BACKENDS:
        raise ValueError(f"k-means backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        if faiss_gpu_count() > 0:
            return "faiss_gpu"
        return "torch" if torch.cuda.is_available() else "faiss_cpu"
    if name == "faiss_gpu" and faiss_gpu_count() == 0:
        raise RuntimeError("pseudo.backend=faiss_gpu but faiss sees no GPU (install the faiss-gpu "
                           "package, not faiss-cpu, on a GPU node) - or use backend=auto")
    return name


def make_assigner(backend: str, gpu_tf32: bool = True, assign: str = "exact", ivf_nlist: int = 0,
                  ivf_nprobe: int = 16) -> Assigner:
    backend = choose_backend(backend)
    if assign == "ivf":
        if backend == "torch":
            raise ValueError("pseudo.assign=ivf (two-level assignment) needs a FAISS backend: set "
                             "pseudo.backend=faiss_gpu (faiss-gpu installed) or faiss_cpu, or assign=exact")
        gpu = dist.local_rank() % max(faiss_gpu_count(), 1) if backend == "faiss_gpu" else None
        return FaissIVFAssigner(ivf_nlist, ivf_nprobe, gpu)
    if backend == "faiss_gpu":
        return FaissGPUAssigner(dist.local_rank() % max(faiss_gpu_count(), 1))
    if backend == "torch":
        return TorchAssigner(dist.device(), gpu_tf32=gpu_tf32)
    return FaissCPUAssigner()


# ------------------------------------------------------------------------------------- sampling
def sample_plan(sizes: Mapping[int, int], m: int, seed: int) -> dict[int, np.ndarray]:
    """Which rows of each part form the training sample: sorted row indices per part id.

    Depends only on (all parts' sizes, m, seed), never on which rank owns what, so every world
    size trains on the same points. m is split across parts by a multivariate hypergeometric
    draw (exactly m in total), then each part draws its rows with its own seeded generator.
    """
    ids = sorted(sizes)
    counts = np.array([int(sizes[i]) for i in ids], dtype=np.int64)
    n = int(counts.sum())
    if m >= n:
        return {i: np.arange(c, dtype=np.int64) for i, c in zip(ids, counts)}
    per_part = np.random.default_rng([seed, 0]).multivariate_hypergeometric(counts, m, method="marginals")
    plan = {}
    for i, c, mi in zip(ids, counts, per_part):
        rows = np.random.default_rng([seed, 1, i]).choice(int(c), int(mi), replace=False)
        plan[i] = np.sort(rows)
    return plan


def _gather_sizes(parts: Mapping[int, Any]) -> dict[int, int]:
    local = {int(i): int(a.shape[0]) for i, a in parts.items()}
    merged: dict[int, int] = {}
    for r, d in enumerate(dist.all_gather_object(local)):
        for i, n in d.items():
            if i in merged:
                raise ValueError(f"k-means: part {i} is owned by more than one rank (rank {r} too); "
                                 f"each rank must own disjoint parts")
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
    return _all_reduce(out)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    """dist.all_reduce_sum that also works for CPU tensors under NCCL (FAISS backends keep the
    sample in host memory while the process group is NCCL on GPU nodes)."""
    if dist.is_dist() and t.device.type == "cpu" and torch.distributed.get_backend() == "nccl":
        return dist.all_reduce_sum(t.to(dist.device())).cpu()
    return dist.all_reduce_sum(t)


# ----------------------------------------------------------------------------------------- init
def kmeans_pp(pool: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling) on `pool`; deterministic given the seed."""
    rng = np.random.default_rng([seed, 3])
    n = pool.shape[0]
    chosen = [int(rng.integers(n))]
    d2 = ((pool - pool[chosen[0]]) ** 2).sum(1)
    for _ in range(1, k):
        cdf = np.cumsum(d2.double().cpu().numpy())
        total = cdf[-1]
        nxt = int(min(np.searchsorted(cdf, rng.random() * total, side="right"), n - 1)) \
            if total > 0 else int(rng.integers(n))
        chosen.append(nxt)
        d2 = torch.minimum(d2, ((pool - pool[nxt]) ** 2).sum(1))
    return pool[chosen].clone()


def _init_centroids(local_x: torch.Tensor, local_pos: np.ndarray, m: int, d: int,
                    params: KMeansParams) -> torch.Tensor:
    rng = np.random.default_rng([params.seed, 2])
    if params.init == "random":
        return _rows_by_position(local_x, local_pos, rng.choice(m, params.k, replace=False), d)
    pool_n = min(m, max(params.k * KMEANSPP_POOL_PER_CENTROID, params.k))
    pool_pos = np.sort(rng.choice(m, pool_n, replace=False)) if pool_n < m else np.arange(m)
    pool = _rows_by_position(local_x, local_pos, pool_pos, d)
    c = kmeans_pp(pool, params.k, params.seed) if dist.is_main() else torch.zeros(params.k, d, device=pool.device)
    return _all_reduce(c)  # broadcast of rank 0's seeding


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


def _lloyd_step(chunks: list[torch.Tensor], c: torch.Tensor, assigner: Assigner
                ) -> tuple[torch.Tensor, np.ndarray, float]:
    """One assignment pass over this rank's sample, all-reduced: (sums (k,d) f64, counts, objective)."""
    k, d = c.shape
    acc_dev = chunks[0].device if chunks else c.device
    sums = torch.zeros(k, d, dtype=torch.float64, device=acc_dev)
    counts = torch.zeros(k, dtype=torch.float64, device=acc_dev)
    obj = torch.zeros(1, dtype=torch.float64, device=acc_dev)
    assigner.set_centroids(c)
    for x in chunks:
        lab, d2 = assigner.assign(x)
        lab = lab.to(acc_dev)
        with _one_thread_on_cpu(acc_dev):  # float32 within a chunk, float64 across chunks and ranks
            sums += torch.zeros(k, d, dtype=torch.float32, device=acc_dev).index_add_(0, lab, x).double()
        counts += torch.bincount(lab, minlength=k).to(torch.float64)
        obj += d2.to(acc_dev, torch.float64).sum()
    packed = _all_reduce(torch.cat([sums.flatten(), counts, obj]))  # one collective per iteration
    return packed[: k * d].view(k, d), packed[k * d: k * d + k].cpu().numpy(), float(packed[-1])


def train_centroids(parts: Mapping[int, Any], params: KMeansParams,
                    init_centroids: np.ndarray | None = None) -> KMeansResult:
    """Train k centroids on the points of all ranks' parts (call on every rank, collectively).

    parts: {global part id: (n_i, d) array-like (np.memmap welcome)} owned by THIS rank; ids are
    disjoint across ranks. The sample (k x max_points_per_centroid points) is read into memory in
    float32; its Lloyd iterations all-reduce sums/counts/objective once per iteration.
    """
    t0 = time.time()
    backend = choose_backend(params.backend)
    assigner = params_assigner(params)
    sample_dev = assigner.device if backend == "torch" else torch.device("cpu")
    sizes = _gather_sizes(parts)
    n_total = sum(sizes.values())
    d = _dims(parts) if n_total else 0
    if n_total < params.k:
        raise ValueError(f"k-means: {n_total} points for k={params.k} clusters; lower pseudo.k "
                         f"(at most the number of points)")
    m = min(n_total, params.k * params.max_points_per_centroid)
    plan = sample_plan(sizes, m, params.seed)
    offsets, acc = {}, 0
    for i in sorted(plan):
        offsets[i] = acc
        acc += len(plan[i])
    local_ids = sorted(int(i) for i in parts)
    xs, pos = [], []
    for i in local_ids:
        rows = plan[i]
        if len(rows):
            xs.append(_to_float(_take_rows(parts[i], rows, sizes[i]), params.spherical, sample_dev))
            pos.append(offsets[i] + np.arange(len(rows), dtype=np.int64))
    local_x = torch.cat(xs) if xs else torch.zeros(0, d, device=sample_dev)
    local_pos = np.concatenate(pos) if pos else np.zeros(0, np.int64)
    t_sample = time.time() - t0

    if init_centroids is not None:
        c = torch.as_tensor(np.asarray(init_centroids, dtype=np.float32), device=sample_dev).clone()
        if tuple(c.shape) != (params.k, d):
            raise ValueError(f"init_centroids has shape {tuple(c.shape)}, expected {(params.k, d)}")
    else:
        c = _init_centroids(local_x, local_pos, m, d, params)
    if params.spherical:
        c = torch.nn.functional.normalize(c, dim=1)
    t_init = time.time() - t0 - t_sample

    chunks = list(torch.split(local_x, params.chunk_size)) if len(local_x) else []
    objective, splits = [], 0
    counts = np.zeros(params.k)
    it_bar = _bar(range(params.niter), params.progress, f"k-means k={params.k} n={m} ({backend})")
    for it in it_bar:
        sums, counts, obj = _lloyd_step(chunks, c, assigner)
        objective.append(obj)
        nonempty = torch.as_tensor(counts > 0, device=c.device)
        denom = torch.as_tensor(np.maximum(counts, 1), dtype=torch.float64, device=c.device)
        new_c = (sums.to(c.device) / denom[:, None]).to(torch.float32)
        c = torch.where(nonempty[:, None], new_c, c)
        splits += _split_empty(c, counts, np.random.default_rng([params.seed, 4, it]))
        if params.spherical:
            c = torch.nn.functional.normalize(c, dim=1)
        if hasattr(it_bar, "set_postfix"):
            it_bar.set_postfix(obj=f"{obj:.4g}")
    seconds = time.time() - t0
    return KMeansResult(centroids=c.cpu().numpy().astype(np.float32), objective=objective,
                        sizes=counts.astype(np.int64), n_train=m, n_total=n_total, backend=backend,
                        seconds=seconds, splits=splits,
                        timings={"sample_s": t_sample, "init_s": t_init,
                                 "lloyd_s": seconds - t_sample - t_init})


def _bar(it: Any, enabled: bool, desc: str) -> Any:
    if not (enabled and dist.is_main()):
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, leave=False, dynamic_ncols=True)


# ---------------------------------------------------------------------------------- full pass
def assign_array(x: Any, centroids: np.ndarray | torch.Tensor | Assigner, *, spherical: bool = False,
                 chunk_size: int = 65536, backend: str = "auto", gpu_tf32: bool = True
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
        assigner.set_centroids(centroids if isinstance(centroids, torch.Tensor)
                               else torch.as_tensor(np.asarray(centroids, dtype=np.float32)))
    n = int(x.shape[0])
    labels = np.empty(n, dtype=np.int32)
    dists = np.empty(n, dtype=np.float32)
    for s in range(0, n, chunk_size):
        chunk = _to_float(x[s:s + chunk_size], spherical, assigner.device)
        lab, d2 = assigner.assign(chunk)
        labels[s:s + len(chunk)] = lab.cpu().numpy()
        dists[s:s + len(chunk)] = d2.sqrt().cpu().numpy()
    return labels, dists


def cap_k(k: int, n: int, min_points_per_centroid: int = 4) -> int:
    """k so that every centroid has on average >= min_points_per_centroid points (warns when capped).

    k-means with fewer points per cluster mostly splits noise, and FAISS refuses n < k outright.
    """
    cap = max(1, n // min_points_per_centroid)
    if k > cap:
        warnings.warn(f"pseudo.k={k} is too large for {n} points: using k={cap} "
                      f"(>= {min_points_per_centroid} points per cluster on average)", stacklevel=2)
        return cap
    return k
