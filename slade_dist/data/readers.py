"""The streams the trainers, embed and eval iterate: `labeled_batches` (INFINITE resampled P x K
batches), `pseudo_labeled_batches` (INFINITE P x K batches drawn from the cluster index,
pseudo_index.py) and `finite_batches` (ONE pass, each rank its own shards), decoded and augmented
in DataLoader workers (data.decode: device, on the rank: device_decode.py). What they share is
loading.py's, importable from here. Behaviour: slade_dist/data/README.md "Reading".
Tests: tests/unit/test_readers.py, tests/integration/test_readers_multirank.py.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from .. import dist
from ..errors import UnusableInput
from .batcher import PKBatcher
from .device_decode import DeviceDecoder, prepare
from .loading import (
    LOST,
    BatchStream,
    Decoding,
    _loader,
    _seed_for,
    _shuffle,
    _worker,
    batch_images,
    buffer_bytes,
    iter_shard,
    lost_to_truncation,
    resampled_samples,
    resolve_shards,
    sample_nbytes,
)
from .pair_truth import UNKNOWN, true_label_id
from .pseudo_index import ClusterIndex, TarReader
from .shards import index_counts, read_index
from .tars import image_bytes, sample_cls, sample_meta
from .transforms import (
    CorruptImage,
    eval_geometry,
    eval_max_size,
    eval_resize_for,
    train_geometry,
)

# a training stream that has decoded nothing after this many images stops with a clear error
# instead of waiting forever for a batch (every labeled image corrupt)
ALL_CORRUPT_AFTER = 256

__all__ = [  # loading.py's stream parts stay importable from here
    "labeled_batches",
    "pseudo_labeled_batches",
    "finite_batches",
    "iter_shard",
    "BatchStream",
    "resolve_shards",
    "buffer_bytes",
    "sample_nbytes",
    "lost_to_truncation",
]


# ------------------------------------------------------------------------------ training streams
class _ResampledPK(IterableDataset):
    """Infinite P x K batches from randomly drawn shards, labels from `cls`."""

    def __init__(
        self,
        shards: list[Path],
        P: int,
        K: int,
        geometry: Callable,
        max_buffered: int,
        shuffle_buffer: int,
        seed: int,
        rank: int,
        expected: Sequence[int | None],
        decoding: Decoding,
    ) -> None:
        if not shards:
            raise ValueError("no shards to read")
        self.shards, self.P, self.K, self.geometry = shards, P, K, geometry
        self.expected = list(expected)
        self.max_buffered, self.shuffle_buffer, self.seed, self.rank = max_buffered, shuffle_buffer, seed, rank
        self.max_without_batch = max(50 * max_buffered, 100_000)
        self.decoding = decoding
        self.skipped = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wid, _ = _worker()
        try:
            yield from self._batches(wid)
        except UnusableInput as e:  # sent as a message: torch would re-raise it with the worker's traceback
            yield {"worker": wid, "skipped": self.skipped, "unusable": str(e)}  # in its text; the rank raises it

    def _start(self, wid: int) -> random.Random:
        """Counts reset, this worker's augmentation seeded; its rng (batcher, shuffle, refills)."""
        torch.manual_seed(_seed_for("aug", self.seed, self.rank, wid))
        self.skipped, self._decoded, self._undecodable = 0, 0, 0
        return random.Random(_seed_for(self.seed, self.rank, wid))

    def _batches(self, wid: int) -> Iterator[dict[str, Any]]:
        rng = self._start(wid)
        cap = self.decoding.buffer_bytes
        batcher = PKBatcher(
            self.P, self.K, self.max_buffered, seed=rng.randrange(1 << 31), max_bytes=cap, size_of=sample_nbytes
        )
        self._since_batch = 0
        samples = _shuffle(self._class_samples(rng), self.shuffle_buffer, rng, cap, _pair_nbytes)
        for batch in batcher(samples):
            self._since_batch = 0
            out = self._decode_batch(batch, rng)
            if out is not None:
                out["worker"] = wid
                yield out

    def _count_progress(self) -> None:
        self._since_batch += 1
        if self._since_batch > self.max_without_batch:
            raise UnusableInput(
                f"read {self._since_batch} samples without completing one P x K batch (P={self.P}, K={self.K}) "
                f"from {len(self.shards)} shards: fewer than P labels with >= 2 samples? Lower P"
            )

    def _class_samples(self, rng: random.Random) -> Iterator[tuple[dict[str, Any], int]]:
        for s in resampled_samples(self.shards, self.expected, rng):
            self._count_progress()  # at each shard's end too: a stream of empty shards stops as well
            if LOST in s:
                self.skipped += s[LOST]
            elif (label := sample_cls(s)) < 0:
                self.skipped += 1  # no usable cls member: corrupt for a labeled stream
            else:
                yield s, label

    def _load(self, sample: dict[str, Any]) -> Any:
        """The image transformed (one full-size decode at a time: never a batch of them), or with
        data.decode: device what `prepare` hands the rank (a JPEG's bytes, or the transformed
        image); CorruptImage outside the contract."""
        d = self.decoding
        return prepare(image_bytes(sample), d.limits, self.geometry, d.on_device)

    def _decode_batch(self, batch: list[tuple[dict[str, Any], int]], rng: random.Random) -> dict[str, Any] | None:
        """Decode + augment a P x K batch, image by image; a corrupt entry is replaced by a fresh
        augmentation of a decodable sample of the same label, decoded again (all K corrupt: the
        batch is dropped)."""
        items: list[Any] = []
        for s, _ in batch:
            try:
                items.append(self._load(s))
                self._decoded += 1
            except CorruptImage:
                self.skipped += 1
                self._undecodable += 1
                items.append(None)
        if self._decoded == 0 and self._undecodable >= ALL_CORRUPT_AFTER:
            raise UnusableInput(
                f"none of the first {self._undecodable} images read from {len(self.shards)} shards "
                f"(e.g. {self.shards[0]}) could be decoded: the data is corrupt or not images; "
                f"check it with `python -m slade_dist.data index` / rewrite the shards"
            )
        self._corrupt = {i for i, item in enumerate(items) if item is None}  # _IndexedPK's true_labels
        for g in range(0, len(batch), self.K):
            good = [i for i in range(g, min(g + self.K, len(batch))) if items[i] is not None]
            if not good:
                return None
            for i in range(g, min(g + self.K, len(batch))):
                if items[i] is None:
                    items[i] = self._load(batch[rng.choice(good)][0])
        out: dict[str, Any] = {
            "labels": torch.tensor([label for _, label in batch], dtype=torch.long),
            "keys": [s["__key__"] for s, _ in batch],
            "skipped": self.skipped,
        }
        if self.decoding.on_device:  # the rank decodes the JPEGs (device_decode.DeviceDecoder)
            out["pending"] = items
        else:
            out["images"] = batch_images(items)
        return out


def _pair_nbytes(pair: tuple[dict[str, Any], int]) -> int:
    return sample_nbytes(pair[0])


def _stream(loader: DataLoader, data_cfg: Any, geometry: Callable, group: int | None) -> BatchStream:
    """The rank's side of a loader; with data.decode: device, the decoder of the pending JPEGs."""
    return BatchStream(loader, DeviceDecoder(geometry, group=group) if data_cfg.decode == "device" else None)


def _train_geometry(data_cfg: Any, image_size: int | None, train: bool) -> Callable:
    size = image_size or data_cfg.image_size
    if train:  # data.augment: flip, rotation, colour, blur and crop ranges from the config
        return train_geometry(size, data_cfg.crop_scale_min, data_cfg.augment)
    resize = eval_resize_for(size, data_cfg.image_size, data_cfg.resize_size)
    return eval_geometry(size, resize, eval_max_size(resize, data_cfg.max_aspect_ratio))


def labeled_batches(
    shard_dir: str | os.PathLike[str],
    data_cfg: Any,
    P: int,
    K: int,
    *,
    seed: int,
    rank: int | None = None,
    world: int | None = None,
    train: bool = True,
    image_size: int | None = None,
) -> BatchStream:
    """INFINITE P x K batches {"images" (P*K,3,H,W) float, "labels" (P*K,) long, "keys" list[str],
    "skipped" int}; entries are grouped by label (K consecutive rows per label).

    Every rank reads all shards, resampled with a (seed, rank, worker) seed: never runs dry.
    `world` is accepted for symmetry (resampling needs no split).
    """
    rank = dist.rank() if rank is None else rank
    if P < 1 or K < 1 or data_cfg.max_buffered < P * K:  # here, not in a worker: one line at start-up
        raise ValueError(
            f"P x K batches need P, K >= 1 and data.max_buffered >= P*K; got P={P} K={K} "
            f"max_buffered={data_cfg.max_buffered}"
        )
    if Path(shard_dir).is_dir() and read_index(shard_dir).get("kind") == "unlabeled":
        raise UnusableInput(
            f"{shard_dir} holds unlabeled shards (no cls): labeled_batches needs a labeled "
            f"shard dir; use pseudo_labeled_batches for unlabeled data"
        )
    shards = resolve_shards(shard_dir)
    geometry = _train_geometry(data_cfg, image_size, train)
    ds = _ResampledPK(
        shards,
        P,
        K,
        geometry,
        data_cfg.max_buffered,
        data_cfg.shuffle_buffer,
        seed,
        rank,
        expected=index_counts(shards),
        decoding=Decoding.of(data_cfg),
    )
    return _stream(_loader(ds, data_cfg.num_workers), data_cfg, geometry, K)


class _IndexedPK(_ResampledPK):
    """Infinite P x K batches from the cluster index: no buffer and no shuffle, so the K images of
    each pseudo label are distinct and every image read is used (decoding and the corrupt-image
    rules are the labeled stream's). Batch n of this rank is micro-batch n % accum of optimizer
    step n // accum (a DataLoader hands batches out round-robin over its workers, so worker w makes
    batches w, w + workers, ...); its clusters are this rank's part of the step's global draw
    (ClusterIndex.draw_step_part), the same on every world size."""

    def __init__(
        self,
        index: ClusterIndex,
        tars: list[Path],
        P: int,
        K: int,
        geometry: Callable,
        seed: int,
        rank: int,
        world: int,
        accum: int,
        decoding: Decoding,
    ):
        super().__init__(tars, P, K, geometry, P * K, 0, seed, rank, [None] * len(tars), decoding)
        self.index, self.world, self.accum = index, world, accum

    def _batches(self, wid: int) -> Iterator[dict[str, Any]]:
        workers = _worker()[1]
        rng = self._start(wid)
        parts = self.world * self.accum
        reader = TarReader(self.shards)
        try:
            for n in itertools.count(wid, workers):
                step, micro = divmod(n, self.accum)
                part = self.rank * self.accum + micro  # rank-major, then micro-batch (train/batch_split.py)
                out = None
                for retry in itertools.count():  # every cluster of a batch all corrupt: redraw the slot's batch
                    seed = self.seed if retry == 0 else _seed_for(self.seed, "retry", retry, self.rank)
                    drawn = self.index.draw_step_part(seed, step, self.P, self.K, part, parts)
                    batch = [(reader.read(e), c) for c, entries in drawn for e in entries]
                    out = self._decode_batch(batch, rng)
                    if out is not None:
                        break
                # the hidden class of each member (measuring only); a corrupt member's stand-in: unknown
                truth = [
                    UNKNOWN if i in self._corrupt else true_label_id(sample_meta(s)) for i, (s, _) in enumerate(batch)
                ]
                out["true_labels"] = torch.tensor(truth, dtype=torch.long)
                out["worker"] = wid
                out["images_read"] = reader.reads  # this worker's running total: P x K per draw
                yield out
        finally:
            reader.close()


def pseudo_labeled_batches(
    unlabeled_dir: str | os.PathLike[str],
    pseudo_dir: str | os.PathLike[str],
    data_cfg: Any,
    P: int,
    K: int,
    *,
    seed: int,
    rank: int | None = None,
    world: int | None = None,
    accum: int = 1,
    train: bool = True,
    image_size: int | None = None,
) -> BatchStream:
    """Like labeled_batches, labels = the cluster ids of `pseudo_dir`'s cluster index (written by
    the cluster stage; missing, or built with other filters: a clear error to run it), plus
    "true_labels" (P*K,) long: each member's hidden class from its json, -1 where unknown (never
    trained on; train/student.py TruthPrecision measures the pairs against it).

    Only kept members are drawn (distance within the cluster's data_cfg.pseudo_max_dist_percentile,
    cluster of at least data_cfg.pseudo_min_cluster_size), from clusters holding >= K of them.
    Start-up reads clusters.json and clusters.npz (no label file, no stat per shard); the member
    files are memory-mapped. Every rank draws its part of each optimizer step's global draw of
    P x world x accum distinct clusters (see _IndexedPK), so that many must be drawable.
    """
    rank = dist.rank() if rank is None else rank
    if P < 1 or K < 1:
        raise ValueError(f"P x K batches need P, K >= 1; got P={P} K={K}")
    index = ClusterIndex.open(pseudo_dir, data_cfg.pseudo_max_dist_percentile, data_cfg.pseudo_min_cluster_size)
    world = dist.world_size() if world is None else world
    index.check_drawable(P * world * accum, K)
    geometry = _train_geometry(data_cfg, image_size, train)
    tars = index.shard_paths(unlabeled_dir)
    ds = _IndexedPK(index, tars, P, K, geometry, seed, rank, world, accum, Decoding.of(data_cfg))
    return _stream(_loader(ds, data_cfg.num_workers), data_cfg, geometry, K)


# ---------------------------------------------------------------------------------- finite pass
class _FinitePass(IterableDataset):
    def __init__(
        self,
        shards: list[Path],
        batch_size: int,
        geometry: Callable,
        expected: Sequence[int | None],
        decoding: Decoding,
    ) -> None:
        self.shards, self.batch_size, self.geometry = shards, batch_size, geometry
        self.expected = list(expected)
        self.decoding = decoding

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wid, nw = _worker()
        done = {"corrupt": 0, "lost": 0}  # finished shards of this worker
        rows: list[tuple[str, str, int, dict[str, Any], torch.Tensor]] = []
        for path, expected in list(zip(self.shards, self.expected))[wid::nw]:
            it = iter_shard(path, self.geometry, expected, self.decoding.limits, self.decoding.on_device)
            for key, img, cls, meta in it:
                rows.append((key, path.name, cls, meta, img))
                if len(rows) == self.batch_size:
                    counts = {"corrupt": done["corrupt"] + it.corrupt, "lost": done["lost"]}
                    yield self._collate(rows, counts, wid, self.decoding.on_device)
                    rows = []
            done = {"corrupt": done["corrupt"] + it.corrupt, "lost": done["lost"] + it.lost}
        if rows:
            yield self._collate(rows, done, wid, self.decoding.on_device)
        # final counts, absorbed by BatchStream
        yield {"images": None, "skipped": sum(done.values()), "counts": done, "worker": wid}

    @staticmethod
    def _collate(rows: list, counts: dict[str, int], wid: int, pending: bool) -> dict[str, Any]:
        images = (
            {"pending": [r[4] for r in rows]}
            if pending  # the rank decodes the JPEGs (device_decode.DeviceDecoder)
            else {"images": batch_images([r[4] for r in rows])}
        )
        return {
            **images,
            "keys": [r[0] for r in rows],
            "shards": [r[1] for r in rows],
            "labels": torch.tensor([r[2] for r in rows], dtype=torch.long),
            "meta": [r[3] for r in rows],
            "skipped": sum(counts.values()),
            "counts": dict(counts),
            "worker": wid,
        }


def finite_batches(
    shard_dir_or_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    data_cfg: Any,
    batch_size: int,
    *,
    rank: int | None = None,
    world: int | None = None,
    image_size: int | None = None,
) -> BatchStream:
    """ONE pass over this rank's shards with eval transforms, batches of up to batch_size:
    {"images", "keys", "shards" (file name per sample), "labels" (cls, -1 where absent), "meta",
    "skipped"}. Ranks own disjoint shards (dist.shard_slice); each worker a disjoint part of those;
    within a shard, samples come in shard order. The union over ranks covers every sample once.
    """
    rank = dist.rank() if rank is None else rank
    world = dist.world_size() if world is None else world
    mine = dist.shard_slice(resolve_shards(shard_dir_or_paths), rank, world)
    if not mine:
        return BatchStream(None)
    geometry = _train_geometry(data_cfg, image_size, train=False)
    ds = _FinitePass(mine, batch_size, geometry, index_counts(mine), Decoding.of(data_cfg))
    return _stream(_loader(ds, min(data_cfg.num_workers, len(mine))), data_cfg, geometry, None)
