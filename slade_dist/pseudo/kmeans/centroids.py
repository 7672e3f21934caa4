"""`train_centroids`, the entry the cluster stage (pseudo/cluster.py) calls: flat or two-level,
resumed from its checkpoints. Tests: tests/unit/test_kmeans_{lloyd,two_level,checkpoints}.py,
tests/integration/test_pseudo_multirank.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from ...config import PseudoConfig, check_section
from .assign import Assigner, choose_backend, make_assigner, params_assigner
from .checkpoints import Checkpoints, inputs_fingerprint
from .lloyd import KMeansResult, Run, distributed_kmeans
from .plan import TrainingSample, coarse_k_for, draw_sample, two_level_mode, use_two_level
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

    parts: {global part id: (n_i, d) array-like (np.memmap welcome)} owned by THIS rank, ids
    disjoint across ranks. ckpt_dir: the same dir on every rank (shared by all ranks for two-level
    training: cells are written by their owners); ckpt_tag: anything else that identifies the
    inputs (e.g. the teacher hash). on_step(stage, step): on every rank after each distributed
    Lloyd iteration ("lloyd" | "coarse" | "refine", iterations done), and after each finished cell
    ("cell", cell id) on the rank that trained it (a test's kill switch).
    """
    t0 = time.time()
    check_section(params, "pseudo")  # a PseudoConfig built in code gets the load checks
    backend = choose_backend(params.backend)
    if two_level_mode(params) == "on" and init_centroids is not None:
        raise ValueError("k-means: init_centroids (k centroids) need flat training; set two_level=off")
    two_level = use_two_level(params) and init_centroids is None  # given k centroids: flat (auto)
    # flat: exact, or IVF when assign=ivf ("auto" is exact without cells); two-level: exact for
    # its small coarse level and cells, the refine stage makes its own
    assigner = make_assigner(backend, params.gpu_tf32) if two_level else params_assigner(params)
    # the sample lives (float32) where it is searched and summed: the GPU for torch and FAISS GPU
    device = assigner.device if backend in ("torch", "faiss_gpu") else torch.device("cpu")
    sample = draw_sample(parts, params, device)
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
        backend=backend,
        splits=st.splits,
        timings={"init_s": init_s, "lloyd_s": time.time() - t0 - init_s},
        init=method,
        resumed={"lloyd": resumed},
    )
