"""Content ids of what a stage reads: the facts a DONE.json and a checkpoint are checked against.

Owns `file_id` (sha256 of a file, cached per (path, size, mtime) in this process, so the
launcher's planning pass reads each model file once), `shard_dir_id` (one stat per shard, never a
read of the data; "missing" for an input not there yet) and `unvalidated_img2dataset` (raw
img2dataset output nobody validated, which the stage commands and the launcher refuse).
Tests: tests/unit/test_stages.py, tests/integration/test_faults.py, tests/unit/test_cli.py and
tests/unit/test_launch.py (the img2dataset refusal).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

MISSING = "missing"
# img2dataset names its shards 00000.tar, 00001.tar...; slade_dist's writers never do (<prefix>-%06d.tar)
IMG2DATASET_TAR = re.compile(r"\d+\.tar")
_BLOCK = 1 << 22
_file_ids: dict[tuple[str, int, int], str] = {}


def file_id(path: str | os.PathLike[str] | None) -> str:
    """sha256[:16] of the file's content; MISSING when it does not exist."""
    if not path:
        return MISSING
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        return MISSING
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _file_ids:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(_BLOCK), b""):
                h.update(block)
        _file_ids[key] = h.hexdigest()[:16]
    return _file_ids[key]


def shard_dir_id(path: str | os.PathLike[str] | None) -> str:
    """Id of a shard directory (or one tar): its index.json and the size and mtime of every tar in
    it (a tar replaced, truncated or restored under the same index changes the id)."""
    if not path:
        return MISSING
    p = Path(path)
    if p.is_file():
        return file_id(p)
    if not p.is_dir():
        return MISSING
    h = hashlib.sha256(file_id(p / "index.json").encode())
    for tar in sorted(p.glob("*.tar")):
        st = tar.stat()
        h.update(f"{tar.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def combine(*parts: object) -> str:
    """One short id from several (a stage's config hash and input ids)."""
    return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()[:16]


def unvalidated_img2dataset(shard_dir: str | os.PathLike[str]) -> str | None:
    """When `shard_dir` holds img2dataset shards (<digits>.tar) without the index.json that
    `write --format img2dataset` writes after decoding every image once: the command that does it.
    None for any other directory (slade_dist's own shards, an index from that command, no tars)."""
    d = Path(shard_dir)
    if not d.is_dir() or not any(IMG2DATASET_TAR.fullmatch(p.name) for p in d.glob("*.tar")):
        return None
    try:
        index = json.loads((d / "index.json").read_text())
    except (OSError, ValueError):  # missing or unreadable: a scan would write one, unvalidated
        index = {}
    if isinstance(index, dict) and index.get("format") == "img2dataset":
        return None
    return f"python -m slade_dist.data write --format img2dataset --root {d} --out {d}"


def describe_unvalidated(key: str, shard_dir: str, command: str) -> str:
    """The refusal the stage commands and the launcher print for unvalidated img2dataset output."""
    return (
        f"{key}: {shard_dir} holds img2dataset output that was never validated (corrupt images and "
        f"truncated tars would go unnoticed): run `{command}` once (decodes every image, writes "
        f"index.json beside the tars, copies nothing), or point {key} at the --out directory of an "
        "earlier `write --format img2dataset`"
    )
