"""Streaming readers over WebDataset shards: what the trainers, embed and eval iterate.

Owns three streams, all decoding + augmenting inside torch DataLoader workers:
- `labeled_batches`: INFINITE resampled P x K batches of labeled shards (teacher/student). Each
  (rank, worker) draws shards at random with its own seed from (seed, rank, worker), so every rank
  can take exactly N batches (training counts optimizer steps; no rank runs dry, no collective hangs).
- `pseudo_labeled_batches`: INFINITE P x K batches of pseudo labels drawn from the cluster stage's
  cluster -> members index (pseudo_index.py): P distinct clusters, K distinct kept members each,
  every member read by its byte range in its tar. Start-up reads the index's small files only
  (never a label file), and a batch holds K distinct images at any k (a buffered stream needs
  ~K x k buffered images for that; docs/SCALING.md has the measurements). Each batch also carries
  `true_labels`: the hidden class in each member's json (pair_truth.true_label_id; -1 where there
  is none, and for a corrupt member's stand-in image), for measuring pair precision only.
- `finite_batches`: ONE pass for embed/eval; each rank owns `shard_slice(shards, rank, world)`, each
  DataLoader worker a round-robin part of that, samples in shard order; works with fewer shards than
  ranks x workers (idle readers yield nothing).
plus `iter_shard` for one shard. Sharding is done here (not by webdataset's nodesplitter /
split_by_node, which read the env and raise or double-read with few shards).
Tar members are parsed in tars.py (webdataset's own tar iterator and key rule).
A corrupt image, a sample without an image, or a truncated tar is skipped and counted ("skipped" in
every batch: total so far over this rank's workers), never a crash.
Tests: tests/unit/test_readers.py, tests/integration/test_readers_multirank.py.
"""

from __future__ import annotations

import multiprocessing
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .. import dist
from .batcher import PKBatcher
from .pair_truth import UNKNOWN, true_label_id
from .pseudo_index import ClusterIndex, TarReader
from .shards import index_counts, read_index, shard_paths
from .tars import TarSamples, image_bytes, sample_cls, sample_meta
from .transforms import CorruptImage, decode, eval_geometry, eval_resize_for, normalize_batch, train_geometry

# a training stream that has decoded nothing after this many images stops with a clear error
# instead of waiting forever for a batch (every labeled image corrupt)
ALL_CORRUPT_AFTER = 256

__all__ = [
    "labeled_batches",
    "pseudo_labeled_batches",
    "finite_batches",
    "iter_shard",
    "BatchStream",
    "rank_shards",
    "resolve_shards",
]


class _ShardIter:
    """Iterator of (key, image, cls, meta) over one shard; counts undecodable samples in `corrupt`
    and, for a truncated tar, the samples it lost in `lost` (its index count minus those met, or 1
    when the count is not known)."""

    def __init__(self, path: str | os.PathLike[str], transform: Callable | None, expected: int | None = None) -> None:
        self.tar = TarSamples(path)
        self.transform = transform
        self.expected = expected
        self.corrupt = 0
        self.lost = 0
        self.seen = 0
        self._gen: Iterator[tuple[str, Any, int, dict[str, Any]]] | None = None

    @property
    def skipped(self) -> int:
        return self.corrupt + self.lost

    def __iter__(self) -> _ShardIter:
        return self

    def __next__(self) -> tuple[str, Any, int, dict[str, Any]]:
        if self._gen is None:
            self._gen = self._rows()
        return next(self._gen)

    def _rows(self) -> Iterator[tuple[str, Any, int, dict[str, Any]]]:
        for s in self.tar:
            self.seen += 1
            try:
                img = decode(image_bytes(s))
            except CorruptImage:
                self.corrupt += 1
                continue
            yield s["__key__"], (self.transform(img) if self.transform else img), sample_cls(s), sample_meta(s)
        self.lost = lost_to_truncation(self.expected, self.seen, self.tar.truncated)


def lost_to_truncation(expected: int | None, seen: int, truncated: bool = True) -> int:
    """Samples a tar lost: its index count minus those read (a tar that ends cleanly on a member
    boundary is still short of its count), at least 1 for a tar that broke off."""
    short = max((expected or 0) - seen, 0)
    return max(short, 1) if truncated else short


def iter_shard(
    path: str | os.PathLike[str], transform: Callable | None = None, expected: int | None = None
) -> _ShardIter:
    """(key, image, cls, meta) for one shard in order; image is a uint8 (3,H,W) tensor when transform
    is None, else transform(that tensor). `.corrupt` counts undecodable samples, `.lost` the samples
    a truncated tar lost (`expected` = its index count), `.skipped` both."""
    return _ShardIter(path, transform, expected)


# ------------------------------------------------------------------------------------ helpers
def resolve_shards(shard_dir_or_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """A shard dir (its index.json, rebuilt if missing) or an explicit list of tar paths."""
    if isinstance(shard_dir_or_paths, (str, os.PathLike)):
        p = Path(shard_dir_or_paths)
        if p.is_file():
            return [p]
        return shard_paths(p)
    return [Path(x) for x in shard_dir_or_paths]


def rank_shards(paths: Sequence[Path], rank: int, world: int) -> list[Path]:
    """The disjoint, deterministic shards a rank owns in a finite pass (round-robin)."""
    return dist.shard_slice(list(paths), rank, world)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _shuffle(stream: Iterable[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    """Reservoir-style shuffle with a bounded buffer."""
    if bufsize <= 1:
        yield from stream
        return
    buf: list[Any] = []
    for item in stream:
        buf.append(item)
        if len(buf) >= bufsize:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class BatchStream:
    """Main-process side of a DataLoader: folds each worker's running counts into totals.

    Workers send {"worker": id, "skipped": n, "counts": {"corrupt": .., "lost": ..}, ...} (running
    totals of that worker); batches with images=None only carry counts.
    """

    def __init__(self, loader: Iterable[dict[str, Any]] | None) -> None:
        self._it = iter(loader) if loader is not None else iter(())
        self._skips: dict[int, int] = {}
        self._counts: dict[int, dict[str, int]] = {}

    @property
    def skipped(self) -> int:
        return sum(self._skips.values())

    @property
    def counts(self) -> dict[str, int]:
        """What was left out so far, by cause: corrupt (undecodable) and lost (truncated tars)."""
        out = {"corrupt": 0, "lost": 0}
        for c in self._counts.values():
            for k, v in c.items():
                out[k] = out.get(k, 0) + int(v)
        return out

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, Any]:
        while True:
            b = next(self._it)
            wid = b.pop("worker")
            self._skips[wid] = b["skipped"]
            if "counts" in b:
                self._counts[wid] = b.pop("counts")
            b["skipped"] = self.skipped
            if b.get("images") is not None:
                return b


def _loader(dataset: IterableDataset, num_workers: int) -> DataLoader:
    # fork explicitly: under a spawn-started rank (torch.multiprocessing, submitit) the inherited
    # default would re-import torch in every worker (~10 s each). Workers never touch CUDA.
    ctx = "fork" if num_workers > 0 and "fork" in multiprocessing.get_all_start_methods() else None
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        multiprocessing_context=ctx,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
    )


def _seed_for(*parts: Any) -> int:
    return random.Random("/".join(map(str, parts))).randrange(1 << 62)


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
        max_samples_without_batch: int = 0,
        expected: Sequence[int | None] | None = None,
    ) -> None:
        if not shards:
            raise ValueError("no shards to read")
        self.shards, self.P, self.K, self.geometry = shards, P, K, geometry
        self.expected = list(expected) if expected is not None else [None] * len(shards)
        self.max_buffered, self.shuffle_buffer, self.seed, self.rank = max_buffered, shuffle_buffer, seed, rank
        self.max_without_batch = max_samples_without_batch or max(50 * max_buffered, 100_000)
        self.skipped = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wid, _ = _worker()
        rng = random.Random(_seed_for(self.seed, self.rank, wid))
        torch.manual_seed(_seed_for("aug", self.seed, self.rank, wid))
        batcher = PKBatcher(self.P, self.K, self.max_buffered, seed=rng.randrange(1 << 31))
        self.skipped = 0
        self._since_batch = 0
        self._decoded, self._undecodable = 0, 0
        for batch in batcher(_shuffle(self._class_samples(rng), self.shuffle_buffer, rng)):
            self._since_batch = 0
            out = self._decode_batch(batch, rng)
            if out is not None:
                out["worker"] = wid
                yield out

    def _draw_shards(self, rng: random.Random) -> Iterator[int]:
        while True:
            yield rng.randrange(len(self.shards))

    def _count_progress(self) -> None:
        self._since_batch += 1
        if self._since_batch > self.max_without_batch:
            raise RuntimeError(
                f"read {self._since_batch} samples without completing one P x K batch (P={self.P}, K={self.K}) "
                f"from {len(self.shards)} shards: fewer than P labels with >= 2 samples? Lower P"
            )

    def _class_samples(self, rng: random.Random) -> Iterator[tuple[dict[str, Any], int]]:
        for i in self._draw_shards(rng):
            tar = TarSamples(self.shards[i])
            seen = 0
            for s in tar:
                seen += 1
                self._count_progress()
                label = sample_cls(s)
                if label < 0:
                    self.skipped += 1  # no usable cls member: corrupt for a labeled stream
                    continue
                yield s, label
            self.skipped += lost_to_truncation(self.expected[i], seen, tar.truncated)
            self._count_progress()

    def _decode_batch(self, batch: list[tuple[dict[str, Any], int]], rng: random.Random) -> dict[str, Any] | None:
        """Decode + augment a P x K batch; a corrupt entry is replaced by a fresh augmentation of a
        decodable sample of the same label (all K corrupt: the batch is dropped)."""
        decoded: list[torch.Tensor | None] = []
        self._last_corrupt = decoded  # None at each corrupt entry (_IndexedPK's true_labels)
        for s, _ in batch:
            try:
                decoded.append(decode(image_bytes(s)))
                self._decoded += 1
            except CorruptImage:
                self.skipped += 1
                self._undecodable += 1
                decoded.append(None)
        if self._decoded == 0 and self._undecodable >= ALL_CORRUPT_AFTER:
            raise RuntimeError(
                f"none of the first {self._undecodable} images read from {len(self.shards)} shards "
                f"(e.g. {self.shards[0]}) could be decoded: the data is corrupt or not images; "
                f"check it with `python -m slade_dist.data index` / rewrite the shards"
            )
        images, labels = [], []
        for g in range(0, len(batch), self.K):
            group = decoded[g : g + self.K]
            good = [d for d in group if d is not None]
            if not good:
                return None
            for d in group:
                images.append(self.geometry(d if d is not None else rng.choice(good)))
            labels.extend([batch[g][1]] * self.K)
        return {
            "images": normalize_batch(torch.stack([torch.as_tensor(x) for x in images])),
            "labels": torch.tensor(labels, dtype=torch.long),
            "keys": [s["__key__"] for s, _ in batch],
            "skipped": self.skipped,
        }


def _check_pk(P: int, K: int, data_cfg: Any) -> None:
    if P < 1 or K < 1 or data_cfg.max_buffered < P * K:
        raise ValueError(
            f"P x K batches need P, K >= 1 and data.max_buffered >= P*K; got P={P} K={K} "
            f"max_buffered={data_cfg.max_buffered}"
        )


def _train_geometry(data_cfg: Any, image_size: int | None, train: bool) -> Callable:
    size = image_size or data_cfg.image_size
    if train:  # data.augment: flip, rotation, colour, blur and crop ranges from the config
        return train_geometry(size, data_cfg.crop_scale_min, data_cfg.augment)
    return eval_geometry(size, eval_resize_for(size, data_cfg.image_size, data_cfg.resize_size))


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
    _check_pk(P, K, data_cfg)
    if Path(shard_dir).is_dir() and read_index(shard_dir).get("kind") == "unlabeled":
        raise ValueError(
            f"{shard_dir} holds unlabeled shards (no cls): labeled_batches needs a labeled "
            f"shard dir; use pseudo_labeled_batches for unlabeled data"
        )
    shards = resolve_shards(shard_dir)
    ds = _ResampledPK(
        shards,
        P,
        K,
        _train_geometry(data_cfg, image_size, train),
        data_cfg.max_buffered,
        data_cfg.shuffle_buffer,
        seed,
        rank,
        expected=index_counts(shards),
    )
    return BatchStream(_loader(ds, data_cfg.num_workers))


class _IndexedPK(_ResampledPK):
    """Infinite P x K batches from the cluster index: no buffer and no shuffle, so the K images of
    each pseudo label are distinct and every image read is used (decoding and the corrupt-image
    rules are the labeled stream's)."""

    def __init__(self, index: ClusterIndex, tars: list[Path], P: int, K: int, geometry: Callable, seed: int, rank: int):
        super().__init__(tars, P, K, geometry, P * K, 0, seed, rank)
        self.index = index

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wid, _ = _worker()
        rng = random.Random(_seed_for(self.seed, self.rank, wid))
        torch.manual_seed(_seed_for("aug", self.seed, self.rank, wid))
        draws = np.random.default_rng(rng.randrange(1 << 62))
        self.skipped, self._decoded, self._undecodable = 0, 0, 0
        reader = TarReader(self.shards)
        try:
            while True:
                drawn = self.index.draw(draws, self.P, self.K)
                batch = [(reader.read(e), c) for c, entries in drawn for e in entries]
                out = self._decode_batch(batch, rng)
                if out is not None:
                    truth = [
                        UNKNOWN if d is None else true_label_id(sample_meta(s))
                        for (s, _), d in zip(batch, self._last_corrupt)
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
    files are memory-mapped. `world` is accepted for symmetry (every rank draws from all clusters).
    """
    rank = dist.rank() if rank is None else rank
    if P < 1 or K < 1:
        raise ValueError(f"P x K batches need P, K >= 1; got P={P} K={K}")
    index = ClusterIndex.open(pseudo_dir, data_cfg.pseudo_max_dist_percentile, data_cfg.pseudo_min_cluster_size)
    index.check_drawable(P, K)
    ds = _IndexedPK(
        index, index.shard_paths(unlabeled_dir), P, K, _train_geometry(data_cfg, image_size, train), seed, rank
    )
    return BatchStream(_loader(ds, data_cfg.num_workers))


# ---------------------------------------------------------------------------------- finite pass
class _FinitePass(IterableDataset):
    def __init__(self, shards: list[Path], batch_size: int, geometry: Callable, expected: Sequence[int | None]) -> None:
        self.shards, self.batch_size, self.geometry = shards, batch_size, geometry
        self.expected = list(expected)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wid, nw = _worker()
        done = {"corrupt": 0, "lost": 0}  # finished shards of this worker
        rows: list[tuple[str, str, int, dict[str, Any], torch.Tensor]] = []
        for path, expected in list(zip(self.shards, self.expected))[wid::nw]:
            it = iter_shard(path, self.geometry, expected)
            for key, img, cls, meta in it:
                rows.append((key, path.name, cls, meta, img))
                if len(rows) == self.batch_size:
                    yield self._collate(rows, {"corrupt": done["corrupt"] + it.corrupt, "lost": done["lost"]}, wid)
                    rows = []
            done = {"corrupt": done["corrupt"] + it.corrupt, "lost": done["lost"] + it.lost}
        if rows:
            yield self._collate(rows, done, wid)
        # final counts, absorbed by BatchStream
        yield {"images": None, "skipped": sum(done.values()), "counts": done, "worker": wid}

    @staticmethod
    def _collate(rows: list, counts: dict[str, int], wid: int) -> dict[str, Any]:
        return {
            "images": normalize_batch(torch.stack([torch.as_tensor(r[4]) for r in rows])),
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
    "skipped"}. Ranks own disjoint shards (rank_shards); each worker a disjoint part of those;
    within a shard, samples come in shard order. The union over ranks covers every sample once.
    """
    rank = dist.rank() if rank is None else rank
    world = dist.world_size() if world is None else world
    mine = rank_shards(resolve_shards(shard_dir_or_paths), rank, world)
    if not mine:
        return BatchStream(None)
    ds = _FinitePass(mine, batch_size, _train_geometry(data_cfg, image_size, train=False), index_counts(mine))
    return BatchStream(_loader(ds, min(data_cfg.num_workers, len(mine))))
