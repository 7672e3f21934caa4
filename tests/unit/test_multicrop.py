"""The SwAV multi-crop stream (slade_dist/data/multicrop.py): its buffer holds encoded bytes, capped
by count and by data.buffer_mb, so memory does not grow with the images (3000 x 2000 photos, in a
process of its own); hazards are decoded by the contract or skipped and counted; what a truncated tar
loses is counted. (Shapes of the views and the pretrain stage on it: tests/unit/test_pretrain.py.)"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from pathlib import Path

import pytest
import torch

from slade_dist.config import DataConfig, swav_augment
from slade_dist.data import curation, loading, multicrop
from slade_dist.data.shards import index_counts, shard_paths, write_index, write_shard
from tests import _hazards as H

REPO = Path(__file__).resolve().parents[2]


def cfg(**kw) -> DataConfig:
    return dataclasses.replace(DataConfig(), **{**dict(image_size=16, num_workers=0, shuffle_buffer=8), **kw})


def batches(samples, data_cfg, n, batch_size=4):
    it = multicrop._multicrop_batches(
        iter(samples), data_cfg=data_cfg, augment=swav_augment(), batch_size=batch_size, seed=0
    )
    return [b for _, b in zip(range(n), it)]


def test_buffer_growth_does_not_follow_the_image_size():
    """Case 6: 40 3000x2000 JPEGs took 3.3 GB at shuffle_buffer=20 (full-size decodes buffered).
    Here 60 are buffered: decoded they would hold 60 x 18 MB = 1.08 GB (the old stream grew by
    1.4 GB here); encoded, a few MB."""
    setup = """
        import dataclasses
        from slade_dist.config import DataConfig, swav_augment
        from slade_dist.data import multicrop
        from tests._hazards import big_photo_jpeg
        data = big_photo_jpeg()
        cfg = dataclasses.replace(DataConfig(), image_size=32, shuffle_buffer=60, num_workers=0)
        samples = ({"__key__": str(i), "jpg": data} for i in range(10**6))
        it = multicrop._multicrop_batches(samples, data_cfg=cfg, augment=swav_augment(), batch_size=2, seed=0)
    """
    growth = H.rss_growth_mb(REPO, setup, "for _ in range(6): next(it)")
    assert growth < 250, growth  # one 3000x2000 decode (18 MB) and its crops


def test_the_byte_cap_lets_images_through_before_the_count_is_reached():
    samples = [{"__key__": str(i), "jpg": H.photo_jpeg(i, size=(40, 40))} for i in range(12)]
    size = max(len(s["jpg"]) for s in samples)
    assert batches(samples, cfg(shuffle_buffer=1000), 2) == []  # a finite stream never fills 1000
    tight = cfg(shuffle_buffer=1000, buffer_mb=1)
    many = [{"__key__": str(i), "jpg": H.photo_jpeg(i % 12, size=(40, 40))} for i in range((3 << 20) // size)]
    got = batches(many, tight, 3)
    assert len(got) == 3 and got[0]["view1"].shape == (4, 3, 16, 16)


def test_hazards_are_decoded_by_the_contract_or_counted():
    good = [{"__key__": f"p{i}", "jpg": H.photo_jpeg(i)} for i in range(6)]
    bad = [{"__key__": n, "png": make()} for n, (make, ok) in H.HAZARDS.items()]
    no_image = [{"__key__": "txt", "txt": b"hello"}]
    samples = (good + bad + no_image) * 4
    got = batches(samples, cfg(shuffle_buffer=2), 6)
    views = torch.cat([b["view1"] for b in got])
    assert torch.isfinite(views).all() and views.abs().max() < 3.0  # 16-bit images scaled, not x257
    rejected = sum(not ok for _, ok in H.HAZARDS.values()) + 1
    assert sum(b["skipped"] for b in got) >= rejected  # counted as they leave the buffer


def test_truncation_losses_are_counted(tmp_path):
    rows = [{"__key__": f"{i:04d}", "jpg": H.photo_jpeg(i), "json": b"{}"} for i in range(10)]
    n = write_shard(tmp_path / "u-000000.tar", rows)
    write_index(tmp_path, [{"name": "u-000000.tar", "count": n}], "unlabeled")
    tar = tmp_path / "u-000000.tar"
    tar.write_bytes(tar.read_bytes()[: H.cut_points(tar)["inside_image"]])
    stream = loading.resampled_samples([tar], index_counts([tar]), random.Random(0))
    items = [next(stream) for _ in range(12)]
    lost = [x[loading.LOST] for x in items if loading.LOST in x]
    assert lost and lost[0] == 10 - 5  # 5 complete samples before the cut, the rest lost


def test_the_pools_copies_of_test_images_are_never_drawn(tmp_path):
    """SwAV's stream leaves out the keys the curate stage listed as copies of a test image
    (decontaminated.tsv, read by curation.test_copies), in their own shard only."""
    pool, curate = tmp_path / "unlabeled", tmp_path / "curate"
    pool.mkdir()
    keys = [f"{i:04d}" for i in range(8)]
    for s in range(2):  # the same keys in both shards: a decision belongs to its shard
        rows = [
            {"__key__": k, "jpg": H.photo_jpeg(i), "json": json.dumps({"shard": s}).encode()}
            for i, k in enumerate(keys)
        ]
        write_shard(pool / f"u-{s:06d}.tar", rows)
    write_index(pool, [{"name": f"u-{s:06d}.tar", "count": 8} for s in range(2)], "unlabeled")
    # shard 0 lost keys 0000 (near copy) and 0001 (same bytes) to the test set; shard 1 nothing
    rows = [("u-000000.tar", k, reason, 0.95, 1.0, "test", "t1") for k, reason in [("0000", "near"), ("0001", "bytes")]]
    curation.write_removed_list(curate, rows)
    shards = shard_paths(pool)
    leave_out = curation.test_copies(curate, shards)
    assert [len(leave_out[p]) for p in shards] == [2, 0]
    stream = loading.resampled_samples(shards, index_counts(shards), random.Random(0), leave_out)
    drawn = {(json.loads(s["json"])["shard"], s["__key__"]) for s in itertools.islice(stream, 300) if "json" in s}
    assert drawn == {(s, k) for s in range(2) for k in keys} - {(0, "0000"), (0, "0001")}
    with pytest.raises(curation.CurationMissing, match="run the curate stage"):
        curation.test_copies(tmp_path / "nowhere", shards)
