"""The curate stage in one process on real demo shards with planted copies (real FAISS, real tars):
decontamination (edited copies and same-bytes copies of test images out, the list and counts,
calibration report, resume), near-duplicate groups (one representative per planted group, the
same groups whatever the cells), the cluster stage reading the decisions (k-means, member index
and stats on kept samples only) and its balance cap / collapse warning, the pure pieces (copy
check, thresholds rule, cell targets, components) and the bad inputs.
(2 real ranks: tests/integration/test_curate_multirank.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from slade_dist.config import ConfigError, load_config
from slade_dist.data.copies import CopyEdits, copy_match, make_copy, signature
from slade_dist.data.curation import (
    DUPLICATE,
    KEPT,
    NEAR_TEST,
    SAME_BYTES,
    CurationMissing,
    decisions_path,
    read_decisions,
    read_summary,
)
from slade_dist.data.demo import read_planted
from slade_dist.data.pseudo_index import ClusterIndex, TarReader
from slade_dist.data.pseudo_labels import pseudo_label_path, read_pseudo_labels
from slade_dist.data.readers import pseudo_labeled_batches
from slade_dist.data.shards import shard_paths, write_index
from slade_dist.data.tars import TarSamples, image_bytes
from slade_dist.errors import is_user_error, one_line
from slade_dist.provenance import MISSING
from slade_dist.pseudo import cluster, cluster_pool, curate
from slade_dist.pseudo import embed as embed_files
from slade_dist.stages import RunLayout, data_keys, pipeline_plan, stage_inputs, write_done
from tests.integration import _pseudo_workers as W

# a small calibration: 40 test images of 64 px; 30 planted test copies, 10 groups of 3
PLANTED = dict(
    image_size=64,
    test_classes=4,
    test_per_class=10,
    unlabeled_per_class=20,
    planted_test_copies=30,
    duplicate_groups=10,
    shard_size=50,
)
CURATE = ["curate.enabled=true", "curate.calibration_images=40"]


def curate_cfg(root: Path, *extra: str):
    demo = root / "demo"
    return W.make_cfg(root / "run", demo / "unlabeled", [f"data.test_shards={demo / 'test'}", *CURATE, *extra])


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    """One curate run on the planted demo, shared by the tests that only read its outputs."""
    root = tmp_path_factory.mktemp("curate")
    W.make_demo(root, **PLANTED)
    cfg = curate_cfg(root)
    result = curate.run(cfg, root / "run")
    return root, cfg, result


def decided(root: Path) -> dict[str, int]:
    """key -> reason of every unlabeled sample."""
    out = {}
    for shard in shard_paths(root / "demo" / "unlabeled"):
        d = read_decisions(decisions_path(RunLayout(root / "run").stage_dir("curate"), shard))
        out.update(zip((s["__key__"] for s in TarSamples(shard)), d["reason"].tolist()))
    return out


# ------------------------------------------------------------------------------- the copy check
def test_copy_check_tells_copies_from_other_photos(tmp_path):
    unl = W.make_demo(tmp_path, image_size=64)
    images = [image_bytes(s) for s in TarSamples(shard_paths(unl)[0])][:12]
    rng = np.random.default_rng(0)
    edits = CopyEdits(min_area=0.8, max_rotation=3, min_scale=0.5, max_scale=2.0, min_quality=50)
    sig = [signature(b) for b in images]
    thumbs = [t[:h, :w] for _, t, (h, w) in sig]
    copies, distinct = [], []
    for i, data in enumerate(images):
        copy, what = make_copy(data, rng, edits)
        _, t, (h, w) = signature(copy)
        m = copy_match(t[:h, :w], thumbs[i], 0.75, 3.0)
        assert m.structure > 0.9 and m.colour < 10, what
        others = [copy_match(t[:h, :w], thumbs[j], 0.75, 3.0) for j in range(len(images)) if j != i]
        assert max(o.structure for o in others) < m.structure and min(o.colour for o in others) > m.colour
        copies.append(m)
        distinct += others
    # the two measures together: no distinct pair is as alike as the least alike copy on both
    least = (min(m.structure for m in copies), max(m.colour for m in copies))
    assert not any(o.structure >= least[0] and o.colour <= least[1] for o in distinct)
    # the same picture in other colours (another exposure, another background): one outline, so a
    # structure score like a copy's; the colour difference tells it apart
    recoloured = np.clip(thumbs[0].astype(np.int16) + np.array([60, -40, 30], np.int16), 0, 255).astype(np.uint8)
    other_light = copy_match(recoloured, thumbs[0], 0.75, 3.0)
    assert other_light.structure > 0.9 and other_light.colour > 2 * least[1]
    same, _ = make_copy(images[0], np.random.default_rng(1), CopyEdits(exact_share=1.0))
    assert same == images[0]  # a re-upload
    again = make_copy(images[0], np.random.default_rng(5), edits)
    assert again == make_copy(images[0], np.random.default_rng(5), edits)  # a seed fixes the copy
    hist, thumb, (h, w) = sig[0]
    assert hist.shape == (512,) and np.linalg.norm(hist) == pytest.approx(1.0, abs=1e-5)
    assert thumb.shape == (32, 32, 3) and max(h, w) == 32


def test_thresholds_rule_and_cell_targets():
    rng = np.random.default_rng(0)
    copy_d = rng.uniform(0, 0.4, 1000)
    copies = np.stack([rng.uniform(0.9, 1.0, 1000), rng.uniform(1, 5, 1000)], axis=1)  # (structure, colour)
    distinct = np.stack([rng.uniform(0.2, 0.7, 1000), rng.uniform(8, 40, 1000)], axis=1)
    apart = curate.choose_thresholds(copy_d, copies, distinct, 0.99, 0.01)
    assert apart["candidate_radius"] == pytest.approx(np.quantile(copy_d, 0.99))
    s, c = apart["structure"], apart["colour"]
    assert not s["overlap"] and s["copy_quantile_value"] == pytest.approx(np.quantile(copies[:, 0], 0.01))
    assert apart["match_threshold"] == pytest.approx((s["copy_quantile_value"] + s["distinct_quantile_value"]) / 2)
    # colour: copies low, distinct high; halfway between the copies' 0.99 and the distinct 0.01 quantile
    assert not c["overlap"] and c["copy_quantile_value"] == pytest.approx(np.quantile(copies[:, 1], 0.99))
    assert c["distinct_quantile_value"] == pytest.approx(np.quantile(distinct[:, 1], 0.01))
    assert apart["colour_threshold"] == pytest.approx((c["copy_quantile_value"] + c["distinct_quantile_value"]) / 2)
    mixed = curate.choose_thresholds(copy_d, copies, distinct * [1.0, 0.1] + [0.25, 0.0], 0.99, 0.01)
    assert mixed["structure"]["overlap"] and mixed["colour"]["overlap"]
    assert mixed["match_threshold"] == pytest.approx(np.quantile(copies[:, 0], 0.01))
    assert mixed["colour_threshold"] == pytest.approx(np.quantile(copies[:, 1], 0.99))
    # no distinct candidate: as far beyond the copy quantile as the copies' median lies before it
    alone = curate.choose_thresholds(copy_d, copies, np.zeros((0, 2)), 0.99, 0.01)
    q, med = np.quantile(copies[:, 1], 0.99), np.median(copies[:, 1])
    assert alone["colour_threshold"] == pytest.approx(2 * q - med) and alone["colour_threshold"] > q
    assert alone["structure"]["distinct_quantile_value"] is None
    # images without a candidate (NaN) can never be flagged: with 0.5 % of 1000 allowed, 3 with one
    # leave the copy quantile alone; 100 with one put the line below the 5th best of those 100
    few = np.full((1000, 2), np.nan)
    few[:3] = [0.95, 2.0]
    q, med = np.quantile(copies[:, 0], 0.01), np.median(copies[:, 0])
    assert curate.choose_thresholds(copy_d, copies, few, 0.99, 0.005)["match_threshold"] == pytest.approx(2 * q - med)
    few[:100] = distinct[:100]
    some = curate.choose_thresholds(copy_d, copies, few, 0.99, 0.005)["structure"]
    assert some["distinct_quantile_value"] == pytest.approx(np.quantile(distinct[:100, 0], 0.95))
    # a point at distance 0.1 from its cell's centroid: another cell at 0.25 may hold a partner
    # within radius 0.1 (0.25 <= 0.1 + 2 x 0.1), one at 0.35 cannot; the last probed still qualifies
    i, cells, unresolved = curate.cell_targets(
        np.array([[0.1, 0.25, 0.35], [0.1, 0.2, 0.3]]), np.array([[4, 7, 9], [1, 2, 3]]), 0.1
    )
    assert list(zip(i.tolist(), cells.tolist())) == [(0, 4), (0, 7), (1, 1), (1, 2), (1, 3)]
    assert unresolved.tolist() == [False, True]


def test_duplicate_groups_are_components_represented_by_their_first_row():
    dup = curate.duplicate_groups(np.array([[5, 9], [9, 12], [3, 4], [12, 40]]))
    assert dup["row"].tolist() == [3, 4, 5, 9, 12, 40]
    assert dup["rep"].tolist() == [3, 3, 5, 5, 5, 5]
    assert len(curate.duplicate_groups(np.zeros((0, 2), np.int64))) == 0


# ---------------------------------------------------------------------------- decontamination
def test_planted_test_copies_are_removed_and_listed(curated):
    root, cfg, result = curated
    planted = read_planted(root / "demo")
    reason = decided(root)
    copies = planted["test_copies"]
    exact = [c for c in copies if c["edit"] == "same bytes"]
    assert exact and all(reason[c["key"]] == SAME_BYTES for c in exact)  # the hash check is exact
    edited = [c for c in copies if c["edit"] != "same bytes"]
    assert sum(reason[c["key"]] == NEAR_TEST for c in edited) >= 0.9 * len(edited)
    planted_keys = {c["key"] for c in copies} | {k for g in planted["duplicate_groups"] for k in g["keys"]}
    others = [k for k in reason if k not in planted_keys]
    assert sum(reason[k] in (NEAR_TEST, SAME_BYTES) for k in others) <= 0.02 * len(others)
    # the list, the counts, the summary the eval stage reads, the calibration report
    listed = (RunLayout(root / "run").stage_dir("curate") / "decontaminated.tsv").read_text().splitlines()
    assert listed[0].startswith("shard\tkey\treason\tscore\tcolour_difference") and len(listed) - 1 == sum(
        r in (NEAR_TEST, SAME_BYTES) for r in reason.values()
    )
    removed = result["removed"]["near_test"] + result["removed"]["same_bytes"]
    assert result["per_test_set"]["test"]["removed"] == removed == len(listed) - 1
    assert result["pool"] == len(reason) and result["kept"] == sum(r == KEPT for r in reason.values())
    assert read_summary(RunLayout(root / "run").stage_dir("curate"))["token"]
    report = json.loads((RunLayout(root / "run").stage_dir("curate") / "calibration.json").read_text())
    assert report["copies"]["score"]["n"] == 40 and report["distinct"]["queries"] == 40
    assert report["distinct"]["best_score"]["n"] == report["distinct"]["queries_with_a_candidate"]
    assert report["match_threshold_source"] == report["colour_threshold_source"] == "calibrated"
    assert "quantile" in report["rule"] and report["copies"]["colour_difference"]["n"] == 40
    assert 0.0 < report["candidate_radius"] <= 2.0 and -1.0 < report["match_threshold"] <= 1.0
    assert report["copies"]["score"]["quantiles"]["0.0"] > 0.9 and report["match_threshold"] > 0.85
    assert 0.0 < report["colour_threshold"] < 255.0
    assert result["colour_threshold"] == report["colour_threshold"]


def test_near_duplicate_groups_keep_one_image_and_the_same_groups_in_many_cells(curated, tmp_path):
    root, cfg, result = curated
    planted = read_planted(root / "demo")
    reason = decided(root)
    kept_per_group = [sum(reason[k] == KEPT for k in g["keys"]) for g in planted["duplicate_groups"]]
    assert sum(n == 1 for n in kept_per_group) >= 0.9 * len(kept_per_group) and max(kept_per_group) <= 2
    groups = result["duplicate_groups"]
    assert groups["removed"] == sum(r == DUPLICATE for r in reason.values()) and groups["cells"] == 1
    one_cell = np.load(RunLayout(root / "run").stage_dir("curate") / "duplicates.npy")
    # many small cells (coarse k-means) and copies across their borders: the same groups
    shutil.copytree(root / "demo", tmp_path / "demo")
    many = curate.run(curate_cfg(tmp_path, "curate.dedup_cell_size=70", "curate.dedup_probe=3"), tmp_path / "run")
    assert (
        many["duplicate_groups"]["cells"] == 3
        and many["duplicate_groups"]["rows_sent"] > many["duplicate_groups"]["candidates"]
    )
    np.testing.assert_array_equal(np.load(RunLayout(tmp_path / "run").stage_dir("curate") / "duplicates.npy"), one_cell)


def test_a_rerun_reuses_the_scans_and_a_set_threshold_is_used_as_given(curated, tmp_path):
    root, _, result = curated
    shutil.copytree(root / "demo", tmp_path / "demo")
    shutil.copytree(root / "run", tmp_path / "run")
    out = RunLayout(tmp_path / "run").stage_dir("curate")
    scans = {p.name: p.stat().st_mtime_ns for p in out.glob("scan-*.npz")}
    again = curate.run(curate_cfg(tmp_path), tmp_path / "run")
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("scan-*.npz")} == scans  # read back, not redone
    assert again["removed"] == result["removed"] and again["pixel_checks"] < result["pixel_checks"]
    strict = curate.run(
        curate_cfg(tmp_path, "curate.match_threshold=0.999", "curate.colour_threshold=1.5", "curate.dedup=false"),
        tmp_path / "run",
    )
    assert strict["match_threshold"] == 0.999 and strict["colour_threshold"] == 1.5
    assert set(strict["thresholds_source"].values()) == {"config", "calibrated"}  # the radius stays calibrated
    assert strict["thresholds_source"]["colour_threshold"] == strict["thresholds_source"]["match_threshold"] == "config"
    assert strict["removed"]["near_test"] < result["removed"]["near_test"] and strict["removed"]["duplicates"] == 0
    assert strict["removed"]["same_bytes"] == result["removed"]["same_bytes"]


# ------------------------------------------------------------------------ the cluster stage
def test_cluster_stage_uses_only_what_curation_kept(curated, tmp_path):
    root, _, result = curated
    shutil.copytree(root / "demo", tmp_path / "demo")
    shutil.copytree(root / "run" / "curate", tmp_path / "run" / "curate")
    cfg = curate_cfg(tmp_path, "pseudo.k=6")
    W.make_teacher(tmp_path / "run")
    embed_files.run(cfg, tmp_path / "run")
    res = cluster.run(cfg, tmp_path / "run")
    assert res["n"] == result["kept"] and res["index_kept_images"] == result["kept"]
    out = RunLayout(tmp_path / "run").stage_dir("cluster", 1)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["curation"]["kept"] == result["kept"] and sum(stats["sizes"]) == result["kept"]
    # no removed sample is in the member index, and at most one image of each planted group
    reason = decided(tmp_path)
    index = ClusterIndex.open(out, 100.0, 2)
    reader = TarReader(index.shard_paths(tmp_path / "demo" / "unlabeled"))
    member_keys = {
        reader.read(e)["__key__"]
        for c in range(len(index.kept))
        for e in index.entries(c, np.arange(int(index.kept[c])))
    }
    reader.close()
    assert member_keys == {k for k, r in reason.items() if r == KEPT}
    group_of = {k: g for g, grp in enumerate(read_planted(tmp_path / "demo")["duplicate_groups"]) for k in grp["keys"]}
    assert len([k for k in member_keys if k in group_of]) == len({group_of[k] for k in member_keys if k in group_of})
    # so the student's pseudo-positive pairs (same cluster label in a batch) never join two images of a group
    stream = pseudo_labeled_batches(cfg.data.unlabeled_shards, out, cfg.data, 3, 3, seed=0, rank=0, world=1)
    for _ in range(10):
        b = next(stream)
        same = b["labels"][:, None] == b["labels"][None, :]
        for i, j in same.fill_diagonal_(False).nonzero().tolist():
            ki, kj = b["keys"][i], b["keys"][j]
            assert ki != kj and not (ki in group_of and group_of[ki] == group_of.get(kj))
    # every label file still covers its shard (all samples labelled)
    for shard in shard_paths(tmp_path / "demo" / "unlabeled"):
        keys, _, _ = read_pseudo_labels(pseudo_label_path(out, shard))
        assert keys == [s["__key__"] for s in TarSamples(shard)]


def test_balance_cap_and_collapse_warning(tmp_path):
    names, sizes = ["unl-000000.tar", "unl-000001.tar"], [300, 200]
    shards = W.write_index_only(tmp_path / "unl", names, sizes)
    run = tmp_path / "run"
    W.write_embeddings(RunLayout(run).stage_dir("embed", 1), names, sizes, d=8, k=5, shard_dir=shards)
    cfg = W.make_cfg(run, shards, ["pseudo.k=5", "pseudo.niter=8", "curate.cluster_cap=0.5"])
    res = cluster.run(cfg, run)
    cap = int(np.ceil(0.5 * 500 / 5))
    out = RunLayout(run).stage_dir("cluster", 1)
    index = ClusterIndex.open(out, 100.0, 2)
    assert res["index_cap"] == cap and index.kept.max() == cap and int(index.kept.sum()) == 5 * cap
    assert res["index_capped_members"] == 500 - 5 * cap and res["index_capped_clusters"] == 5
    for c in range(5):  # the nearest members stay: the threshold is the last kept member's distance
        rows = index.entries(c, np.arange(cap))
        assert len(rows) == cap and np.isfinite(index.thresholds[c])
    warn = cluster_pool.collapse(np.array([90, 4, 3, 3]), 0.1)
    assert "cluster 0 holds 90 of 100 points (90.0%" in warn["warning"] and warn["share"] == 0.9
    assert cluster_pool.collapse(np.array([30, 25, 25, 20]), 0.1)["warning"] == ""  # under twice an equal share
    stats = json.loads((out / "stats.json").read_text())
    assert stats["collapse"]["share"] == pytest.approx(max(stats["sizes"]) / 500)


# ------------------------------------------------------------------------------- the chain
def test_stage_wiring(tmp_path):
    assert pipeline_plan(1, ("curate.enabled",))[:3] == [("curate", 1), ("pretrain", 1), ("teacher", 1)]
    assert ("curate", 1) not in pipeline_plan(1)
    cfg = load_config(None, [f"run.dir={tmp_path}", "curate.enabled=true"], check_paths=False)
    assert data_keys(cfg, "curate") == ("data.unlabeled_shards", "data.test_shards")
    cfg = load_config(None, [f"run.dir={tmp_path}", "data.query_shards=q", "data.gallery_shards=g"], check_paths=False)
    assert data_keys(cfg, "curate") == ("data.unlabeled_shards", "data.query_shards", "data.gallery_shards")
    cfg.curate.enabled = True
    write_done(cfg, "curate", {}, 1.0, inputs={})
    assert stage_inputs(cfg, "cluster")["curate"] != MISSING


# ------------------------------------------------------------------------------- bad input
def test_bad_inputs_fail_with_one_clear_line(curated, tmp_path):
    root, _, _ = curated
    shutil.copytree(root / "demo", tmp_path / "demo")
    empty = tmp_path / "empty_test"
    write_index(empty, [], "labeled")
    errors = []
    with pytest.raises(curate.NoTestImages, match="hold no readable image") as e:
        curate.run(curate_cfg(tmp_path, f"data.test_shards={empty}"), tmp_path / "run")
    errors.append(e.value)
    with pytest.raises(ConfigError, match="no test set to decontaminate against") as e:
        curate.run(curate_cfg(tmp_path, "data.test_shards="), tmp_path / "run")
    errors.append(e.value)
    with pytest.raises(ConfigError, match="curate.match_threshold .* above the maximum 1.0") as e:
        curate_cfg(tmp_path, "curate.match_threshold=1.5")
    errors.append(e.value)
    with pytest.raises(ConfigError, match="curate.colour_threshold .* above the maximum 255.0") as e:
        curate_cfg(tmp_path, "curate.colour_threshold=300")
    errors.append(e.value)
    with pytest.raises(ConfigError, match="curate.candidate_radius .* below the minimum") as e:
        curate_cfg(tmp_path, "curate.candidate_radius=-0.1")
    errors.append(e.value)
    # the cluster stage: no embeddings; curation on but never run; run on other shards
    cfg = curate_cfg(tmp_path)
    with pytest.raises(FileNotFoundError, match="have no embeddings .* run the embed stage") as e:
        cluster.run(cfg, tmp_path / "run")
    errors.append(e.value)
    W.make_teacher(tmp_path / "run")
    embed_files.run(cfg, tmp_path / "run")
    with pytest.raises(CurationMissing, match="run the curate stage first") as e:
        cluster.run(cfg, tmp_path / "run")
    errors.append(e.value)
    shutil.copytree(root / "run" / "curate", tmp_path / "run" / "curate", dirs_exist_ok=True)
    first = decisions_path(tmp_path / "run" / "curate", shard_paths(tmp_path / "demo" / "unlabeled")[0])
    d = read_decisions(first)
    np.savez(first, **{**d, "key_id": d["key_id"][::-1].copy() + np.uint64(1)})
    with pytest.raises(CurationMissing, match="the shard changed after curation") as e:
        cluster.run(cfg, tmp_path / "run")
    errors.append(e.value)
    # each one a user error: one line, exit 2 at the entry points (errors.exit_on_user_error)
    assert all(is_user_error(err) and "\n" not in one_line(err) for err in errors)


def test_eval_says_what_was_removed_or_that_nothing_was_checked(curated, caplog):
    from slade_dist.eval.stage import curation_report

    root, cfg, result = curated
    layout = RunLayout(root / "run")
    with caplog.at_level("INFO", logger="slade_dist"):
        report = curation_report(layout, cfg)
    removed = result["per_test_set"]["test"]["removed"]
    assert report["per_test_set"]["test"]["removed"] == removed
    summary = json.loads((layout.stage_dir("curate") / "curate.json").read_text())
    assert {k: report[k] for k in ("match_threshold", "colour_threshold")} == {
        k: summary[k] for k in ("match_threshold", "colour_threshold")
    }
    assert f"curation removed from the {result['pool']} unlabeled images: copies of test {removed}" in caplog.text
    cfg_off = load_config(None, [f"run.dir={root / 'run'}"], check_paths=False)
    with caplog.at_level("WARNING", logger="slade_dist"):
        assert curation_report(layout, cfg_off) == {}
    assert "the unlabeled pool was not checked against the test sets" in caplog.text


def test_query_and_gallery_are_each_a_test_set(curated, tmp_path):
    """In-shop names query and gallery (keys repeat across them): both are checked against."""
    root, _, result = curated
    shutil.copytree(root / "demo", tmp_path / "demo")
    test = tmp_path / "demo" / "test"
    both = curate.run(
        curate_cfg(tmp_path, "data.test_shards=", f"data.query_shards={test}", f"data.gallery_shards={test}"),
        tmp_path / "run",
    )
    assert list(both["per_test_set"]) == ["query", "gallery"] and both["per_test_set"]["gallery"]["images"] == 40
    # every gallery image has a byte twin in the query: each removal is counted once, on one set
    sets = both["per_test_set"].values()
    assert sum(v["removed"] for v in sets) == both["removed"]["near_test"] + both["removed"]["same_bytes"]
    assert (
        both["per_test_set"]["query"]["same_bytes"] == both["removed"]["same_bytes"] == result["removed"]["same_bytes"]
    )
