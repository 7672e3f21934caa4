"""Benchmark: slade_dist.eval.metrics.retrieval_metrics vs pytorch-metric-learning's
AccuracyCalculator on the same embeddings, in one process.

Data: n x d Gaussian-cluster embeddings with C classes (default 100,000 x 128, 1,000 classes;
--quick: 20,000). Both compute P@1, R-Precision, MAP@R (AccuracyCalculator with
k="max_bin_count", the setting its docs prescribe for MAP@R; its default k=None would rank the
whole set: n x n) and NMI (both with FAISS k-means, niter 20, the same seed). Our run also
yields Recall@{1,2,4,8}. Prints both times, the ratio and the largest metric difference; the last
line is one JSON object.

Both sides are warmed up once on a small set before timing (imports, FAISS/BLAS thread pools, and
our compiled kernels: the C kernels of slade_dist/eval/_kernels.c, built once per machine into
~/.cache/slade_dist, and the numba ones of the portable path, once per install into __pycache__);
the warm-up times are printed too. SLADE_DIST_NATIVE=0 times the portable path. Ours uses every
CPU through its own threads, PML through FAISS's.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slade_dist.eval.metrics import retrieval_metrics  # noqa: E402

PAIRS = {"precision_at_1": "precision_at_1", "r_precision": "r_precision",
         "map_at_r": "mean_average_precision_at_r", "nmi": "NMI"}
FAISS_DEFAULT_SEED = 1234  # PML's FaissKMeans leaves faiss.Kmeans' seed at its default


def make_embeddings(n: int, d: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % classes)
    centers = rng.standard_normal((classes, d)).astype(np.float32)
    emb = centers[labels] + 1.6 * rng.standard_normal((n, d), dtype=np.float32)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), labels


def run_ours(emb: np.ndarray, labels: np.ndarray) -> tuple[dict, float, float]:
    t, c = time.perf_counter(), time.process_time()
    out = retrieval_metrics(emb, labels, recall_k=(1, 2, 4, 8), seed=FAISS_DEFAULT_SEED)
    return out, time.perf_counter() - t, time.process_time() - c


def run_pml(emb: np.ndarray, labels: np.ndarray) -> tuple[dict, float, float]:
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    logging.getLogger("PML").setLevel(logging.WARNING)
    t, c = time.perf_counter(), time.process_time()
    calc = AccuracyCalculator(include=tuple(PAIRS.values()), k="max_bin_count", device=torch.device("cpu"))
    out = calc.get_accuracy(emb, labels)
    return out, time.perf_counter() - t, time.process_time() - c


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20,000 embeddings instead of 100,000")
    ap.add_argument("--n", type=int, default=None, help="number of embeddings (overrides --quick)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=1, help="alternate ours/PML this many times, keep the best")
    ap.add_argument("--threads", type=int, default=0, help="FAISS/torch threads (0: library default)")
    args = ap.parse_args(argv)
    n = args.n or (20_000 if args.quick else 100_000)
    if args.threads:
        import faiss
        import torch

        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    emb, labels = make_embeddings(n, args.dim, args.classes)
    print(f"eval bench: {n} x {args.dim} embeddings, {args.classes} classes, cpus={os.cpu_count()}", flush=True)
    small, small_labels = make_embeddings(5000, args.dim, 50, seed=1)  # > 2 x 2048: every kNN path
    warm_ours, warm_pml = run_ours(small, small_labels)[1], run_pml(small, small_labels)[1]
    print(f"warm-up (5,000 points, once): ours {warm_ours:.2f} s, PML {warm_pml:.2f} s", flush=True)
    t_ours = t_ref = c_ours = c_ref = float("inf")
    for _ in range(max(1, args.repeat)):  # alternate, so load changes hit both sides alike
        ours, t, c = run_ours(emb, labels)
        t_ours, c_ours = min(t_ours, t), min(c_ours, c)
        print(f"ours {t:8.2f} s wall {c:8.2f} s cpu  " + "  ".join(
            f"{k}={v:.5f}" for k, v in ours.items() if isinstance(v, float)), flush=True)
        ref, t, c = run_pml(emb, labels)
        t_ref, c_ref = min(t_ref, t), min(c_ref, c)
        print(f"PML  {t:8.2f} s wall {c:8.2f} s cpu  " + "  ".join(
            f"{k}={ref[v]:.5f}" for k, v in PAIRS.items()), flush=True)
    diffs = {k: abs(ours[k] - ref[v]) for k, v in PAIRS.items()}
    max_diff = max(diffs.values())
    print(f"max |ours - PML| = {max_diff:.2e} ({max(diffs, key=diffs.get)}); ratio PML/ours = {t_ref / t_ours:.2f}x wall, "
          f"{c_ref / c_ours:.2f}x cpu time")
    result = {"bench": "eval_metrics", "ours": round(t_ours, 3), "baseline": round(t_ref, 3), "unit": "s",
              "ratio": round(t_ref / t_ours, 3), "ours_cpu_s": round(c_ours, 3), "baseline_cpu_s": round(c_ref, 3),
              "ratio_cpu": round(c_ref / c_ours, 3), "load_avg_1m": round(os.getloadavg()[0], 2), "n": n, "dim": args.dim, "classes": args.classes,
              "max_abs_diff": max_diff, "warmup_ours_s": round(warm_ours, 3), "warmup_baseline_s": round(warm_pml, 3), "same_numbers": bool(max_diff <= 1e-5),
              **{f"ours_{k}": ours[k] for k in PAIRS}, **{f"pml_{k}": ref[v] for k, v in PAIRS.items()}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
