"""Atomic small-file writes (temp file in the same directory + rename), used for every marker,
index and metadata file, so a killed writer never leaves a half-written file that looks finished.
Tests: tests/unit/test_fileio.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write text to path atomically (the temp name carries the pid: concurrent writers never clash)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_json(path: str | os.PathLike[str], body: Any, indent: int | None = 1) -> Path:
    return atomic_write_text(path, json.dumps(body, indent=indent, default=str))
