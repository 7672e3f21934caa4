"""The curate stage with 2 and 4 real ranks (gloo, separate processes) against 1 rank on the same real
demo shards: each rank scans its own unlabeled shards and test shards, the dedup rows cross ranks
(3 cells of k-means, copies sent over their borders, one all-to-all) and the decisions, the
duplicate groups and the counts equal the 1-rank run's; a 2-rank rerun after one shard's scan was
deleted redoes only that scan; the cluster stage on the curated pool with a balance cap on 2 ranks
(each rank caps the clusters it owns) equals 1 rank. Worker: tests/integration/_curate_workers.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from slade_dist import dist
from slade_dist.data.curation import decisions_path, read_decisions
from slade_dist.data.pseudo_index import ClusterIndex
from slade_dist.data.shards import shard_paths
from slade_dist.pseudo import cluster, curate
from slade_dist.pseudo import embed as embed_files
from slade_dist.stages import RunLayout
from tests.integration import _pseudo_workers as W
from tests.integration._curate_workers import cluster_worker, curate_worker

ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
PLANTED = dict(
    image_size=64, test_per_class=10, unlabeled_per_class=20, planted_test_copies=20, duplicate_groups=8, shard_size=50
)
OVERRIDES = ["curate.enabled=true", "curate.calibration_images=40", "curate.dedup_cell_size=70", "curate.dedup_probe=3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    W.make_demo(one, **PLANTED)
    shutil.copytree(one / "demo", two / "demo")
    demo = one / "demo"
    cfg = W.make_cfg(one / "run", demo / "unlabeled", [f"data.test_shards={demo / 'test'}", *OVERRIDES])
    single = curate.run(cfg, one / "run")
    dist.run_local_processes(curate_worker, 2, args=(str(two), OVERRIDES, str(two / "result.json")), extra_env=ENV)
    return one, two, single, json.loads((two / "result.json").read_text())


def test_two_ranks_decide_as_one(runs):
    one, two, single, double = runs
    assert double["world_size"] == 2 and double["duplicate_groups"]["cells"] == 3
    assert double["duplicate_groups"]["rows_sent"] > double["duplicate_groups"]["candidates"]  # border copies
    for key in ("pool", "kept", "removed", "per_test_set", "match_threshold", "colour_threshold", "candidate_radius"):
        assert double[key] == single[key], key
    assert double["removed"]["near_test"] > 0 and double["removed"]["duplicates"] > 0
    for shard in shard_paths(one / "demo" / "unlabeled"):
        a = read_decisions(decisions_path(RunLayout(one / "run").stage_dir("curate"), shard))
        b = read_decisions(decisions_path(RunLayout(two / "run").stage_dir("curate"), shard))
        for field in ("key_id", "reason", "group"):
            np.testing.assert_array_equal(a[field], b[field])
    dup = "duplicates.npy"
    np.testing.assert_array_equal(np.load(one / "run" / "curate" / dup), np.load(two / "run" / "curate" / dup))
    assert (two / "run" / "curate" / "pairs-00001.npy").exists()  # rank 1 searched its own cells


def test_four_ranks_decide_as_one(runs, tmp_path):
    """4 ranks over 3 dedup cells (a rank owns no cell) decide as 1 rank."""
    one, _, single, _ = runs
    shutil.copytree(one / "demo", tmp_path / "demo")
    dist.run_local_processes(curate_worker, 4, args=(str(tmp_path), OVERRIDES, str(tmp_path / "r.json")), extra_env=ENV)
    four = json.loads((tmp_path / "r.json").read_text())
    assert four["world_size"] == 4 and four["duplicate_groups"]["cells"] == 3
    for key in ("pool", "kept", "removed", "per_test_set", "match_threshold", "colour_threshold", "candidate_radius"):
        assert four[key] == single[key], key
    for shard in shard_paths(one / "demo" / "unlabeled"):
        a = read_decisions(decisions_path(RunLayout(one / "run").stage_dir("curate"), shard))
        b = read_decisions(decisions_path(RunLayout(tmp_path / "run").stage_dir("curate"), shard))
        for field in ("key_id", "reason", "group"):
            np.testing.assert_array_equal(a[field], b[field])


def test_two_ranks_resume_from_the_scans(runs):
    _, two, _, double = runs
    out = RunLayout(two / "run").stage_dir("curate")
    scans = sorted(out.glob("scan-*.npz"))
    before = {p.name: p.stat().st_mtime_ns for p in scans}
    scans[1].unlink()
    dist.run_local_processes(curate_worker, 2, args=(str(two), OVERRIDES, str(two / "again.json")), extra_env=ENV)
    after = {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("scan-*.npz"))}
    assert after.keys() == before.keys()
    assert [n for n in after if after[n] != before[n]] == [scans[1].name]  # only the missing scan was redone
    again = json.loads((two / "again.json").read_text())
    assert again["removed"] == double["removed"] and again["kept"] == double["kept"]


def test_two_ranks_cluster_the_curated_pool_with_a_cap_as_one(runs):
    one, two, single, _ = runs
    over = [*OVERRIDES, "curate.cluster_cap=0.8"]
    for root in (one, two):
        W.make_teacher(root / "run")
    demo = one / "demo"
    cfg = W.make_cfg(one / "run", demo / "unlabeled", [f"data.test_shards={demo / 'test'}", *over])
    embed_files.run(cfg, one / "run")
    alone = cluster.run(cfg, one / "run")
    dist.run_local_processes(cluster_worker, 2, args=(str(two), over, str(two / "cluster.json")), extra_env=ENV)
    both = json.loads((two / "cluster.json").read_text())
    assert alone["n"] == both["n"] == single["kept"]  # only what curation kept is clustered
    assert alone["index_capped_clusters"] > 0  # the cap acted
    for key in ("index_cap", "index_capped_clusters", "index_capped_members", "index_kept_images"):
        assert both[key] == alone[key], key
    idx = [ClusterIndex.open(RunLayout(r / "run").stage_dir("cluster", 1), 100.0, 2) for r in (one, two)]
    np.testing.assert_array_equal(idx[0].kept, idx[1].kept)
    assert int(idx[1].kept.max()) <= alone["index_cap"]
