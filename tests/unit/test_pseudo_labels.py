"""Pseudo-label files (slade_dist/data/pseudo_labels.py): format round trip, naming, meta, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from slade_dist.data import pseudo_labels as pl
from slade_dist.data.shards import shard_index


def test_round_trip_atomic_and_compact(tmp_path):
    keys = [f"{i:08d}" for i in range(1000)]
    path = pl.write_pseudo_labels(tmp_path / "pl-000003.npz", keys, np.arange(1000) % 7, np.linspace(0, 1, 1000))
    k, c, d = pl.read_pseudo_labels(path)
    assert k == keys and c.dtype == np.int32 and d.dtype == np.float32
    assert c.tolist() == (np.arange(1000) % 7).tolist() and np.allclose(d, np.linspace(0, 1, 1000))
    assert [p.name for p in tmp_path.iterdir()] == ["pl-000003.npz"]  # no temp file left
    assert path.stat().st_size < 30 * 1000  # the ~30 bytes/image budget of docs/ARCHITECTURE.md
    uni = pl.write_pseudo_labels(tmp_path / "u.npz", ["a/ü", "b"], [0, 1], [0.5, 0.25])
    assert pl.read_pseudo_labels(uni)[0] == ["a/ü", "b"]


def test_bad_inputs_are_clear(tmp_path):
    with pytest.raises(ValueError, match="equal length"):
        pl.write_pseudo_labels(tmp_path / "x.npz", ["a"], [0, 1], [0.0])
    with pytest.raises(ValueError, match="non-negative"):
        pl.write_pseudo_labels(tmp_path / "x.npz", ["a"], [-1], [0.0])
    with pytest.raises(FileNotFoundError, match="cluster stage"):
        pl.read_pseudo_labels(tmp_path / "nope.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a pseudo-label file"):
        pl.read_pseudo_labels(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="unreadable"):
        pl.read_pseudo_labels(tmp_path / "junk.npz")


def test_paths_and_meta(tmp_path):
    assert pl.pseudo_label_path(tmp_path, "/x/unlabeled-000012.tar") == tmp_path / "pl-000012.npz"
    assert pl.pseudo_label_path(tmp_path, "../i2d/00007.tar").name == "pl-000007.npz"  # img2dataset naming
    with pytest.raises(ValueError, match="digits"):
        shard_index("foo.tar")
    pl.write_meta(tmp_path, round=2, teacher_step=500, k=400, n=10)
    assert pl.read_meta(tmp_path) == {"round": 2, "teacher_step": 500, "k": 400, "n": 10}
