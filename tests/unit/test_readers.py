"""Streaming readers + transforms (slade_dist/data/readers.py, transforms.py), single process:
labeled P x K stream shapes/labels/seeding, finite pass coverage and order, corrupt samples and a
truncated tar skipped and counted, pseudo-labeled stream (from the cluster index: filters, K distinct
images per pseudo label, start-up without label files), transform equivalences."""

from __future__ import annotations

import dataclasses
import io
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from slade_dist.config import AugmentConfig, DataConfig
from slade_dist.data import readers, transforms, writers
from slade_dist.data.batcher import PKBatcher
from slade_dist.data.pseudo_index import build_index
from slade_dist.data.pseudo_labels import PseudoLabelMismatch, pseudo_label_path, write_pseudo_labels
from slade_dist.data.shards import shard_paths, write_index, write_shard
from slade_dist.errors import UnusableInput
from tests import _hazards as H

REPO = Path(__file__).resolve().parents[2]


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
    with pytest.raises(UnusableInput, match="pseudo_labeled_batches"):
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


def _plant_pseudo_labels(pdir, labeled):
    """Unlabeled = the labeled shards; pseudo label = true class, cluster 5 holding a single member
    (the rest of class 5 made singletons), a third of each cluster far from its centroid."""
    far, kept5, seen = set(), False, Counter()
    for p in shard_paths(labeled):
        rows = []
        for k, _, c, _ in readers.iter_shard(p):
            if c == 5 and kept5:
                c = 100 + len(far) + sum(seen.values())  # a singleton cluster: below pseudo_min_cluster_size
            kept5 |= c == 5
            seen[c] += 1
            d = 10.0 if seen[c] % 3 == 0 else 0.1
            if d > 1:
                far.add(k)
            rows.append((k, c, d))
        write_pseudo_labels(pseudo_label_path(pdir, p), *zip(*rows))
    return far


def test_pseudo_stream_filters_and_k_distinct_images(tmp_path, labeled):
    pdir = tmp_path / "pl"
    far = _plant_pseudo_labels(pdir, labeled)
    c = cfg(pseudo_min_cluster_size=2, pseudo_max_dist_percentile=50.0)
    with pytest.raises(FileNotFoundError, match="run the cluster stage"):  # label files alone are not enough
        readers.pseudo_labeled_batches(labeled, pdir, c, 2, 2, seed=0)
    build_index(labeled, pdir, 50.0, 2)
    stream = readers.pseudo_labeled_batches(labeled, pdir, c, 2, 2, seed=0, rank=0, world=1)
    labels = Counter()
    for _ in range(20):
        b = next(stream)
        labels.update(b["labels"].tolist())
        assert not far & set(b["keys"])  # beyond the cluster's 50th distance percentile
        by_label = {}
        for key, lab in zip(b["keys"], b["labels"].tolist()):
            by_label.setdefault(lab, []).append(key)
        assert sorted(len(set(v)) for v in by_label.values()) == [2, 2]  # P=2 labels x K=2 distinct images
    assert 5 not in labels and set(labels) == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError, match="built with data.pseudo_max_dist_percentile=50.0"):
        readers.pseudo_labeled_batches(labeled, pdir, cfg(), 2, 2, seed=0)
    with pytest.raises(FileNotFoundError, match="run the cluster stage"):
        readers.pseudo_labeled_batches(labeled, tmp_path / "none", c, 2, 2, seed=0)


def test_pseudo_stream_start_up_reads_no_label_file(tmp_path, labeled):
    """The index is all the stream needs: the label files moved away, then replaced by garbage."""
    pdir = tmp_path / "pl"
    _plant_pseudo_labels(pdir, labeled)
    build_index(labeled, pdir, 100.0, 2)
    want = [next(readers.pseudo_labeled_batches(labeled, pdir, cfg(), 2, 3, seed=4, rank=0, world=1))["keys"]]
    (tmp_path / "away").mkdir()
    for p in pdir.glob("pl-*.npz"):
        p.rename(tmp_path / "away" / p.name)
    got = readers.pseudo_labeled_batches(labeled, pdir, cfg(), 2, 3, seed=4, rank=0, world=1)
    assert [next(got)["keys"]] == want
    for p in (tmp_path / "away").glob("pl-*.npz"):
        (pdir / p.name).write_bytes(b"garbage")
    again = readers.pseudo_labeled_batches(labeled, pdir, cfg(num_workers=1), 2, 3, seed=4, rank=0, world=1)
    b = next(again)
    assert b["keys"] == want[0] and b["images"].shape == (6, 3, 16, 16)


def _step_batches(labeled, pdir, P_step, world, accum, steps, workers=0):
    """Each step's global pseudo-labeled batch (keys, labels) as `world` ranks x `accum` micro-batches
    read it: rank-major, then micro-batch, as the trainers concatenate a step."""
    streams = [
        readers.pseudo_labeled_batches(
            labeled,
            pdir,
            cfg(num_workers=workers),
            P_step // (world * accum),
            2,
            seed=7,
            rank=r,
            world=world,
            accum=accum,
        )
        for r in range(world)
    ]
    out = []
    for _ in range(steps):
        keys, labels = [], []
        for s in streams:
            for _ in range(accum):
                b = next(s)
                keys += b["keys"]
                labels += b["labels"].tolist()
        out.append((keys, labels))
    return out


def test_pseudo_stream_step_is_the_same_global_batch_on_any_world_size(tmp_path, labeled):
    """1, 2 and 4 ranks, grad_accum 2 and two DataLoader workers read each optimizer step's same
    global batch: P distinct clusters over all ranks (no cluster on two ranks), same members."""
    pdir = tmp_path / "pl"
    _plant_pseudo_labels(pdir, labeled)
    build_index(labeled, pdir, 100.0, 2)
    one = _step_batches(labeled, pdir, 4, 1, 1, 6)
    for keys, labels in one:
        assert len(set(labels)) == 4 and len(set(keys)) == 8  # 4 distinct clusters x 2 distinct images
    assert len({tuple(sorted(set(lab))) for _, lab in one}) > 1  # the draw changes from step to step
    assert _step_batches(labeled, pdir, 4, 2, 1, 6) == one
    assert _step_batches(labeled, pdir, 4, 4, 1, 6) == one  # one cluster per rank, never the same one
    assert _step_batches(labeled, pdir, 4, 1, 2, 6) == one
    assert _step_batches(labeled, pdir, 4, 2, 1, 6, workers=2) == one
    with pytest.raises(ValueError, match="fewer than P=6"):  # 5 drawable clusters: the step's P is checked
        readers.pseudo_labeled_batches(labeled, pdir, cfg(), 3, 2, seed=7, rank=0, world=2)


def test_a_label_file_missing_readable_keys_is_refused(tmp_path, labeled):
    pdir = tmp_path / "pl"
    for p in shard_paths(labeled):
        rows = [(k, c, 0.1) for k, _, c, _ in readers.iter_shard(p)]
        rows = rows[:-3] if p == shard_paths(labeled)[0] else rows  # the first file lost its last 3 rows
        write_pseudo_labels(pseudo_label_path(pdir, p), *zip(*rows))
    with pytest.raises(
        PseudoLabelMismatch,
        match=r"pl-000000.npz does not cover image shard .*train-000000.tar: "
        r"sample '\d+' decodes but has no label row",
    ):
        build_index(labeled, pdir)


@pytest.mark.parametrize("workers", [0, 2])
def test_every_image_corrupt_fails_fast(tmp_path, workers):
    """Nothing decodable is the user's data: errors.UnusableInput with one line in the rank, also
    when a loader worker found it (torch re-raises a worker's error with its traceback as text)."""
    out = tmp_path / "bad"
    write_shard(
        out / "train-000000.tar",
        ({"__key__": f"{i:04d}", "jpg": b"not a jpeg", "cls": str(i % 4).encode()} for i in range(400)),
    )
    write_index(out, [{"name": "train-000000.tar", "count": 400}], "labeled")
    stream = readers.labeled_batches(out, cfg(num_workers=workers), 2, 2, seed=0, rank=0, world=1)
    with pytest.raises(UnusableInput, match=r"none of the first \d+ images .* could be decoded") as e:
        next(stream)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


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


# ---------------------------------------------------------------------------- data.augment
def _asymmetric(size: int = 16) -> torch.Tensor:
    """uint8 (3, size, size), no mirror symmetry: a left-right ramp, a top-bottom ramp, a coloured corner."""
    ramp = torch.arange(size, dtype=torch.float32) * (200 / size)
    img = torch.stack(
        [
            ramp.view(1, -1).expand(size, size),
            ramp.view(-1, 1).expand(size, size),
            40 + 0 * ramp.view(1, -1).expand(size, size),
        ]
    )
    img[2, :4, :4] = 250
    return img.round().to(torch.uint8)


def _whole_image(**kw) -> AugmentConfig:
    """Crops that always take the whole (square) image, so only the option under test acts."""
    return AugmentConfig(
        **{
            "flip": False,
            "crop_scale_min": 1.0,
            "crop_scale_max": 1.0,
            "crop_ratio_min": 1.0,
            "crop_ratio_max": 1.0,
            **kw,
        }
    )


def _draws(geometry, img: torch.Tensor, n: int = 40) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [geometry(img) for _ in range(n)]


def test_augment_flip_off_never_mirrors_and_on_does():
    img = _asymmetric()
    mirrored = img.flip(-1)
    off = _draws(readers._train_geometry(cfg(augment=_whole_image()), 16, train=True), img)
    assert all(torch.equal(o, img) for o in off)  # flip off: the image itself, never its mirror
    on = _draws(readers._train_geometry(cfg(augment=_whole_image(flip=True)), 16, train=True), img)
    n_mirror = sum(torch.equal(o, mirrored) for o in on)
    assert 5 < n_mirror < 35 and n_mirror + sum(torch.equal(o, img) for o in on) == len(on)


def test_augment_default_keeps_todays_crop_and_flip():
    steps = transforms.augment_steps(16, 0.3, AugmentConfig())
    assert [type(s) for s in steps] == [v2.RandomResizedCrop, v2.RandomHorizontalFlip]
    assert steps[0].scale == (0.3, 1.0)  # crop_scale_min null: data.crop_scale_min
    legacy = transforms.augment_steps(16, 0.3, None)
    assert [type(s) for s in legacy] == [type(s) for s in steps] and legacy[0].scale == steps[0].scale


@pytest.mark.parametrize(
    "option,check",
    [
        ({"rotation_degrees": 90.0}, lambda img, out: not torch.equal(out, img)),
        ({"grayscale_p": 1.0}, lambda img, out: torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])),
        (
            {"jitter_brightness": 0.5, "jitter_p": 1.0},
            lambda img, out: not torch.equal(out, img) and _order_kept(img, out),
        ),
        (
            {"blur_p": 1.0, "blur_sigma_min": 2.0, "blur_sigma_max": 2.0},
            lambda img, out: _roughness(out) < 0.8 * _roughness(img),
        ),
    ],
)
def test_augment_each_option_is_applied(option, check):
    img = _asymmetric()
    img[:, ::2, ::2] = 0  # some high-frequency content for the blur to remove
    outs = _draws(readers._train_geometry(cfg(augment=_whole_image(**option)), 16, train=True), img, n=10)
    assert sum(check(img, o) for o in outs) >= 8, option


def test_augment_crop_ranges_are_used():
    steps = transforms.augment_steps(16, 0.3, _whole_image(crop_scale_min=0.2, crop_scale_max=0.4, crop_ratio_min=0.5))
    assert steps[0].scale == (0.2, 0.4) and steps[0].ratio == (0.5, 1.0)
    img = _asymmetric(32)
    outs = _draws(transforms.train_geometry(16, 0.3, _whole_image(crop_scale_min=0.2, crop_scale_max=0.2)), img, n=5)
    assert all(o.shape == (3, 16, 16) and not torch.equal(o, transforms.eval_geometry(16, 16)(img)) for o in outs)


def _roughness(img: torch.Tensor) -> float:
    """Mean absolute difference between horizontal neighbours (high for sharp detail)."""
    x = img.float()
    return float((x[..., 1:] - x[..., :-1]).abs().mean())


def _order_kept(img: torch.Tensor, out: torch.Tensor) -> bool:
    """A brightness change scales every pixel by one factor: the order of pixel values is kept."""
    x, y = img.float().flatten(), out.float().flatten()
    order = torch.argsort(x, stable=True)
    return bool((y[order].diff() >= 0).all())


# ------------------------------------------------------------------------ a crawl's hazards
@pytest.fixture(scope="module")
def hazard_shards(tmp_path_factory) -> Path:
    """One labeled shard: 2 classes x 4 photos, plus every hazard of tests/_hazards.py (class 0)."""
    d = tmp_path_factory.mktemp("hz")
    rows = [
        {"__key__": f"p{c}{j}", "jpg": H.photo_jpeg(10 * c + j, c), "cls": str(c)} for c in (0, 1) for j in range(4)
    ]
    for i, (name, (make, _)) in enumerate(H.HAZARDS.items()):
        ext = "png" if name.endswith(".png") else "jpg"
        rows.append({"__key__": f"h{i:02d}", ext: make(), "cls": "0"})
    n = write_shard(d / "x-000000.tar", rows)
    write_index(d, [{"name": "x-000000.tar", "count": n}], "labeled")
    return d


def test_hazards_in_a_shard_are_decoded_by_the_contract_or_counted(hazard_shards):
    """Cases 1, 4, 5 in the finite pass (embed, eval): a 16-bit PNG batched with JPEGs used to kill the
    stage; an aspect-ratio bomb made eval's Resize allocate gigabytes; a pixel bomb was embedded."""
    stream = readers.finite_batches(hazard_shards, cfg(), 64, rank=0, world=1)
    batches = list(stream)
    keys = [k for b in batches for k in b["keys"]]
    accepted = sum(ok for _, ok in H.HAZARDS.values())
    assert len(keys) == 8 + accepted and stream.counts == {"corrupt": len(H.HAZARDS) - accepted, "lost": 0}
    assert all(b["images"].dtype == torch.float32 and b["images"].shape[1:] == (3, 16, 16) for b in batches)
    assert torch.isfinite(torch.cat([b["images"] for b in batches])).all()
    assert float(torch.cat([b["images"] for b in batches]).abs().max()) < 3.0  # no x257 pixels


def test_hazards_in_a_labeled_stream_are_skipped_and_counted(hazard_shards):
    stream = readers.labeled_batches(hazard_shards, cfg(shuffle_buffer=4), 2, 2, seed=0, rank=0, world=1)
    batches = [next(stream) for _ in range(12)]
    assert all(b["images"].shape == (4, 3, 16, 16) for b in batches)
    assert batches[-1]["skipped"] > 0


def test_buffers_are_capped_in_bytes(tmp_path):
    """Memory per worker is bounded by data.buffer_mb, not by the images: with a cap below two
    samples, the shuffle buffer lets every sample through at once and the P x K batcher never holds
    more than the cap (plus the sample that overflows it)."""
    big = [{"__key__": f"{i}", "jpg": bytes(300_000)} for i in range(20)]
    rng = random.Random(0)
    out = list(readers._shuffle(iter(big), 1000, rng, max_bytes=500_000, size_of=readers.sample_nbytes))
    assert len(out) == 20  # nothing waits for 1000 samples
    assert readers.buffer_bytes(DataConfig(buffer_mb=3)) == 3 << 20  # data.buffer_mb is in MiB
    b = PKBatcher(2, 2, 10_000, max_bytes=1 << 20, size_of=readers.sample_nbytes)
    for i, s in enumerate(big):
        b.add(s, i % 7)
    assert b.peak_bytes <= (1 << 20) + 300_000 and b.n_bytes <= 1 << 20


def test_a_labeled_worker_decodes_one_image_at_a_time():
    """A P x K batch was decoded whole before its crops were taken: 16 photos of 3000x2000 held
    16 x 18 MB at once. Now each image is cropped as it is decoded (and the buffers hold bytes)."""
    setup = """
        import dataclasses
        from tests._hazards import big_photo_jpeg
        from slade_dist.config import DataConfig
        from slade_dist.data.readers import labeled_batches
        from slade_dist.data.shards import write_index, write_shard
        import tempfile
        d = Path(tempfile.mkdtemp())
        data = big_photo_jpeg()
        rows = [{"__key__": f"{i:03d}", "jpg": data, "cls": str(i % 4)} for i in range(24)]
        n = write_shard(d / "x-000000.tar", rows)
        write_index(d, [{"name": "x-000000.tar", "count": n}], "labeled")
        cfg = dataclasses.replace(DataConfig(), image_size=32, num_workers=0, shuffle_buffer=4, max_buffered=64)
        stream = labeled_batches(d, cfg, 4, 4, seed=0, rank=0, world=1)
    """
    growth = H.rss_growth_mb(REPO, setup, "for _ in range(3): next(stream)")
    assert growth < 150, growth  # one decode at a time (18 MB), not 16 (288 MB)
