"""Files written safely: `atomic_path` (temp file + rename) for every file the project writes whole,
`atomic_write_text` / `atomic_write_json` on top of it, `set_aside` (old work renamed, never
deleted), `DirLock` (the run directory's lock, a stale one of a killed run detected and taken over)
and `WriteFailed`, the one clear error of every writer for a read-only or full filesystem.
Tests: tests/unit/test_fileio.py.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UserError

_CAUSES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


class WriteFailed(OSError, UserError):
    """Writing `path` failed for a reason the user must fix (disk full, read-only, permissions)."""


def _free_space(path: Path) -> str:
    for p in (path, *path.parents):
        with contextlib.suppress(OSError):
            return f"{shutil.disk_usage(p).free / 2**30:.2f} GiB free on {p}"
    return "free space unknown"


# below this much free space a failed write is taken for a full disk
_NEARLY_FULL = 16 << 20


def _filesystem_trouble(path: Path) -> str | None:
    """Why writing under `path` fails, as the filesystem itself tells (torch's C++ writer hides errno)."""
    for p in (path, *path.parents):
        try:
            st = os.statvfs(p)
        except OSError:
            continue
        if st.f_flag & os.ST_RDONLY:
            return _CAUSES[errno.EROFS]
        if st.f_bavail * st.f_frsize < _NEARLY_FULL:
            return _CAUSES[errno.ENOSPC]
        return None
    return None


def write_failed(path: str | os.PathLike[str], error: BaseException) -> WriteFailed:
    """The clear error for a failed write of `path` (call sites raise it `from error`)."""
    path = Path(path)
    code = getattr(error, "errno", None)
    cause = _CAUSES.get(code) if code is not None else None
    cause = cause or _filesystem_trouble(path.parent) or f"{type(error).__name__}: {error}"
    return WriteFailed(
        code or errno.EIO,
        f"cannot write {path}: {cause} ({_free_space(path.parent)}); free space or choose another run.dir",
    )


@contextlib.contextmanager
def explained_writes(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn an OSError while writing `path`, or a RuntimeError of torch's writer on a full or
    read-only filesystem, into WriteFailed; any other error passes unchanged."""
    try:
        yield
    except WriteFailed:
        raise
    except OSError as e:
        raise write_failed(path, e) from e
    except RuntimeError as e:
        if _filesystem_trouble(Path(path).parent) is None:
            raise
        raise write_failed(path, e) from e


# numpy's savers append .npy / .npz to a file name that lacks it: their temp names must keep it
_NUMPY_SUFFIXES = (".npy", ".npz")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside `path` to write to; on success it is renamed onto `path` (readers
    see the old file or the whole new one, never half of it), on failure it is removed. The
    parent directory is created, and a failed write is a WriteFailed naming `path`.

    Temp name: `.<name>.tmp<pid>`, hidden (no `*.tar`, `emb-*` or `pl-*.npz` scan ever takes a
    leftover of a killed writer for a finished file) and per process (concurrent writers of one
    file never clash), plus the target's suffix for numpy files."""
    path = Path(path)
    suffix = path.suffix if path.suffix in _NUMPY_SUFFIXES else ""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")
    with explained_writes(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield tmp
            tmp.replace(path)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write text to path atomically (atomic_path)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike[str], body: Any, indent: int | None = 1) -> Path:
    return atomic_write_text(path, json.dumps(body, indent=indent, default=str))


def set_aside(path: Path, why: str) -> Path | None:
    """Rename `path` to `<path>.<why>-<time>` (rank 0): old work is never resumed, never deleted."""
    if not path.exists():
        return None
    dest = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while dest.exists():
        dest = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    with explained_writes(dest):
        path.rename(dest)
    return dest


class DirInUse(RuntimeError, UserError):
    """Another live process holds the directory's lock."""


class DirLock:
    """Exclusive, non-blocking flock on `<dir>/.lock`, holding who took it (pid, host, time).

    The kernel drops a flock when its process dies, so a lock file whose content survives while no
    process holds it is a stale lock of a killed run: `stale` then describes that holder.
    """

    def __init__(self, directory: str | os.PathLike[str], what: str = "run directory"):
        self.path = Path(directory) / ".lock"
        self.what = what
        self.stale = ""
        self._fd: int | None = None

    def acquire(self) -> DirLock:
        with explained_writes(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise DirInUse(
                f"{self.what} {self.path.parent} is in use by {holder}: a second run there would "
                f"write beside it. Wait for it to finish, cancel it, or use another run.dir"
            ) from None
        self.stale = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        me = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # an empty file is a released lock, not a stale one
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
