"""Shard writing (atomic), index.json (written and rebuilt) and classes.json."""

from __future__ import annotations

import json

import pytest
import webdataset as wds

from slade_dist.data import shards


def samples(n, prefix="s"):
    for i in range(n):
        yield {"__key__": f"{prefix}{i:04d}", "jpg": b"\xff\xd8fake", "cls": i % 3, "json": {"i": i}}


def test_write_shard_atomic_and_readable(tmp_path):
    p = tmp_path / shards.shard_name("train", 3)
    assert p.name == "train-000003.tar"
    assert shards.write_shard(p, samples(5)) == 5
    got = list(wds.WebDataset(str(p), shardshuffle=False))
    assert [g["__key__"] for g in got] == [f"s{i:04d}" for i in range(5)]
    assert int(got[4]["cls"]) == 1 and json.loads(got[2]["json"]) == {"i": 2}
    assert [x.name for x in tmp_path.iterdir()] == [p.name]  # no temp file left behind


def test_failed_write_leaves_nothing(tmp_path):
    def broken():
        yield from samples(2)
        raise RuntimeError("decoder died")

    p = tmp_path / "x-000000.tar"
    with pytest.raises(RuntimeError):
        shards.write_shard(p, broken())
    assert list(tmp_path.iterdir()) == []


def test_index_written_and_rebuilt(tmp_path):
    for k in range(2):
        shards.write_shard(tmp_path / shards.shard_name("u", k), samples(3 + k, prefix=f"k{k}_"))
    idx = shards.read_index(tmp_path)  # no index.json yet: rebuilt by scanning
    assert idx["rebuilt"] and idx["total"] == 7 and idx["kind"] == "unlabeled"
    assert [s["count"] for s in idx["shards"]] == [3, 4]
    assert json.loads((tmp_path / "index.json").read_text())["total"] == 7
    assert shards.shard_paths(tmp_path) == [tmp_path / "u-000000.tar", tmp_path / "u-000001.tar"]


def test_classes_round_trip_and_errors(tmp_path):
    shards.write_classes(tmp_path, ["a", "b"])
    assert shards.read_classes(tmp_path) == ["a", "b"]
    with pytest.raises(FileNotFoundError, match="classes.json"):
        shards.read_classes(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        shards.read_index(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no index.json and no .tar"):
        shards.read_index(tmp_path / "empty")


def test_members_carry_whole_second_times_without_pax_headers(tmp_path):
    """A float mtime made tarfile write a pax header before every member: twice the headers to parse."""
    import tarfile

    from slade_dist.data.shards import write_shard

    write_shard(tmp_path / "a-000000.tar", [{"__key__": "k", "jpg": b"x", "cls": b"1"}], mtime=0.0)
    write_shard(tmp_path / "b-000000.tar", [{"__key__": "k", "jpg": b"x"}])
    for name in ("a-000000.tar", "b-000000.tar"):
        with tarfile.open(tmp_path / name) as tf:
            members = tf.getmembers()
            assert all(not m.pax_headers and isinstance(m.mtime, int) for m in members), name
    with tarfile.open(tmp_path / "a-000000.tar") as tf:
        assert [m.mtime for m in tf.getmembers()] == [0, 0]
