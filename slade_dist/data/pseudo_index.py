"""The cluster -> members index the cluster stage writes beside `pl-%06d.npz`, which the student
reads instead of label files (`clusters.json`, `clusters.npz`, `members-%05d.npy`: docs/SCALING.md
"The member index"): the pieces the cluster stage runs across its ranks (`index_rows`,
`summarise_clusters`, `write_member_file`, `write_summary`; slade_dist/pseudo/cluster.py),
`build_index` (the same files in one process: tools and tests) and the read side (`ClusterIndex`,
`TarReader`). Tests: tests/unit/test_pseudo_index.py, tests/unit/test_cluster.py,
tests/integration/test_pseudo_multirank.py.
"""

from __future__ import annotations

import json
import os
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import atomic_path, atomic_write_json
from .pseudo_join import cluster_percentile, zip_pseudo_labels
from .pseudo_labels import PseudoLabelMismatch, pseudo_label_path, read_meta, read_pseudo_labels
from .shards import read_index, shard_paths
from .tars import TarSamples, image_bytes, parse_sample
from .transforms import DEFAULT_LIMITS, CorruptImage, ImageLimits, decode

__all__ = [
    "ENTRY",
    "ROW",
    "SUMMARY_FILE",
    "ARRAYS_FILE",
    "index_rows",
    "owner_bounds",
    "summarise_clusters",
    "write_member_file",
    "write_summary",
    "clear_index",
    "TarReader",
    "ClusterIndex",
    "build_index",
]

FORMAT = 1
SUMMARY_FILE = "clusters.json"
ARRAYS_FILE = "clusters.npz"
MEMBERS_GLOB = "members-*.npy"
# what the student needs of a member (20 B); ROW adds the label row's cluster and distance (28 B)
ENTRY = np.dtype([("shard", "<i4"), ("length", "<i4"), ("offset", "<i8"), ("crc", "<u4")])
ROW = np.dtype(
    [("cls", "<i4"), ("dist", "<f4"), ("shard", "<i4"), ("length", "<i4"), ("offset", "<i8"), ("crc", "<u4")]
)
OPEN_TARS = 32  # open tar files kept per reader (a batch touches up to P x K shards)


def members_file(i: int) -> str:
    return f"members-{i:05d}.npy"


def key_crc(key: str) -> int:
    return zlib.crc32(key.encode("utf-8"))


# ------------------------------------------------------------------------------- tar scanning
def _scan_tar(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """Samples of one tar in order, as {"__key__", "__span__"} (member data seeked over), and whether
    it ended early (tars.TarSamples: a truncated tar holds the same samples as in the embed stage)."""
    if not path.is_file():
        raise FileNotFoundError(f"image shard {path} is missing")
    tar = TarSamples(path, read_data=False)
    return list(tar), tar.truncated


def index_rows(
    tar: str | os.PathLike[str],
    shard_pos: int,
    keys: Sequence[str],
    cls: np.ndarray,
    dist: np.ndarray,
    pl_name: str,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> tuple[np.ndarray, int]:
    """ROW of every label row whose sample is in the tar (label order), and how many rows a
    truncated tar lost. A label key out of the tar's order or missing from an intact tar, or an
    image inside the decoder contract (`limits`: the embed stage's data.max_image_pixels /
    max_aspect_ratio) without a label row, raises PseudoLabelMismatch naming both files."""
    tar = Path(tar)
    scanned, truncated = _scan_tar(tar)
    reader = TarReader([tar])

    def must_be_corrupt(s: dict[str, Any]) -> None:  # the embed stage leaves out corrupt images only
        offset, end = s["__span__"]
        try:
            decode(image_bytes(reader.read_range(0, offset, end - offset)), limits)
        except CorruptImage:
            return
        raise PseudoLabelMismatch(
            f"pseudo-label file {pl_name} does not cover image shard {tar}: sample {s['__key__']!r} decodes but "
            f"has no label row (partial or stale labels; re-run the cluster stage)"
        )

    rows = []
    try:
        for s, c, d in zip_pseudo_labels(
            scanned, keys, cls, dist, str(tar), pl_name, ended_early=lambda: truncated, on_unlabeled=must_be_corrupt
        ):
            offset, end = s["__span__"]
            rows.append((c, d, shard_pos, end - offset, offset, key_crc(s["__key__"])))
    finally:
        reader.close()
    return np.array(rows, dtype=ROW), len(keys) - len(rows)


# ------------------------------------------------------------------------------- owner's part
def owner_bounds(k: int, world: int) -> np.ndarray:
    """Rank r owns clusters [bounds[r], bounds[r+1]): contiguous, near-equal ranges."""
    return (np.arange(world + 1, dtype=np.int64) * k) // world


def summarise_clusters(
    rows: np.ndarray, first: int, end: int, percentile: float, min_cluster_size: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Rows of clusters [first, end) sorted by (cluster, dist, tar, offset), and per cluster: sizes,
    thresholds (pseudo_join.cluster_thresholds' rule, on every distance) and kept counts."""
    if len(rows) and (rows["cls"].min() < first or rows["cls"].max() >= end):
        raise ValueError(f"cluster ids outside [{first}, {end}) in the rows to summarise (labels of another k?)")
    rows = rows[np.lexsort((rows["offset"], rows["shard"], rows["dist"], rows["cls"]))]
    sizes = np.bincount(rows["cls"] - first, minlength=end - first).astype(np.int64)
    # keep iff dist <= thr: -inf drops a cluster under the minimum size, +inf keeps all (percentile 100)
    thr = np.where(sizes >= min_cluster_size, np.inf, -np.inf)
    kept = np.where(sizes >= min_cluster_size, sizes, 0)
    if percentile < 100.0:
        starts = np.concatenate([[0], np.cumsum(sizes)])
        for c in np.flatnonzero(sizes >= min_cluster_size):
            d = rows["dist"][starts[c] : starts[c + 1]]
            thr[c] = cluster_percentile(d, percentile)
            kept[c] = np.searchsorted(d, thr[c], side="right")  # d is sorted: the kept are a prefix
    return rows, {"sizes": sizes, "thresholds": thr, "kept": kept.astype(np.int64)}


def write_member_file(out_dir: Path, part: int, rows: np.ndarray) -> Path:
    """ENTRY fields of sorted ROWs, atomically (temp + rename)."""
    entries = np.empty(len(rows), dtype=ENTRY)
    for name in ENTRY.names:
        entries[name] = rows[name]
    path = out_dir / members_file(part)
    with atomic_path(path) as tmp:
        np.save(tmp, entries)
    return path


def write_summary(
    out_dir: Path,
    parts: Sequence[dict[str, np.ndarray]],
    bounds: np.ndarray,
    shard_names: Sequence[str],
    percentile: float,
    min_cluster_size: int,
    lost: int,
) -> dict[str, Any]:
    """clusters.npz from every owner's per-cluster arrays, then clusters.json (the completion mark)."""
    arrays = {key: np.concatenate([p[key] for p in parts]) for key in ("sizes", "thresholds", "kept")}
    arrays["indptr"] = np.concatenate([[0], np.cumsum(arrays["sizes"])]).astype(np.int64)
    with atomic_path(out_dir / ARRAYS_FILE) as tmp:
        np.savez(tmp, **arrays)
    summary = {
        "format": FORMAT,
        "k": int(len(arrays["sizes"])),
        "n": int(arrays["indptr"][-1]),
        "pseudo_max_dist_percentile": float(percentile),
        "pseudo_min_cluster_size": int(min_cluster_size),
        "kept_clusters": int((arrays["kept"] > 0).sum()),
        "kept_images": int(arrays["kept"].sum()),
        "lost_to_truncation": int(lost),
        "members": [
            {"file": members_file(i), "first": int(bounds[i]), "end": int(bounds[i + 1])} for i in range(len(parts))
        ],
        "shards": list(shard_names),
    }
    atomic_write_json(out_dir / SUMMARY_FILE, summary, indent=None)
    return summary


def clear_index(out_dir: Path) -> None:
    """Before a new index is written: the marker first, so a half-written index never looks done."""
    (out_dir / SUMMARY_FILE).unlink(missing_ok=True)
    (out_dir / ARRAYS_FILE).unlink(missing_ok=True)
    for p in out_dir.glob(MEMBERS_GLOB):
        p.unlink()


# ---------------------------------------------------------------------------------- read side
class TarReader:
    """Samples read by byte range from a fixed list of tars (a few kept open, least recently used
    closed first), parsed by tars.parse_sample into {"__key__", ext: bytes}."""

    def __init__(self, tars: Sequence[Path], max_open: int = OPEN_TARS) -> None:
        self.tars, self.max_open = list(tars), max_open
        self._open: OrderedDict[int, Any] = OrderedDict()
        self.reads = 0  # samples read so far (what bench/scale.py reports per batch)

    def _file(self, i: int) -> Any:
        f = self._open.pop(i, None)
        if f is None:
            f = open(self.tars[i], "rb")  # noqa: SIM115 (kept open across reads, closed in close())
            while len(self._open) >= self.max_open:
                self._open.popitem(last=False)[1].close()
        self._open[i] = f
        return f

    def read_range(self, i: int, offset: int, length: int) -> dict[str, Any]:
        """The sample at [offset, offset + length) of tar i, parsed by tars.parse_sample (the
        rules of every tar read); {} when those bytes are not one whole sample (a tar cut or
        rewritten since it was indexed): no image, so the batch counts it as corrupt."""
        f = self._file(i)
        self.reads += 1
        f.seek(offset)
        return parse_sample(f.read(length), base=offset)

    def read(self, entry: np.void) -> dict[str, Any]:
        s = self.read_range(int(entry["shard"]), int(entry["offset"]), int(entry["length"]))
        if s and key_crc(s["__key__"]) != int(entry["crc"]):
            raise PseudoLabelMismatch(
                f"{self.tars[int(entry['shard'])]} at byte {int(entry['offset'])} holds sample {s['__key__']!r}, not "
                f"the one the cluster index lists (the shard changed after clustering; re-run the cluster stage)"
            )
        return s

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()


class ClusterIndex:
    """The cluster stage's index of one pseudo-label dir; members files are memory-mapped on first use."""

    def __init__(self, pseudo_dir: Path, summary: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.dir, self.summary = pseudo_dir, summary
        self.sizes, self.thresholds = arrays["sizes"], arrays["thresholds"]
        self.kept, self.indptr = arrays["kept"], arrays["indptr"]
        self.firsts = np.array([m["first"] for m in summary["members"]], dtype=np.int64)
        self._maps: dict[int, np.ndarray] = {}
        self._weights: tuple[int, np.ndarray, np.ndarray] | None = None

    @classmethod
    def open(cls, pseudo_dir: str | os.PathLike[str], percentile: float, min_cluster_size: int) -> ClusterIndex:
        """The index, checked to be complete and built with these filters (else a clear error)."""
        d = Path(pseudo_dir)
        try:
            summary = json.loads((d / SUMMARY_FILE).read_text())
            with np.load(d / ARRAYS_FILE, allow_pickle=False) as z:
                arrays = {key: z[key] for key in ("sizes", "thresholds", "kept", "indptr")}
        except (FileNotFoundError, json.JSONDecodeError, KeyError, ValueError) as e:
            raise FileNotFoundError(
                f"{d} has no complete cluster index ({SUMMARY_FILE} + {ARRAYS_FILE} + {MEMBERS_GLOB}: {e}); "
                f"run the cluster stage (it writes them with the pseudo labels)"
            ) from e
        built = (summary.get("pseudo_max_dist_percentile"), summary.get("pseudo_min_cluster_size"))
        if summary.get("format") != FORMAT or built != (float(percentile), int(min_cluster_size)):
            raise ValueError(
                f"the cluster index in {d} was built with data.pseudo_max_dist_percentile={built[0]}, "
                f"data.pseudo_min_cluster_size={built[1]} (format {summary.get('format')}); this run asks for "
                f"{percentile}, {min_cluster_size}: run the cluster stage again with this config"
            )
        return cls(d, summary, arrays)

    def shard_paths(self, unlabeled_dir: str | os.PathLike[str]) -> list[Path]:
        """The indexed tars under unlabeled_dir, where its index.json says they are (no stat: a
        missing one fails when read)."""
        # the index names each shard by its file name; index.json by its path from the shard dir
        # (img2dataset output indexed in place: "../<root>/00001.tar"), so the tar is found through it
        d = Path(unlabeled_dir)
        try:
            listed = {Path(s["name"]).name: s["name"] for s in read_index(d, rebuild=False)["shards"]}
        except FileNotFoundError:
            listed = {}
        return [d / listed.get(name, name) for name in self.summary["shards"]]

    def _members(self, part: int) -> np.ndarray:
        if part not in self._maps:
            self._maps[part] = np.load(self.dir / self.summary["members"][part]["file"], mmap_mode="r")
        return self._maps[part]

    def entries(self, c: int, rows: np.ndarray) -> np.ndarray:
        """ENTRY rows of cluster c at positions `rows` within the cluster."""
        part = int(np.searchsorted(self.firsts, c, side="right") - 1)
        base = self.indptr[self.firsts[part]]
        return self._members(part)[self.indptr[c] - base + rows]

    def drawable(self, K: int) -> np.ndarray:
        """Clusters a P x K batch can draw: >= K kept members (K distinct images)."""
        return np.flatnonzero(self.kept >= K)

    def check_drawable(self, P: int, K: int) -> None:
        n = len(self.drawable(K))
        if n < P:
            raise ValueError(
                f"the cluster index in {self.dir} has {n} clusters with >= K={K} kept members, fewer than P={P}: "
                f"lower the unlabeled P or K, or loosen data.pseudo_max_dist_percentile / pseudo_min_cluster_size"
            )

    def draw_clusters(self, rng: np.random.Generator, P: int, K: int) -> list[int]:
        """P distinct drawable clusters, each with probability proportional to its kept members
        (each kept image equally likely, as a fully shuffled stream gives)."""
        if self._weights is None or self._weights[0] != K:
            ids = self.drawable(K)
            self._weights = (K, ids, np.cumsum(self.kept[ids], dtype=np.float64))
        _, ids, cum = self._weights
        if len(ids) < P:
            self.check_drawable(P, K)
        chosen: dict[int, None] = {}  # insertion-ordered set: P can be thousands (web.yaml's step)
        while len(chosen) < P:
            for j in np.searchsorted(cum, rng.random(P) * cum[-1], side="right"):
                if len(chosen) < P:
                    chosen.setdefault(int(ids[min(j, len(ids) - 1)]))
        return list(chosen)

    def draw_members(self, rng: np.random.Generator, c: int, K: int) -> np.ndarray:
        """K distinct kept members of cluster c (entries for TarReader)."""
        return self.entries(c, np.sort(rng.choice(int(self.kept[c]), K, replace=False)))

    def draw_step_part(
        self, seed: int, step: int, P: int, K: int, part: int, parts: int
    ) -> list[tuple[int, np.ndarray]]:
        """Part `part` of `parts` of one optimizer step's pseudo-labeled batch: the step draws
        P x parts distinct clusters from (seed, step) alone, so every rank and micro-batch of the
        step computes the same global draw and takes its own P. The step's global batch is thus
        the same on any world size x grad_accum, and no two ranks hold one cluster (an independent
        draw per rank would repeat clusters: with one cluster per rank, a step whose ranks drew the
        same one has no negative pair). Members are drawn per slot of the global batch."""
        clusters = self.draw_clusters(np.random.default_rng([seed, step]), P * parts, K)
        first = part * P
        return [
            (c, self.draw_members(np.random.default_rng([seed, step, first + i]), c, K))
            for i, c in enumerate(clusters[first : first + P])
        ]


# ------------------------------------------------------------------------------ one process
def build_index(
    unlabeled_dir: str | os.PathLike[str],
    pseudo_dir: str | os.PathLike[str],
    percentile: float = 100.0,
    min_cluster_size: int = 2,
    k: int | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> dict[str, Any]:
    """The cluster index of hand-written or already existing label files, in one process (the
    cluster stage builds the same files across its ranks). k: meta.json's, else max label + 1."""
    pseudo_dir = Path(pseudo_dir)
    shards = shard_paths(unlabeled_dir)
    clear_index(pseudo_dir)
    parts, lost = [], 0
    for pos, shard in enumerate(shards):
        pl = pseudo_label_path(pseudo_dir, shard)
        keys, cls, dist = read_pseudo_labels(pl)
        rows, n_lost = index_rows(shard, pos, keys, cls, dist, str(pl), limits)
        parts.append(rows)
        lost += n_lost
    rows = np.concatenate(parts) if parts else np.zeros(0, dtype=ROW)
    if k is None:
        k = (
            int(read_meta(pseudo_dir)["k"])
            if (pseudo_dir / "meta.json").exists()
            else int(rows["cls"].max(initial=-1)) + 1
        )
    rows, arrays = summarise_clusters(rows, 0, k, percentile, min_cluster_size)
    write_member_file(pseudo_dir, 0, rows)
    return write_summary(
        pseudo_dir, [arrays], owner_bounds(k, 1), [s.name for s in shards], percentile, min_cluster_size, lost
    )
