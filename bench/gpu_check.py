"""GPU check of our k-means and of decode on the device (one short script for a lent GPU machine).

Default size: n = 10,000,000 points, d = 128, k = 65,536 centroids, 20 Lloyd iterations on one
GPU (goal: <= 30 s on one H200). --quick: n = 1,000,000, k = 8,192, 10 iterations.
Backend: FAISS GPU when faiss-gpu is importable, else our torch matmul backend on CUDA (TF32 GEMMs
unless --no-tf32). The data (Gaussian blobs) is generated on the GPU and is not timed. Also checks,
in a few seconds, that the GPU path gives the CPU path's centroids at a small size (fp32), how many
assignments TF32 changes against exact fp32, and the time of one full streaming assignment pass.
Decode on the device (data.decode: device, slade_dist/data/device_decode.py): `device_decode_check`
decodes 512 photo-like 500x375 JPEGs with one batched torchvision.io.decode_jpeg call on the GPU and
with the loader workers' CPU decoder (transforms.decode, one thread), and reports images/s of each
and the largest / mean pixel difference (nvJPEG's IDCT is not libjpeg-turbo's: a few grey levels
are expected; the CPU equality is a unit test, tests/unit/test_device_decode.py). It runs first,
in a few seconds; `--decode-only` runs it alone.
Then the training side (bench/_gpu_steps.py): the losses' collectives on a 1-rank NCCL group (host
tensors staged through the GPU; one GPU holds one NCCL rank) and the REAL student optimizer step
(ResNet-50, 224 px, bf16, DeepSpeed engine, every SLADE term on) at web.yaml's per-GPU shape,
4 labeled + 512 pseudo-labeled images, against the old 8-GPU paper shape, 4 + 4: images/s, peak
memory, ratio. `--no-student` skips it (it runs ~1-2 min).
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from slade_dist.config import PseudoConfig  # noqa: E402
from slade_dist.data import device_decode, transforms  # noqa: E402
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


def photo_jpegs(n: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> list[bytes]:
    """n photo-like JPEGs (smooth waves + noise, quality 90)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for i in range(n):
        f = 0.005 + 0.045 * (i % 8) / 7
        img = np.stack([60 * np.sin(xx * f * (k + 1) + yy * f * 0.7) for k in range(3)], -1) + rng.normal(
            0, 12, (h, w, 3)
        )
        buf = io.BytesIO()
        Image.fromarray(np.clip(img + 128, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def device_decode_check(device: torch.device, n: int = 512, batch: int = 128) -> dict:
    """Batched decode_jpeg on `device` vs the workers' CPU decode: images/s and pixel differences."""
    jpegs = photo_jpegs(n)
    items = [
        device_decode.prepare(j, transforms.DEFAULT_LIMITS, lambda x: x, on_device=True) for j in jpegs
    ]  # what a loader worker hands the rank
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda _: None)
    device_decode.decode_jpegs(items[:8], device)  # warm-up: nvJPEG handles, CUDA context
    sync(device)
    t = time.perf_counter()
    on_device = []
    for s in range(0, n, batch):
        on_device += device_decode.decode_jpegs(items[s : s + batch], device)
    sync(device)
    gpu_s = time.perf_counter() - t
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t = time.perf_counter()
    on_cpu = [transforms.decode(j) for j in jpegs]
    cpu_s = time.perf_counter() - t
    torch.set_num_threads(threads)
    failed = sum(x is None for x in on_device)
    diffs = [(g.cpu().int() - c.int()).abs() for g, c in zip(on_device, on_cpu) if g is not None]
    return {
        "images": n,
        "batch": batch,
        "gpu_images_per_s": round(n / gpu_s, 1),
        "cpu_one_thread_images_per_s": round(n / cpu_s, 1),
        "failed_on_device": failed,
        "max_abs_diff": int(max(int(d.max()) for d in diffs)) if diffs else None,
        "mean_abs_diff": round(float(torch.cat([d.flatten().float() for d in diffs]).mean()), 4) if diffs else None,
        "ok": failed == 0 and bool(diffs) and max(int(d.max()) for d in diffs) <= 16,
    }


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
    ap.add_argument("--decode-only", action="store_true", help="run the decode-on-device check only")
    ap.add_argument("--no-student", action="store_true", help="skip the collectives and student-step checks")
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
    decode = device_decode_check(device)
    print(
        f"decode on the device: {decode['gpu_images_per_s']} images/s (batched decode_jpeg, 500x375) vs "
        f"{decode['cpu_one_thread_images_per_s']} images/s on one CPU thread; max |diff| {decode['max_abs_diff']}, "
        f"mean {decode['mean_abs_diff']} grey levels, {decode['failed_on_device']} failed "
        f"{'OK' if decode['ok'] else 'MISMATCH'}",
        flush=True,
    )
    if args.decode_only:
        out = {
            "bench": "decode_gpu",
            "ours": decode["gpu_images_per_s"],
            "baseline": decode["cpu_one_thread_images_per_s"],
        }
        out.update(unit="images/s", ratio=round(out["ours"] / out["baseline"], 3), device_decode=decode)
        print(json.dumps(out))
        return out

    train = {} if args.no_student else student_checks(device)
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
        "device_decode": decode,
        **train,
    }
    print(json.dumps(out))
    return out


def student_checks(device: torch.device) -> dict:
    """NCCL collectives, then the student step at web.yaml's 4 + 512 and at 4 + 4 images per GPU."""
    from _gpu_steps import collectives_check, student_rate  # bench/, beside this script

    coll = collectives_check(device)
    print(f"collectives on {coll['backend']} (world {coll['world']}): {'OK' if coll['ok'] else 'MISMATCH'}", flush=True)
    rates = {}
    for name, unlabeled in (("web_4_512", 512), ("paper_4_4", 4)):
        rates[name] = student_rate(device, 4, unlabeled)
        r = rates[name]
        print(
            f"student step {name}: {r['images_per_s']} images/s ({r['step_s']} s/step), peak {r['peak_gib']} GiB, "
            f"sd {r['sd_loss']}, mined pairs {r['mined_pairs']}",
            flush=True,
        )
    ratio = rates["web_4_512"]["images_per_s"] / rates["paper_4_4"]["images_per_s"]
    print(f"images/s at 4 + 512 vs 4 + 4 per GPU: ratio {ratio:.1f}", flush=True)
    return {"collectives": coll, "student_step": rates, "student_images_per_s_ratio": round(ratio, 2)}


if __name__ == "__main__":
    main()
