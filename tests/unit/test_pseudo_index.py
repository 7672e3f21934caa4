"""The cluster -> members index (slade_dist/data/pseudo_index.py) on real tars written by the
project's writer: byte ranges read back as TarSamples reads them (pax headers, long keys), key order
and coverage refused as the label-file zip refuses them, truncated tars counted, the summaries equal
to pseudo_join.cluster_thresholds on the label files, an owner split equal to one owner, the draw
(P distinct clusters x K distinct kept members), and a stale index detected by the key check."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slade_dist.data import pseudo_index as pi
from slade_dist.data.pseudo_join import cluster_thresholds
from slade_dist.data.pseudo_labels import PseudoLabelMismatch, pseudo_label_path, write_pseudo_labels
from slade_dist.data.shards import write_index, write_shard
from slade_dist.data.tars import TarSamples
from slade_dist.stages import RunLayout
from tests.integration._pseudo_workers import tiny_jpeg


def samples(prefix: str, n: int, long_every: int = 0):
    for j in range(n):
        key = f"{prefix}{j:04d}" + ("x" * 120 if long_every and j % long_every == 0 else "")  # > 100: pax name
        yield {"__key__": key, "jpg": tiny_jpeg(j), "json": json.dumps({"j": j}).encode()}


@pytest.fixture()
def shards(tmp_path):
    """3 shards of 40, 25 and 35 samples; labels: 7 clusters with random distances, one cluster of 1."""
    d = tmp_path / "unl"
    rng = np.random.default_rng(0)
    rows = []
    for i, n in enumerate([40, 25, 35]):
        write_shard(d / f"unl-{i:06d}.tar", samples(f"s{i}_", n, long_every=7), mtime=0)
        keys = [s["__key__"] for s in TarSamples(d / f"unl-{i:06d}.tar")]
        cls = rng.integers(6, size=n)
        if i == 2:
            cls[5] = 6  # the only member of cluster 6
        write_pseudo_labels(pseudo_label_path(tmp_path / "pl", f"unl-{i:06d}.tar"), keys, cls, rng.random(n))
        rows.append((keys, cls))
    write_index(d, [{"name": f"unl-{i:06d}.tar", "count": n} for i, n in enumerate([40, 25, 35])], "unlabeled")
    return d, tmp_path / "pl", rows


def test_ranges_read_back_every_sample_as_the_tar_iterator_does(shards):
    d, pl, rows = shards
    tar = d / "unl-000000.tar"
    keys, cls = rows[0]
    got, lost = pi.index_rows(tar, 3, keys, cls, np.zeros(len(keys), np.float32), "pl-000000.npz")
    assert lost == 0 and len(got) == 40 and (got["shard"] == 3).all()
    assert np.array_equal(got["cls"], cls)
    reader = pi.TarReader([tar])
    for row, want in zip(got, TarSamples(tar)):
        assert reader.read_range(0, int(row["offset"]), int(row["length"])) == want  # jpg + json, long keys too
    reader.close()


def test_order_coverage_and_truncation(shards, tmp_path):
    d, _, rows = shards
    tar = d / "unl-000001.tar"
    keys, cls = rows[1]
    z = np.zeros(len(keys), np.float32)
    swapped = [keys[1], keys[0], *keys[2:]]
    with pytest.raises(PseudoLabelMismatch, match=r"unl-000001.tar.*pl-x.npz"):
        pi.index_rows(tar, 0, swapped, cls, z, "pl-x.npz")
    with pytest.raises(PseudoLabelMismatch, match="'zz'"):  # a label key the intact tar lacks
        pi.index_rows(tar, 0, [*keys, "zz"], np.append(cls, 0), np.append(z, 0), "pl-x.npz")
    with pytest.raises(PseudoLabelMismatch, match="does not cover image shard"):  # a readable image, no label
        pi.index_rows(tar, 0, keys[:-2], cls[:-2], z[:-2], "pl-x.npz")
    cut = tmp_path / "cut-000001.tar"
    cut.write_bytes(tar.read_bytes()[: int(tar.stat().st_size * 0.6)])
    got, lost = pi.index_rows(cut, 0, keys, cls, z, "pl-x.npz")  # lost to truncation: counted, not an error
    assert 0 < len(got) < len(keys) and lost == len(keys) - len(got)
    assert [int(c) for c in got["cls"]] == list(cls[: len(got)])


@pytest.mark.parametrize("percentile,min_size", [(100.0, 2), (50.0, 1), (80.0, 17)])
def test_summaries_equal_cluster_thresholds_of_the_label_files(shards, percentile, min_size):
    d, pl, _ = shards
    summary = pi.build_index(d, pl, percentile, min_size, k=8)  # cluster 7: empty
    paths = sorted(pl.glob("pl-*.npz"))
    want = cluster_thresholds(paths, percentile, min_size)
    idx = pi.ClusterIndex.open(pl, percentile, min_size)
    np.testing.assert_array_equal(idx.thresholds[: len(want)], want)
    assert idx.thresholds[7] == -np.inf and idx.sizes[7] == 0
    labels = [pi.read_pseudo_labels(p) for p in paths]
    all_cls = np.concatenate([c for _, c, _ in labels])
    all_dist = np.concatenate([x for _, _, x in labels])
    np.testing.assert_array_equal(idx.sizes, np.bincount(all_cls, minlength=8))
    kept = [int(((all_cls == c) & (all_dist <= idx.thresholds[c])).sum()) for c in range(8)]
    assert idx.kept.tolist() == kept and summary["kept_images"] == sum(kept)
    members = np.load(pl / "members-00000.npy")
    assert len(members) == 100 and len({(int(m["shard"]), int(m["offset"])) for m in members}) == 100
    for c in range(8):  # every label row once, grouped by cluster
        rows = idx.entries(c, np.arange(idx.sizes[c]))
        assert len(rows) == idx.sizes[c]


def test_owner_split_equals_one_owner(shards):
    d, pl, rows = shards
    parts = [pi.index_rows(d / f"unl-{i:06d}.tar", i, *_labels(pl, i))[0] for i in range(3)]
    allrows = np.concatenate(parts)
    one, whole = pi.summarise_clusters(allrows, 0, 8, 60.0, 3)
    bounds = pi.owner_bounds(8, 3)
    split = [
        pi.summarise_clusters(allrows[(allrows["cls"] >= a) & (allrows["cls"] < b)], a, b, 60.0, 3)
        for a, b in zip(bounds, bounds[1:])
    ]
    np.testing.assert_array_equal(np.concatenate([r for r, _ in split]), one)
    for key in ("sizes", "thresholds", "kept"):
        np.testing.assert_array_equal(np.concatenate([a[key] for _, a in split]), whole[key])
    d_sorted = one["dist"][one["cls"] == 2]
    assert (np.diff(d_sorted) >= 0).all()  # sorted by distance inside a cluster: the kept are a prefix


def _labels(pl, i):
    keys, cls, dist = pi.read_pseudo_labels(pl / f"pl-{i:06d}.npz")
    return keys, cls, dist, f"pl-{i:06d}.npz"


def test_draw_gives_p_distinct_clusters_of_k_distinct_kept_members(shards):
    d, pl, _ = shards
    pi.build_index(d, pl, 70.0, 2, k=8)
    idx = pi.ClusterIndex.open(pl, 70.0, 2)
    reader = pi.TarReader(idx.shard_paths(d))
    drawn = set()
    for step in range(30):
        batch = idx.draw_step_part(0, step, 3, 4, part=0, parts=1)
        assert len({c for c, _ in batch}) == 3
        for c, entries in batch:
            drawn.add(c)
            assert len(entries) == 4 and len({(int(e["shard"]), int(e["offset"])) for e in entries}) == 4
            thr = idx.thresholds[c]
            keys = {reader.read(e)["__key__"] for e in entries}
            assert len(keys) == 4
            for key in keys:  # a kept member: the label file agrees
                shard = int(key[1])
                k_, cls, dist = pi.read_pseudo_labels(pl / f"pl-{shard:06d}.npz")
                j = k_.index(key)
                assert cls[j] == c and dist[j] <= thr
    reader.close()
    assert drawn <= set(idx.drawable(4).tolist()) and 6 not in drawn and len(drawn) >= 4
    with pytest.raises(ValueError, match="fewer than P=9"):
        idx.check_drawable(9, 4)


def test_missing_or_stale_index_fails_clearly(shards):
    d, pl, _ = shards
    with pytest.raises(FileNotFoundError, match="run the cluster stage"):
        pi.ClusterIndex.open(pl, 100.0, 2)
    pi.build_index(d, pl, 100.0, 2)
    with pytest.raises(ValueError, match="run the cluster stage again"):
        pi.ClusterIndex.open(pl, 90.0, 2)
    idx = pi.ClusterIndex.open(pl, 100.0, 2)
    # the shard rewritten with other keys, same layout: the key check catches it
    write_shard(d / "unl-000000.tar", samples("t0_", 40, long_every=7), mtime=0)
    reader = pi.TarReader(idx.shard_paths(d))
    entries = [e for c in range(len(idx.sizes)) for e in idx.entries(c, np.arange(idx.sizes[c]))]
    with pytest.raises(PseudoLabelMismatch, match="re-run the cluster stage"):
        for e in entries:
            reader.read(e)
    reader.close()


# --------------------------------------------------------- the real embed -> cluster path on cut tars
@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    from tests.integration._pseudo_workers import make_teacher

    run = tmp_path_factory.mktemp("cut_run") / "run"
    make_teacher(run)
    return run


@pytest.mark.parametrize("cut", ["inside_image", "inside_header", "member_boundary", "between_samples"])
def test_cluster_stage_survives_a_tar_cut_anywhere(tmp_path, teacher_run, cut):
    """Case 2: a truncated unlabeled tar cut inside an image made the cluster stage die with
    "sample ... decodes but has no label row" (embed's reader dropped the last complete sample, the
    member index's scan kept it). The real embed and cluster stages, one process, several cuts."""
    import shutil

    from slade_dist.pseudo import cluster, embed
    from tests import _hazards as H
    from tests.integration._pseudo_workers import make_cfg

    unl = tmp_path / "unl"
    counts = []
    for i in range(2):
        rows = [
            {"__key__": f"u{i}_{j:03d}", "jpg": H.photo_jpeg(100 * i + j, j % 3), "json": b'{"label": 0}'}
            for j in range(12)
        ]
        counts.append(write_shard(unl / f"unl-{i:06d}.tar", rows))
    write_index(unl, [{"name": f"unl-{i:06d}.tar", "count": n} for i, n in enumerate(counts)], "unlabeled")
    tar = unl / "unl-000000.tar"
    tar.write_bytes(tar.read_bytes()[: H.cut_points(tar)[cut]])
    run = tmp_path / "run"
    shutil.copytree(teacher_run, run)
    cfg = make_cfg(run, unl, ["pseudo.k=3"])
    res = embed.run(cfg, run)
    assert res["images"] + res["lost_to_truncation"] == 24 and res["lost_to_truncation"] >= 1
    cluster.run(cfg, run)  # used to raise PseudoLabelMismatch
    index = pi.ClusterIndex.open(RunLayout(run).stage_dir("cluster", 1), 100.0, 2)
    assert index.summary["n"] == res["images"] and index.summary["lost_to_truncation"] == 0
    reader = pi.TarReader(index.shard_paths(unl))
    members = [index.entries(c, np.arange(index.sizes[c])) for c in range(len(index.sizes))]
    read = {reader.read(e)["__key__"] for m in members for e in m}  # every entry is its sample
    assert read == {k for shard in sorted(unl.glob("*.tar")) for k in embed.read_keys(run / "round1" / "embed", shard)}
    reader.close()


def test_img2dataset_shards_indexed_in_place_are_found(tmp_path):
    """img2dataset output is indexed where it lies (index.json names "../i2d/00000.tar"): the student
    reads its members from there, not from <unlabeled dir>/00000.tar (which does not exist)."""
    from slade_dist.data import writers

    src = tmp_path / "i2d"
    for i in range(2):
        write_shard(src / f"{i:05d}.tar", samples(f"s{i}_", 6))
    out = tmp_path / "unl"
    writers.convert("img2dataset", src, out, progress=False)
    for i in range(2):
        keys = [s["__key__"] for s in TarSamples(src / f"{i:05d}.tar")]
        write_pseudo_labels(pseudo_label_path(tmp_path / "pl", f"{i:05d}.tar"), keys, np.arange(6) % 2, np.zeros(6))
    pi.build_index(out, tmp_path / "pl", k=2)
    index = pi.ClusterIndex.open(tmp_path / "pl", 100.0, 2)
    paths = index.shard_paths(out)
    assert [p.resolve() for p in paths] == [(src / f"{i:05d}.tar").resolve() for i in range(2)]
    reader = pi.TarReader(paths)
    assert reader.read(index.entries(0, np.arange(1))[0])["__key__"].startswith("s")
    reader.close()
