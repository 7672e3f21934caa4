"""Joining an image shard with its pseudo-label file (slade_dist/data/pseudo_join.py): the zip (planted
key mismatches are refused naming both files), a whole-shard check through the data CLI, and the
per-cluster filters."""

from __future__ import annotations

import numpy as np
import pytest

from slade_dist.data import pseudo_join as pj
from slade_dist.data import pseudo_labels as pl
from slade_dist.data.__main__ import main
from slade_dist.data.shards import write_shard


def samples(keys):
    return [{"__key__": k} for k in keys]


def test_zip_matches_skips_unlabeled_and_refuses_mismatch():
    keys = ["a", "b", "c", "d"]
    cls, dist = np.array([1, 2, 3, 4], np.int32), np.zeros(4, np.float32)
    got = list(pj.zip_pseudo_labels(samples(keys), keys, cls, dist, "s.tar", "pl.npz"))
    assert [(s["__key__"], c) for s, c, _ in got] == list(zip(keys, [1, 2, 3, 4]))
    unlabeled = []  # an image the embed stage could not decode has no label row: skipped
    got = list(
        pj.zip_pseudo_labels(
            samples(["a", "x", "b"]), ["a", "b"], cls[:2], dist[:2], "s.tar", "pl.npz", on_unlabeled=unlabeled.append
        )
    )
    assert len(got) == 2 and unlabeled == [{"__key__": "x"}]
    with pytest.raises(pl.PseudoLabelMismatch, match=r"s\.tar.*pl\.npz"):  # order swapped
        list(pj.zip_pseudo_labels(samples(["a", "c", "b", "d"]), keys, cls, dist, "s.tar", "pl.npz"))
    with pytest.raises(pl.PseudoLabelMismatch, match=r"s\.tar.*pl\.npz.*'zz'"):  # key not in the shard
        list(pj.zip_pseudo_labels(samples(keys), ["a", "zz", "c", "d"], cls, dist, "s.tar", "pl.npz"))
    # a truncated shard just ends early
    assert len(list(pj.zip_pseudo_labels(samples(keys[:2]), keys, cls, dist, "s", "p", ended_early=lambda: True))) == 2


def test_check_zip_on_real_shard(tmp_path):
    shard = tmp_path / "unlabeled-000004.tar"
    keys = [f"{i:08d}" for i in range(5)]
    write_shard(shard, ({"__key__": k, "jpg": b"x"} for k in keys))
    pl.write_pseudo_labels(pl.pseudo_label_path(tmp_path / "pl", shard), keys, [0] * 5, [0.0] * 5)
    assert pj.check_zip(shard, tmp_path / "pl") == 5
    assert main(["check-pseudo", str(tmp_path), str(tmp_path / "pl")]) == 0
    bad = keys[:2] + ["99999999"] + keys[3:]
    pl.write_pseudo_labels(tmp_path / "pl" / "pl-000004.npz", bad, [0] * 5, [0.0] * 5)
    with pytest.raises(pl.PseudoLabelMismatch, match="unlabeled-000004.tar.*pl-000004.npz"):
        pj.check_zip(shard, tmp_path / "pl")
    assert main(["check-pseudo", str(tmp_path), str(tmp_path / "pl")]) == 2  # clear message, no traceback


def test_cluster_thresholds(tmp_path):
    # cluster 0: dists 0..9 (10 pts); cluster 1: 1 point; cluster 2: 4 points, split over two files
    pl.write_pseudo_labels(
        tmp_path / "pl-000000.npz", [str(i) for i in range(12)], [0] * 10 + [1, 2], list(range(10)) + [0.5, 1.0]
    )
    pl.write_pseudo_labels(tmp_path / "pl-000001.npz", ["a", "b", "c"], [2, 2, 2], [2.0, 3.0, 4.0])
    paths = sorted(tmp_path.glob("pl-*.npz"))
    thr = pj.cluster_thresholds(paths, 100.0, 2)
    assert thr[0] == np.inf and thr[1] == -np.inf and thr[2] == np.inf
    thr = pj.cluster_thresholds(paths, 50.0, 1)
    assert thr[0] == pytest.approx(4.5) and thr[1] == pytest.approx(0.5) and thr[2] == pytest.approx(2.5)
    assert pj.keep_sample(thr, 0, 4.0) and not pj.keep_sample(thr, 0, 5.0) and not pj.keep_sample(thr, 7, 0.0)
    sub = pj.cluster_thresholds(paths, 50.0, 1, max_points=8, seed=0)  # subsampled: still per cluster
    assert np.isfinite(sub[0]) and 0.0 <= sub[0] <= 9.0
