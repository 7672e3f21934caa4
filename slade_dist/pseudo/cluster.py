"""The "cluster" stage: distributed k-means on the teacher embeddings -> pseudo-label files, the
member index the student reads, stats.json and TensorBoard; what it reads, writes and resumes is in
slade_dist/pseudo/README.md. Curation and balance: pseudo/cluster_pool.py.
Tests: tests/unit/test_cluster.py, tests/integration/test_pseudo_multirank.py, tests/unit/test_curate.py,
tests/integration/test_curate_multirank.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import time
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import dist
from ..config import Config, PseudoConfig
from ..data.pseudo_index import (
    ROW,
    clear_index,
    owner_bounds,
    summarise_clusters,
    write_member_file,
    write_summary,
)
from ..data.pseudo_labels import pseudo_label_path, read_pseudo_labels, write_meta, write_pseudo_labels
from ..data.shards import shard_index, unlabeled_pool
from ..data.tars import TarSamples, image_bytes
from ..data.transforms import CorruptImage, ImageLimits, decode
from ..errors import UnusableInput
from ..fileio import atomic_path, atomic_write_json
from ..models.retrieval import nmi_from_table
from ..progress import steps
from ..stages import RunLayout
from ..tb import TBWriter, thumbnail
from . import embed as embed_files
from .cluster_pool import (
    cap_clusters,
    cap_size,
    collapse,
    curation_summary,
    imbalance_factor,
    keep_mask,
    kept_index_rows,
    kept_rows,
)
from .kmeans import assign_array, cap_k, params_assigner, train_centroids

CENTROIDS_FILE = "centroids.npy"
COARSE_FILE = "coarse_centroids.npy"  # two-level training's coarse cells: the ivf assignment's lists
KMEANS_CKPT_DIR = "kmeans_ckpt"  # k-means checkpoints (a preempted training resumes from them)
FINGERPRINT_FILE = "centroids.json"
STATS_FILE = "stats.json"
SIZES_FILE = "sizes.npy"
SIZES_IN_JSON_MAX_K = 65536


def run(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Cluster round cfg.run.round's embeddings; every rank calls it (collectives inside)."""
    t0 = time.time()
    log = dist.get_logger()
    r = cfg.run.round
    layout = RunLayout(run_dir)
    emb_dir, out_dir = layout.stage_dir("embed", r), layout.stage_dir("cluster", r)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = unlabeled_pool(cfg.data.unlabeled_shards, "cluster")
    _check_embeddings(emb_dir, shards, r)
    mine = dist.shard_slice(shards)
    curated = curation_summary(cfg, layout)
    keep = {p.name: keep_mask(layout, emb_dir, p) for p in mine} if curated else {}
    parts = {shard_index(p): kept_rows(embed_files.load_embeddings(emb_dir, p), keep.get(p.name)) for p in mine}

    n_local = torch.tensor([sum(int(a.shape[0]) for a in parts.values())], dtype=torch.float64)
    n_total = int(dist.staged_all_reduce_sum(n_local)[0])
    if n_total == 0:
        raise UnusableInput(
            f"cluster round {r}: the embeddings in {emb_dir} hold no points (every image corrupt or every shard empty?)"
        )
    k = cap_k(cfg.pseudo.k, n_total)
    params = dataclasses.replace(cfg.pseudo, k=k)  # k capped to the data
    embed_facts = embed_files.read_embed_facts(emb_dir)
    fingerprint = {
        "pseudo": dataclasses.asdict(cfg.pseudo),
        "k": k,
        "n_total": n_total,
        "shards": [p.name for p in shards],
        "embed": embed_facts,
        "curation": curated.get("token"),
    }

    centroids, train_info = _reuse_centroids(out_dir, fingerprint)
    t_train = time.time()
    if centroids is None:
        res = train_centroids(parts, params, ckpt_dir=out_dir / KMEANS_CKPT_DIR, ckpt_tag=embed_facts)
        centroids = res.centroids
        train_info = {
            "objective": res.objective,
            "n_train": res.n_train,
            "backend": res.backend,
            "splits": res.splits,
            "train_s": round(res.seconds, 3),
            "init": res.init,
            "two_level": res.two_level,
            "resumed": res.resumed,
            "timings": {a: round(b, 3) for a, b in res.timings.items()},
        }
        if dist.is_main():
            _remove_stale_labels(out_dir)
            _save_centroids(out_dir, centroids, {**fingerprint, "train": train_info}, res.coarse_centroids)
        dist.barrier()
    else:
        log.info(f"[cluster] reusing {out_dir / CENTROIDS_FILE} (same config and embeddings)")
    t_train = time.time() - t_train

    if dist.is_main():
        clear_index(out_dir)  # before any rank writes its part of the new one
    dist.barrier()
    t_assign = time.time()
    positions = {p.name: i for i, p in enumerate(shards)}
    limits = ImageLimits.of(cfg.data)  # embed's decoder contract: the index's coverage check decodes alike
    local = _assign_my_shards(mine, emb_dir, out_dir, centroids, params, positions, cfg.data.num_workers, keep, limits)
    t_assign = time.time() - t_assign
    stats = _global_stats(local, k, n_total, train_info)
    stats["collapse"] = collapse(np.asarray(local["sizes_all"]), cfg.curate.collapse_share)
    if curated:
        stats["curation"] = {"pool": curated["pool"], "kept": curated["kept"], "removed": curated["removed"]}
    t_index = time.time()
    stats["index"] = _write_index(local, k, cfg, out_dir, shards, cap_size(cfg.curate.cluster_cap, n_total, k))
    stats["timing"] = {
        "train_s": round(t_train, 3),
        "assign_s": round(t_assign, 3),
        "tar_scan_s": round(local["scan_s"], 3),
        "index_s": round(time.time() - t_index, 3),
        "total_s": round(time.time() - t0, 3),
    }
    stats.update(k=k, k_requested=cfg.pseudo.k, round=r, world_size=dist.world_size())
    if dist.is_main():
        atomic_write_json(out_dir / STATS_FILE, stats)
        with atomic_path(out_dir / SIZES_FILE) as tmp:
            np.save(tmp, np.asarray(local["sizes_all"], dtype=np.int64))
        write_meta(out_dir, **_meta(cfg, layout, k, centroids, n_total, embed_facts))
        sizes = np.asarray(local["sizes_all"])
        _tensorboard(layout.tb_dir("cluster", r), stats, sizes, r, _cluster_examples(shards[0], out_dir, sizes))
    dist.barrier()
    facts = ("k", "n", "inertia", "imbalance", "empty_clusters", "purity", "nmi", "n_labeled")
    summary = {k_: stats[k_] for k_ in facts if k_ in stats}
    summary.update({f"index_{k_}": v for k_, v in stats["index"].items()})
    summary["largest_cluster_share"] = stats["collapse"]["share"]
    if stats["collapse"]["warning"]:
        log.warning(f"[cluster] round {r}: {stats['collapse']['warning']}")
    log.info(
        f"[cluster] round {r}: k={k} n={n_total} imbalance={stats['imbalance']:.3f}"
        + (f" purity={stats['purity']:.3f} nmi={stats['nmi']:.3f}" if "purity" in stats else "")
    )
    return summary


# ------------------------------------------------------------------------------------- inputs
def _check_embeddings(emb_dir: Path, shards: list[Path], round_: int) -> None:
    missing = [p.name for p in shards if not embed_files.is_embedded(emb_dir, p)]
    if missing:
        raise FileNotFoundError(
            f"cluster round {round_}: {len(missing)} of {len(shards)} shards have no embeddings in "
            f"{emb_dir} (first: {', '.join(missing[:3])}); run the embed stage for round {round_} first"
        )


# ---------------------------------------------------------------------------------- centroids
def _reuse_centroids(out_dir: Path, fingerprint: dict[str, Any]) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Rank 0 decides (one reader of the files), every rank then loads the same array."""
    ok = False
    if dist.is_main():
        try:
            saved = json.loads((out_dir / FINGERPRINT_FILE).read_text())
            ok = (out_dir / CENTROIDS_FILE).exists() and {k: saved.get(k) for k in fingerprint} == json.loads(
                json.dumps(fingerprint)
            )
        except (FileNotFoundError, json.JSONDecodeError):
            ok = False
    if not dist.broadcast_object(ok):
        return None, {}
    saved = json.loads((out_dir / FINGERPRINT_FILE).read_text())
    return np.load(out_dir / CENTROIDS_FILE).astype(np.float32), saved.get("train", {})


def _save_centroids(
    out_dir: Path, centroids: np.ndarray, fingerprint: dict[str, Any], coarse: np.ndarray | None = None
) -> None:
    for name, arr in ((CENTROIDS_FILE, centroids), (COARSE_FILE, coarse)):
        if arr is None:
            (out_dir / name).unlink(missing_ok=True)
            continue
        with atomic_path(out_dir / name) as tmp:
            np.save(tmp, arr.astype(np.float32))
    atomic_write_json(out_dir / FINGERPRINT_FILE, fingerprint)  # written last: marks the centroids final


def _remove_stale_labels(out_dir: Path) -> None:
    """New centroids make every existing pseudo-label file wrong."""
    for p in out_dir.glob("pl-*.npz"):
        p.unlink()
    (out_dir / FINGERPRINT_FILE).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------- assignment
def _assign_my_shards(
    mine: list[Path],
    emb_dir: Path,
    out_dir: Path,
    centroids: np.ndarray,
    params: PseudoConfig,
    positions: dict[str, int],
    scan_workers: int,
    keep: dict[str, np.ndarray],
    limits: ImageLimits,
) -> dict[str, Any]:
    """Label every point of this rank's shards; sizes, inertia, purity pairs and member-index rows
    count only the points curation kept (all without curation)."""
    k = centroids.shape[0]
    coarse = np.load(out_dir / COARSE_FILE) if (out_dir / COARSE_FILE).exists() else None
    assigner = params_assigner(params, coarse)  # assign=auto: through the two-level cells, if any
    assigner.set_centroids(torch.from_numpy(centroids))
    sizes = np.zeros(k, dtype=np.int64)
    sq_sum, n = 0.0, 0
    pairs: Counter = Counter()
    with _TarScans(scan_workers if len(mine) > scan_workers else 0) as scans:
        for shard in steps(mine, "assign shards"):
            pl_path = pseudo_label_path(out_dir, shard)
            keys, labels, dists = _shard_labels(shard, emb_dir, pl_path, assigner, params)
            mask = keep.get(shard.name)
            scans.add(shard, positions[shard.name], keys, labels, dists, str(pl_path), mask, limits)
            hidden = embed_files.read_hidden_labels(emb_dir, shard)
            if mask is not None:
                labels, dists = labels[mask], dists[mask]
                hidden = hidden[mask] if hidden is not None else None
            sizes += np.bincount(labels, minlength=k)
            sq_sum += float(np.square(dists.astype(np.float64)).sum())
            n += len(labels)
            if hidden is not None:
                pairs.update(zip(hidden.tolist(), labels.tolist()))
        rows, lost, scan_s = scans.finish()
    return {"sizes": sizes, "sq_sum": sq_sum, "n": n, "pairs": pairs, "rows": rows, "lost": lost, "scan_s": scan_s}


def _shard_labels(
    shard: Path, emb_dir: Path, pl_path: Path, assigner: Any, params: PseudoConfig
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(keys, labels, dists) of one shard: assigned and written, or read back when a resumed run
    already labelled it with these centroids."""
    keys = embed_files.read_keys(emb_dir, shard)
    if Path(pl_path).exists():
        done_keys, labels, dists = read_pseudo_labels(pl_path)
        if done_keys != keys:
            raise UnusableInput(
                f"{pl_path} does not match the keys of {shard.name}'s embeddings; delete it and rerun the cluster stage"
            )
        return keys, labels, dists
    emb = embed_files.load_embeddings(emb_dir, shard)
    labels, dists = assign_array(emb, assigner, spherical=params.spherical, chunk_size=params.chunk_size)
    write_pseudo_labels(pl_path, keys, labels, dists)
    return keys, labels, dists


class _TarScans:
    """The member-index scans of a rank's shards (pseudo_index.index_rows), in this process or in
    `workers` (data.num_workers) spawned processes: tarfile is pure Python, ~35 us per member
    (docs/SCALING.md). Rows are kept in submission order; at most 2 x workers scans in flight."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        ctx = multiprocessing.get_context("spawn")  # never fork a rank (CUDA, process groups)
        self.pool = ProcessPoolExecutor(workers, mp_context=ctx) if workers > 0 else None
        self.pending: list[Future] = []
        self.rows: list[np.ndarray] = []
        self.lost, self.seconds = 0, 0.0

    def __enter__(self) -> _TarScans:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def add(self, *args: Any) -> None:
        t = time.time()
        if self.pool is None:
            self._keep(kept_index_rows(*args))
        else:
            self.pending.append(self.pool.submit(kept_index_rows, *args))
            while len(self.pending) > 2 * self.workers:
                self._keep(self.pending.pop(0).result())
        self.seconds += time.time() - t

    def _keep(self, result: tuple[np.ndarray, int]) -> None:
        self.rows.append(result[0])
        self.lost += result[1]

    def finish(self) -> tuple[np.ndarray, int, float]:
        """Every row (ROW, shard order), rows lost to truncated tars, seconds this rank waited."""
        t = time.time()
        while self.pending:
            self._keep(self.pending.pop(0).result())
        self.seconds += time.time() - t
        rows = np.concatenate(self.rows) if self.rows else np.zeros(0, dtype=ROW)
        return rows, self.lost, self.seconds


# ------------------------------------------------------------------------------- member index
def _write_index(
    local: dict[str, Any], k: int, cfg: Config, out_dir: Path, shards: list[Path], cap: int
) -> dict[str, Any]:
    """Every rank writes the members file of the clusters it owns; rank 0 the summary, last."""
    bounds = owner_bounds(k, dist.world_size())
    r = dist.rank()
    owner = np.searchsorted(bounds, local["rows"]["cls"], side="right") - 1
    mine = dist.all_to_all_records(local["rows"], owner)  # each row to the rank owning its cluster
    pct, min_size = cfg.data.pseudo_max_dist_percentile, cfg.data.pseudo_min_cluster_size
    rows, arrays = summarise_clusters(mine, int(bounds[r]), int(bounds[r + 1]), pct, min_size)
    capped = cap_clusters(rows, arrays, cap)
    write_member_file(out_dir, r, rows)
    parts = dist.all_gather_object((arrays, capped))  # after every rank's members file is in place
    lost = int(sum(dist.all_gather_object(local["lost"])))
    summary: dict[str, Any] = {}
    if dist.is_main():
        summary = write_summary(out_dir, [a for a, _ in parts], bounds, [p.name for p in shards], pct, min_size, lost)
    summary = dist.broadcast_object(summary)
    out = {key: summary[key] for key in ("kept_clusters", "kept_images", "lost_to_truncation")}
    out.update(cap=cap, **{key: sum(c[key] for _, c in parts) for key in ("capped_clusters", "capped_members")})
    return out


# ------------------------------------------------------------------------------------- stats
def _global_stats(local: dict[str, Any], k: int, n_total: int, train_info: dict[str, Any]) -> dict[str, Any]:
    packed = torch.from_numpy(np.concatenate([local["sizes"].astype(np.float64), [local["sq_sum"], float(local["n"])]]))
    packed = dist.staged_all_reduce_sum(packed).numpy()
    sizes = packed[:k].round().astype(np.int64)
    inertia, n = float(packed[k]), int(round(packed[k + 1]))
    if n != n_total:
        raise RuntimeError(f"cluster: assigned {n} points but the embeddings hold {n_total}")
    local["sizes_all"] = sizes
    stats: dict[str, Any] = {
        "n": n,
        "inertia": inertia,
        "mean_sq_dist": inertia / max(n, 1),
        "imbalance": imbalance_factor(sizes),
        "empty_clusters": int((sizes == 0).sum()),
        "size_min": int(sizes.min()),
        "size_max": int(sizes.max()),
        "size_median": float(np.median(sizes)),
        "train": train_info,
    }
    # the full size list only while it stays readable; sizes.npy always has it
    if k <= SIZES_IN_JSON_MAX_K:
        stats["sizes"] = sizes.tolist()
    pairs: Counter = Counter()
    for part in dist.all_gather_object(local["pairs"]):
        pairs.update(part)
    if pairs:
        stats.update(contingency_scores(pairs))
    return stats


def contingency_scores(pairs: Counter) -> dict[str, Any]:
    """Purity and NMI (arithmetic normalisation, as sklearn's default) from {(truth, cluster): count}."""
    truths = sorted({t for t, _ in pairs}, key=str)
    clusters = sorted({c for _, c in pairs})
    ti = {t: i for i, t in enumerate(truths)}
    ci = {c: i for i, c in enumerate(clusters)}
    table = np.zeros((len(truths), len(clusters)), dtype=np.float64)
    for (t, c), v in pairs.items():
        table[ti[t], ci[c]] += v
    n = table.sum()
    return {
        "purity": float(table.max(axis=0).sum() / n),
        "nmi": nmi_from_table(table),
        "n_labeled": int(n),
        "n_true_classes": len(truths),
        "chance_purity": float(table.sum(1).max() / n),
    }


# ------------------------------------------------------------------------------------- outputs
def _meta(
    cfg: Config, layout: RunLayout, k: int, centroids: np.ndarray, n: int, embed_facts: dict[str, Any]
) -> dict[str, Any]:
    step = embed_facts.get("teacher_step")
    return {
        "round": cfg.run.round,
        "k": k,
        "teacher_step": -1 if step is None else int(step),
        "k_requested": cfg.pseudo.k,
        "n": n,
        "dim": int(centroids.shape[1]),
        "spherical": cfg.pseudo.spherical,
        "seed": cfg.pseudo.seed,
        "teacher_weights": embed_facts.get("teacher_weights", str(layout.teacher_weights(cfg.run.round))),
        "teacher_sha256": embed_facts.get("teacher_sha256"),
        "unlabeled_shards": str(cfg.data.unlabeled_shards),
        "dist": "Euclidean distance to the centroid (of the unit-normalised embedding when spherical)",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _tensorboard(
    tb_dir: Path, stats: dict[str, Any], sizes: np.ndarray, round_: int, examples: dict[int, torch.Tensor]
) -> None:
    """The size histogram, the run facts, the training objective, and a grid per example
    pseudo-class (one cluster a tag). A fresh writer: a rerun of the round replaces all of it."""
    with TBWriter(tb_dir, enabled=True) as tb:
        bins = np.linspace(0, max(int(sizes.max()), 1) + 1, 51)
        tb.histogram("cluster/size", sizes.astype(np.float64), round_, bins=bins)
        tb.scalars({f"cluster/{k}": stats[k] for k in _TB_FACTS if k in stats}, round_)
        for it, obj in enumerate(stats.get("train", {}).get("objective", [])):
            if math.isfinite(obj):
                tb.scalars({f"cluster/round{round_}_train_objective": obj}, it)
        for c, images in examples.items():
            tb.images(f"pseudo_class/{c:06d}", images, round_, nrow=EXAMPLES_PER_CLUSTER)


_TB_FACTS = ("imbalance", "inertia", "mean_sq_dist", "empty_clusters", "purity", "nmi")
EXAMPLE_CLUSTERS, EXAMPLES_PER_CLUSTER, EXAMPLE_PIXELS = 8, 8, 64


def _cluster_examples(shard: Path, out_dir: Path, sizes: np.ndarray) -> dict[int, torch.Tensor]:
    """What TensorBoard shows of the pseudo-classes: up to 8 images (uint8, 64 px) of each of 8
    clusters present in the first shard, spread over the size ranking (largest to smallest); one
    shard is read, whatever the data's size."""
    keys, cls, _ = read_pseudo_labels(pseudo_label_path(out_dir, shard))
    present = np.unique(cls)
    ranked = present[np.argsort(-sizes[present], kind="stable")]
    picks = np.linspace(0, len(ranked) - 1, min(EXAMPLE_CLUSTERS, len(ranked))).round().astype(int)
    got: dict[int, list[torch.Tensor]] = {int(c): [] for c in ranked[picks]}
    of = {k: c for k, c in zip(keys, cls.tolist()) if c in got}
    for sample in TarSamples(shard):
        c = of.get(sample["__key__"])
        if c is None or len(got[c]) >= EXAMPLES_PER_CLUSTER:
            continue
        try:
            got[c].append(thumbnail(decode(image_bytes(sample)), EXAMPLE_PIXELS))
        except CorruptImage:  # the embed stage left it out too
            continue
        if all(len(v) >= EXAMPLES_PER_CLUSTER for v in got.values()):
            break
    return {c: torch.stack(v) for c, v in got.items() if v}
