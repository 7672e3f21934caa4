"""Compiles and loads the package's C kernels at first use (`kernels()`: slade_dist/eval/_kernels.c).

Owns building `slade_dist/eval/_<name>.c` into a shared library with the machine's C compiler
(`$CC`, else cc/gcc; `-O3 -march=native`), caching it, and loading it with ctypes. Callers get None
(with one warning) when it cannot be had, and then use their portable numba path: no compiler,
a CPU without the instructions the kernel needs (the C file's #error), a non-writable cache.
Tests: tests/unit/test_native.py (compile, cache reuse, a failing compiler, the opt-out).

Why compile here, not at install: the kernels are tuned with -march=native, so the library must
be built on (a CPU like) the one that runs it; a shared cache key includes the CPU's model and
flags, so nodes of different kinds on one shared home directory each get their own build.
Cache: $SLADE_DIST_CACHE, else $XDG_CACHE_HOME/slade_dist, else ~/.cache/slade_dist; the build is
written to a temporary name and renamed, so processes compiling at once never load a partial file.
Opt out: SLADE_DIST_NATIVE=0.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

__all__ = ["load", "kernels", "pack_rows", "usable_cpus", "cache_dir"]

log = logging.getLogger(__name__)
FLAGS = ["-O3", "-march=native", "-std=c11", "-fPIC", "-shared"]
_HERE = Path(__file__).resolve().parent
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a Slurm allocation): the kernels' threads."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def cache_dir() -> Path:
    if os.environ.get("SLADE_DIST_CACHE"):
        return Path(os.environ["SLADE_DIST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "slade_dist"


def _compiler() -> list[str] | None:
    """$CC (may carry flags, e.g. "gcc -m64"), else the first of cc, gcc, clang on PATH."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return [found] if found else None


def _cpu_key() -> str:
    """The CPU's model and feature flags (Linux), else the platform: part of the cache key."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return platform.processor() + platform.machine()


def _build(name: str) -> Path:
    """The cached library for _<name>.c, compiled first when missing. Raises on any failure."""
    src = _HERE / f"_{name}.c"
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60)
    key = hashlib.sha256("\0".join([src.read_text(), " ".join(cc), version.stdout, " ".join(FLAGS), _cpu_key()])
                         .encode()).hexdigest()[:16]
    out = cache_dir() / "native" / f"{name}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([*cc, *FLAGS, str(src), "-o", tmp], capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            detail = (res.stderr or res.stdout).strip()[-800:] or f"exit status {res.returncode}"
            raise RuntimeError(f"{' '.join(cc)} failed on {src.name}: {detail}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("compiled %s into %s", src.name, out)
    return out


def load(name: str) -> ctypes.CDLL | None:
    """The compiled kernel library `name` (cached per process), or None when unavailable."""
    with _lock:
        if name in _loaded:
            return _loaded[name]
        lib = None
        if os.environ.get("SLADE_DIST_NATIVE", "1") not in ("0", "false", "no", "off"):
            try:
                lib = ctypes.CDLL(str(_build(name)))
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                log.warning("native kernel %r unavailable, using the slower portable path: %s", name, err)
        _loaded[name] = lib
        return lib


def forget() -> None:
    """Drop the per-process memo (tests: re-read the environment on the next load)."""
    with _lock:
        _loaded.clear()


def kernels() -> ctypes.CDLL | None:
    """_kernels.c with its C signatures declared (the kNN filter and thresholds, the k-means top-2),
    or None."""
    lib = load("kernels")
    if lib is not None and not hasattr(lib, "mr"):  # declared once per process
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.pack_rows.argtypes = [p, i64, i64, i64, p]
        lib.pack_rows.restype = None
        lib.simfilter_tile.argtypes = [p, p, i64, i64, i64, p, p, ctypes.c_int,
                                       p, p, p, i64, i64, p, p, p, i64, i64, p]
        lib.simfilter_tile.restype = ctypes.c_int
        lib.min2_tile.argtypes = [p, p, i64, i64, i64, p, i64, p, p, p, p]
        lib.min2_tile.restype = None
        lib.topj_tile.argtypes = [p, p, i64, i64, i64, i64, p]
        lib.topj_tile.restype = None
        lib.mr, lib.nr = lib.kernel_mr(), lib.kernel_nr()  # last: marks it declared; pack rows with mr, columns with nr
    return lib


def pack_rows(lib: ctypes.CDLL, x, mr: int):
    """x (n x d float32, C-contiguous) in the kernels' sliver layout of mr rows (see _kernels.c)."""
    import numpy as np

    n, d = x.shape
    out = np.empty(-(-n // mr) * mr * d, np.float32)
    lib.pack_rows(x.ctypes.data, n, d, mr, out.ctypes.data)
    return out
