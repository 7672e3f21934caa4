"""One WebDataset tar as a stream of samples: `TarSamples`, the ONE tar reader of every stage and
tool (so all agree on which samples a damaged tar holds; the rules: slade_dist/data/README.md "One
tar reader"), `parse_sample` (one sample's byte range, as the member index stores it, read back by
the same rules) and the member readers `image_bytes`, `sample_cls`, `sample_meta`.
Tests: tests/unit/test_tars.py (tars cut at every byte class), tests/unit/test_pseudo_index.py.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from webdataset.tariterators import base_plus_ext

from .transforms import IMAGE_EXTS, CorruptImage

__all__ = ["TarSamples", "parse_sample", "image_bytes", "sample_cls", "sample_meta"]

_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator skips these names


class _Cut(Exception):
    """The tar ends before a member's data does."""


class TarSamples:
    """Samples of one tar in order ({"__key__", "__span__", member ext: bytes}); a truncated or
    unreadable tar ends the iteration early with `truncated` set and `error` saying where, never
    an exception. read_data=False: members are listed as b"" and their data is seeked over (the
    member index needs byte ranges only)."""

    def __init__(self, path: str | os.PathLike[str], read_data: bool = True) -> None:
        self.path = Path(path)
        self.read_data = read_data
        self.truncated = False
        self.error = ""
        self.duplicates = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.truncated, self.error, self.duplicates = False, "", 0
        try:
            f = open(self.path, "rb")  # noqa: SIM115 (closed in the finally below, also when the consumer stops early)
        except OSError as e:
            self.truncated, self.error = True, f"{type(e).__name__}: {str(e)[:200]}"
            return
        try:
            walk = _Walk(f, os.fstat(f.fileno()).st_size, self.read_data)
            seen: set[str] = set()
            for sample in walk:
                # a key met again (its members not consecutive: concatenated or hand-made tars) is left out,
                # as every stage writes one row per key; the readers count these as corrupt
                if sample["__key__"] in seen:
                    self.duplicates += 1
                    continue
                seen.add(sample["__key__"])
                yield sample
            self.truncated, self.error = walk.truncated, walk.error
        finally:
            f.close()


def parse_sample(buf: bytes, base: int = 0) -> dict[str, Any]:
    """The one sample in `buf`, the bytes [base, base + len(buf)) of a tar as the member index
    recorded them; {} when they are not exactly one whole sample (the tar was cut or rewritten
    since it was indexed)."""
    walk = _Walk(io.BytesIO(buf), len(buf), True, base=base, ends_on_sample=True)
    samples = list(walk)
    return samples[0] if len(samples) == 1 and not walk.truncated else {}


class _Walk:
    """The member walk behind TarSamples and parse_sample (Python's tarfile parses the headers)."""

    def __init__(self, f: IO[bytes], size: int, read_data: bool, base: int = 0, ends_on_sample: bool = False) -> None:
        self.f, self.size, self.read_data, self.base = f, size, read_data, base
        self.ends_on_sample = ends_on_sample  # the bytes stop at a sample's end: no end-of-archive block
        self.truncated, self.error = False, ""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        cur: dict[str, Any] | None = None
        try:
            tf = tarfile.open(fileobj=self.f, mode="r:")  # plain tars: what our writers and img2dataset write
            while (ti := tf.next()) is not None:
                tf.members = []  # the walk keeps nothing per member
                prefix, suffix = _split(ti)
                if prefix is None:
                    continue
                if cur is not None and cur["__key__"] != prefix:
                    yield cur  # a header of another key was read: that sample is complete
                    cur = None
                end = -(-(ti.offset_data + ti.size) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                if ti.offset_data + ti.size > self.size:
                    raise _Cut(f"member {ti.name!r} runs past the end of the file ({self.size} bytes)")
                if cur is None:  # __span__: first header to the end of the last member's padded data (what the
                    # member index stores; webdataset's writer skips `_` keys, so the sample can be written back)
                    cur = {"__key__": prefix, "__span__": (self.base + ti.offset, self.base + end)}
                cur["__span__"] = (cur["__span__"][0], self.base + end)
                cur[suffix.lower()] = self._data(tf, ti)
            if not self._ended_cleanly(tf.offset):
                raise _Cut(f"no end-of-archive block at byte {self.base + tf.offset} (cut or damaged there)")
        except (tarfile.TarError, OSError, EOFError, ValueError, _Cut) as e:
            self.truncated = True
            self.error = f"{type(e).__name__}: {str(e)[:200]}"
            return  # the sample in progress at the cut is dropped
        if cur is not None:
            yield cur

    def _data(self, tf: tarfile.TarFile, ti: tarfile.TarInfo) -> bytes:
        if not self.read_data:
            return b""
        if ti.sparse is not None:  # GNU sparse member: tarfile reassembles it
            with tf.extractfile(ti) as m:  # type: ignore[union-attr]
                return m.read()
        self.f.seek(ti.offset_data)
        return self.f.read(ti.size)

    def _ended_cleanly(self, offset: int) -> bool:
        if self.ends_on_sample:
            return offset == self.size
        self.f.seek(offset)
        block = self.f.read(tarfile.BLOCKSIZE)
        # zeros (a cut inside the end blocks still shows some): the end; nothing, or a header's
        # first bytes (a name is never empty): cut on a member boundary or inside a header
        return len(block) > 0 and not block.strip(b"\0")


def _split(ti: tarfile.TarInfo) -> tuple[str | None, str]:
    """(key, extension) of a member webdataset would read, by its key rule (`base_plus_ext`: the name
    up to the first dot of its last path part); (None, "") for one it skips (not a regular file,
    webdataset's `__meta__` names)."""
    name = ti.name
    if not ti.isreg() or not name or _SKIP_META.match(name):
        return None, ""
    if "/" not in name and name.startswith("__") and name.endswith("__"):
        return None, ""
    prefix, suffix = base_plus_ext(name)
    return (prefix, suffix) if prefix is not None else (None, "")


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
    except (ValueError, UnicodeDecodeError):
        return -1


def sample_meta(sample: dict[str, Any]) -> dict[str, Any]:
    raw = sample.get("json")
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {"value": meta}
