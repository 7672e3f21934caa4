"""The cluster stage in one process on synthetic embed-stage files: outputs and their alignment,
stats/TensorBoard, resume, stale-file handling, k capping, purity/NMI arithmetic.
(Real images + teacher + 2 ranks: tests/integration/test_pseudo_multirank.py.)"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from slade_dist.data.pseudo_labels import pseudo_label_path, read_meta, read_pseudo_labels
from slade_dist.errors import UnusableInput
from slade_dist.pseudo import cluster
from slade_dist.stages import RunLayout
from tests.integration._pseudo_workers import make_cfg, write_embeddings, write_index_only

NAMES = ["unl-000000.tar", "unl-000001.tar", "unl-000002.tar", "unl-000005.tar"]
SIZES = [300, 0, 250, 170]


@pytest.fixture()
def setup(tmp_path):
    shards = write_index_only(tmp_path / "unl", NAMES, SIZES)
    run = tmp_path / "run"
    truth = write_embeddings(RunLayout(run).stage_dir("embed", 1), NAMES, SIZES, d=8, k=5, shard_dir=shards)
    cfg = make_cfg(run, shards, ["pseudo.k=5", "pseudo.niter=8", "pseudo.spherical=true"])
    return cfg, run, truth


def test_outputs_aligned_with_shards_and_stats(setup):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, run, truth = setup
    res = cluster.run(cfg, run)
    out = RunLayout(run).stage_dir("cluster", 1)
    centroids = np.load(out / "centroids.npy")
    assert centroids.shape == (5, 8) and centroids.dtype == np.float32
    for name in NAMES:
        keys, cls, dist = read_pseudo_labels(pseudo_label_path(out, name))
        assert keys == truth[name][0]
        assert cls.dtype == np.int32 and dist.dtype == np.float32 and len(cls) == len(keys)
        if len(keys):
            assert cls.min() >= 0 and cls.max() < 5 and (dist >= 0).all()
    stats = json.loads((out / "stats.json").read_text())
    assert stats["n"] == sum(SIZES) and sum(stats["sizes"]) == sum(SIZES)
    assert np.load(out / "sizes.npy").tolist() == stats["sizes"]
    assert stats["purity"] > 0.95 and stats["nmi"] > 0.9  # well-separated blobs
    assert 1.0 <= stats["imbalance"] < 2.0
    assert res["k"] == 5 and res["purity"] == stats["purity"]
    meta = read_meta(out)
    assert meta["round"] == 1 and meta["k"] == 5 and meta["teacher_step"] == 7
    assert meta["teacher_weights"].endswith("teacher/final.pt")
    acc = EventAccumulator(str(RunLayout(run).tb_dir("cluster", 1)), size_guidance={"histograms": 0})
    acc.Reload()
    assert "cluster/size" in acc.Tags()["histograms"]
    hist = acc.Histograms("cluster/size")[0]
    assert hist.step == 1 and hist.histogram_value.num == 5  # one entry per cluster
    assert acc.Scalars("cluster/purity")[0].value == pytest.approx(stats["purity"])


def test_rerun_reuses_centroids_and_completes_missing_labels(setup):
    cfg, run, _ = setup
    cluster.run(cfg, run)
    out = RunLayout(run).stage_dir("cluster", 1)
    first = {n: read_pseudo_labels(pseudo_label_path(out, n)) for n in NAMES}
    c_mtime = (out / "centroids.npy").stat().st_mtime_ns
    kept = pseudo_label_path(out, NAMES[0]).stat().st_mtime_ns
    pseudo_label_path(out, NAMES[2]).unlink()
    cluster.run(cfg, run)
    assert (out / "centroids.npy").stat().st_mtime_ns == c_mtime  # not retrained
    assert pseudo_label_path(out, NAMES[0]).stat().st_mtime_ns == kept  # not rewritten
    again = read_pseudo_labels(pseudo_label_path(out, NAMES[2]))
    assert again[0] == first[NAMES[2]][0] and np.array_equal(again[1], first[NAMES[2]][1])
    # a config change retrains and rewrites every label file
    cfg.pseudo.seed = 3
    cluster.run(cfg, run)
    assert (out / "centroids.npy").stat().st_mtime_ns != c_mtime
    assert pseudo_label_path(out, NAMES[0]).stat().st_mtime_ns != kept


def test_missing_embeddings_fail_clearly(setup):
    cfg, run, _ = setup
    (RunLayout(run).stage_dir("embed", 1) / "emb-000005.npy").unlink()
    with pytest.raises(FileNotFoundError, match="run the embed stage for round 1"):
        cluster.run(cfg, run)


def test_no_points_fail_clearly(tmp_path):
    shards = write_index_only(tmp_path / "unl", NAMES[:2], [0, 0])
    run = tmp_path / "run"
    write_embeddings(RunLayout(run).stage_dir("embed", 1), NAMES[:2], [0, 0], shard_dir=shards)
    with pytest.raises(UnusableInput, match="hold no points"):
        cluster.run(make_cfg(run, shards), run)


def test_k_is_capped_to_the_data(setup):
    cfg, run, _ = setup
    cfg.pseudo.k = 500
    with pytest.warns(UserWarning, match="too large"):
        res = cluster.run(cfg, run)
    assert res["k"] == sum(SIZES) // 4
    assert np.load(RunLayout(run).stage_dir("cluster", 1) / "centroids.npy").shape[0] == res["k"]


def test_purity_nmi_and_imbalance_arithmetic():
    rng = np.random.default_rng(0)
    truth = rng.integers(6, size=2000)
    pred = np.where(rng.random(2000) < 0.7, truth, rng.integers(9, size=2000))
    s = cluster.contingency_scores(Counter(zip(map(str, truth), pred.tolist())))
    assert s["nmi"] == pytest.approx(normalized_mutual_info_score(truth, pred), abs=1e-9)
    table = np.zeros((6, 9))
    np.add.at(table, (truth, pred), 1)
    assert s["purity"] == pytest.approx(table.max(0).sum() / 2000)
    assert s["n_labeled"] == 2000 and s["n_true_classes"] == 6
    assert cluster.imbalance_factor(np.array([5, 5, 5, 5])) == pytest.approx(1.0)
    assert cluster.imbalance_factor(np.array([20, 0, 0, 0])) == pytest.approx(4.0)


def test_two_level_saves_coarse_cells_assigns_through_them_and_checkpoints(setup):
    from slade_dist.pseudo import embed as embed_files
    from slade_dist.pseudo.kmeans import assign_array

    cfg, run, _ = setup
    cfg.pseudo.k, cfg.pseudo.two_level, cfg.pseudo.backend, cfg.pseudo.assign = 20, "on", "faiss_cpu", "ivf"
    cluster.run(cfg, run)
    out = RunLayout(run).stage_dir("cluster", 1)
    assert np.load(out / "coarse_centroids.npy").shape == (4, 8)  # round(sqrt(20)) cells
    train = json.loads((out / "stats.json").read_text())["train"]
    assert train["two_level"] and train["resumed"] == {"coarse": 0, "cells": 0, "refine": 0}
    ckpt = out / "kmeans_ckpt"
    assert (ckpt / "coarse.npz").exists() and (ckpt / "refine.npz").exists() and len(list(ckpt.glob("cell-*.npz"))) == 4
    centroids = np.load(out / "centroids.npy")
    emb_dir = RunLayout(run).stage_dir("embed", 1)
    for name in NAMES:  # assigned through the 4 cells (ivf_nprobe 16 >= 4: all probed, so exact)
        _, cls, _ = read_pseudo_labels(pseudo_label_path(out, name))
        if len(cls):
            exact, _ = assign_array(
                embed_files.load_embeddings(emb_dir, __import__("pathlib").Path(name)),
                centroids,
                spherical=True,
                backend="faiss_cpu",
            )
            np.testing.assert_array_equal(cls, exact)
    cfg.pseudo.two_level = "off"  # flat centroids: no coarse cells left to assign through
    cluster.run(cfg, run)
    assert not (out / "coarse_centroids.npy").exists()


def test_cluster_stage_writes_the_member_index_the_student_reads(setup):
    """Summaries equal cluster_thresholds on the stage's own label files; with the label files
    replaced by garbage the pseudo stream still starts and gives K distinct images per label."""
    from slade_dist.data.pseudo_index import ClusterIndex
    from slade_dist.data.pseudo_join import cluster_thresholds
    from slade_dist.data.readers import pseudo_labeled_batches

    cfg, run, _ = setup
    cfg.data.pseudo_max_dist_percentile, cfg.data.pseudo_min_cluster_size = 75.0, 3
    res = cluster.run(cfg, run)
    out = RunLayout(run).stage_dir("cluster", 1)
    paths = sorted(out.glob("pl-*.npz"))
    idx = ClusterIndex.open(out, 75.0, 3)
    want = cluster_thresholds(paths, 75.0, 3)
    np.testing.assert_array_equal(idx.thresholds[: len(want)], want)
    assert idx.sizes.tolist() == json.loads((out / "stats.json").read_text())["sizes"]
    assert res["index_kept_images"] == int(idx.kept.sum()) and 0 < res["index_kept_images"] < sum(SIZES)
    for p in paths:
        p.write_bytes(b"not a label file")
    cfg.data.image_size = cfg.data.resize_size = 8
    stream = pseudo_labeled_batches(cfg.data.unlabeled_shards, out, cfg.data, 3, 4, seed=0, rank=0, world=1)
    for _ in range(5):
        b = next(stream)
        groups = {}
        for key, lab in zip(b["keys"], b["labels"].tolist()):
            groups.setdefault(lab, set()).add(key)
        assert len(groups) == 3 and all(len(v) == 4 for v in groups.values())


def test_tar_scans_in_spawned_workers_give_the_same_index(setup):
    cfg, run, _ = setup
    cluster.run(cfg, run)
    out = RunLayout(run).stage_dir("cluster", 1)
    inline = np.load(out / "members-00000.npy"), dict(np.load(out / "clusters.npz"))
    cfg.data.num_workers = 2  # 4 shards > 2 workers: scanned by a pool of 2 spawned processes
    cluster.run(cfg, run)
    np.testing.assert_array_equal(np.load(out / "members-00000.npy"), inline[0])
    for key, arr in np.load(out / "clusters.npz").items():
        np.testing.assert_array_equal(arr, inline[1][key])
