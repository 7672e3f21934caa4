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

from .assign import TorchAssigner, assign_array, choose_backend, make_assigner, params_assigner
from .centroids import train_centroids
from .lloyd import KMeansResult, resolve_init
from .plan import cap_k, draw_sample, sample_counts, sample_plan, sample_rows
from .two_level import allocate_fine_k

# what the cluster stage, the tests and the benches use; the rest stays inside the package
__all__ = [
    "KMeansResult",
    "TorchAssigner",
    "allocate_fine_k",
    "assign_array",
    "cap_k",
    "choose_backend",
    "draw_sample",
    "make_assigner",
    "params_assigner",
    "resolve_init",
    "sample_counts",
    "sample_plan",
    "sample_rows",
    "train_centroids",
]
