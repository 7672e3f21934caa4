"""Distributed k-means on config.PseudoConfig, each rank owning disjoint point arrays ("parts", e.g.
one per shard); its files are listed in docs/ARCHITECTURE.md. Tests: tests/unit/test_kmeans_*.py,
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
