"""Rank 0's progress for every long pass: `progress` (a bar over counted work) and `steps` (progress
over slow steps such as Lloyd iterations), drawn on rank 0's terminal only; in a job log `steps`
logs a plain line "[desc] i/n" instead. Imports only dist and tqdm: a bar costs no TensorBoard or
torchvision import. Tests: tests/unit/test_progress.py (a real pseudo-terminal and a job log).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

from . import dist

T = TypeVar("T")


def _terminal() -> bool:
    """A bar only on rank 0's terminal: in a job log each redraw would pile up on one line."""
    return dist.is_main() and sys.stderr.isatty()


def progress(total: int | None, desc: str, unit: str = "it", *, enabled: bool = True, **tqdm_kw: Any) -> tqdm:
    """Rank 0's bar over counted work (update(n) as it goes); disabled off a terminal or when not
    `enabled`. tqdm_kw: more tqdm options (initial=, unit_scale=, leave=)."""
    tqdm_kw.setdefault("leave", False)
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=not (enabled and _terminal()), **tqdm_kw)


def steps(items: Iterable[T], desc: str, *, log_every_s: float = 10.0) -> Iterator[T]:
    """`items`, with rank 0's progress moved after each one (a slow step: a Lloyd iteration): a bar
    redrawn at every step on a terminal; in a job log a line "[desc] i/n" at most every
    log_every_s seconds, and after the last step."""
    total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    if not dist.is_main():
        yield from items
    elif _terminal():
        # mininterval=0, miniters=1: each step is slow, so every one is worth a redraw
        with progress(total, desc, mininterval=0, miniters=1) as bar:
            for x in items:
                yield x
                bar.update(1)
    else:
        yield from _logged_steps(items, desc, total, log_every_s)


def _logged_steps(items: Iterable[T], desc: str, total: int | None, every_s: float) -> Iterator[T]:
    log, last = dist.get_logger(), -math.inf
    for i, x in enumerate(items, 1):
        yield x
        now = time.monotonic()
        if i == total or now - last >= every_s:
            log.info(f"[{desc}] {i}/{total if total is not None else '?'}")
            last = now
