"""GPU check of our k-means (one short script for a lent GPU machine; k-means only).

Default size: n = 10,000,000 points, d = 128, k = 65,536 centroids, 20 Lloyd iterations on one
GPU (goal: <= 30 s on one H200). --quick: n = 1,000,000, k = 8,192, 10 iterations.
Backend: FAISS GPU when faiss-gpu is importable, else our torch matmul backend on CUDA (TF32 GEMMs
unless --no-tf32). The data (Gaussian blobs) is generated on the GPU and is not timed. Also checks,
in a few seconds, that the GPU path gives the CPU path's centroids at a small size (fp32), how many
assignments TF32 changes against exact fp32, and the time of one full streaming assignment pass.
Without a CUDA GPU it prints a clear message and exits 0. The last line is one JSON object.
Whole script: estimated 1-3 min on an H200 (most of it the 20 timed iterations); not yet run on one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slade_dist.config import PseudoConfig  # noqa: E402
from slade_dist.pseudo.kmeans import TorchAssigner, assign_array, choose_backend, train_centroids  # noqa: E402


def blobs_on(device: torch.device, n: int, d: int, blobs: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    centers = torch.randn(blobs, d, device=device, generator=g) * 2.0
    x = torch.empty(n, d, device=device)
    step = 1 << 22
    for s in range(0, n, step):
        e = min(n, s + step)
        idx = torch.randint(blobs, (e - s,), device=device, generator=g)
        x[s:e] = centers[idx] + torch.randn(e - s, d, device=device, generator=g)
    return x


def gpu_matches_cpu(device: torch.device) -> dict:
    """Small problem, fp32 on both: the CUDA path must give the CPU path's centroids."""
    x = blobs_on(torch.device("cpu"), 50_000, 64, 200, seed=3)
    init = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:256]].numpy()
    p = dict(k=256, niter=5, gpu_tf32=False, backend="torch", spherical=False)
    cpu = train_centroids({0: x}, PseudoConfig(**p), init_centroids=init)
    gpu = train_centroids({0: x.to(device)}, PseudoConfig(**p), init_centroids=init)
    diff = float(np.abs(cpu.centroids - gpu.centroids).max())
    return {"max_abs_centroid_diff": diff, "ok": diff < 1e-3}


def tf32_agreement(x: torch.Tensor, centroids: np.ndarray, m: int = 200_000) -> float:
    c = torch.from_numpy(centroids).to(x.device)
    exact, fast = TorchAssigner(x.device, gpu_tf32=False), TorchAssigner(x.device, gpu_tf32=True)
    exact.set_centroids(c)
    fast.set_centroids(c)
    return float((exact.assign(x[:m])[0] == fast.assign(x[:m])[0]).float().mean())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="n=1M, k=8192, 10 iterations")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--niter", type=int, default=None)
    ap.add_argument("--no-tf32", action="store_true", help="exact fp32 GEMMs in the torch backend")
    args = ap.parse_args(argv)
    n = args.n or (1_000_000 if args.quick else 10_000_000)
    k = args.k or (8192 if args.quick else 65_536)
    niter = args.niter or (10 if args.quick else 20)
    if not torch.cuda.is_available():
        msg = "no CUDA GPU visible: bench/gpu_check.py measures GPU k-means only; nothing was run"
        print(msg)
        out = {"bench": "kmeans_gpu", "ours": None, "baseline": None, "unit": "s", "ratio": None, "skipped": msg}
        print(json.dumps(out))
        return out
    device = torch.device("cuda", 0)
    backend = choose_backend("auto")
    print(f"GPU: {torch.cuda.get_device_name(device)}; backend {backend}; torch {torch.__version__}", flush=True)

    check = gpu_matches_cpu(device)
    print(
        f"GPU vs CPU (fp32, 50k x 64, k=256): max |centroid diff| {check['max_abs_centroid_diff']:.2e}"
        f" {'OK' if check['ok'] else 'MISMATCH'}",
        flush=True,
    )

    x = blobs_on(device, n, args.d, blobs=k)
    init = x[torch.randperm(n, device=device, generator=torch.Generator(device=device).manual_seed(1))[:k]]
    init = init.cpu().numpy()
    params = PseudoConfig(
        spherical=False,
        k=k,
        niter=niter,
        backend=backend,
        gpu_tf32=not args.no_tf32,
        max_points_per_centroid=max(256, -(-n // k)),
        chunk_size=1 << 20,
    )
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    res = train_centroids({0: x}, params, init_centroids=init)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    flops = 2.0 * n * k * args.d * niter
    print(
        f"k-means n={n:,} d={args.d} k={k:,} {niter} it: {seconds:.2f} s "
        f"({seconds / niter:.3f} s/it, {flops / seconds / 1e12:.0f} TFLOP/s effective GEMM), "
        f"objective {res.objective[0]:.5g} -> {res.objective[-1]:.5g}, splits {res.splits}",
        flush=True,
    )

    t = time.perf_counter()
    labels, _ = assign_array(x, res.centroids, chunk_size=1 << 20, backend=backend, gpu_tf32=not args.no_tf32)
    assign_s = time.perf_counter() - t
    agree = tf32_agreement(x, res.centroids) if backend == "torch" and not args.no_tf32 else 1.0
    peak_gb = torch.cuda.max_memory_allocated(device) / 2**30
    print(
        f"full assignment pass (to host labels): {assign_s:.2f} s; TF32 vs fp32 assignment agreement "
        f"{agree:.5f}; peak GPU memory {peak_gb:.1f} GiB; clusters used {len(np.unique(labels)):,}",
        flush=True,
    )
    goal = 30.0 if (n, k, niter) == (10_000_000, 65_536, 20) else None
    out = {
        "bench": "kmeans_gpu",
        "ours": round(seconds, 3),
        "baseline": goal,
        "unit": "s",
        "ratio": round(goal / seconds, 3) if goal else None,
        "n": n,
        "d": args.d,
        "k": k,
        "niter": niter,
        "backend": backend,
        "tf32": not args.no_tf32,
        "tflops_effective": round(flops / seconds / 1e12, 1),
        "assign_pass_s": round(assign_s, 3),
        "tf32_agreement": round(agree, 6),
        "gpu_vs_cpu": check,
        "peak_gib": round(peak_gb, 2),
        "timings": res.timings,
        "goal_met": (seconds <= goal) if goal else None,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
