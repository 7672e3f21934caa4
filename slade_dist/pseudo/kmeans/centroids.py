"""The stage-facing entry of k-means: `train_centroids`, flat or two-level, resumed from its
checkpoints, on the points of all ranks' parts. The cluster stage (pseudo/cluster.py) calls it, then
assigns every point with assign.params_assigner and assign_array.
Tests: tests/unit/test_kmeans_lloyd.py, test_kmeans_two_level.py, test_kmeans_checkpoints.py,
tests/integration/test_pseudo_multirank.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from ...config import PseudoConfig
from .assign import Assigner, choose_backend, make_assigner, params_assigner
from .checkpoints import Checkpoints, inputs_fingerprint
from .lloyd import KMeansResult, Run, distributed_kmeans
from .plan import TrainingSample, check_params, coarse_k_for, draw_sample, two_level_mode, use_two_level
from .two_level import train_two_level


def train_centroids(
    parts: Mapping[int, Any],
    params: PseudoConfig,
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
    check_params(params)
    backend = choose_backend(params.backend)
    if two_level_mode(params) == "on" and init_centroids is not None:
        raise ValueError("k-means: init_centroids (k centroids) need flat training; set two_level=off")
    two_level = use_two_level(params) and init_centroids is None  # given k centroids: flat (auto)
    # flat: exact, or IVF when assign=ivf ("auto" is exact without cells); two-level: exact for
    # its small coarse level and cells, the refine stage makes its own
    assigner = make_assigner(backend, params.gpu_tf32) if two_level else params_assigner(params)
    sample = draw_sample(parts, params, _sample_device(backend, assigner))
    k1 = coarse_k_for(params) if two_level else 0
    ckpt = Checkpoints(ckpt_dir, inputs_fingerprint(params, sample, two_level, k1, init_centroids, ckpt_tag))
    run = Run(params, ckpt, on_step)
    if two_level:
        res = train_two_level(sample, run, backend, assigner)
    else:
        res = _train_flat(sample, run, assigner, backend, init_centroids)
    res.n_total = sum(sample.sizes.values())
    res.seconds = time.time() - t0
    res.timings = {"sample_s": sample.seconds, **res.timings}
    return res


def _sample_device(backend: str, assigner: Assigner) -> torch.device:
    """The points live where they are searched: the GPU for torch-on-CUDA and FAISS GPU, so the
    sums are accumulated there too; the host for FAISS CPU."""
    return assigner.device if backend in ("torch", "faiss_gpu") else torch.device("cpu")


def _train_flat(
    sample: TrainingSample, run: Run, assigner: Assigner, backend: str, init_centroids: np.ndarray | None
) -> KMeansResult:
    k = run.params.k
    if init_centroids is not None and np.shape(init_centroids) != (k, sample.d):
        raise ValueError(f"init_centroids has shape {np.shape(init_centroids)}, expected {(k, sample.d)}")
    t0 = time.time()
    st, method, resumed, init_s = distributed_kmeans(
        sample.x, sample.pos, sample.m, k, run, assigner, (run.params.seed,), "lloyd", init_centroids
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
