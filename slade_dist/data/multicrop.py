"""The SwAV multi-crop image stream: what the pretrain stage (train/pretrain.py) trains on.

Owns `swav_batches` (an infinite stream of {"view1", "view2", "skipped"} + "local" (V, B, 3, s, s)
when pretrain.local_crops, over every shard of the given dirs, labels ignored, resampled per
rank), the view transforms (`two_view_transform`, `local_view_transform`, `local_crop_size`: the
vocabulary and code of data.augment, transforms.py) and the pieces behind it (`_ResampledTars`,
`_MultiCropStream`, `_multicrop_batches`).
Memory per loader worker is bounded by the config, whatever the images: the shuffle buffer holds
ENCODED image bytes (at most data.shuffle_buffer of them and at most data.buffer_mb MiB), an image
is decoded only when it leaves the buffer (one at a time, under the decoder contract of
transforms.py: data.max_image_pixels / data.max_aspect_ratio checked from the header first), and a
batch holds the crops only. Images outside the contract, samples without an image and what a
truncated tar loses are skipped and counted ("skipped").
Tests: tests/unit/test_multicrop.py, tests/unit/test_pretrain.py.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..config import AugmentConfig, DataConfig, PretrainConfig, swav_augment
from .loading import buffer_bytes
from .shards import index_counts, shard_paths
from .tars import TarSamples, image_bytes
from .transforms import CorruptImage, ImageLimits, decode, full_transform, train_geometry

__all__ = ["swav_batches", "two_view_transform", "local_view_transform", "local_crop_size"]

LOST = "__lost__"  # a marker _ResampledTars yields after a truncated tar: how many samples it lost


def two_view_transform(data_cfg: DataConfig, augment: AugmentConfig) -> Any:
    """One global SwAV view: pretrain.augment (by default random resized crop, flip, colour jitter,
    grayscale: SwAV's), normalised; the vocabulary and code of data.augment (data/transforms.py)."""
    return full_transform(train_geometry(data_cfg.image_size, data_cfg.crop_scale_min, augment))


def local_crop_size(pc: PretrainConfig, data_cfg: DataConfig) -> int:
    """pretrain.local_crop_size, or SwAV's 96 / 224 of the global crop, at least 16 px (tiny_cnn's
    16x downsampling needs 16) and at most the global crop."""
    return pc.local_crop_size or min(data_cfg.image_size, max(16, round(data_cfg.image_size * 96 / 224)))


def local_view_transform(pc: PretrainConfig, data_cfg: DataConfig, augment: AugmentConfig) -> Any:
    """One local SwAV view: the global view's augmentation on a small crop of a small area."""
    small = dataclasses.replace(augment, crop_scale_min=pc.local_crop_scale_min, crop_scale_max=pc.local_crop_scale_max)
    return full_transform(train_geometry(local_crop_size(pc, data_cfg), pc.local_crop_scale_min, small))


def _multicrop_batches(
    samples: Iterable[dict[str, Any]],
    *,
    data_cfg: DataConfig,
    augment: AugmentConfig,
    batch_size: int,
    seed: int,
    local: tuple[int, Any] = (0, None),
) -> Iterator[dict[str, Any]]:
    """Shuffle encoded images (a buffer of bytes, capped by count and by data.buffer_mb), decode
    each as it leaves the buffer, make two global views (+ `local` = (V, transform) local ones),
    batch. Images outside the decoder contract and truncation losses are counted, not fatal."""
    rng = random.Random(seed)
    torch.manual_seed(seed)  # this process' augmentation randomness (worker-local under a loader)
    tf = two_view_transform(data_cfg, augment)
    limits = ImageLimits.of(data_cfg)
    n_local, local_tf = local
    buf: list[bytes] = []
    held, cap, max_bytes = 0, max(data_cfg.shuffle_buffer, 1), buffer_bytes(data_cfg)
    crops: list[list[torch.Tensor]] = []
    skipped = 0
    for sample in samples:
        if LOST in sample:
            skipped += sample[LOST]
            continue
        try:
            data = image_bytes(sample)
        except CorruptImage:  # no image member
            skipped += 1
            continue
        buf.append(data)
        held += len(data)
        if len(buf) < cap and held <= max_bytes:
            continue
        data = buf.pop(rng.randrange(len(buf)))
        held -= len(data)
        try:
            img = decode(data, limits)
        except CorruptImage:  # corrupt, too large, unsupported format: skip and count
            skipped += 1
            continue
        crops.append([tf(img), tf(img), *(local_tf(img) for _ in range(n_local))])
        del img  # the full-size decode is not kept past its crops
        if len(crops) == batch_size:
            views = [torch.stack(v) for v in zip(*crops, strict=True)]
            batch = {"view1": views[0], "view2": views[1], "skipped": skipped}
            if n_local:
                batch["local"] = torch.stack(views[2:])  # (V, B, 3, s, s)
            yield batch
            crops, skipped = [], 0


class _ResampledTars(torch.utils.data.IterableDataset):
    """Samples of shards drawn at random (with replacement) forever, read with data.tars; after a
    truncated tar, a {LOST: n} marker with the samples it lost (its index count minus those read,
    at least 1) and those the tar reader left out for a repeated key.

    Paths are opened as local files by our own tar reader, never handed to webdataset's URL
    opener: a directory named like `pipe:cmd` is a directory, not a shell command.
    """

    def __init__(self, paths: list[Path], seed: int) -> None:
        self.paths, self.seed = paths, seed
        self.expected = index_counts(paths)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        rng = random.Random(f"{self.seed}/{info.id if info else 0}")
        while True:
            i = rng.randrange(len(self.paths))
            tar, seen = TarSamples(self.paths[i]), 0
            for sample in tar:
                seen += 1
                yield sample
            lost = max((self.expected[i] or 0) - seen, 1) if tar.truncated else 0
            if lost + tar.duplicates:
                yield {LOST: lost + tar.duplicates}


class _MultiCropStream(torch.utils.data.IterableDataset):
    def __init__(
        self,
        paths: list[Path],
        data_cfg: DataConfig,
        augment: AugmentConfig,
        batch_size: int,
        seed: int,
        pretrain_cfg: PretrainConfig | None = None,
    ) -> None:
        self.tars, self.data_cfg, self.batch_size, self.seed = _ResampledTars(paths, seed), data_cfg, batch_size, seed
        self.augment, self.pretrain_cfg = augment, pretrain_cfg

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        seed = self.seed * 31 + (info.id if info else 0)
        pc = self.pretrain_cfg
        local = (
            (pc.local_crops, local_view_transform(pc, self.data_cfg, self.augment))
            if pc and pc.local_crops
            else (0, None)
        )
        return _multicrop_batches(
            iter(self.tars),
            data_cfg=self.data_cfg,
            augment=self.augment,
            batch_size=self.batch_size,
            seed=seed,
            local=local,
        )


def swav_batches(
    shard_dirs: list[str],
    data_cfg: DataConfig,
    batch_size: int,
    *,
    seed: int,
    rank: int,
    world: int,
    augment: AugmentConfig | None = None,
    pretrain_cfg: PretrainConfig | None = None,
) -> Iterator[dict[str, Any]]:
    """Infinite stream of {"view1", "view2", "skipped"} (+ "local" (V, B, 3, s, s) when
    pretrain_cfg.local_crops) over the shards of every dir (labels ignored)."""
    paths = [p for d in shard_dirs if d for p in shard_paths(d)]
    if not paths:
        raise FileNotFoundError(f"no shards for SwAV pretraining in {shard_dirs}")
    # resampled per rank: no per-rank split, so no uneven shard counts (a split with fewer shards than
    # ranks x workers raises or leaves ranks uneven, and an uneven rank hangs a collective)
    augment = swav_augment() if augment is None else augment
    stream = _MultiCropStream(paths, data_cfg, augment, batch_size, seed * 1009 + rank, pretrain_cfg)
    if data_cfg.num_workers > 0:
        loader = torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            num_workers=data_cfg.num_workers,
            persistent_workers=True,
            prefetch_factor=2,
            pin_memory=torch.cuda.is_available(),
        )
        return iter(loader)
    return iter(stream)
