"""Fixtures and spawned-process entry points for the pseudo-label tests (embed, k-means, cluster).

Used by tests/unit/test_embed.py, tests/unit/test_cluster.py and
tests/integration/test_pseudo_multirank.py. Everything is real: demo WebDataset shards, a tiny_cnn
teacher saved with save_weights, torch.distributed over gloo in separate processes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from slade_dist import dist
from slade_dist.config import Config, DemoConfig, ModelConfig, load_config
from slade_dist.stages import RunLayout

# 8 classes x 30 unlabeled images of 32 px in shards of 40 -> 6 shards (the last one shorter)
DEMO = dict(
    image_size=32,
    train_classes=4,
    test_classes=2,
    extra_classes=2,
    labeled_per_class=2,
    test_per_class=2,
    unlabeled_per_class=30,
    shard_size=40,
    workers=1,
    seed=0,
)


def make_demo(root: Path, **over) -> Path:
    """Demo shards under root/demo; returns the unlabeled shard dir."""
    from slade_dist.data.demo import generate

    cfg = DemoConfig(out=str(root / "demo"), **{**DEMO, **over})
    generate(cfg)
    return Path(cfg.out) / "unlabeled"


def make_teacher(run_dir: Path, round_: int = 1, embed_dim: int = 16, seed: int = 0) -> Path:
    """A randomly initialised tiny_cnn embedder, saved where round `round_` reads its teacher."""
    from slade_dist.models import build_embedder, save_weights

    torch.manual_seed(seed)
    mcfg = ModelConfig(backbone="tiny_cnn", embed_dim=embed_dim, freeze_bn=False)
    return save_weights(RunLayout(run_dir).teacher_weights(round_), build_embedder(mcfg), mcfg, extra={"step": 123})


def make_cfg(run_dir: Path, unlabeled: Path, overrides: Sequence[str] = ()) -> Config:
    base = [
        f"run.dir={run_dir}",
        f"data.unlabeled_shards={unlabeled}",
        "data.image_size=32",
        "data.resize_size=32",
        "data.num_workers=0",
        "pseudo.embed_batch_size=16",
        "pseudo.k=8",
        "pseudo.niter=10",
        "pseudo.chunk_size=64",
        "model.backbone=tiny_cnn",
        "model.embed_dim=16",
    ]
    return load_config(None, base + list(overrides))


def write_embeddings(
    emb_dir: Path,
    shard_names: Sequence[str],
    per_shard: Sequence[int],
    d: int = 8,
    k: int = 5,
    seed: int = 0,
    shard_dir: Path | None = None,
) -> dict[str, tuple[list[str], np.ndarray]]:
    """Embed-stage files for synthetic Gaussian blobs (unit-normalised, float16) with hidden labels,
    as the embed stage would write them. Returns {shard name: (keys, true labels)}. shard_dir: where
    the index lists the shards; a real tar of one tiny JPEG per key stands in for each missing one,
    so the embed files' source stamps match the shards the cluster stage checks and its member
    index finds every sample."""
    from slade_dist.data.shards import write_shard
    from slade_dist.pseudo import embed as ef

    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d)) * 3
    emb_dir.mkdir(parents=True, exist_ok=True)
    truth = {}
    for name, n in zip(shard_names, per_shard):
        y = rng.integers(k, size=n)
        x = centers[y] + rng.standard_normal((n, d)) * 0.3
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        keys = [f"{Path(name).stem}_{j:05d}" for j in range(n)]
        source = Path(name) if shard_dir is None else Path(shard_dir) / name
        if shard_dir is not None and not source.exists():
            write_shard(source, ({"__key__": key, "jpg": tiny_jpeg(j)} for j, key in enumerate(keys)), mtime=0)
        ef._write_shard_files(emb_dir, source, x.astype(np.float16), keys, [str(v) for v in y])
        truth[name] = (keys, y)
    (emb_dir / ef.FACTS_FILE).write_text(json.dumps({"teacher_sha256": "synthetic", "teacher_step": 7}))
    return truth


def tiny_jpeg(seed: int, size: int = 8) -> bytes:
    import io

    from PIL import Image

    a = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_index_only(shard_dir: Path, shard_names: Sequence[str], per_shard: Sequence[int]) -> Path:
    from slade_dist.data.shards import write_index

    write_index(shard_dir, [{"name": n, "count": c} for n, c in zip(shard_names, per_shard)], "unlabeled")
    return shard_dir


# ------------------------------------------------------------------------- spawned entry points
def session_worker(run_dir: str, unlabeled: str, cluster_overrides: list[str], kmeans_data: str, out_dir: str) -> None:
    """Everything the 2-rank tests check, in ONE pair of processes (start-up dominates on CI):
    3 embed runs, the cluster stage, then distributed k-means on saved parts with both CPU backends,
    two-level k-means, and the training sample each rank draws."""
    dist.init_distributed()
    try:
        torch.set_num_threads(1)
        embed_log = _embed_runs(run_dir, unlabeled)
        cluster_res = _cluster_run(run_dir, unlabeled, cluster_overrides)
        km = _kmeans_runs(kmeans_data, k=12, niter=10, backends=["faiss_cpu", "torch"])
        km.update(_two_level_run(kmeans_data))
        km.update(_sample_draw(kmeans_data))
        if dist.is_main():
            Path(out_dir, "embed.json").write_text(json.dumps(embed_log))
            Path(out_dir, "cluster.json").write_text(json.dumps(cluster_res))
            np.savez(Path(out_dir, "kmeans.npz"), **km)
    finally:
        dist.shutdown()


def _embed_runs(run_dir: str, unlabeled: str) -> dict:
    """Three embed runs: fresh, again (must write nothing), and after rank 0 deleted every other
    shard's .npy (a run killed half-way: must complete exactly those)."""
    from slade_dist.data.shards import shard_paths
    from slade_dist.pseudo import embed

    cfg = make_cfg(Path(run_dir), Path(unlabeled))
    results, snapshots = [], []
    out = RunLayout(run_dir).stage_dir("embed", 1)
    for attempt in range(3):
        if attempt == 2 and dist.is_main():
            for s in shard_paths(unlabeled)[::2]:
                embed.emb_path(out, s).unlink()
        dist.barrier()
        results.append(embed.run(cfg, Path(run_dir)))
        if dist.is_main():
            snapshots.append({s.name: embed.emb_path(out, s).stat().st_mtime_ns for s in shard_paths(unlabeled)})
    return {"results": results, "mtimes": snapshots}


def _cluster_run(run_dir: str, unlabeled: str, overrides: list[str]) -> dict:
    from slade_dist.pseudo import cluster

    return cluster.run(make_cfg(Path(run_dir), Path(unlabeled), overrides), Path(run_dir))


def my_parts(data_file: str) -> dict[int, np.ndarray]:
    """This rank's parts of a saved npz of parts p0, p1, ...: those i with i % world == rank."""
    z = np.load(data_file)
    return {int(name[1:]): z[name] for name in z.files if int(name[1:]) % dist.world_size() == dist.rank()}


def _kmeans_runs(data_file: str, k: int, niter: int, backends: list[str]) -> dict[str, np.ndarray]:
    from slade_dist.config import PseudoConfig
    from slade_dist.pseudo.kmeans import train_centroids

    parts = my_parts(data_file)
    out = {}
    for backend in backends:
        res = train_centroids(
            parts, PseudoConfig(spherical=False, k=k, niter=niter, backend=backend, max_points_per_centroid=40)
        )
        out.update(
            {
                f"{backend}_centroids": res.centroids,
                f"{backend}_objective": np.array(res.objective),
                f"{backend}_n_train": np.array(res.n_train),
            }
        )
    return out


def two_level_params():
    from slade_dist.config import PseudoConfig

    return PseudoConfig(spherical=False, k=12, niter=6, backend="faiss_cpu", two_level="on", max_points_per_centroid=40)


def _two_level_run(data_file: str) -> dict[str, np.ndarray]:
    from slade_dist.pseudo.kmeans import train_centroids

    res = train_centroids(my_parts(data_file), two_level_params())
    return {"two_level_centroids": res.centroids, "two_level_objective": np.array(res.objective)}


def _sample_draw(data_file: str) -> dict[str, np.ndarray]:
    """Every rank's training-sample rows with their global positions, gathered (rank 0 keeps them)."""
    from slade_dist.config import PseudoConfig
    from slade_dist.pseudo.kmeans import draw_sample

    s = draw_sample(my_parts(data_file), PseudoConfig(spherical=False, k=12, max_points_per_centroid=40))
    pieces = dist.all_gather_object((s.pos, s.x.numpy()))
    pos = np.concatenate([p for p, _ in pieces])
    x = np.concatenate([v for _, v in pieces])
    order = np.argsort(pos)
    return {"sample_pos": pos[order], "sample_x": x[order]}


def ckpt_params():
    """k-means of the kill/resume test: checkpoints every 2 iterations."""
    from slade_dist.config import PseudoConfig

    return PseudoConfig(
        spherical=False, k=12, niter=8, backend="faiss_cpu", max_points_per_centroid=40, ckpt_every_iters=2
    )


def kmeans_ckpt_worker(data_file: str, ckpt_dir: str, out_file: str, kill_after: int) -> None:
    """Distributed k-means with checkpoints; kill_after > 0: every rank dies (os._exit, as a
    preempted job: no cleanup) right after that Lloyd iteration. Rank 0 saves the result."""
    from slade_dist.pseudo.kmeans import train_centroids

    def preempt(stage: str, it: int) -> None:
        if kill_after and stage == "lloyd" and it == kill_after:
            os._exit(3)

    dist.init_distributed()
    try:
        torch.set_num_threads(1)
        res = train_centroids(my_parts(data_file), ckpt_params(), ckpt_dir=ckpt_dir, on_step=preempt)
        if dist.is_main():
            np.savez(
                out_file,
                centroids=res.centroids,
                objective=np.array(res.objective),
                resumed=np.array(res.resumed["lloyd"]),
            )
    finally:
        dist.shutdown()


def kmeans_parts(seed: int = 0) -> dict[str, np.ndarray]:
    """12 blobs in 8-d split into uneven parts (one empty), 1103 points."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((12, 8)) * 4
    return {
        f"p{i}": (centers[rng.integers(12, size=n)] + rng.standard_normal((n, 8))).astype(np.float32)
        for i, n in enumerate([400, 250, 0, 333, 120])
    }
