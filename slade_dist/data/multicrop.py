"""The SwAV multi-crop stream the pretrain stage trains on (`swav_batches`) and its view transforms
(`two_view_transform`, `local_view_transform`, `local_crop_size`: data.augment's vocabulary, transforms.py).
Its buffer holds encoded images (slade_dist/data/README.md "Memory per loader worker").
Tests: tests/unit/test_multicrop.py, tests/unit/test_pretrain.py.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import AugmentConfig, DataConfig, PretrainConfig, swav_augment
from .loading import LOST, _loader, _worker, buffer_bytes, resampled_samples
from .shards import index_counts, shard_paths
from .tars import image_bytes
from .transforms import CorruptImage, ImageLimits, decode, full_transform, train_geometry

__all__ = ["swav_batches", "two_view_transform", "local_view_transform", "local_crop_size"]


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
    batch. Images outside the decoder contract and truncation losses are counted ("skipped")."""
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


class _MultiCropStream(torch.utils.data.IterableDataset):
    def __init__(
        self,
        paths: list[Path],
        data_cfg: DataConfig,
        augment: AugmentConfig,
        batch_size: int,
        seed: int,
        pretrain_cfg: PretrainConfig | None = None,
        leave_out: Mapping[Path, frozenset[int]] | None = None,
    ) -> None:
        self.paths, self.data_cfg, self.batch_size, self.seed = paths, data_cfg, batch_size, seed
        self.augment, self.pretrain_cfg, self.leave_out = augment, pretrain_cfg, leave_out
        self.expected = index_counts(paths)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wid = _worker()[0]
        pc = self.pretrain_cfg
        local = (
            (pc.local_crops, local_view_transform(pc, self.data_cfg, self.augment))
            if pc and pc.local_crops
            else (0, None)
        )
        return _multicrop_batches(
            resampled_samples(self.paths, self.expected, random.Random(f"{self.seed}/{wid}"), self.leave_out),
            data_cfg=self.data_cfg,
            augment=self.augment,
            batch_size=self.batch_size,
            seed=self.seed * 31 + wid,
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
    leave_out: Mapping[Path, frozenset[int]] | None = None,
) -> Iterator[dict[str, Any]]:
    """Infinite stream of {"view1", "view2", "skipped"} (+ "local" (V, B, 3, s, s) when
    pretrain_cfg.local_crops) over the shards of every dir (labels ignored), less the `leave_out`
    keys of each shard (loading.resampled_samples)."""
    paths = [p for d in shard_dirs if d for p in shard_paths(d)]
    if not paths:
        raise FileNotFoundError(f"no shards for SwAV pretraining in {shard_dirs}")
    augment = swav_augment() if augment is None else augment
    stream = _MultiCropStream(paths, data_cfg, augment, batch_size, seed * 1009 + rank, pretrain_cfg, leave_out)
    return iter(_loader(stream, data_cfg.num_workers))
