"""What every stream of readers.py and multicrop.py shares: one shard in order (`iter_shard`), the
shard resampler, shard lists, the byte-capped shuffle, the DataLoader and its rank side
(`BatchStream`: per-worker counts folded into totals). Behaviour: slade_dist/data/README.md "Reading".
Tests: tests/unit/test_readers.py, tests/unit/test_device_decode.py, tests/integration/test_readers_multirank.py.
"""

from __future__ import annotations

import multiprocessing
import os
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import UnusableInput
from .curation import key_ids
from .device_decode import DeviceDecoder, prepare
from .shards import shard_paths
from .tars import TarSamples, image_bytes, sample_cls, sample_meta
from .transforms import DEFAULT_LIMITS, CorruptImage, ImageLimits, normalize_batch

LOST = "__lost__"  # the marker resampled_samples yields after each shard: how many samples it lost


class ShardRows:
    """(key, image, cls, meta) of one shard in order; image is a uint8 (3,H,W) tensor when transform
    is None, else transform(that tensor) (on_device: a plain JPEG comes as device_decode.EncodedJpeg).
    `.corrupt` counts images outside the decoder contract (`limits`), `.lost` the samples a
    truncated tar lost (`expected` = its index count), `.skipped` both."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        transform: Callable | None = None,
        expected: int | None = None,
        limits: ImageLimits = DEFAULT_LIMITS,
        on_device: bool = False,
    ) -> None:
        self.tar = TarSamples(path)
        self.transform = transform or (lambda img: img)
        self.expected, self.limits, self.on_device = expected, limits, on_device
        self.corrupt = 0
        self.lost = 0

    @property
    def skipped(self) -> int:
        return self.corrupt + self.lost

    def __iter__(self) -> Iterator[tuple[str, Any, int, dict[str, Any]]]:
        seen = 0
        for s in self.tar:
            seen += 1
            try:
                img = prepare(image_bytes(s), self.limits, self.transform, self.on_device)
            except CorruptImage:
                self.corrupt += 1
                continue
            yield s["__key__"], img, sample_cls(s), sample_meta(s)
        self.corrupt += self.tar.duplicates  # a key met twice: left out by the tar reader, counted here
        self.lost = lost_to_truncation(self.expected, seen, self.tar.truncated)


iter_shard = ShardRows


def lost_to_truncation(expected: int | None, seen: int, truncated: bool = True) -> int:
    """Samples a tar lost: its index count minus those read (a tar that ends cleanly on a member
    boundary is still short of its count), at least 1 for a tar that broke off."""
    short = max((expected or 0) - seen, 0)
    return max(short, 1) if truncated else short


def resampled_samples(
    shards: Sequence[Path],
    expected: Sequence[int | None],
    rng: random.Random,
    leave_out: Mapping[Path, frozenset[int]] | None = None,
) -> Iterator[dict]:
    """Samples of shards drawn at random (with replacement) forever; after each shard a {LOST: n}
    marker: what a truncated tar lost and the samples the tar reader left out for a repeated key.
    Every rank reads all shards (no split, so no rank runs dry and hangs a collective).
    `leave_out`: {shard: key ids (curation.key_ids)} never yielded (the pool's copies of test images)."""
    while True:
        i = rng.randrange(len(shards))
        tar, seen = TarSamples(shards[i]), 0
        skip = (leave_out or {}).get(shards[i], frozenset())
        for s in tar:
            seen += 1
            if skip and int(key_ids([s["__key__"]])[0]) in skip:
                continue
            yield s
        yield {LOST: lost_to_truncation(expected[i], seen, tar.truncated) + tar.duplicates}


def resolve_shards(shard_dir_or_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """A shard dir (its index.json, rebuilt if missing) or an explicit list of tar paths."""
    if isinstance(shard_dir_or_paths, (str, os.PathLike)):
        p = Path(shard_dir_or_paths)
        if p.is_file():
            return [p]
        return shard_paths(p)
    return [Path(x) for x in shard_dir_or_paths]


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _shuffle(
    stream: Iterable[Any],
    bufsize: int,
    rng: random.Random,
    max_bytes: int | None = None,
    size_of: Callable[[Any], int] | None = None,
) -> Iterator[Any]:
    """Reservoir-style shuffle with a buffer bounded by count (bufsize) and by bytes (max_bytes, by
    size_of): an item leaves as soon as either is reached."""
    if bufsize <= 1:
        yield from stream
        return
    buf: list[Any] = []
    held = 0
    for item in stream:
        buf.append(item)
        held += size_of(item) if size_of else 0
        if len(buf) >= bufsize or (max_bytes is not None and held > max_bytes):
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            out = buf.pop()
            held -= size_of(out) if size_of else 0
            yield out
    rng.shuffle(buf)
    yield from buf


def batch_images(images: Sequence[Any]) -> torch.Tensor:
    """Transformed uint8 images -> the normalised float batch. In a loader worker the batch is
    written straight into shared memory, as torch's default_collate does: handing it to the main
    process then copies nothing (otherwise the queue copies every batch into shared memory)."""
    u8 = torch.stack([torch.as_tensor(x) for x in images])
    out = None
    if get_worker_info() is not None:
        storage = torch.UntypedStorage._new_shared(u8.numel() * 4)
        out = torch.empty(0, dtype=torch.float32).set_(storage).view(u8.shape)
    return normalize_batch(u8, out)


def sample_nbytes(sample: dict[str, Any]) -> int:
    """Bytes a raw sample holds (its members' data)."""
    return sum(len(v) for v in sample.values() if isinstance(v, bytes))


def buffer_bytes(data_cfg: Any) -> int:
    """data.buffer_mb in bytes: the cap of each encoded-sample buffer of a loader worker."""
    return int(data_cfg.buffer_mb) << 20


class BatchStream:
    """Main-process side of a DataLoader: folds each worker's running counts into totals.

    Workers send {"worker": id, "skipped": n, "counts": {"corrupt": .., "lost": ..}, ...} (running
    totals of that worker); batches with images=None only carry counts; one with "unusable" is
    raised here as errors.UnusableInput (one line, not the worker's traceback). With data.decode: device,
    a batch carries "pending" items that `finish` (device_decode.DeviceDecoder) decodes on the
    rank; the JPEGs that fail there are counted as corrupt here.
    """

    def __init__(self, loader: Iterable[dict[str, Any]] | None, finish: DeviceDecoder | None = None) -> None:
        self._it = iter(loader) if loader is not None else iter(())
        self._skips: dict[int, int] = {}
        self._counts: dict[int, dict[str, int]] = {}
        self.finish = finish

    @property
    def _rank_corrupt(self) -> int:
        return self.finish.corrupt if self.finish is not None else 0

    @property
    def skipped(self) -> int:
        return sum(self._skips.values()) + self._rank_corrupt

    @property
    def counts(self) -> dict[str, int]:
        """What was left out so far, by cause: corrupt (outside the decoder contract) and lost
        (truncated tars)."""
        out = {"corrupt": self._rank_corrupt, "lost": 0}
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
            if "unusable" in b:  # a worker found the data unusable (readers: nothing decodable, no P x K)
                raise UnusableInput(b["unusable"])
            self._skips[wid] = b["skipped"]
            if "counts" in b:
                self._counts[wid] = b.pop("counts")
            if "pending" in b:
                b = self.finish(b) if self.finish is not None else None
                if b is None:  # every image of a label group failed on the rank
                    continue
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


@dataclass(frozen=True)
class Decoding:
    """How a stream decodes: the decoder contract's limits, where JPEGs are decoded (data.decode)
    and the byte cap of each encoded-sample buffer (data.buffer_mb)."""

    limits: ImageLimits
    on_device: bool
    buffer_bytes: int

    @classmethod
    def of(cls, data_cfg: Any) -> Decoding:
        return cls(ImageLimits.of(data_cfg), data_cfg.decode == "device", buffer_bytes(data_cfg))
