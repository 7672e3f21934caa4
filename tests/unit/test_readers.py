"""Streaming readers + transforms (slade_dist/data/readers.py, transforms.py), single process:
labeled P x K stream shapes/labels/seeding, finite pass coverage and order, corrupt samples and a
truncated tar skipped and counted, pseudo-labeled stream filters, transform equivalences."""

from __future__ import annotations

import dataclasses
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slade_dist.config import DataConfig
from slade_dist.data import readers, transforms, writers
from slade_dist.data.pseudo_labels import PseudoLabelMismatch, pseudo_label_path, write_pseudo_labels
from slade_dist.data.shards import shard_paths, write_index, write_shard


def jpeg(seed: int, size: int = 24) -> bytes:
    a = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def cfg(**kw) -> DataConfig:
    base = dict(image_size=16, resize_size=20, num_workers=0, shuffle_buffer=8, max_buffered=200)
    return dataclasses.replace(DataConfig(), **{**base, **kw})


@pytest.fixture(scope="module")
def labeled(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lab")
    for c in range(6):
        for j in range(6):
            p = root / "src" / f"class{c}" / f"{j}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(jpeg(c * 100 + j))
    writers.convert("imagefolder", root / "src", root / "shards", shard_size=10, progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> Path:
    """3 shards: intact (5), one corrupt image among 5, and a truncated copy of an intact shard."""
    d = tmp_path_factory.mktemp("dmg")

    def rows(s, bad=None):
        return [
            {
                "__key__": f"{s}{j:03d}",
                "jpg": (jpeg(j)[:50] if j == bad else jpeg(j)),
                "cls": j % 2,
                "json": json.dumps({"j": j}).encode(),
            }
            for j in range(5)
        ]

    write_shard(d / "x-000000.tar", rows("a"), mtime=0)
    write_shard(d / "x-000001.tar", rows("b", bad=2), mtime=0)
    write_shard(d / "full.tar", rows("c"), mtime=0)
    raw = (d / "full.tar").read_bytes()
    (d / "x-000002.tar").write_bytes(raw[: int(len(raw) * 0.6)])
    (d / "full.tar").unlink()
    write_index(d, [{"name": f"x-00000{i}.tar", "count": 5} for i in range(3)], "labeled")
    return d


def test_labeled_stream_shapes_labels_and_seeding(labeled):
    P, K = 3, 2
    stream = readers.labeled_batches(labeled, cfg(), P, K, seed=0, rank=0, world=1)
    batches = [next(stream) for _ in range(6)]
    for b in batches:
        assert b["images"].shape == (P * K, 3, 16, 16) and b["images"].dtype == torch.float32
        assert b["labels"].dtype == torch.long and sorted(Counter(b["labels"].tolist()).values()) == [K] * P
        assert b["skipped"] == 0
    again = readers.labeled_batches(labeled, cfg(), P, K, seed=0, rank=0, world=1)
    other = readers.labeled_batches(labeled, cfg(), P, K, seed=0, rank=1, world=2)
    b2 = [next(again) for _ in range(6)]
    assert all(
        torch.equal(x["images"], y["images"]) and torch.equal(x["labels"], y["labels"]) for x, y in zip(batches, b2)
    )
    assert not all(torch.equal(x["images"], next(other)["images"]) for x in batches)
    ev = next(readers.labeled_batches(labeled, cfg(num_workers=2), P, K, seed=1, train=False, image_size=8))
    assert ev["images"].shape == (P * K, 3, 8, 8)
    with pytest.raises(ValueError, match="max_buffered"):
        readers.labeled_batches(labeled, cfg(max_buffered=5), P, K, seed=0)


def test_labeled_stream_refuses_unlabeled_dir(tmp_path):
    write_shard(tmp_path / "u-000000.tar", [{"__key__": "a", "jpg": jpeg(0)}])
    write_index(tmp_path, [{"name": "u-000000.tar", "count": 1}], "unlabeled")
    with pytest.raises(ValueError, match="pseudo_labeled_batches"):
        readers.labeled_batches(tmp_path, cfg(), 2, 2, seed=0)


def test_finite_pass_covers_in_shard_order(labeled):
    seen = []
    stream = readers.finite_batches(labeled, cfg(num_workers=2), 7, rank=0, world=1)
    for b in stream:
        assert b["images"].shape[1:] == (3, 16, 16) and len(b["keys"]) == len(b["shards"]) == len(b["meta"])
        assert (b["labels"] >= 0).all()
        seen.extend(zip(b["shards"], b["keys"], b["labels"].tolist(), [m["class_name"] for m in b["meta"]]))
    assert len(seen) == 36 and len({k for _, k, _, _ in seen}) == 36 and stream.skipped == 0
    names = json.loads((labeled / "classes.json").read_text())
    assert all(names[str(c)] == cn for _, _, c, cn in seen)
    for p in shard_paths(labeled):  # within a shard, shard order
        expected = [k for k, *_ in readers.iter_shard(p)]
        assert [k for s, k, _, _ in seen if s == p.name] == expected


def test_corrupt_sample_and_truncated_tar_skipped_and_counted(damaged):
    it = readers.iter_shard(damaged / "x-000001.tar")
    assert [k for k, *_ in it] == ["b000", "b001", "b003", "b004"] and it.skipped == 1
    it = readers.iter_shard(damaged / "x-000002.tar", transforms.eval_geometry(8, 8))
    rows = list(it)
    assert 0 < len(rows) < 5 and it.skipped == 1 and it.tar.truncated and rows[0][1].shape == (3, 8, 8)
    stream = readers.finite_batches(damaged, cfg(num_workers=2), 4)
    keys = [k for b in stream for k in b["keys"]]
    assert len(keys) == 5 + 4 + len(rows) and stream.skipped == 2
    # the infinite stream never crashes on them and reports what it skipped
    lab = readers.labeled_batches(damaged, cfg(max_buffered=8, shuffle_buffer=0), 2, 2, seed=0)
    got = [next(lab) for _ in range(30)]
    assert got[-1]["skipped"] >= 2 and all(g["images"].shape[0] == 4 for g in got)


def test_pseudo_labeled_stream_filters(tmp_path, labeled):
    """Unlabeled = the labeled shards; pseudo label = true class, cluster 5 too small, far points out."""
    pdir = tmp_path / "pl"
    far, kept5, seen = set(), False, Counter()
    for p in shard_paths(labeled):
        rows = []
        for k, _, c, _ in readers.iter_shard(p):
            if c == 5 and kept5:
                c = 100 + len(far) + sum(seen.values())  # a singleton cluster: below pseudo_min_cluster_size
            kept5 |= c == 5  # cluster 5 keeps a single member overall
            seen[c] += 1
            d = 10.0 if seen[c] % 3 == 0 else 0.1  # a third of each cluster is far from its centroid
            if d > 1:
                far.add(k)
            rows.append((k, c, d))
        keys, cls, dist = zip(*rows)
        write_pseudo_labels(pseudo_label_path(pdir, p), keys, cls, dist)
    c = cfg(pseudo_min_cluster_size=2, pseudo_max_dist_percentile=50.0)
    stream = readers.pseudo_labeled_batches(labeled, pdir, c, 2, 2, seed=0, rank=0, world=1)
    labels = Counter()
    for _ in range(20):
        b = next(stream)
        labels.update(b["labels"].tolist())
        assert not far & set(b["keys"])  # beyond the cluster's 50th distance percentile
        assert sorted(Counter(b["labels"].tolist()).values()) == [2, 2]
    assert 5 not in labels and set(labels) <= {0, 1, 2, 3, 4}
    with pytest.raises(FileNotFoundError, match="cluster stage"):
        readers.pseudo_labeled_batches(labeled, tmp_path / "none", c, 2, 2, seed=0)


def test_a_label_file_missing_readable_keys_is_refused(tmp_path, labeled):
    pdir = tmp_path / "pl"
    for p in shard_paths(labeled):
        rows = [(k, c, 0.1) for k, _, c, _ in readers.iter_shard(p)]
        rows = rows[:-3] if p == shard_paths(labeled)[0] else rows  # the first file lost its last 3 rows
        write_pseudo_labels(pseudo_label_path(pdir, p), *zip(*rows))
    stream = readers.pseudo_labeled_batches(labeled, pdir, cfg(num_workers=0), 2, 2, seed=0, rank=0, world=1)
    with pytest.raises(
        PseudoLabelMismatch,
        match=r"pl-000000.npz does not cover image shard .*train-000000.tar: "
        r"sample '\d+' decodes but has no label row",
    ):
        for _ in range(200):
            next(stream)


def test_every_image_corrupt_fails_fast(tmp_path):
    out = tmp_path / "bad"
    write_shard(
        out / "train-000000.tar",
        ({"__key__": f"{i:04d}", "jpg": b"not a jpeg", "cls": str(i % 4).encode()} for i in range(400)),
    )
    write_index(out, [{"name": "train-000000.tar", "count": 400}], "labeled")
    stream = readers.labeled_batches(out, cfg(num_workers=0), 2, 2, seed=0, rank=0, world=1)
    with pytest.raises(RuntimeError, match=r"none of the first \d+ images .* could be decoded"):
        next(stream)


def test_finite_pass_counts_corrupt_and_truncation_losses(damaged):
    stream = readers.finite_batches(damaged, cfg(num_workers=0), 4, rank=0, world=1)
    n = sum(len(b["keys"]) for b in stream)
    # 15 listed samples: 1 corrupt image, and the truncated copy lost all it could not read
    assert stream.counts["corrupt"] == 1 and stream.counts["lost"] >= 1
    assert n + stream.counts["corrupt"] + stream.counts["lost"] == 15


def test_a_listed_shard_missing_on_disk_is_an_error(tmp_path, labeled):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(labeled, copy)
    first = shard_paths(copy)[0]
    first.unlink()
    with pytest.raises(
        FileNotFoundError,
        match=rf"1 of \d+ shards listed in .*index.json are missing on disk "
        rf"\(first: {first.name}\)",
    ):
        readers.finite_batches(copy, cfg(num_workers=0), 4, rank=0, world=1)


def test_transforms_batched_normalize_equals_per_sample():
    x = torch.randint(0, 256, (4, 3, 10, 12), dtype=torch.uint8)
    ref = torch.stack([transforms.normalization()(xi) for xi in x])
    assert torch.allclose(transforms.normalize_batch(x), ref, atol=1e-5)
    img = transforms.decode(jpeg(0, size=30))
    assert img.dtype == torch.uint8 and img.shape == (3, 30, 30)
    assert transforms.eval_geometry(16, 20)(img).shape == (3, 16, 16)
    assert transforms.train_geometry(16, 0.2)(img).shape == (3, 16, 16)
    assert transforms.eval_resize_for(112, 224, 256) == 128
    for bad in (b"", jpeg(0)[:60], b"\xff\xd8garbage"):
        with pytest.raises(transforms.CorruptImage):
            transforms.decode(bad)
