"""Fixtures shared by the unit tests."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as tdist


@pytest.fixture
def one_thread_no_leftover_group():
    """One thread (tiny models: more threads only contend on 2 shared cores); and the engine
    gives a plain process a world-1 group, which other tests must not inherit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if tdist.is_initialized():
        tdist.destroy_process_group()


@pytest.fixture(params=["native", "portable"])
def kernel_path(request, monkeypatch):
    """Runs a test on both evaluation paths: the compiled kernels (slade_dist/eval/_kernels.c) and
    the portable numba/numpy code used where they cannot be built."""
    import shutil

    from slade_dist.eval import native

    monkeypatch.setenv("SLADE_DIST_NATIVE", "1" if request.param == "native" else "0")
    native.forget()
    if request.param == "native" and native.kernels() is None:
        if shutil.which("cc") or shutil.which("gcc"):
            pytest.fail("a C compiler is present but the kernels did not build (see the warning)")
        pytest.skip("no C compiler: only the portable path can run here")
    yield request.param
    native.forget()
