"""The cluster -> members index of the pseudo labels: what the student reads instead of label files.

Owns the files the cluster stage writes beside `pl-%06d.npz` (so student start-up reads O(1) small
files, never one per shard):
- `clusters.json`: format, k, n, the filters it was built with (data.pseudo_max_dist_percentile,
  data.pseudo_min_cluster_size), the shard names (entries refer to them by position) and the
  member files with their cluster ranges; written last, so its presence marks a complete index;
- `clusters.npz`: per cluster `sizes` (all members), `thresholds` (keep iff dist <= thr; -inf:
  cluster dropped, smaller than the minimum size; +inf: percentile 100), `kept` (kept members =
  the first kept[c] rows of the cluster, whose rows are sorted by distance) and `indptr` (rows of
  cluster c: indptr[c]:indptr[c+1] of the concatenated member files);
- `members-%05d.npy`: ENTRY rows (tar position, byte offset and length of the whole sample, crc32
  of its key) of clusters [first, end), one file per rank of the cluster stage, memory-mapped by
  the student.
And the pieces around them: `index_rows` (each labelled sample's byte range in its tar; Python's
tarfile reads headers only, seeking over member data; key order and coverage are checked with
pseudo_join.zip_pseudo_labels' rules and messages), `summarise_clusters` (sort, thresholds by
pseudo_join.cluster_percentile, kept counts: for the clusters one process owns), `TarReader`
(one sample read by its byte range and parsed by webdataset's tar iterator, the same key rule as
tars.TarSamples), `ClusterIndex` (the read side; P distinct clusters x K distinct members per draw)
and `build_index` (one process, from the label files: tools and tests; the cluster stage builds
the same files distributed, slade_dist/pseudo/cluster.py).
Tests: tests/unit/test_pseudo_index.py, tests/unit/test_cluster.py, tests/unit/test_readers.py,
tests/integration/test_pseudo_multirank.py.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from ..fileio import atomic_path, atomic_write_json
from .pseudo_join import cluster_percentile, zip_pseudo_labels
from .pseudo_labels import PseudoLabelMismatch, pseudo_label_path, read_meta, read_pseudo_labels
from .shards import shard_paths
from .tars import image_bytes
from .transforms import CorruptImage, decode

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
    """Samples of one tar in order, as {"__key__", "offset", "end"} byte ranges, and whether it
    ended early. Members are grouped by webdataset's key rule; a sample's range runs from its first
    member's header (pax headers included) to its last member's padded data end."""
    size = path.stat().st_size
    out: list[dict[str, Any]] = []
    truncated, last = False, 0
    try:
        with tarfile.open(path, "r:") as tf:
            for ti in tf:
                prefix, _ = base_plus_ext(ti.name)
                if not ti.isreg() or prefix is None:
                    continue
                end = -(-(ti.offset_data + ti.size) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                if out and out[-1]["__key__"] == prefix:
                    out[-1]["end"] = end
                else:
                    out.append({"__key__": prefix, "offset": ti.offset, "end": end})
            last = tf.offset
    except (tarfile.TarError, OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        truncated = True
    while out and out[-1]["end"] > size:  # its data runs past the end of the file: cut off
        out.pop()
        truncated = True
    # tarfile ends quietly at a cut header: a tar without its two end-of-archive blocks was cut
    return out, truncated or last + 2 * tarfile.BLOCKSIZE > size


def index_rows(
    tar: str | os.PathLike[str], shard_pos: int, keys: Sequence[str], cls: np.ndarray, dist: np.ndarray, pl_name: str
) -> tuple[np.ndarray, int]:
    """ROW of every label row whose sample is in the tar (label order), and how many rows a
    truncated tar lost. A label key out of the tar's order or missing from an intact tar, or a
    decodable image without a label row, raises PseudoLabelMismatch naming both files."""
    tar = Path(tar)
    scanned, truncated = _scan_tar(tar)
    reader = TarReader([tar])

    def must_be_corrupt(s: dict[str, Any]) -> None:  # the embed stage leaves out undecodable images only
        try:
            decode(image_bytes(reader.read_range(0, s["offset"], s["end"] - s["offset"])))
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
            rows.append((c, d, shard_pos, s["end"] - s["offset"], s["offset"], key_crc(s["__key__"])))
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
    closed first), parsed by webdataset's tar iterator into {"__key__", ext: bytes}."""

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
        """The sample at [offset, offset + length) of tar i; {} when those bytes are not one (a tar
        cut or rewritten since it was indexed): no image, so the batch counts it as corrupt."""
        f = self._file(i)
        self.reads += 1
        f.seek(offset)
        buf = f.read(length)
        sample: dict[str, Any] = {}
        try:
            for member in tar_file_iterator(io.BytesIO(buf)):
                prefix, suffix = base_plus_ext(member["fname"])
                if prefix is not None:
                    sample["__key__"] = prefix
                    sample[suffix.lower()] = member["data"]
        except (tarfile.TarError, OSError, EOFError, ValueError):
            return {}
        return sample

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
        """The indexed tars by name under unlabeled_dir (no stat: a missing one fails when read)."""
        return [Path(unlabeled_dir) / name for name in self.summary["shards"]]

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

    def draw(self, rng: np.random.Generator, P: int, K: int) -> list[tuple[int, np.ndarray]]:
        """P distinct clusters, each with probability proportional to its kept members (each kept
        image equally likely, as a fully shuffled stream gives), and K distinct kept members of each."""
        if self._weights is None or self._weights[0] != K:
            ids = self.drawable(K)
            self._weights = (K, ids, np.cumsum(self.kept[ids], dtype=np.float64))
        _, ids, cum = self._weights
        if len(ids) < P:
            self.check_drawable(P, K)
        chosen: list[int] = []
        while len(chosen) < P:
            for j in np.searchsorted(cum, rng.random(P) * cum[-1], side="right"):
                c = int(ids[min(j, len(ids) - 1)])
                if c not in chosen and len(chosen) < P:
                    chosen.append(c)
        return [(c, self.entries(c, np.sort(rng.choice(int(self.kept[c]), K, replace=False)))) for c in chosen]


# ------------------------------------------------------------------------------ one process
def build_index(
    unlabeled_dir: str | os.PathLike[str],
    pseudo_dir: str | os.PathLike[str],
    percentile: float = 100.0,
    min_cluster_size: int = 2,
    k: int | None = None,
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
        rows, n_lost = index_rows(shard, pos, keys, cls, dist, str(pl))
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
