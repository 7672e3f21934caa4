"""Benchmark: the pseudo-label path at web-scale shapes on this machine (2 cores, 24 GiB).

1. Data: n synthetic 128-d fp16 embeddings of a known hierarchical mixture (sqrt(k) super-classes
   on the unit sphere, k components scattered around them (spread 1.0), lognormal weights, point
   noise of norm 1.8: not trivially separable, flat faiss.Kmeans NMI 0.92 at the --quick size;
   real embedding spaces have such a hierarchy, and two-level clustering needs one: on an
   isotropic mixture of the same flat NMI its coarse cells cut the components apart, see
   docs/SCALING.md), written as the embed stage writes them (emb-%06d.npy + .keys + .src
   per shard, embed.json) beside real WebDataset tars of tiny 8x8 JPEGs (one per key: the cluster
   stage finds every sample's byte range in its tar for the member index).
2. The real cluster stage (slade_dist.pseudo.cluster.run) in 2 gloo ranks
   (dist.run_local_processes), one thread each, two-level training (pseudo.two_level=on, FAISS CPU):
   wall time, peak RSS per rank, phase timings, NMI / purity of its pseudo labels against the
   mixture. --quick also runs flat faiss.Kmeans (2 threads, same data, all points) for the NMI
   comparison (goal: two-level within 0.02 of flat).
3. The student's pseudo data path on pseudo labels with many classes: --quick: ~10^6 tiny images
   in real tars x 10^5 pseudo-classes (the mixture's labels, index built by
   pseudo_index.build_index); full: the cluster stage's own labels (10^7 x 10^5). Also at
   k = 10^3 (the --quick cluster stage's labels). Ours: pseudo_labeled_batches (the cluster
   index): start-up seconds, distinct images per pseudo-class, same-cluster positive pairs per
   batch (pairs of distinct images sharing a label), images read per batch. Today's: the P x K
   batcher (P = 8, K = 4, data.max_buffered 10^4) over the shuffled label stream (shuffle buffer
   10^3, shards drawn at random, rows as the label files hold them), the stream the student read
   before; its start-up = cluster_thresholds over every label file (what it called).
4. Embed throughput on CPU: the real embed stage (tiny_cnn teacher, 500x375 JPEGs -> 224 crops,
   no loader workers, 1 thread) and decode + transform alone: ms per image per core, and the CPUs
   a GPU needs at an assumed GPU embed rate (--gpu-img-s, default 3,000 img/s: ResNet-50 bf16 on one
   H200, an estimate: no GPU was lent to the session that wrote this).
5. Extrapolation to N = 10^9, k = 10^6 on 64 H200s: FLOP counts of each phase from the formulas
   printed (the same formulas evaluated at this run's sizes give this run's FLOP/s per phase), time
   = FLOP / (64 x rate) with the H200's fp32 peak (FAISS runs fp32 GEMMs) derated by the
   GEMM-vs-IVF efficiency measured here (at most 0.1, the k = 65,536 measurement).

  python bench/scale.py --quick   # 10^5 x 10^3 (+ 10^6 images x 10^5 classes data path), minutes
  python bench/scale.py           # 10^7 x 10^5, < 30 min and < 8 GiB per rank on 2 cores
Last line: one JSON object {"bench": "scale", "ours", "baseline", "unit", "ratio", ...}: ours /
baseline = student pseudo-stream start-up seconds (cluster index vs reading every label file).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import multiprocessing
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

D, SPREAD, NOISE = 128, 1.0, 1.8
P, K, BUFFER, SHUFFLE = 8, 4, 10_000, 1_000
# nprobe: cells probed by the ivf assignment (refine + full pass) of k1 = sqrt(k) cells
QUICK = {"n": 100_000, "k": 1_000, "shard": 1_000, "mppc": 256, "nprobe": 4, "data_n": 1_000_000, "data_k": 100_000}
FULL = {"n": 10_000_000, "k": 100_000, "shard": 10_000, "mppc": 32, "nprobe": 8, "data_n": 0, "data_k": 0}
H200_FP32 = 67e12  # dense fp32 peak (non-tensor): what FAISS's sgemm runs on
GEMM_EFFICIENCY = 0.6  # assumed share of that peak a large FAISS GPU GEMM reaches
# IVF per FLOP vs GEMM: measured at k = 65,536 on CPU, ivf at nprobe 16 ran 2.1x faster than exact
# with 15-30x fewer distances (0.07-0.14); docs/SCALING.md plans with 0.1
IVF_EFFICIENCY_MAX = 0.1


# --------------------------------------------------------------------------------------- data
_G: dict = {}  # what the forked shard writers share (centres, labels, jpeg pool)


def _mixture(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """k component centres around sqrt(k) super-class centres (unit vectors), labels of n points."""
    rng = np.random.default_rng(seed)
    top = rng.standard_normal((round(math.sqrt(k)), D), dtype=np.float32)
    top /= np.linalg.norm(top, axis=1, keepdims=True)
    centres = top[rng.integers(len(top), size=k)] + rng.standard_normal((k, D), dtype=np.float32) * (
        SPREAD / math.sqrt(D)
    )
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    w = rng.lognormal(0.0, 0.5, k)
    return centres, rng.choice(k, n, p=w / w.sum()).astype(np.int32)


def _jpeg_pool(n: int = 256) -> list[bytes]:
    from PIL import Image

    out = []
    for i in range(n):
        a = np.random.default_rng(i).integers(0, 255, (8, 8, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _write_one(s: int) -> dict:
    """Shard s: its tar; with embeddings, the embed stage's files; else a label file (mixture labels)."""
    from slade_dist.data.pseudo_labels import pseudo_label_path, write_pseudo_labels
    from slade_dist.data.shards import write_shard
    from slade_dist.pseudo import embed as ef

    g = _G
    lo, hi = s * g["shard"], min(g["n"], (s + 1) * g["shard"])
    keys = [f"s{s:06d}_{j:05d}" for j in range(hi - lo)]
    tar = Path(g["unl"]) / f"unlabeled-{s:06d}.tar"
    pool = g["pool"]
    write_shard(tar, ({"__key__": key, "jpg": pool[(lo + j) % len(pool)]} for j, key in enumerate(keys)), mtime=0)
    rng = np.random.default_rng([g["seed"], s])
    y = g["y"][lo:hi]
    if g["emb"] is not None:
        x = g["centres"][y] + rng.standard_normal((len(y), D), dtype=np.float32) * (NOISE / math.sqrt(D))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ef._write_shard_files(Path(g["emb"]), tar, x.astype(np.float16), keys, [None] * len(keys))
    else:
        write_pseudo_labels(pseudo_label_path(g["pl"], tar), keys, y, rng.random(len(y)).astype(np.float32))
    return {"name": tar.name, "count": len(keys)}


def write_dataset(root: Path, n: int, k: int, shard: int, embeddings: bool, seed: int = 0) -> dict:
    """Tars (+ embed-stage files, or + label files) of n samples of a k-component mixture."""
    from slade_dist.data.pseudo_labels import write_meta
    from slade_dist.data.shards import write_index
    from slade_dist.pseudo import embed as ef
    from slade_dist.stages import RunLayout

    t0 = time.time()
    centres, y = _mixture(n, k, seed)
    unl, run = root / "unlabeled", root / "run"
    emb = RunLayout(run).stage_dir("embed", 1) if embeddings else None
    pl = root / "pl"
    for p in (unl, emb, pl):
        if p is not None:
            p.mkdir(parents=True, exist_ok=True)
    _G.update(n=n, shard=shard, unl=str(unl), emb=emb and str(emb), pl=pl, y=y, centres=centres, seed=seed)
    _G["pool"] = _jpeg_pool()
    with multiprocessing.get_context("fork").Pool(2) as pool:
        shards = pool.map(_write_one, range(math.ceil(n / shard)), chunksize=4)
    write_index(unl, shards, "unlabeled")
    if embeddings:
        (emb / ef.FACTS_FILE).write_text(json.dumps({"teacher_sha256": "synthetic", "teacher_step": 0}))
    else:
        write_meta(pl, round=1, teacher_step=0, k=k)
    return {"unl": unl, "run": run, "pl": pl, "y": y, "seconds": time.time() - t0}


# ------------------------------------------------------------------------------ cluster stage
def _cluster_worker(run_dir: str, overrides: list[str], out_json: str) -> None:
    import faiss
    import torch

    from slade_dist import dist
    from slade_dist.config import load_config
    from slade_dist.pseudo import cluster

    dist.init_distributed()
    try:
        torch.set_num_threads(1)
        faiss.omp_set_num_threads(1)
        t0 = time.time()
        res = cluster.run(load_config(None, overrides), Path(run_dir))
        facts = {"wall_s": time.time() - t0, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        ranks = dist.all_gather_object(facts)
        if dist.is_main():
            Path(out_json).write_text(json.dumps({"ranks": ranks, "result": res}))
    finally:
        dist.shutdown()


def run_cluster_stage(data: dict, k: int, mppc: int, nprobe: int) -> dict:
    from slade_dist import dist
    from slade_dist.stages import RunLayout

    overrides = [
        f"run.dir={data['run']}",
        f"data.unlabeled_shards={data['unl']}",
        "data.num_workers=0",  # tar scans in the ranks themselves: 2 cores, 2 ranks
        f"pseudo.k={k}",
        "pseudo.two_level=on",
        "pseudo.backend=faiss_cpu",
        "pseudo.spherical=true",
        "pseudo.niter=20",
        f"pseudo.max_points_per_centroid={mppc}",
        f"pseudo.ivf_nprobe={nprobe}",
        "pseudo.assign=ivf",
    ]
    out = Path(data["run"]) / "bench_cluster.json"
    t0 = time.time()
    dist.run_local_processes(_cluster_worker, 2, args=(str(data["run"]), overrides, str(out)), extra_env=_ONE_THREAD)
    facts = json.loads(out.read_text())
    cdir = RunLayout(data["run"]).stage_dir("cluster", 1)
    stats = json.loads((cdir / "stats.json").read_text())
    pred = _labels_in_order(cdir, data["unl"])
    return {
        "wall_s": round(time.time() - t0, 1),
        "stage_s": round(max(r["wall_s"] for r in facts["ranks"]), 1),
        "peak_rss_gib": [round(r["peak_rss_gib"], 2) for r in facts["ranks"]],
        "timing": stats["timing"],
        "train_timings": stats["train"].get("timings", {}),
        "n_train": stats["train"]["n_train"],
        "imbalance": round(stats["imbalance"], 3),
        "empty_clusters": stats["empty_clusters"],
        **quality(data["y"], pred, k),
        "dir": cdir,
    }


_ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def _labels_in_order(pseudo_dir: Path, unl: Path) -> np.ndarray:
    from slade_dist.data.pseudo_labels import pseudo_label_path, read_pseudo_labels
    from slade_dist.data.shards import shard_paths

    return np.concatenate([read_pseudo_labels(pseudo_label_path(pseudo_dir, s))[1] for s in shard_paths(unl)])


def quality(truth: np.ndarray, pred: np.ndarray, k: int) -> dict:
    """NMI (sklearn, arithmetic) and purity of pred against the mixture's components."""
    from sklearn.metrics import normalized_mutual_info_score

    codes, counts = np.unique(pred.astype(np.int64) * (int(truth.max()) + 1) + truth, return_counts=True)
    best = np.zeros(k, dtype=np.int64)
    np.maximum.at(best, codes // (int(truth.max()) + 1), counts)
    return {
        "nmi": round(float(normalized_mutual_info_score(truth, pred)), 4),
        "purity": round(float(best.sum() / len(truth)), 4),
    }


def flat_faiss(data: dict, k: int) -> dict:
    """faiss.Kmeans (2 threads, spherical, 20 iterations) on all points, then one exact assignment."""
    import faiss

    from slade_dist.data.shards import shard_paths
    from slade_dist.pseudo import embed as ef

    emb = Path(data["run"]) / "round1" / "embed"
    x = np.concatenate([ef.load_embeddings(emb, s) for s in shard_paths(data["unl"])]).astype(np.float32)
    faiss.omp_set_num_threads(2)
    t0 = time.time()
    km = faiss.Kmeans(D, k, niter=20, spherical=True, seed=1, verbose=False, max_points_per_centroid=256)
    km.train(x)
    _, lab = km.index.search(x, 1)
    return {"seconds": round(time.time() - t0, 1), **quality(data["y"], lab[:, 0].astype(np.int32), k)}


# ------------------------------------------------------------------------------ student data path
def _pair_stats(keys: list[str], labels: list[int]) -> tuple[list[int], int]:
    """Distinct images per label of one batch, and same-label pairs of distinct images (a duplicate
    filling a label up to K adds an augmentation, not a pair)."""
    groups: dict[int, set[str]] = {}
    for key, lab in zip(keys, labels):
        groups.setdefault(lab, set()).add(key)
    distinct = [len(v) for v in groups.values()]
    return distinct, sum(n * (n - 1) // 2 for n in distinct)


def todays_batcher(unl: Path, pseudo_dir: Path, n_batches: int) -> dict:
    """The stream the student read before the cluster index: label files of randomly drawn shards,
    rows shuffled in a 10^3 buffer, P x K batcher with 10^4 buffered (its start-up read every file)."""
    from slade_dist.data.batcher import PKBatcher
    from slade_dist.data.pseudo_join import cluster_thresholds, keep_sample
    from slade_dist.data.pseudo_labels import pseudo_label_path, read_pseudo_labels
    from slade_dist.data.readers import _shuffle
    from slade_dist.data.shards import shard_paths

    shards = shard_paths(unl)
    pls = [pseudo_label_path(pseudo_dir, s) for s in shards]
    t0 = time.time()
    thr = cluster_thresholds(pls, 100.0, 2)  # the defaults: min cluster size 2 made it read every file
    start_s = time.time() - t0
    rng = random.Random(0)
    read = [0]

    def rows():
        while True:
            i = rng.randrange(len(pls))
            _, cls, dist = read_pseudo_labels(pls[i])
            for j, (c, d) in enumerate(zip(cls.tolist(), dist.tolist())):
                read[0] += 1
                if keep_sample(thr, c, d):
                    yield (i, j), c

    b = PKBatcher(P, K, BUFFER, seed=1)
    distinct, pairs = [], []
    for batch in b(_shuffle(rows(), SHUFFLE, rng)):
        dd, pp = _pair_stats([f"{i}/{j}" for (i, j), _ in batch], [c for _, c in batch])
        distinct += dd
        pairs.append(pp)
        if len(pairs) == n_batches:
            break
    return {
        "start_s": round(start_s, 3),
        "distinct_per_class": round(float(np.mean(distinct)), 2),
        "pairs_per_batch": round(float(np.mean(pairs)), 1),
        "images_read_per_batch": round(read[0] / n_batches, 1),
        "evicted_share": round(b.evicted / max(read[0], 1), 3),
        "replacement_batches_share": round(b.replacement_batches / max(b.batches, 1), 3),
    }


def our_stream(unl: Path, pseudo_dir: Path, n_batches: int) -> dict:
    from slade_dist.config import DataConfig
    from slade_dist.data.readers import pseudo_labeled_batches

    cfg = dataclasses.replace(DataConfig(), image_size=8, resize_size=8, num_workers=0)
    t0 = time.time()
    stream = pseudo_labeled_batches(unl, pseudo_dir, cfg, P, K, seed=0, rank=0, world=1)
    start_s = time.time() - t0
    distinct, pairs, read = [], [], 0
    t1 = time.time()
    for _ in range(n_batches):
        batch = next(stream)
        dd, pp = _pair_stats(batch["keys"], batch["labels"].tolist())
        distinct += dd
        pairs.append(pp)
        read = batch["images_read"]
    return {
        "start_s": round(start_s, 4),
        "distinct_per_class": round(float(np.mean(distinct)), 2),
        "pairs_per_batch": round(float(np.mean(pairs)), 1),
        "images_read_per_batch": round(read / n_batches, 1),
        "batches_per_s": round(n_batches / (time.time() - t1), 1),
    }


def data_path(unl: Path, pseudo_dir: Path, k: int, n_batches: int = 300) -> dict:
    return {"k": k, "today": todays_batcher(unl, pseudo_dir, n_batches), "ours": our_stream(unl, pseudo_dir, n_batches)}


# ----------------------------------------------------------------------------------- embed rate
def embed_rate(root: Path, n_images: int = 384) -> dict:
    """The real embed stage on 500x375 JPEGs (tiny_cnn, 224 crops, main-process decode, 1 thread)
    and decode + eval transform alone."""
    import torch
    from PIL import Image

    from slade_dist.config import ModelConfig, load_config
    from slade_dist.data import transforms
    from slade_dist.data.shards import write_index, write_shard
    from slade_dist.models import build_embedder, save_weights
    from slade_dist.pseudo import embed
    from slade_dist.stages import RunLayout

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    jpgs = []
    for _ in range(64):  # photo-like: smooth gradients + texture
        yy, xx = np.mgrid[0:375, 0:500]
        base = np.stack([(xx * rng.uniform(0.2, 0.5) + yy * rng.uniform(0.1, 0.4)) % 255] * 3, -1)
        img = np.clip(base + rng.normal(0, 20, (375, 500, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        jpgs.append(buf.getvalue())
    unl = root / "embed_unl"
    half = n_images // 2
    for s in range(2):
        write_shard(
            unl / f"unlabeled-{s:06d}.tar", ({"__key__": f"{s}_{j:05d}", "jpg": jpgs[j % 64]} for j in range(half))
        )
    write_index(unl, [{"name": f"unlabeled-{s:06d}.tar", "count": half} for s in range(2)], "unlabeled")
    run = root / "embed_run"
    mcfg = ModelConfig(backbone="tiny_cnn", embed_dim=128, freeze_bn=False)
    save_weights(RunLayout(run).teacher_weights(1), build_embedder(mcfg), mcfg)
    cfg = load_config(
        None,
        [
            f"run.dir={run}",
            f"data.unlabeled_shards={unl}",
            "data.num_workers=0",
            "model.backbone=tiny_cnn",
            "model.embed_dim=128",
        ],
    )
    res = embed.run(cfg, run)
    geo = transforms.eval_geometry(224, transforms.eval_resize_for(224, 224, 256))
    t0 = time.time()
    for j in range(128):
        geo(transforms.decode(jpgs[j % 64]))
    ms = (time.time() - t0) / 128 * 1e3
    return {"embed_stage_img_s": res["images_per_s"], "decode_transform_ms_per_core": round(ms, 2)}


# -------------------------------------------------------------------------------- extrapolation
def flops(n: int, k: int, s: int, k1: int, nprobe: int, iters: int = 20, refine: int = 4) -> dict:
    """FLOP of each phase (2 d per distance): coarse Lloyd on min(S, 2000 k1) points x k1; cells:
    each sample point against its cell's ~k/k1 centroids; refine and the full assignment through
    the cells: k1 + nprobe k / k1 distances per point."""
    probe = k1 + nprobe * k / k1
    return {
        "coarse": 2 * D * min(s, 2000 * k1) * k1 * iters,
        "cells": 2 * D * s * (k / k1) * iters,
        "refine": 2 * D * s * probe * refine,
        "assign": 2 * D * n * probe,
    }


def extrapolate(c: dict, n: int, k: int, mppc: int, nprobe: int) -> dict:
    here = flops(n, k, c["n_train"], round(math.sqrt(k)), nprobe)
    tt = c["train_timings"]
    secs = {"coarse": tt.get("coarse_s"), "cells": tt.get("cells_s"), "refine": tt.get("refine_s")}
    secs["assign"] = c["timing"]["assign_s"] - c["timing"]["tar_scan_s"]
    rate = {p: here[p] / secs[p] for p in here if secs[p]}  # FLOP/s here, 2 ranks x 1 thread
    # IVF scans vs GEMMs per FLOP, measured here; capped at IVF_EFFICIENCY_MAX: at small k (the
    # --quick size) the cells' GEMMs are tiny and IVF looks as efficient as they are
    ivf_eff = min(IVF_EFFICIENCY_MAX, (rate["refine"] + rate["assign"]) / 2 / rate["cells"])
    N, Kt, G = 10**9, 10**6, 64
    target = flops(N, Kt, Kt * 64, 1000, 16)
    gemm = H200_FP32 * GEMM_EFFICIENCY
    t = {p: target[p] / (G * gemm * (1.0 if p in ("coarse", "cells") else ivf_eff)) for p in target}
    exact = 2 * D * N * Kt / (G * gemm)
    print("\nextrapolation (d = 128, 20 Lloyd iterations, 4 refine iterations, k1 = sqrt(k) cells, nprobe 16):")
    print("  coarse = 2 d min(S, 2000 k1) k1 I   cells = 2 d S (k/k1) I   refine = 2 d S (k1 + nprobe k/k1) R")
    print("  assign = 2 d N (k1 + nprobe k/k1)   exact assign = 2 d N k   S = k x 64 (max_points_per_centroid)")
    print(
        "  here (2 ranks x 1 thread): "
        + ", ".join(f"{p} {here[p]:.2e} FLOP in {secs[p]:.1f} s = {rate[p] / 1e9:.1f} GFLOP/s" for p in rate)
    )
    print(f"  IVF efficiency vs GEMM measured here: {ivf_eff:.3f}")
    print(
        "  target N=1e9 k=1e6: "
        + ", ".join(f"{p} {target[p]:.2e}" for p in target)
        + f", exact assign {2 * D * N * Kt:.2e}"
    )
    print(
        f"  time = FLOP / (64 x {H200_FP32 / 1e12:.0f} TFLOP/s fp32 x {GEMM_EFFICIENCY}"
        " [x the IVF efficiency for refine/assign]):"
    )
    print("   " + ", ".join(f"{p} {v:.0f} s" for p, v in t.items()) + f"; exact assignment instead: {exact:.0f} s")
    return {
        "target_flop": target,
        "target_s": {p: round(v, 1) for p, v in t.items()},
        "exact_assign_s": round(exact, 1),
        "ivf_efficiency": round(ivf_eff, 3),
        "here_gflop_s": {p: round(v / 1e9, 2) for p, v in rate.items()},
    }


# --------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gpu-img-s", type=float, default=3000.0, help="assumed GPU embed rate (images/s)")
    ap.add_argument("--keep", help="work directory to keep (default: a temp dir, removed)")
    args = ap.parse_args()
    size = QUICK if args.quick else FULL
    tmp = tempfile.TemporaryDirectory(prefix="bench_scale_") if not args.keep else None
    root = Path(args.keep or tmp.name)
    t_all = time.time()
    print(f"[scale] data: n={size['n']:,} d={D} mixture of {size['k']:,}", flush=True)
    data = write_dataset(root / "a", size["n"], size["k"], size["shard"], embeddings=True)
    print(f"[scale] written in {data['seconds']:.0f} s; cluster stage, 2 ranks", flush=True)
    c = run_cluster_stage(data, size["k"], size["mppc"], size["nprobe"])
    print(f"[scale] cluster: {json.dumps({k_: v for k_, v in c.items() if k_ != 'dir'})}", flush=True)
    out = {"cluster": {k_: v for k_, v in c.items() if k_ != "dir"}}
    paths = [data_path(data["unl"], c["dir"], size["k"])]
    if args.quick:
        out["flat_faiss"] = flat_faiss(data, size["k"])
        print(f"[scale] flat faiss.Kmeans: {out['flat_faiss']}", flush=True)
        big = write_dataset(root / "b", size["data_n"], size["data_k"], 10_000, embeddings=False, seed=1)
        t0 = time.time()
        from slade_dist.data.pseudo_index import build_index

        build_index(big["unl"], big["pl"], 100.0, 2, k=size["data_k"])
        print(
            f"[scale] data path set: {size['data_n']:,} images written in {big['seconds']:.0f} s, "
            f"index built in {time.time() - t0:.0f} s (1 process)",
            flush=True,
        )
        paths.append(data_path(big["unl"], big["pl"], size["data_k"]))
    for p in paths:
        print(f"[scale] data path k={p['k']:,}: today {p['today']}  ours {p['ours']}", flush=True)
    out["data_path"] = paths
    out["embed"] = embed_rate(root)
    per_core = 1e3 / out["embed"]["decode_transform_ms_per_core"]
    out["embed"]["cpus_per_gpu"] = math.ceil(args.gpu_img_s / per_core)
    print(f"[scale] embed: {out['embed']} (at {args.gpu_img_s:.0f} img/s per GPU)", flush=True)
    out["extrapolation"] = extrapolate(c, size["n"], size["k"], size["mppc"], size["nprobe"])
    big_k = paths[-1]
    line = {
        "bench": "scale",
        "ours": big_k["ours"]["start_s"],
        "baseline": big_k["today"]["start_s"],
        "unit": f"s student pseudo-stream start-up ({big_k['k']:,} pseudo-classes)",
        "ratio": round(big_k["today"]["start_s"] / max(big_k["ours"]["start_s"], 1e-6), 1),
        "n": size["n"],
        "k": size["k"],
        "cluster_wall_s": c["stage_s"],
        "peak_rss_gib_per_rank": c["peak_rss_gib"],
        "nmi": c["nmi"],
        "purity": c["purity"],
        "nmi_flat_faiss": out.get("flat_faiss", {}).get("nmi"),
        "distinct_per_class": {
            f"k={p['k']}": [p["today"]["distinct_per_class"], p["ours"]["distinct_per_class"]] for p in paths
        },
        "pairs_per_batch": {
            f"k={p['k']}": [p["today"]["pairs_per_batch"], p["ours"]["pairs_per_batch"]] for p in paths
        },
        "images_read_per_batch": {
            f"k={p['k']}": [p["today"]["images_read_per_batch"], p["ours"]["images_read_per_batch"]] for p in paths
        },
        "embed_decode_ms_per_core": out["embed"]["decode_transform_ms_per_core"],
        "cpus_per_gpu": out["embed"]["cpus_per_gpu"],
        "extrapolated_64_h200_s": out["extrapolation"]["target_s"],
        "total_s": round(time.time() - t_all, 1),
    }
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(line))


if __name__ == "__main__":
    main()
