"""Shard files on disk: atomic WebDataset tar writing, `index.json` and `classes.json`.

Owns: the naming `<prefix>-%06d.tar`, writing one shard atomically (temp file + rename, so a
killed writer never leaves a half shard that looks finished), the shard index every job plans
from (shard names + sample counts; rebuilt by scanning the tars when missing) and the class-name
map. Every writer (demo generator, dataset converters) goes through here.
Tests: tests/unit/test_shards.py.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import webdataset as wds

from ..fileio import atomic_write_json

INDEX_FILE = "index.json"
CLASSES_FILE = "classes.json"


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def write_shard(path: str | os.PathLike[str], samples: Iterable[Mapping[str, Any]],
                mtime: float | None = None) -> int:
    """Write samples (dicts with `__key__` and members) to one tar, atomically. Returns the count.

    A fixed `mtime` (e.g. 0) makes the tar bytes reproducible (member times are the only varying bytes).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    n = 0
    try:
        with open(tmp, "wb") as f:
            with wds.TarWriter(f, mtime=mtime) as sink:
                for sample in samples:
                    sink.write(dict(sample))
                    n += 1
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def write_index(out_dir: str | os.PathLike[str], shards: Sequence[Mapping[str, Any]], kind: str,
                **extra: Any) -> dict[str, Any]:
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
    """Samples in a tar = distinct keys (member name up to the first dot of its basename)."""
    keys = set()
    with tarfile.open(path) as tf:
        for m in tf:
            if m.isfile():
                d, base = os.path.split(m.name)
                keys.add(os.path.join(d, base.split(".", 1)[0]))
    return len(keys)


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


def shard_paths(shard_dir: str | os.PathLike[str]) -> list[Path]:
    """Absolute shard paths in index order."""
    shard_dir = Path(shard_dir)
    return [shard_dir / s["name"] for s in read_index(shard_dir)["shards"]]


def encode_jpeg(img: Any, quality: int = 90) -> bytes:
    """PIL image -> JPEG bytes."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
