"""The images the pool is decontaminated against: every test set the config names.

Owns `test_set_dirs` / `required_test_sets` (data.test_shards, data.query_shards,
data.gallery_shards: each one set counts; none is a ConfigError), `TestImages` (their readable
images' signatures, concatenated set by set, shard by shard, in tar order; the first row of each
byte digest) and `load_test_images` (each rank signs its share of the tars, every rank gets all;
not one readable image is `NoTestImages`, a one-line user error).
Tests: tests/unit/test_curate.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ... import dist
from ...config import Config, ConfigError
from ...data.shards import shard_paths
from ...errors import UnusableInput
from .search import cut, shard_signatures, unit_rows

TEST_SETS = ("test", "query", "gallery")  # data.<name>_shards, in this order


class NoTestImages(UnusableInput):
    """The test sets named hold no readable image: nothing to decontaminate against."""


def test_set_dirs(cfg: Config) -> dict[str, str]:
    """{set name: shard dir} of every test set the config names (each one is checked against)."""
    return {name: getattr(cfg.data, f"{name}_shards") for name in TEST_SETS if getattr(cfg.data, f"{name}_shards")}


def required_test_sets(cfg: Config) -> dict[str, str]:
    sets = test_set_dirs(cfg)
    if not sets:
        raise ConfigError(
            "curate: no test set to decontaminate against: set data.test_shards (or data.query_shards / "
            "data.gallery_shards), or curate.enabled=false"
        )
    return sets


@dataclass
class TestImages:
    """The readable images of every test set, one row each (rows index every field below)."""

    __test__ = False  # a data class, not a pytest test class
    names: list[str]  # test set names
    set_of: np.ndarray  # (T,) index into names
    shards: list[Path]  # the test sets' tars
    shard_of: np.ndarray  # (T,) index into shards (keys repeat across sets: query and gallery)
    keys: list[str]
    sig: dict[str, np.ndarray]  # readable test images' signatures, sets concatenated (shard, tar order)
    digest_row: dict[bytes, int]  # image digest -> first test row with those bytes
    byte_twin: np.ndarray  # (T,) the first row with the same bytes (the row itself if none)
    unreadable: int

    @property
    def hist(self) -> np.ndarray:
        return unit_rows(self.sig["hist"])

    def thumb(self, row: int) -> np.ndarray:
        return cut(self.sig["thumb"][row], self.sig["shape"][row])


def load_test_images(sets: dict[str, str]) -> TestImages:
    """Each rank signs its share of the test sets' shards; every rank gets all of them."""
    jobs = [(s, p) for s, d in enumerate(sets.values()) for p in shard_paths(d)]
    if not jobs:
        raise _no_test_images(sets)
    mine = {i: shard_signatures(p) for i, (_, p) in list(enumerate(jobs))[dist.rank() :: dist.world_size()]}
    parts: dict[int, dict[str, np.ndarray]] = {}
    for part in dist.all_gather_object(mine):
        parts.update(part)
    sigs = [parts[i] for i in range(len(jobs))]
    ok = [s["readable"] for s in sigs]
    sig = {k: np.concatenate([s[k][m] for s, m in zip(sigs, ok)]) for k in ("keys", "digest", "hist", "thumb", "shape")}
    set_of = np.concatenate([np.full(int(m.sum()), s, np.int64) for (s, _), m in zip(jobs, ok)])
    shard_of = np.concatenate([np.full(int(m.sum()), i, np.int64) for i, m in enumerate(ok)])
    keys = [str(k) for k in sig["keys"]]
    if not keys:
        raise _no_test_images(sets)
    digest_row: dict[bytes, int] = {}
    twin = np.arange(len(keys))
    for row, d in enumerate(sig["digest"]):
        twin[row] = digest_row.setdefault(d.tobytes(), row)
    unreadable = int(sum((~m).sum() for m in ok))
    shards = [p for _, p in jobs]
    return TestImages(list(sets), set_of, shards, shard_of, keys, sig, digest_row, twin, unreadable)


def _no_test_images(sets: dict[str, str]) -> NoTestImages:
    return NoTestImages(
        f"curate: the test sets ({', '.join(f'{n}: {d}' for n, d in sets.items())}) hold no readable image: "
        f"nothing to decontaminate against; point data.test_shards (or query / gallery) at the evaluation "
        f"images, or set curate.enabled=false"
    )
