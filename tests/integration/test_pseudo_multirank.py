"""Pseudo labelling with 2 real ranks (gloo, separate processes): embed is aligned with the shards,
idempotent and completes a half-done run; distributed k-means and the cluster stage give the
1-rank centroids (flat and two-level, from the same training sample); pseudo labels zip with the
image shards, with purity well above chance; the 2 ranks' member index (each rank the clusters it
owns) equals the 1-rank one and cluster_thresholds on the label files, and the student's stream
reads it with the label files gone; a 2-rank k-means killed
mid-Lloyd resumes from its checkpoint and ends where an uninterrupted run ends. One pair of
processes runs all the session's 2-rank work (W.session_worker); each test checks one part of it
against single-process references computed here (the kill test starts its own pairs).
Workers: tests/integration/_pseudo_workers.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from slade_dist import dist
from slade_dist.config import PseudoConfig
from slade_dist.data.pseudo_index import ClusterIndex
from slade_dist.data.pseudo_join import cluster_thresholds, zip_pseudo_labels
from slade_dist.data.pseudo_labels import pseudo_label_path, read_pseudo_labels
from slade_dist.data.readers import finite_batches, iter_shard, pseudo_labeled_batches
from slade_dist.data.shards import shard_paths
from slade_dist.data.tars import TarSamples
from slade_dist.models import load_embedder
from slade_dist.pseudo import cluster, embed
from slade_dist.pseudo.kmeans import draw_sample, train_centroids
from slade_dist.stages import RunLayout
from tests.integration import _pseudo_workers as W

ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
# k=16 for 8 hidden classes; 10 points per centroid -> the 160-point sample of 240 is exercised;
# the member index keeps each cluster's nearest 90 %
CLUSTER = ["pseudo.k=16", "pseudo.niter=15", "pseudo.max_points_per_centroid=10", "data.pseudo_max_dist_percentile=90"]


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    root = tmp_path_factory.mktemp("pseudo2")
    unl = W.make_demo(root)
    run = root / "run"
    W.make_teacher(run)
    np.savez(root / "parts.npz", **W.kmeans_parts())
    dist.run_local_processes(
        W.session_worker, 2, args=(str(run), str(unl), CLUSTER, str(root / "parts.npz"), str(root)), extra_env=ENV
    )
    return root, unl, run


def test_embed_two_ranks_aligned_idempotent_and_resumable(session):
    root, unl, run = session
    log = json.loads((root / "embed.json").read_text())
    first, second, third = log["results"]
    mt1, mt2, mt3 = log["mtimes"]
    out = RunLayout(run).stage_dir("embed", 1)
    shards = shard_paths(unl)
    assert first["written"] == len(shards) == 6 and first["images"] == 240 and first["skipped_corrupt"] == 0
    for shard in shards:
        keys = [key for key, *_ in iter_shard(shard)]
        assert embed.read_keys(out, shard) == keys
        assert embed.load_embeddings(out, shard).shape == (len(keys), 16)
    # second run: nothing to do, nothing touched
    assert second["written"] == 0 and second["images"] == 0 and second["already_done"] == 6
    assert mt2 == mt1
    # third run after every other .npy was deleted: exactly those are written again
    assert third["written"] == 3 and third["already_done"] == 3 and third["images"] == 120
    redone = {s.name for s in shards[::2]}
    assert all((mt3[n] != mt1[n]) == (n in redone) for n in mt1)
    teacher = load_embedder(RunLayout(run).teacher_weights(1)).eval()
    batch = next(iter(finite_batches([shards[3]], W.make_cfg(run, unl).data, 64, rank=0, world=1)))
    with torch.no_grad():
        want = torch.nn.functional.normalize(teacher(batch["images"]), dim=1).numpy()
    np.testing.assert_allclose(embed.load_embeddings(out, shards[3]).astype(np.float32), want, atol=2e-3)


@pytest.fixture(scope="module")
def single(session):
    """The cluster stage in this process on the 2-rank run's embeddings."""
    root, unl, run2 = session
    run1 = root / "run_single"
    shutil.copytree(RunLayout(run2).stage_dir("embed", 1), RunLayout(run1).stage_dir("embed", 1))
    return run1, cluster.run(W.make_cfg(run1, unl, CLUSTER), run1)


def test_cluster_two_ranks_equals_one_rank_and_zips_with_shards(session, single):
    root, unl, run2 = session
    run1, res1 = single
    res2 = json.loads((root / "cluster.json").read_text())
    out1, out2 = RunLayout(run1).stage_dir("cluster", 1), RunLayout(run2).stage_dir("cluster", 1)
    np.testing.assert_allclose(np.load(out2 / "centroids.npy"), np.load(out1 / "centroids.npy"), atol=1e-4)
    stats = json.loads((out2 / "stats.json").read_text())
    assert stats["world_size"] == 2 and stats["train"]["n_train"] == 160
    assert res2["n"] == res1["n"] == 240 and res2["k"] == 16
    assert res2["purity"] == pytest.approx(res1["purity"], abs=1e-9)
    # 8 equally frequent hidden classes: chance purity 1/8; even a random tiny CNN groups them
    assert stats["chance_purity"] == pytest.approx(1 / 8)
    assert res2["purity"] > 2 * stats["chance_purity"] and res2["nmi"] > 0.1

    for shard in shard_paths(unl):
        keys, cls, dists = read_pseudo_labels(pseudo_label_path(out2, shard))
        assert np.array_equal(cls, read_pseudo_labels(pseudo_label_path(out1, shard))[1])
        zipped = list(zip_pseudo_labels(TarSamples(shard), keys, cls, dists, shard.name, "pl"))
        assert [s["__key__"] for s, _, _ in zipped] == keys == [k for k, *_ in iter_shard(shard)]
    stream = pseudo_labeled_batches(unl, out2, W.make_cfg(run2, unl, CLUSTER).data, 2, 2, seed=0, rank=0, world=1)
    batch = next(iter(stream))
    assert batch["images"].shape == (4, 3, 32, 32) and int(batch["labels"].max()) < 16


def test_kmeans_two_ranks_match_one_rank_with_sampling(session):
    root, _, _ = session
    parts = W.kmeans_parts()
    single = train_centroids(
        {int(k[1:]): v for k, v in parts.items()},
        PseudoConfig(spherical=False, k=12, niter=10, backend="torch", max_points_per_centroid=40),
    )
    assert single.n_train == 480  # sampled from 1103 points
    z = np.load(root / "kmeans.npz")
    for backend in ("faiss_cpu", "torch"):
        assert int(z[f"{backend}_n_train"]) == 480
        np.testing.assert_allclose(z[f"{backend}_centroids"], single.centroids, atol=1e-4)
        np.testing.assert_allclose(z[f"{backend}_objective"], single.objective, rtol=1e-5)


def test_sample_identical_at_world_size_1_and_2(session):
    root, _, _ = session
    parts = {int(k[1:]): v for k, v in W.kmeans_parts().items()}
    one = draw_sample(parts, PseudoConfig(spherical=False, k=12, max_points_per_centroid=40))
    z = np.load(root / "kmeans.npz")
    np.testing.assert_array_equal(z["sample_pos"], np.arange(480))
    np.testing.assert_array_equal(one.pos, z["sample_pos"])
    np.testing.assert_array_equal(one.x.numpy(), z["sample_x"])


def test_two_level_two_ranks_match_one_rank(session):
    root, _, _ = session
    parts = {int(k[1:]): v for k, v in W.kmeans_parts().items()}
    single = train_centroids(parts, W.two_level_params())
    assert single.two_level and single.coarse_centroids.shape == (3, 8)  # round(sqrt(12)) cells
    z = np.load(root / "kmeans.npz")
    np.testing.assert_allclose(z["two_level_centroids"], single.centroids, atol=1e-4)
    np.testing.assert_allclose(z["two_level_objective"], single.objective, rtol=1e-5)


def test_killed_two_rank_kmeans_resumes_from_checkpoint(tmp_path):
    data, ckpt, out = str(tmp_path / "parts.npz"), str(tmp_path / "ckpt"), str(tmp_path / "out.npz")
    np.savez(data, **W.kmeans_parts())
    with pytest.raises(torch.multiprocessing.ProcessExitedException):  # both ranks die after iteration 3
        dist.run_local_processes(W.kmeans_ckpt_worker, 2, args=(data, ckpt, out, 3), extra_env=ENV)
    assert not (tmp_path / "out.npz").exists() and (tmp_path / "ckpt" / "lloyd.npz").exists()
    dist.run_local_processes(W.kmeans_ckpt_worker, 2, args=(data, ckpt, out, 0), extra_env=ENV)
    z = np.load(out)
    assert int(z["resumed"]) == 2  # the checkpoint of iteration 2 (every 2); iteration 3 is redone
    whole = train_centroids({int(k[1:]): v for k, v in W.kmeans_parts().items()}, W.ckpt_params())
    np.testing.assert_allclose(z["centroids"], whole.centroids, atol=1e-4)
    np.testing.assert_allclose(z["objective"], whole.objective, rtol=1e-5)


def test_member_index_two_ranks_equals_one_rank_and_needs_no_label_file(session, single, tmp_path):
    root, unl, run2 = session
    run1, _ = single
    out1, out2 = RunLayout(run1).stage_dir("cluster", 1), RunLayout(run2).stage_dir("cluster", 1)
    one, two = ClusterIndex.open(out1, 90.0, 2), ClusterIndex.open(out2, 90.0, 2)
    assert [m["first"] for m in two.summary["members"]] == [0, 8] and len(one.summary["members"]) == 1
    for key in ("sizes", "kept", "indptr"):
        np.testing.assert_array_equal(getattr(two, key), getattr(one, key))
    np.testing.assert_allclose(two.thresholds, one.thresholds, rtol=1e-5)  # distances: float noise of the centroids
    for c in range(16):  # the same kept members in each cluster
        kept = [
            {(int(e["shard"]), int(e["offset"])) for e in idx.entries(c, np.arange(idx.kept[c]))} for idx in (one, two)
        ]
        assert kept[0] == kept[1]
    want = cluster_thresholds(sorted(out2.glob("pl-*.npz")), 90.0, 2)
    np.testing.assert_array_equal(two.thresholds[: len(want)], want)
    assert 0 < two.summary["kept_images"] < 240 and two.summary["lost_to_truncation"] == 0
    moved = tmp_path / "cluster"
    shutil.copytree(out2, moved, ignore=shutil.ignore_patterns("pl-*.npz"))  # the index, no label file
    data = W.make_cfg(run2, unl, CLUSTER).data
    stream = pseudo_labeled_batches(unl, moved, data, 4, 3, seed=0, rank=0, world=1)
    for _ in range(4):
        b = next(stream)
        groups = {}
        for key, lab in zip(b["keys"], b["labels"].tolist()):
            groups.setdefault(lab, set()).add(key)
        assert len(groups) == 4 and all(len(v) == 3 for v in groups.values())  # P x K distinct images
