"""Pseudo-label files (slade_dist/data/pseudo_labels.py): format round trip, naming, the zip with an
image shard (planted key mismatches are refused naming both files), per-cluster filters."""
from __future__ import annotations

import numpy as np
import pytest

from slade_dist.data import pseudo_labels as pl
from slade_dist.data.shards import write_shard


def test_round_trip_atomic_and_compact(tmp_path):
    keys = [f"{i:08d}" for i in range(1000)]
    path = pl.write_pseudo_labels(tmp_path / "pl-000003.npz", keys, np.arange(1000) % 7, np.linspace(0, 1, 1000))
    k, c, d = pl.read_pseudo_labels(path)
    assert k == keys and c.dtype == np.int32 and d.dtype == np.float32
    assert c.tolist() == (np.arange(1000) % 7).tolist() and np.allclose(d, np.linspace(0, 1, 1000))
    assert [p.name for p in tmp_path.iterdir()] == ["pl-000003.npz"]  # no temp file left
    assert path.stat().st_size < 30 * 1000  # the ~30 bytes/image budget of DESIGN.md
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
        pl.shard_index("foo.tar")
    pl.write_meta(tmp_path, round=2, teacher_step=500, k=400, n=10)
    assert pl.read_meta(tmp_path) == {"round": 2, "teacher_step": 500, "k": 400, "n": 10}


def samples(keys):
    return [{"__key__": k} for k in keys]


def test_zip_matches_skips_unlabeled_and_refuses_mismatch():
    keys = ["a", "b", "c", "d"]
    cls, dist = np.array([1, 2, 3, 4], np.int32), np.zeros(4, np.float32)
    got = list(pl.zip_pseudo_labels(samples(keys), keys, cls, dist, "s.tar", "pl.npz"))
    assert [(s["__key__"], c) for s, c, _ in got] == list(zip(keys, [1, 2, 3, 4]))
    unlabeled = []  # an image the embed stage could not decode has no label row: skipped
    got = list(pl.zip_pseudo_labels(samples(["a", "x", "b"]), ["a", "b"], cls[:2], dist[:2], "s.tar", "pl.npz",
                                    on_unlabeled=unlabeled.append))
    assert len(got) == 2 and unlabeled == [{"__key__": "x"}]
    with pytest.raises(pl.PseudoLabelMismatch, match=r"s\.tar.*pl\.npz"):  # order swapped
        list(pl.zip_pseudo_labels(samples(["a", "c", "b", "d"]), keys, cls, dist, "s.tar", "pl.npz"))
    with pytest.raises(pl.PseudoLabelMismatch, match=r"s\.tar.*pl\.npz.*'zz'"):  # key not in the shard
        list(pl.zip_pseudo_labels(samples(keys), ["a", "zz", "c", "d"], cls, dist, "s.tar", "pl.npz"))
    # a truncated shard just ends early
    assert len(list(pl.zip_pseudo_labels(samples(keys[:2]), keys, cls, dist, "s", "p", ended_early=lambda: True))) == 2


def test_check_zip_on_real_shard(tmp_path):
    shard = tmp_path / "unlabeled-000004.tar"
    keys = [f"{i:08d}" for i in range(5)]
    write_shard(shard, ({"__key__": k, "jpg": b"x"} for k in keys))
    pl.write_pseudo_labels(pl.pseudo_label_path(tmp_path / "pl", shard), keys, [0] * 5, [0.0] * 5)
    assert pl.check_zip(shard, tmp_path / "pl") == 5
    from slade_dist.data.__main__ import main

    assert main(["check-pseudo", str(tmp_path), str(tmp_path / "pl")]) == 0
    bad = keys[:2] + ["99999999"] + keys[3:]
    pl.write_pseudo_labels(tmp_path / "pl" / "pl-000004.npz", bad, [0] * 5, [0.0] * 5)
    with pytest.raises(pl.PseudoLabelMismatch, match="unlabeled-000004.tar.*pl-000004.npz"):
        pl.check_zip(shard, tmp_path / "pl")
    assert main(["check-pseudo", str(tmp_path), str(tmp_path / "pl")]) == 2  # clear message, no traceback


def test_cluster_thresholds(tmp_path):
    # cluster 0: dists 0..9 (10 pts); cluster 1: 1 point; cluster 2: 4 points, split over two files
    pl.write_pseudo_labels(tmp_path / "pl-000000.npz", [str(i) for i in range(12)], [0] * 10 + [1, 2],
                           list(range(10)) + [0.5, 1.0])
    pl.write_pseudo_labels(tmp_path / "pl-000001.npz", ["a", "b", "c"], [2, 2, 2], [2.0, 3.0, 4.0])
    paths = sorted(tmp_path.glob("pl-*.npz"))
    thr = pl.cluster_thresholds(paths, 100.0, 2)
    assert thr[0] == np.inf and thr[1] == -np.inf and thr[2] == np.inf
    thr = pl.cluster_thresholds(paths, 50.0, 1)
    assert thr[0] == pytest.approx(4.5) and thr[1] == pytest.approx(0.5) and thr[2] == pytest.approx(2.5)
    assert pl.keep_sample(thr, 0, 4.0) and not pl.keep_sample(thr, 0, 5.0) and not pl.keep_sample(thr, 7, 0.0)
    sub = pl.cluster_thresholds(paths, 50.0, 1, max_points=8, seed=0)  # subsampled: still per cluster
    assert np.isfinite(sub[0]) and 0.0 <= sub[0] <= 9.0
