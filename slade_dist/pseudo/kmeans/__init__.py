"""Distributed k-means: each rank owns a disjoint set of point arrays ("parts", e.g. one per shard);
parameters are config.PseudoConfig.

  plan.py         parameter checks, flat or two-level, coarse k, k capped to the data, and the
                  deterministic training sample (world-size free, for any N)
  assign.py       nearest-centroid backends (FAISS GPU / CPU / IVF, torch) and the streaming full pass
  lloyd.py        seeding, Lloyd iterations all-reduced in float64, empty-cluster splits, resume
  two_level.py    ~sqrt(k) coarse cells, each cell's share of k trained by the rank that owns it
  checkpoints.py  checkpoint files fingerprinted by the run's inputs
  centroids.py    train_centroids: the entry the cluster stage (pseudo/cluster.py) calls

Tests: tests/unit/test_kmeans_{plan,assign,lloyd,two_level,checkpoints}.py,
tests/integration/test_pseudo_multirank.py (2 real ranks == 1 rank, flat and two-level; the same
sample; a killed 2-rank run resumes).
"""

from .assign import (
    Assigner,
    FaissCPUAssigner,
    FaissGPUAssigner,
    FaissIVFAssigner,
    TorchAssigner,
    assign_array,
    choose_backend,
    make_assigner,
    params_assigner,
)
from .centroids import train_centroids
from .lloyd import KMeansResult, kmeans_pp, resolve_init
from .plan import (
    TrainingSample,
    cap_k,
    coarse_k_for,
    draw_sample,
    sample_counts,
    sample_plan,
    sample_rows,
    use_two_level,
)
from .two_level import allocate_fine_k

__all__ = [
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
