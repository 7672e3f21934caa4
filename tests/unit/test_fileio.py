"""Atomic small-file writes."""
import json

import pytest

from slade_dist.fileio import atomic_write_json, atomic_write_text


def test_writes_and_replaces_without_leftovers(tmp_path):
    p = atomic_write_json(tmp_path / "sub" / "a.json", {"x": 1})
    assert json.loads(p.read_text()) == {"x": 1}
    atomic_write_text(p, "new")
    assert p.read_text() == "new" and [f.name for f in p.parent.iterdir()] == ["a.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    p = atomic_write_text(tmp_path / "a.txt", "old")
    with pytest.raises(TypeError):
        atomic_write_text(p, None)  # type: ignore[arg-type]
    assert p.read_text() == "old" and [f.name for f in tmp_path.iterdir()] == ["a.txt"]
