"""k-means checkpoints under the caller's ckpt_dir, each stamped with the fingerprint of the run's
inputs. Tests: tests/unit/test_kmeans_checkpoints.py, tests/integration/test_pseudo_multirank.py
(a killed 2-rank run resumes).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ... import dist
from ...config import PseudoConfig
from ...fileio import atomic_path
from .plan import TrainingSample

CKPT_VERSION = 1


class Checkpoints:
    """Files of one training run under `root`: a file stamped with another fingerprint (other
    params, part sizes or caller's tag) is never loaded."""

    def __init__(self, root: str | os.PathLike[str] | None, fingerprint: str):
        self.root = Path(root) if root is not None else None
        self.fingerprint = fingerprint
        if self.root is not None and dist.is_main():
            self.root.mkdir(parents=True, exist_ok=True)

    def derived(self, extra: str) -> Checkpoints:
        """Checkpoints of later stages that are valid only after this `extra` result (e.g. the
        coarse centroids' hash): a recomputed coarse level never meets stale cells."""
        return Checkpoints(self.root, hashlib.sha256(f"{self.fingerprint}:{extra}".encode()).hexdigest())

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


def inputs_fingerprint(
    params: PseudoConfig,
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
