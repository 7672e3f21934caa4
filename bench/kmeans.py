"""Benchmark: our distributed k-means (2 real ranks, 1 thread each, gloo) vs faiss.Kmeans in one
process with the same total threads (2), same data, same initial centroids, same iterations.

Data: Gaussian blobs generated here (default n = 1,000,000, d = 128, k = 4,096, 10 iterations;
--quick: n = 100,000, k = 256). Both train on all n points (n <= k x 256, FAISS's default
max_points_per_centroid, so neither subsamples). Prints seconds for both, the speed ratio
(faiss seconds / ours: >= 1.0 means we are at least as fast), the inertia ratio (final centroids of
each, scored on the full data by one exact FAISS assignment: ours / faiss, goal within 1%), and a
scaling table of our time for growing n (time per point should stay flat). Process start-up is not
timed for either.

Two-level row (larger k; default n = 200,000, k = 4,096; --quick: n = 50,000, k = 1,024): our
two-level k-means (2 ranks, pseudo.two_level=on: ~sqrt(k) coarse cells, each cell's share of k,
then 4 refine iterations through the cells; its own init) vs flat faiss.Kmeans (2 threads, its
own random init) and FAISS's own faiss.contrib.clustering.two_level_clustering (same coarse
iterations; its sub-level runs FAISS's default 25);
time ratio (faiss flat seconds / ours) and inertia ratio (ours / faiss flat, exact assignment of
all n points). --no-two-level skips it. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make_blobs(n: int, d: int, blobs: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((blobs, d), dtype=np.float32) * 2.0
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 1 << 18):  # bounded temporaries
        e = min(n, s + (1 << 18))
        x[s:e] = centers[rng.integers(blobs, size=e - s)] + rng.standard_normal((e - s, d), dtype=np.float32)
    return x


def _rank_worker(
    data_path: str, init_path: str, sizes: list[int], niter: int, backend: str, mppc: int, out_dir: str
) -> None:
    """One rank, every n of the table in one process (start-up once): owns rows
    [r*n/w, (r+1)*n/w) of the memory-mapped data and times train_centroids on them."""
    import faiss
    import torch

    from slade_dist import dist
    from slade_dist.config import PseudoConfig
    from slade_dist.pseudo.kmeans import train_centroids

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    dist.init_distributed()
    r, w = dist.rank(), dist.world_size()
    data = np.load(data_path, mmap_mode="r")
    init = np.load(init_path)
    params = PseudoConfig(k=len(init), niter=niter, backend=backend, spherical=False, max_points_per_centroid=mppc)
    for n in sizes:
        lo, hi = r * n // w, (r + 1) * n // w
        dist.barrier()
        t = time.perf_counter()
        res = train_centroids({r: data[lo:hi]}, params, init_centroids=init)
        seconds = time.perf_counter() - t
        if dist.is_main():
            np.save(os.path.join(out_dir, f"ours-{n}.npy"), res.centroids)
            Path(out_dir, f"ours-{n}.json").write_text(
                json.dumps(
                    {
                        "seconds": seconds,
                        "objective": res.objective,
                        "backend": res.backend,
                        "n_train": res.n_train,
                        "timings": res.timings,
                    }
                )
            )
    dist.shutdown()


def run_ours(
    data_path: str, init_path: str, sizes: list[int], niter: int, ranks: int, backend: str, mppc: int, tmp: str
) -> dict[int, tuple[np.ndarray, dict]]:
    from slade_dist import dist

    dist.run_local_processes(
        _rank_worker,
        ranks,
        args=(data_path, init_path, sizes, niter, backend, mppc, tmp),
        extra_env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    )
    return {
        n: (np.load(os.path.join(tmp, f"ours-{n}.npy")), json.loads(Path(tmp, f"ours-{n}.json").read_text()))
        for n in sizes
    }


def _two_level_worker(data_path: str, n: int, k: int, niter: int, backend: str, out_dir: str) -> None:
    """One rank of the two-level row: owns rows [r*n/w, (r+1)*n/w) and times train_centroids."""
    import faiss
    import torch

    from slade_dist import dist
    from slade_dist.config import PseudoConfig
    from slade_dist.pseudo.kmeans import train_centroids

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    dist.init_distributed()
    r, w = dist.rank(), dist.world_size()
    data = np.load(data_path, mmap_mode="r")
    params = PseudoConfig(spherical=False, k=k, niter=niter, backend=backend, two_level="on")
    dist.barrier()
    t = time.perf_counter()
    res = train_centroids({r: data[r * n // w : (r + 1) * n // w]}, params)
    seconds = time.perf_counter() - t
    if dist.is_main():
        np.save(os.path.join(out_dir, "two-level.npy"), res.centroids)
        Path(out_dir, "two-level.json").write_text(
            json.dumps({"seconds": seconds, "backend": res.backend, "n_train": res.n_train, "timings": res.timings})
        )
    dist.shutdown()


def two_level_row(n: int, d: int, k: int, niter: int, ranks: int, backend: str, seed: int) -> dict:
    """Our two-level k-means vs flat faiss.Kmeans and FAISS's two_level_clustering (see the docstring)."""
    import faiss
    from faiss.contrib.clustering import two_level_clustering

    from slade_dist import dist

    print(f"\ntwo-level: n={n:,} d={d} k={k:,} niter={niter}", flush=True)
    x = make_blobs(n, d, blobs=k, seed=seed + 2)
    with tempfile.TemporaryDirectory(prefix="bench_kmeans2_") as tmp:
        data_path = os.path.join(tmp, "x.npy")
        np.save(data_path, x)
        dist.run_local_processes(
            _two_level_worker,
            ranks,
            args=(data_path, n, k, niter, backend, tmp),
            extra_env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        )
        c_ours = np.load(os.path.join(tmp, "two-level.npy"))
        info = json.loads(Path(tmp, "two-level.json").read_text())
    faiss.omp_set_num_threads(ranks)
    flat = faiss.Kmeans(d, k, niter=niter, seed=1)
    t = time.perf_counter()
    flat.train(x)
    t_flat = time.perf_counter() - t
    t = time.perf_counter()
    # (its sub-level runs faiss.Kmeans' default 25 iterations: passing niter clashes with clustering_niter)
    c_f2, _ = two_level_clustering(x, int(round(k**0.5)), k, clustering_niter=niter, seed=1)
    t_f2 = time.perf_counter() - t
    i_ours, i_flat, i_f2 = (inertia(x, c, ranks) for c in (c_ours, flat.centroids, c_f2))
    row = {
        "n": n,
        "d": d,
        "k": k,
        "ours_s": round(info["seconds"], 3),
        "faiss_flat_s": round(t_flat, 3),
        "faiss_two_level_s": round(t_f2, 3),
        "ratio": round(t_flat / info["seconds"], 4),
        "inertia_ratio": round(i_ours / i_flat, 6),
        "faiss_two_level_inertia_ratio": round(i_f2 / i_flat, 6),
        "timings": {a: round(b, 3) for a, b in info["timings"].items()},
    }
    print(
        f"ours two-level ({info['backend']}, {ranks} ranks): {info['seconds']:8.2f} s   "
        f"faiss.Kmeans flat: {t_flat:8.2f} s   faiss two_level_clustering: {t_f2:8.2f} s",
        flush=True,
    )
    print(
        f"speed ratio (faiss flat/ours) {row['ratio']:.3f}   inertia ours/flat {row['inertia_ratio']:.5f}   "
        f"faiss two-level/flat {row['faiss_two_level_inertia_ratio']:.5f}",
        flush=True,
    )
    return row


def run_faiss(x: np.ndarray, init: np.ndarray, niter: int, threads: int, mppc: int) -> tuple[np.ndarray, float, list]:
    import faiss

    faiss.omp_set_num_threads(threads)
    km = faiss.Kmeans(x.shape[1], len(init), niter=niter, max_points_per_centroid=mppc, seed=1)
    t = time.perf_counter()
    km.train(x, init_centroids=init)
    return km.centroids.copy(), time.perf_counter() - t, [float(v) for v in km.obj]


def inertia(x: np.ndarray, centroids: np.ndarray, threads: int) -> float:
    import faiss

    faiss.omp_set_num_threads(threads)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    total = 0.0
    for s in range(0, len(x), 1 << 17):
        d2, _ = index.search(x[s : s + (1 << 17)], 1)
        total += float(d2.astype(np.float64).sum())
    return total


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="n=100,000, k=256 (under a minute)")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--niter", type=int, default=10)
    ap.add_argument("--ranks", type=int, default=2, help="our processes (1 thread each); faiss gets as many threads")
    ap.add_argument("--backend", default="auto", choices=["auto", "faiss_cpu", "torch", "faiss_gpu"])
    ap.add_argument(
        "--scaling", default=None, help="comma-separated n for the scaling table (default: n/10, n/4, n/2 and n)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--two-level-n", type=int, default=None, help="n of the two-level row (200,000; --quick 50,000)")
    ap.add_argument("--two-level-k", type=int, default=None, help="k of the two-level row (4,096; --quick 1,024)")
    ap.add_argument("--no-two-level", action="store_true", help="skip the two-level row")
    args = ap.parse_args(argv)
    n = args.n or (100_000 if args.quick else 1_000_000)
    k = args.k or (256 if args.quick else 4096)
    sizes = sorted({int(s) for s in args.scaling.split(",")} if args.scaling else {n // 10, n // 4, n // 2, n})
    if max(sizes) > n:
        ap.error("--scaling sizes must be <= --n")

    print(
        f"k-means bench: n={n:,} d={args.d} k={k:,} niter={args.niter}; ours {args.ranks} ranks x 1 "
        f"thread vs faiss.Kmeans {args.ranks} threads",
        flush=True,
    )
    x = make_blobs(n, args.d, blobs=k, seed=args.seed)
    init = x[np.random.default_rng(args.seed + 1).choice(n, k, replace=False)].copy()
    mppc = max(256, -(-n // k))  # both train on all n points: no subsample to differ
    with tempfile.TemporaryDirectory(prefix="bench_kmeans_") as tmp:
        data_path, init_path = os.path.join(tmp, "x.npy"), os.path.join(tmp, "init.npy")
        np.save(data_path, x)
        np.save(init_path, init)
        ours = run_ours(
            data_path, init_path, sorted(sizes, reverse=True), args.niter, args.ranks, args.backend, mppc, tmp
        )
    c_ours, info = ours[n]
    t_ours = info["seconds"]
    print(f"ours  ({info['backend']}, {args.ranks} ranks): {t_ours:8.2f} s", flush=True)
    c_faiss, t_faiss, obj_faiss = run_faiss(x, init, args.niter, args.ranks, mppc)
    print(f"faiss.Kmeans ({args.ranks} threads):   {t_faiss:8.2f} s", flush=True)
    i_ours, i_faiss = inertia(x, c_ours, args.ranks), inertia(x, c_faiss, args.ranks)
    speed, iratio = t_faiss / t_ours, i_ours / i_faiss
    print(
        f"speed ratio (faiss/ours) {speed:.3f}   inertia ours/faiss {iratio:.5f} "
        f"(final: ours {i_ours:.6g}, faiss {i_faiss:.6g})",
        flush=True,
    )

    table = []
    print(f"\nscaling (ours, k={k:,}, {args.niter} iterations):\n{'n':>10} {'seconds':>9} {'us/point/iter':>14}")
    for m in sizes:
        s = ours[m][1]["seconds"]
        per = s / m / args.niter * 1e6
        table.append({"n": m, "seconds": round(s, 3), "us_per_point_iter": round(per, 4)})
        print(f"{m:>10,} {s:9.2f} {per:14.4f}", flush=True)
    pers = [row["us_per_point_iter"] for row in table]
    two = (
        None
        if args.no_two_level
        else two_level_row(
            args.two_level_n or (50_000 if args.quick else 200_000),
            args.d,
            args.two_level_k or (1024 if args.quick else 4096),
            args.niter,
            args.ranks,
            args.backend,
            args.seed,
        )
    )
    result = {
        "bench": "kmeans",
        "ours": round(t_ours, 3),
        "baseline": round(t_faiss, 3),
        "unit": "s",
        "ratio": round(speed, 4),
        "inertia_ratio": round(iratio, 6),
        "n": n,
        "d": args.d,
        "k": k,
        "niter": args.niter,
        "ranks": args.ranks,
        "backend": info["backend"],
        "scaling": table,
        "per_point_spread": round(max(pers) / min(pers), 3),
        "two_level": two,
        "goals": {
            "speed_ratio>=1.0": speed >= 1.0,
            "inertia_within_1pct": abs(iratio - 1) <= 0.01,
            "two_level_inertia_within_2pct": two is None or two["inertia_ratio"] <= 1.02,
        },
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
