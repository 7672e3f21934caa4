"""slade_dist.pseudo.kmeans, k-means checkpoints (pseudo/kmeans/checkpoints.py, lloyd.py,
two_level.py): a killed run resumes and matches an uninterrupted one, flat and two-level; other
inputs never resume.
(2 real ranks: tests/integration/test_pseudo_multirank.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from slade_dist.pseudo.kmeans import (
    train_centroids,
)
from tests.unit._kmeans import blobs, params


class Killed(Exception):
    """Raised from on_step: the training stops there as a preempted job would."""


def kill_at(stage: str, step: int):
    def hook(s: str, i: int) -> None:
        if s == stage and i == step:
            raise Killed(f"{s} {i}")

    return hook


def test_flat_checkpoint_resumes_and_matches_an_uninterrupted_run(tmp_path):
    x, _ = blobs(5000, 8, 16, seed=13)
    parts = {0: x[:2000], 4: x[2000:]}
    p = params(k=16, niter=7, backend="faiss_cpu", ckpt_every_iters=2)
    whole = train_centroids(parts, p)
    with pytest.raises(Killed):
        train_centroids(parts, p, ckpt_dir=tmp_path, on_step=kill_at("lloyd", 3))
    assert (tmp_path / "lloyd.npz").exists()
    resumed = train_centroids(parts, p, ckpt_dir=tmp_path)
    assert resumed.resumed == {"lloyd": 2} and resumed.init == "resumed"
    np.testing.assert_allclose(resumed.centroids, whole.centroids, atol=1e-6)
    np.testing.assert_allclose(resumed.objective, whole.objective, rtol=1e-9)
    assert resumed.splits == whole.splits
    # finished: a rerun reads the final checkpoint and iterates no more
    assert train_centroids(parts, p, ckpt_dir=tmp_path).resumed == {"lloyd": 7}
    # other inputs never resume: another seed, other sizes, another tag
    assert train_centroids(parts, params(k=16, niter=7, backend="faiss_cpu", seed=1), ckpt_dir=tmp_path).resumed == {
        "lloyd": 0
    }
    tmp2 = tmp_path / "b"
    train_centroids(parts, p, ckpt_dir=tmp2, ckpt_tag="teacher-a")
    assert train_centroids({0: x[:2001], 4: x[2001:]}, p, ckpt_dir=tmp2, ckpt_tag="teacher-a").resumed == {"lloyd": 0}
    assert train_centroids(parts, p, ckpt_dir=tmp2, ckpt_tag="teacher-b").resumed == {"lloyd": 0}
    assert train_centroids(parts, p, ckpt_dir=tmp2, ckpt_tag="teacher-b").resumed == {"lloyd": 7}
    (tmp2 / "lloyd.npz").write_bytes(b"not a zip")  # unreadable: trained afresh
    assert train_centroids(parts, p, ckpt_dir=tmp2, ckpt_tag="teacher-b").resumed == {"lloyd": 0}


def test_two_level_checkpoints_resume_cells_and_refine(tmp_path):
    x, _ = blobs(8000, 8, 40, seed=14, spread=2.0)
    p = params(k=100, niter=5, backend="faiss_cpu", two_level="on", ckpt_every_iters=1, two_level_refine_iters=3)
    whole = train_centroids({0: x}, p)
    first_cells = []

    def kill_after_two_cells(stage: str, step: int) -> None:
        if stage == "cell":
            first_cells.append(step)
            if len(first_cells) == 2:
                raise Killed("cells")

    with pytest.raises(Killed):
        train_centroids({0: x}, p, ckpt_dir=tmp_path, on_step=kill_after_two_cells)
    with pytest.raises(Killed):
        train_centroids({0: x}, p, ckpt_dir=tmp_path, on_step=kill_at("refine", 2))
    resumed = train_centroids({0: x}, p, ckpt_dir=tmp_path)
    assert resumed.resumed == {"coarse": 5, "cells": 0, "refine": 2}  # the cells live in "refine"
    np.testing.assert_allclose(resumed.centroids, whole.centroids, atol=1e-6)
    np.testing.assert_allclose(resumed.objective, whole.objective, rtol=1e-9)
    # without a refine checkpoint, finished cells are read back, the rest trained
    (tmp_path / "refine.npz").unlink()
    for f in sorted(tmp_path.glob("cell-*.npz"))[2:]:
        f.unlink()
    partial = train_centroids({0: x}, p, ckpt_dir=tmp_path)
    assert partial.resumed == {"coarse": 5, "cells": 2, "refine": 0}
    np.testing.assert_allclose(partial.centroids, whole.centroids, atol=1e-6)
