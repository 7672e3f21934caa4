"""One tar as a sample stream (slade_dist/data/tars.py): key grouping by webdataset's rule, members by
extension, a truncated tar ends early with `truncated` set, and the member readers' fallbacks."""

from __future__ import annotations

import json

import pytest

from slade_dist.data.shards import write_shard
from slade_dist.data.tars import TarSamples, image_bytes, sample_cls, sample_meta
from slade_dist.data.transforms import CorruptImage


def _write(path, n):
    rows = [
        {
            "__key__": f"dir/{i:04d}",
            "jpg": bytes([i]) * 100,
            "cls": str(i % 3).encode(),
            "json": json.dumps({"i": i}).encode(),
        }
        for i in range(n)
    ]
    write_shard(path, rows)
    return rows


def test_samples_in_order_with_their_members(tmp_path):
    rows = _write(tmp_path / "a-000000.tar", 6)
    got = list(TarSamples(tmp_path / "a-000000.tar"))
    assert [s["__key__"] for s in got] == [r["__key__"] for r in rows]
    assert [image_bytes(s) for s in got] == [r["jpg"] for r in rows]
    assert [sample_cls(s) for s in got] == [i % 3 for i in range(6)]
    assert [sample_meta(s) for s in got] == [{"i": i} for i in range(6)]


def test_truncated_tar_ends_early_and_says_so(tmp_path):
    _write(tmp_path / "a-000000.tar", 20)
    data = (tmp_path / "a-000000.tar").read_bytes()
    cut = tmp_path / "cut-000000.tar"
    cut.write_bytes(data[: len(data) // 2 + 77])
    tar = TarSamples(cut)
    got = list(tar)
    assert 0 < len(got) < 20 and tar.truncated and tar.error
    assert not TarSamples(tmp_path / "a-000000.tar").truncated
    missing = TarSamples(tmp_path / "nope.tar")
    assert list(missing) == [] and missing.truncated and "FileNotFoundError" in missing.error


def test_member_readers_fall_back_clearly():
    assert sample_cls({"__key__": "k"}) == -1 and sample_cls({"cls": b"x"}) == -1
    assert sample_meta({"json": b"not json"}) == {} and sample_meta({"json": b"[1]"}) == {"value": [1]}
    with pytest.raises(CorruptImage, match="'k' has no image member"):
        image_bytes({"__key__": "k", "txt": b"hello"})
