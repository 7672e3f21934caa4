"""Shard files on disk: the naming `<prefix>-%06d.tar` (and `shard_index`, its inverse), atomic
tar writes (temp file + rename: a killed writer never leaves a half shard that looks finished),
`index.json` (names + counts; rebuilt by scanning when missing; a listed shard missing on disk is
an error) and `classes.json`. Every writer (demo, converters) goes through here.
Tests: tests/unit/test_shards.py.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import webdataset as wds

from ..config import ConfigError
from ..errors import UnusableInput
from ..fileio import atomic_path, atomic_write_json

INDEX_FILE = "index.json"
CLASSES_FILE = "classes.json"
_INDEX_RE = re.compile(r"(\d+)\.tar$")


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def shard_index(shard_path: str | os.PathLike[str]) -> int:
    """The integer index in a shard file name (the inverse of shard_name): `train-000012.tar` -> 12,
    img2dataset `00012.tar` -> 12."""
    m = _INDEX_RE.search(Path(shard_path).name)
    if not m:
        raise ValueError(f"shard file name {Path(shard_path).name!r} does not end in <digits>.tar")
    return int(m.group(1))


def write_shard(path: str | os.PathLike[str], samples: Iterable[Mapping[str, Any]], mtime: float | None = None) -> int:
    """Write samples (dicts with `__key__` and members) to one tar, atomically. Returns the count.

    A fixed `mtime` (e.g. 0) makes the tar bytes reproducible (member times are the only varying bytes).
    Member times are whole seconds: tarfile writes a pax header before every member whose mtime is a
    float, which doubles the headers every reader parses (tars.py reads 2x faster without them).
    """
    n = 0
    seconds = int(time.time() if mtime is None else mtime)
    with atomic_path(path) as tmp, open(tmp, "wb") as f, wds.TarWriter(f, mtime=seconds) as sink:
        for sample in samples:
            sink.write(dict(sample))
            n += 1
    return n


def write_index(
    out_dir: str | os.PathLike[str], shards: Sequence[Mapping[str, Any]], kind: str, **extra: Any
) -> dict[str, Any]:
    """`index.json`: {"kind", "shards": [{"name", "count"}], "total", ...extra}."""
    out_dir = Path(out_dir)
    shards = sorted(({"name": s["name"], "count": int(s["count"])} for s in shards), key=lambda s: s["name"])
    body = {"kind": kind, "shards": shards, "total": sum(s["count"] for s in shards), **extra}
    atomic_write_json(out_dir / INDEX_FILE, body)
    return body


def write_classes(out_dir: str | os.PathLike[str], names: Sequence[str]) -> None:
    """`classes.json`: {"0": name0, "1": name1, ...} (id -> name, ids dense 0..C-1)."""
    atomic_write_json(Path(out_dir) / CLASSES_FILE, {str(i): n for i, n in enumerate(names)})


def read_classes(shard_dir: str | os.PathLike[str]) -> list[str]:
    path = Path(shard_dir) / CLASSES_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: labeled shard dirs carry a classes.json (id -> name)")
    d = json.loads(path.read_text())
    return [d[str(i)] for i in range(len(d))]


def count_tar_samples(path: str | os.PathLike[str]) -> int:
    """Samples in a tar as every stage reads them (tars.TarSamples: a truncated tar counts the
    complete samples before its cut)."""
    from .tars import TarSamples  # here: tars imports torch (via transforms), the launcher imports this module

    return sum(1 for _ in TarSamples(path, read_data=False))


def read_index(shard_dir: str | os.PathLike[str], rebuild: bool = True) -> dict[str, Any]:
    """The shard index of a directory; scans the tars to rebuild it when missing."""
    shard_dir = Path(shard_dir)
    path = shard_dir / INDEX_FILE
    if path.exists():
        return json.loads(path.read_text())
    if not shard_dir.is_dir():
        raise FileNotFoundError(f"shard directory {shard_dir} does not exist")
    tars = sorted(p for p in shard_dir.glob("*.tar") if not p.name.startswith("."))
    if not tars:
        raise FileNotFoundError(f"no {INDEX_FILE} and no .tar shards in {shard_dir}")
    if not rebuild:
        raise FileNotFoundError(f"{path} is missing")
    shards = [{"name": t.name, "count": count_tar_samples(t)} for t in tars]
    kind = "labeled" if (shard_dir / CLASSES_FILE).exists() else "unlabeled"
    return write_index(shard_dir, shards, kind, rebuilt=True)


def unlabeled_pool(shard_dir: str | os.PathLike[str] | None, stage: str) -> list[Path]:
    """The unlabeled shards a pool stage (curate, cluster) reads: the key must be set and the
    index must list at least one shard (one clear user error each)."""
    if not shard_dir:
        raise ConfigError(f"data.unlabeled_shards must be set for the {stage} stage (the pool it reads)")
    shards = shard_paths(shard_dir)
    if not shards:
        raise UnusableInput(f"{stage}: no shards listed in {shard_dir}/{INDEX_FILE}: nothing to read")
    return shards


def shard_paths(shard_dir: str | os.PathLike[str]) -> list[Path]:
    """Shard paths in index order; a shard the index lists but the disk lacks is an error naming it
    (read as an empty or truncated tar it would silently lose its samples)."""
    shard_dir = Path(shard_dir)
    paths = [shard_dir / s["name"] for s in read_index(shard_dir)["shards"]]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} shards listed in {shard_dir / INDEX_FILE} are "
            f"missing on disk (first: {', '.join(missing[:5])}); restore them, or rebuild the "
            f"index with `python -m slade_dist.data index {shard_dir}`"
        )
    return paths


def index_counts(paths: Sequence[str | os.PathLike[str]]) -> list[int | None]:
    """Each shard's sample count from the index.json beside it (None where there is none)."""
    by_dir: dict[Path, dict[str, int]] = {}
    out: list[int | None] = []
    for p in map(Path, paths):
        if p.parent not in by_dir:
            index = p.parent / INDEX_FILE
            by_dir[p.parent] = (
                {s["name"]: int(s["count"]) for s in json.loads(index.read_text())["shards"]} if index.is_file() else {}
            )
        out.append(by_dir[p.parent].get(p.name))
    return out


def encode_jpeg(img: Any, quality: int = 90) -> bytes:
    """PIL image -> JPEG bytes."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
