"""What a converter or validator left out, and why: the format of `rejects.txt` in a written shard
dir (slade_dist/data/README.md "Writing shards") and the reason text.
Tests: tests/unit/test_writers.py (cases 3 and 10 of the crawl hazards), tests/integration/test_hazards.py.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from ..fileio import atomic_write_text
from .transforms import CorruptImage

REJECTS_FILE = "rejects.txt"


def reason(e: BaseException) -> str:
    """A reject's reason: the contract's words, or the error's type and first line, without the
    memory addresses some messages carry (rejects.txt is the same on every run)."""
    text = str(e).splitlines()[0] if str(e) else ""
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", text)[:200]
    return text if isinstance(e, CorruptImage) else f"{type(e).__name__}: {text}".rstrip(": ")


def write_rejects(out_dir: Path, records: Sequence[dict[str, str]]) -> None:
    """rejects.txt: one JSON object a line (ASCII: a newline or tab in a name cannot forge a line,
    a name in any byte encoding is written, surrogate-escaped)."""
    atomic_write_text(out_dir / REJECTS_FILE, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def read_rejects(out_dir: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The records of a rejects.txt (empty when there is none)."""
    path = Path(out_dir) / REJECTS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
