"""One WebDataset tar as a stream of samples, and the members a sample carries.

Owns `TarSamples` (a tar's samples in order, parsed by webdataset's own tar iterator and key rule
`base_plus_ext`; a truncated or unreadable tar ends the stream early with `truncated` set, never
an exception) and the member readers every stage shares: `image_bytes`, `sample_cls`,
`sample_meta`. Nothing here decodes images (transforms.py does).
Tests: tests/unit/test_readers.py, tests/unit/test_writers.py.
"""

from __future__ import annotations

import json
import os
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from webdataset.tariterators import base_plus_ext, tar_file_iterator

from .transforms import IMAGE_EXTS, CorruptImage

__all__ = ["TarSamples", "image_bytes", "sample_cls", "sample_meta"]


class TarSamples:
    """Samples of one tar in order ({"__key__", member ext: bytes}); a truncated/unreadable tar ends
    the iteration early with `truncated` set (its partial last sample is dropped)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.truncated = False
        self.error = ""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        cur: dict[str, Any] | None = None
        try:
            with open(self.path, "rb") as f:
                for member in tar_file_iterator(f):
                    prefix, suffix = base_plus_ext(member["fname"])
                    if prefix is None:
                        continue
                    if cur is not None and cur["__key__"] != prefix:
                        yield cur
                        cur = None
                    if cur is None:
                        cur = {"__key__": prefix}
                    cur[suffix.lower()] = member["data"]
        except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error) as e:
            self.truncated = True
            self.error = f"{type(e).__name__}: {str(e)[:200]}"
            return
        if cur is not None:
            yield cur


def image_bytes(sample: dict[str, Any]) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise CorruptImage(f"sample {sample.get('__key__')!r} has no image member ({'/'.join(IMAGE_EXTS)})")


def sample_cls(sample: dict[str, Any]) -> int:
    """The `cls` member as int; -1 when absent or unparsable (unlabeled data)."""
    raw = sample.get("cls")
    if raw is None:
        return -1
    try:
        return int(raw.decode() if isinstance(raw, bytes) else raw)
    except ValueError:
        return -1


def sample_meta(sample: dict[str, Any]) -> dict[str, Any]:
    raw = sample.get("json")
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {"value": meta}
