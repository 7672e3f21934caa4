"""Nearest-centroid search for k-means: the backends (FAISS GPU / CPU / IVF, torch), which one
`auto` picks, the full pass's assigner (params_assigner) and the streaming full pass (assign_array).
Tests: tests/unit/test_kmeans_assign.py.
"""

from __future__ import annotations

import contextlib
import math
import typing
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from ... import dist
from ...config import PseudoConfig

# the schema's choices (config.PseudoConfig.backend): a wrong name fails here as it does at load
BACKENDS = typing.get_args(typing.get_type_hints(PseudoConfig)["backend"])

# assign=auto takes the IVF path only where it computes 8x fewer distances: an IVF list scan costs
# ~9x a GEMM per distance (measured on CPU, d = 32, k = 4096: exact 0.37 s vs 0.89 s for 1/4 of the
# distances); at k = 10^6 with 1000 cells and nprobe 16 it computes ~60x fewer
IVF_MIN_SAVING = 8


@contextlib.contextmanager
def temporarily(get: Callable[[], Any], set_: Callable[[Any], None], value: Any) -> Iterator[None]:
    """A process-global torch setting set to `value` inside the block, restored after it."""
    old = get()
    set_(value)
    try:
        yield
    finally:
        set_(old)


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
    """argmin_c ||x - c||^2 = argmin_c (||c||^2 - 2 x.c) with one GEMM per block of rows, the
    (rows x k) score matrix under `budget` elements whatever k."""

    name = "torch"

    def __init__(self, device: torch.device | str = "cpu", gpu_tf32: bool = True, budget: int | None = None):
        self.device = torch.device(device)
        self.tf32 = gpu_tf32 and self.device.type == "cuda"  # ~8x fp32 on Hopper; only near-ties can flip
        # elements of one score block: 1 GiB of float32 on a GPU, 16 MiB (cache sized) on the host
        self.budget = budget or (1 << 28 if self.device.type == "cuda" else 1 << 22)
        self.c: torch.Tensor | None = None
        self.c_sq: torch.Tensor | None = None

    def set_centroids(self, c: torch.Tensor) -> None:
        self.c = c.to(self.device, torch.float32).contiguous()
        self.c_sq = (self.c * self.c).sum(1)

    def assign(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.c is not None and self.c_sq is not None, "set_centroids() first"
        x = x.to(self.device, torch.float32)
        rows = max(1, self.budget // self.c.shape[0])
        labels = torch.empty(x.shape[0], dtype=torch.int64, device=self.device)
        d2 = torch.empty(x.shape[0], dtype=torch.float32, device=self.device)
        ct = self.c.t()
        tf32 = temporarily(torch.get_float32_matmul_precision, torch.set_float32_matmul_precision, "high")
        with tf32 if self.tf32 else contextlib.nullcontext():
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
    """Where the FAISS GPU backends want the points: their GPU (no host round trip per chunk)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")  # faiss-gpu with a CPU-only torch: points stay on the host
    import faiss.contrib.torch_utils  # noqa: F401  (patches the indexes to search CUDA tensors too)

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
    """Two-level assignment for very large k: the k centroids in an IndexIVFFlat, each point compared
    with those of its `nprobe` nearest groups only (~(nlist + nprobe k / nlist) d per point instead
    of k d; approximate: a nearest centroid in an unprobed group is missed). The groups are `coarse`
    (two-level training's cells: each fine centroid lies in its convex Voronoi cell) or a quantizer
    trained once on the first centroids it sees (they move little between iterations)."""

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
            index.cp.seed = 1234  # the quantizer's own k-means: the same lists on every rank and rerun
            index.train(c_np)
        assert index.is_trained
        if self.res is not None:
            index = self.faiss.index_cpu_to_gpu(self.res, self.gpu_device, index)
        self._quantizer = quantizer  # keep the Python reference alive with the index
        index.nprobe = min(self.nprobe, nlist)
        return index


def params_assigner(params: PseudoConfig, coarse: np.ndarray | None = None) -> Assigner:
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
    gpu = dist.local_rank() % max(dist.faiss_gpu_count(), 1) if backend == "faiss_gpu" else None
    if assign == "ivf":
        if backend == "torch":
            raise ValueError(
                "pseudo.assign=ivf (two-level assignment) needs a FAISS backend: set "
                "pseudo.backend=faiss_gpu (faiss-gpu installed) or faiss_cpu, or assign=exact"
            )
        return FaissIVFAssigner(ivf_nlist, ivf_nprobe, gpu, coarse)
    if gpu is not None:
        return FaissGPUAssigner(gpu)
    if backend == "torch":
        return TorchAssigner(dist.device(), gpu_tf32=gpu_tf32)
    return FaissCPUAssigner()


def to_float(a: Any, spherical: bool, device: torch.device | None = None) -> torch.Tensor:
    """Rows (numpy/memmap of any float dtype, or a tensor) -> float32 tensor on `device` (default:
    where they are), unit-normalised in spherical mode."""
    if isinstance(a, torch.Tensor):
        x = a.to(device or a.device, torch.float32)
    else:
        x = torch.from_numpy(np.array(a, dtype=np.float32))  # a private copy: memmaps are read-only
        x = x.to(device) if device is not None else x
    if spherical:  # cosine: unit points make L2 argmin == cosine argmax
        x = torch.nn.functional.normalize(x, dim=1)
    return x


def assign_array(
    x: Any,
    centroids: np.ndarray | torch.Tensor | Assigner,
    *,
    spherical: bool = False,
    chunk_size: int = 65536,
    backend: str = "auto",
    gpu_tf32: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(labels int32, Euclidean distances float32; of the unit point in spherical mode) of every row
    of x (np.memmap welcome), `chunk_size` rows at a time: O(chunk_size x d + k x d) memory."""
    if isinstance(centroids, Assigner):
        assigner = centroids
    else:
        assigner = make_assigner(backend, gpu_tf32)
        assigner.set_centroids(to_float(centroids, spherical=False))
    n = int(x.shape[0])
    labels = np.empty(n, dtype=np.int32)
    dists = np.empty(n, dtype=np.float32)
    for s in range(0, n, chunk_size):
        chunk = to_float(x[s : s + chunk_size], spherical, assigner.device)
        lab, d2 = assigner.assign(chunk)
        labels[s : s + len(chunk)] = lab.cpu().numpy()
        dists[s : s + len(chunk)] = d2.sqrt().cpu().numpy()
    return labels, dists
