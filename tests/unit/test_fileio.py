"""slade_dist/fileio.py: atomic_path and atomic small-file writes, set_aside, clear errors on real full and
read-only filesystems."""

import json
import multiprocessing
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from slade_dist.fileio import (
    DirInUse,
    DirLock,
    WriteFailed,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    set_aside,
)


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


def test_atomic_path_renames_a_whole_binary_file_into_place_or_nothing(tmp_path):
    target = tmp_path / "emb" / "emb-000003.npy"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".") and tmp.suffix == ".npy"
        np.save(tmp, np.arange(3))  # numpy appends .npy to a name without it: the temp keeps it
    assert np.load(target).tolist() == [0, 1, 2]
    with pytest.raises(RuntimeError, match="killed"), atomic_path(target) as tmp:
        np.save(tmp, np.arange(5))
        raise RuntimeError("killed mid-write")
    assert np.load(target).tolist() == [0, 1, 2] and [f.name for f in target.parent.iterdir()] == [target.name]
    with atomic_path(tmp_path / "pl-000003.npz") as tmp:
        np.savez(tmp, cls=np.zeros(2, np.int32))
    with atomic_path(tmp_path / "shard-000000.tar") as tmp:
        assert not tmp.name.endswith(".tar")  # a leftover of a killed writer is no *.tar a scan would take
        tmp.write_bytes(b"x")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["emb", "pl-000003.npz", "shard-000000.tar"]


@pytest.fixture
def small_fs(tmp_path):
    """A real 64 KiB tmpfs (root mounts it; the suite runs as root here and in CI)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_is_a_clear_error_naming_the_path(small_fs):
    with pytest.raises(WriteFailed, match=r"cannot write .*big\.txt: the disk is full \(.*GiB free"):
        atomic_write_text(small_fs / "big.txt", "x" * 200_000)
    assert list(small_fs.iterdir()) == []  # no temp file left behind
    with (
        pytest.raises(WriteFailed, match=r"cannot write .*big\.npy: the disk is full"),
        atomic_path(small_fs / "big.npy") as tmp,
    ):
        np.save(tmp, np.zeros(50_000))
    assert list(small_fs.iterdir()) == []


def test_read_only_filesystem_is_a_clear_error(small_fs):
    atomic_write_text(small_fs / "a.txt", "old")
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    with pytest.raises(WriteFailed, match=r"cannot write .*DONE\.json: the filesystem is read-only"):
        atomic_write_json(small_fs / "x" / "DONE.json", {"a": 1})
    with pytest.raises(WriteFailed, match="read-only"):
        set_aside(small_fs / "a.txt", "stale")
    assert (small_fs / "a.txt").read_text() == "old"


def test_set_aside_never_deletes(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "x").write_text("1")
    first = set_aside(d, "stale-abc")
    d.mkdir()
    second = set_aside(d, "stale-abc")
    assert first != second and (first / "x").read_text() == "1" and second.is_dir() and not d.exists()
    assert set_aside(tmp_path / "none", "x") is None


def _hold_lock(directory, started):
    DirLock(directory).acquire()
    started.set()
    time.sleep(60)


def test_dir_lock_refuses_a_second_holder_and_reports_a_stale_one(tmp_path):
    ctx = multiprocessing.get_context("fork")
    started = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(tmp_path, started))
    holder.start()
    try:
        assert started.wait(30)
        with pytest.raises(DirInUse, match=rf"run directory {tmp_path} is in use by pid {holder.pid} on "):
            DirLock(tmp_path).acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # killed: its flock goes, its note stays
        holder.join()
    lock = DirLock(tmp_path).acquire()
    assert f"pid {holder.pid}" in lock.stale
    lock.release()
    again = DirLock(tmp_path).acquire()  # released cleanly: nothing stale
    assert again.stale == ""
    again.release()
