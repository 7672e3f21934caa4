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
