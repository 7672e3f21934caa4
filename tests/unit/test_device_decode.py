"""Decode on the device (slade_dist/data/device_decode.py, data.decode: device), on CPU: the rank's
batched decode_jpeg gives exactly the worker path's tensors (tolerance 0: the same libjpeg-turbo and
the same transforms), non-JPEG images stay on the workers, a JPEG whose damage only the decoder sees
is counted as corrupt on the rank (rows dropped in a finite pass, refilled from the label group in
P x K batches), with real loader workers too."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from slade_dist.config import DataConfig
from slade_dist.data import device_decode as D
from slade_dist.data import readers, transforms
from slade_dist.data.shards import write_index, write_shard
from tests import _hazards as H

TOLERANCE = 0.0  # on CPU; a GPU's nvJPEG differs by a few grey levels (bench/gpu_check.py)


def cfg(**kw) -> DataConfig:
    base = dict(image_size=16, resize_size=20, num_workers=0, shuffle_buffer=4, max_buffered=200)
    return dataclasses.replace(DataConfig(), **{**base, **kw})


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """2 shards, 3 classes: photos (some EXIF-rotated), PNG / 16-bit / RGBA images (worker path),
    one JPEG cut short (its header is fine: only the decoder sees the damage) and one bomb."""
    d = tmp_path_factory.mktemp("dev")
    rows = []
    for c in range(3):
        for j in range(6):
            data = H.exif_rotated_jpeg(j % 8 + 1) if j == 5 else H.photo_jpeg(10 * c + j, c, size=(40 + 4 * j, 30))
            rows.append({"__key__": f"k{c}{j}", "jpg": data, "cls": str(c)})
    rows += [
        {"__key__": "png16", "png": H.rgb16_png(), "cls": "0"},
        {"__key__": "rgba", "png": H.rgba_png(), "cls": "1"},
        {"__key__": "cut", "jpg": H.truncated_jpeg(), "cls": "2"},
        {"__key__": "bomb", "png": H.bilevel_bomb(200_000, 1), "cls": "2"},
    ]
    counts = [write_shard(d / f"x-{s:06d}.tar", rows[s::2]) for s in range(2)]
    write_index(d, [{"name": f"x-{s:06d}.tar", "count": n} for s, n in enumerate(counts)], "labeled")
    return d


@pytest.mark.parametrize("workers", [0, 2])
def test_finite_pass_on_the_device_equals_the_worker_path(shards, workers):
    ours = readers.finite_batches(shards, cfg(decode="device", num_workers=workers), 7, rank=0, world=1)
    base = readers.finite_batches(shards, cfg(num_workers=workers), 7, rank=0, world=1)
    got = {k: img for b in ours for k, img in zip(b["keys"], b["images"])}
    want = {k: img for b in base for k, img in zip(b["keys"], b["images"])}
    assert set(got) == set(want) and len(got) == 18 + 2  # the cut JPEG and the bomb left out
    assert max(float((got[k] - want[k]).abs().max()) for k in got) <= TOLERANCE
    assert ours.counts == base.counts == {"corrupt": 2, "lost": 0}
    assert ours.finish.corrupt == 1  # the cut JPEG failed on the rank; the bomb at the worker's header check


def test_pk_batches_on_the_device_refill_from_the_label_group(shards):
    stream = readers.labeled_batches(shards, cfg(decode="device"), 3, 2, seed=0, rank=0, world=1)
    batches = [next(stream) for _ in range(10)]
    for b in batches:
        assert b["images"].shape == (6, 3, 16, 16) and b["images"].dtype == torch.float32
        assert b["labels"].view(3, 2).unique(dim=1).shape[1] == 1  # K consecutive rows per label
    assert stream.counts["corrupt"] >= 1 and batches[-1]["skipped"] >= stream.finish.corrupt >= 0


def test_prepare_hands_over_plain_jpegs_only():
    limits = transforms.DEFAULT_LIMITS
    geometry = transforms.eval_geometry(16, 20)
    jpeg = D.prepare(H.exif_rotated_jpeg(6), limits, geometry, on_device=True)
    assert isinstance(jpeg, D.EncodedJpeg) and jpeg.orientation == 6
    png = D.prepare(H.rgba_png(), limits, geometry, on_device=True)
    assert isinstance(png, torch.Tensor) and png.shape == (3, 16, 16)  # decoded on the worker
    with pytest.raises(transforms.CorruptImage, match="aspect ratio"):
        D.prepare(H.bilevel_bomb(1_000_000, 1), limits, geometry, on_device=True)
    (img,) = D.decode_jpegs([jpeg], torch.device("cpu"))
    assert torch.equal(img, transforms.decode(H.exif_rotated_jpeg(6)))
    assert D.decode_jpegs(
        [D.EncodedJpeg(torch.frombuffer(bytearray(H.truncated_jpeg()), dtype=torch.uint8), 1)], "cpu"
    ) == [None]
