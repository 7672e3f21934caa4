"""Which config keys code reads: `ConfigReads(cfg)` records every leaf read of the config's
sections (and of copies of them, e.g. a `dataclasses.replace` of cfg.train) while it is entered.
Used by test_stage_reads.py to hold each stage to its declaration."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

from slade_dist.config import Config


def _sections(obj: Any, prefix: str, out: dict[int, tuple[type, str]]) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out[id(value)] = (type(value), f"{prefix}{f.name}")
            _sections(value, f"{prefix}{f.name}.", out)


class ConfigReads:
    """Records "section.key" for every read of a leaf of `cfg` while entered; `paused()` stops it."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.keys: set[str] = set()
        self.recording = False
        where: dict[int, tuple[type, str]] = {}
        _sections(cfg, "", where)
        self._prefix = {i: p for i, (_, p) in where.items()}
        self._by_class: dict[type, list[str]] = {}
        for cls, p in where.values():
            self._by_class.setdefault(cls, []).append(p)

    def _hook(self, cls: type):
        leaves = {f.name for f in dataclasses.fields(cls)}
        reads = self

        def __getattribute__(obj: Any, name: str) -> Any:
            value = object.__getattribute__(obj, name)
            if reads.recording and name in leaves and not dataclasses.is_dataclass(value):
                # a copy of a section (dataclasses.replace) counts for every place its class sits in
                for prefix in [reads._prefix[id(obj)]] if id(obj) in reads._prefix else reads._by_class[cls]:
                    reads.keys.add(f"{prefix}.{name}")
            return value

        return __getattribute__

    def __enter__(self) -> ConfigReads:
        for cls in self._by_class:
            cls.__getattribute__ = self._hook(cls)
        self._replace = dataclasses.replace
        dataclasses.replace = self._pausing(self._replace)  # a copy reads nothing; reads of the copy count
        self.recording = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.recording = False
        dataclasses.replace = self._replace
        for cls in self._by_class:
            del cls.__getattribute__

    def _pausing(self, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            with self.paused():
                return fn(*args, **kwargs)

        return call

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        was, self.recording = self.recording, False
        try:
            yield
        finally:
            self.recording = was
