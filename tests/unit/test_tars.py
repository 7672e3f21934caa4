"""One tar as a sample stream (slade_dist/data/tars.py): key grouping by webdataset's rule, members by
extension, a truncated tar ends early with `truncated` set, the same samples for every reader of a
tar cut anywhere (tests/_hazards.cut_points), and the member readers' fallbacks."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from slade_dist.data.shards import write_shard
from slade_dist.data.tars import TarSamples, image_bytes, parse_sample, sample_cls, sample_meta
from slade_dist.data.transforms import CorruptImage
from tests import _hazards as H


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


# ------------------------------------------------------------------ truncation: one reader for all
def _photo_shard(path, n=9):
    rows = [{"__key__": f"{i:08d}", "jpg": H.photo_jpeg(i), "json": json.dumps({"i": i}).encode()} for i in range(n)]
    write_shard(path, rows)
    return [r["__key__"] for r in rows]


@pytest.mark.parametrize(
    "cut, keeps", [("inside_header", 4), ("inside_image", 4), ("member_boundary", 4), ("between_samples", 4)]
)
def test_a_cut_drops_the_sample_in_progress_and_keeps_every_complete_one(tmp_path, cut, keeps):
    """Case 2: the stages' tar reader used to drop the complete sample before a cut inside an image
    (no header of the next key was yielded yet), while the member index kept it. Now a sample is
    complete once a header of another key was read; the sample in progress at a cut is dropped,
    even when the cut falls on a member boundary (no member list says it was whole)."""
    keys = _photo_shard(tmp_path / "a-000000.tar")
    at = H.cut_points(tmp_path / "a-000000.tar")[cut]
    cut_tar = tmp_path / "cut-000000.tar"
    cut_tar.write_bytes((tmp_path / "a-000000.tar").read_bytes()[:at])
    tar = TarSamples(cut_tar)
    got = [s["__key__"] for s in tar]
    assert got == keys[:keeps] and tar.truncated and tar.error


def test_a_cut_inside_the_end_blocks_loses_nothing(tmp_path):
    keys = _photo_shard(tmp_path / "a-000000.tar")
    at = H.cut_points(tmp_path / "a-000000.tar")["inside_end_blocks"]
    (tmp_path / "cut-000000.tar").write_bytes((tmp_path / "a-000000.tar").read_bytes()[:at])
    tar = TarSamples(tmp_path / "cut-000000.tar")
    assert [s["__key__"] for s in tar] == keys and not tar.truncated


@pytest.mark.parametrize("cut", ["inside_header", "inside_image", "member_boundary", "between_samples"])
def test_every_reader_of_a_cut_tar_sees_the_same_samples(tmp_path, cut):
    """The member index's scan, the finite stream, index rebuilds, the img2dataset validator and a
    byte-range read all go through TarSamples: one answer for which samples a cut tar holds."""
    from slade_dist.data import pseudo_index, readers, writers
    from slade_dist.data.shards import count_tar_samples

    _photo_shard(tmp_path / "a-000000.tar")
    at = H.cut_points(tmp_path / "a-000000.tar")[cut]
    cut_tar = tmp_path / "cut-000000.tar"
    cut_tar.write_bytes((tmp_path / "a-000000.tar").read_bytes()[:at])
    samples = list(TarSamples(cut_tar))
    keys = [s["__key__"] for s in samples]
    scanned, truncated = pseudo_index._scan_tar(cut_tar)
    assert [s["__key__"] for s in scanned] == keys and truncated
    assert [k for k, *_ in readers.iter_shard(cut_tar)] == keys
    assert count_tar_samples(cut_tar) == len(keys)
    report = writers.validate_tar(str(cut_tar))
    assert report["count"] == len(keys) and report["truncated"] and report["corrupt"] == 0
    data = cut_tar.read_bytes()
    for s in samples:
        start, end = s["__span__"]
        assert parse_sample(data[start:end], base=start) == s
    assert parse_sample(data[samples[0]["__span__"][0] : samples[0]["__span__"][1] - 512]) == {}  # not whole


def test_directories_and_webdataset_meta_members_are_skipped(tmp_path):
    path = tmp_path / "m-000000.tar"
    with tarfile.open(path, "w") as tf:
        for name, data in (("__meta__", b"{}"), ("d", None), ("d/k1.jpg", b"x"), ("d/k1.cls", b"1"), ("k2.jpg", b"y")):
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    got = list(TarSamples(path))
    assert [s["__key__"] for s in got] == ["d/k1", "k2"] and got[0]["cls"] == b"1"


def test_a_key_met_twice_is_left_out_and_counted(tmp_path):
    """Concatenated or hand-made tars can repeat a key: every stage writes one row per key (embed
    used to stop on "keys (n distinct)"), so the reader leaves the repeat out and says how many."""
    from slade_dist.data import readers, writers

    rows = [{"__key__": k, "jpg": H.photo_jpeg(i)} for i, k in enumerate(["a", "b", "a", "c"])]
    write_shard(tmp_path / "d-000000.tar", rows)
    tar = TarSamples(tmp_path / "d-000000.tar")
    assert [s["__key__"] for s in tar] == ["a", "b", "c"] and tar.duplicates == 1
    it = readers.iter_shard(tmp_path / "d-000000.tar")
    assert [k for k, *_ in it] == ["a", "b", "c"] and it.corrupt == 1
    report = writers.validate_tar(str(tmp_path / "d-000000.tar"))
    assert report["count"] == 3 and report["corrupt"] == 1 and "repeat the key" in report["rejects"][0]["reason"]
