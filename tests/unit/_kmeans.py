"""Data and parameters shared by the k-means unit tests (tests/unit/test_kmeans_*.py)."""

from __future__ import annotations

import numpy as np

from slade_dist.config import PseudoConfig


def blobs(n: int, d: int, k: int, seed: int = 0, spread: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d)).astype(np.float32) * spread
    y = rng.integers(k, size=n)
    return (centers[y] + rng.standard_normal((n, d))).astype(np.float32), y


def params(**kw) -> PseudoConfig:
    """k-means parameters of a test: the config's, but plain (Euclidean) k-means unless spherical=True."""
    return PseudoConfig(**{"spherical": False, **kw})
