"""Benchmark: memory of one loader worker's work, ours vs torchvision ImageFolder + DataLoader, on
3000 x 2000 photos (what the README's memory note states).

Each stream runs in a process of its own with num_workers=0, so the process does exactly what one
loader worker does (read, buffer, decode, transform, batch); the figure is its peak RSS (VmHWM,
reset through /proc/self/clear_refs once torch is imported) minus its RSS before the stream is
built, after `--batches` batches: the buffers, the decodes and the batches, without the
interpreter and torch themselves. Streams, at the
shipped defaults (data.shuffle_buffer 1000, data.max_buffered 10000, data.buffer_mb 256,
data.max_image_pixels 64 Mpx): `labeled` (the teacher's / student's P x K stream, 8 x 4 at 224 px),
`swav` (the pretrain stage's multi-crop stream, batch 32, 2 x 224 + 6 x 96 px crops), `finite`
(embed / eval: one pass, batch 64, resize 256 + crop 224); baseline: ImageFolder + DataLoader with
the same train transform, batch 32 (no buffer at all: what a worker costs without one).
Last output line: one JSON object {"bench", "ours" (the largest of our streams), "baseline", "unit",
"ratio", ...}.

  python bench/memory.py            # 320 photos of 3000x2000 (~1.6 MB each), 30 batches per stream
  python bench/memory.py --quick    # 120 photos, 8 batches
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STREAMS = ("labeled", "swav", "finite", "baseline")


def write_photos(folder: Path, n: int, classes: int, size: tuple[int, int], distinct: int = 12) -> int:
    """n photo-like JPEGs (gradients + texture + noise, quality 90) in folder/<class>/, made of
    `distinct` different images written under several names. Returns the mean file size."""
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    blobs = []
    for i in range(distinct):
        f = 0.002 + 0.01 * i / distinct
        img = np.stack([70 * np.sin(xx * f * (k + 1) + yy * f * 0.6) for k in range(3)], -1)
        img += rng.normal(0, 10, (h, w, 3)).astype(np.float32) + rng.uniform(60, 120)
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    for i in range(n):
        p = folder / f"class{i % classes:03d}" / f"{i:05d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(blobs[i % distinct])
    return int(np.mean([len(blobs[i % distinct]) for i in range(n)]))


def rss_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def reset_peak() -> None:
    """Forget the peak so far (the imports'): Linux resets VmHWM on "5" to clear_refs."""
    Path("/proc/self/clear_refs").write_text("5")


def probe(kind: str, root: Path, batches: int) -> dict:
    """In this process: build one stream, take `batches` batches, report the peak-RSS growth."""
    import torch

    from slade_dist.config import DataConfig, PretrainConfig
    from slade_dist.data import transforms
    from slade_dist.data.multicrop import swav_batches
    from slade_dist.data.readers import finite_batches, labeled_batches

    torch.set_num_threads(1)
    cfg = dataclasses.replace(DataConfig(), image_size=224, num_workers=0)
    reset_peak()
    before = rss_mb()[0]
    if kind == "labeled":
        it = labeled_batches(root / "shards", cfg, 8, 4, seed=0, rank=0, world=1)
    elif kind == "swav":
        pc = PretrainConfig(local_crops=6)
        it = swav_batches([str(root / "shards")], cfg, 32, seed=0, rank=0, world=1, pretrain_cfg=pc)
    elif kind == "finite":
        it = iter(finite_batches(root / "shards", cfg, 64, rank=0, world=1))
    else:
        from torchvision.datasets import ImageFolder

        tf = transforms.full_transform(transforms.train_geometry(cfg.image_size, cfg.crop_scale_min))
        ds = ImageFolder(str(root / "folder"), transform=tf)
        sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=10**9)
        it = iter(torch.utils.data.DataLoader(ds, batch_size=32, sampler=sampler, num_workers=0))
    n = 0
    for _ in range(batches):
        try:
            next(it)
        except StopIteration:  # the finite pass ends: a pass is what it holds
            break
        n += 1
    return {"stream": kind, "batches": n, "growth_mb": round(rss_mb()[1] - before, 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="120 photos, 8 batches per stream")
    ap.add_argument("--photos", type=int, default=320)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--probe", nargs=2, metavar=("STREAM", "ROOT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        out = probe(args.probe[0], Path(args.probe[1]), args.batches)
        print(json.dumps(out))
        return out
    if args.quick:
        args.photos, args.batches = 120, 8
    from slade_dist.data import writers

    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        root = Path(tmp)
        mean = write_photos(root / "folder", args.photos, 10, (3000, 2000))
        writers.convert("imagefolder", root / "folder", root / "shards", shard_size=100, workers=2, progress=False)
        rows = {}
        for kind in STREAMS:
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            cmd = [sys.executable, __file__, "--probe", kind, str(root), "--batches", str(args.batches)]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
            if r.returncode:
                raise SystemExit(f"probe {kind} failed:\n{r.stderr[-3000:]}")
            rows[kind] = json.loads(r.stdout.splitlines()[-1])
            print(
                f"{kind:9s} peak RSS growth {rows[kind]['growth_mb']:7.1f} MB ({rows[kind]['batches']} batches)",
                flush=True,
            )
    ours = max(rows[k]["growth_mb"] for k in ("labeled", "swav", "finite"))
    base = rows["baseline"]["growth_mb"]
    print(
        f"{args.photos} photos 3000x2000 (mean {mean / 2**20:.2f} MiB): one loader worker's work grows the peak RSS by "
        f"at most {ours:.0f} MB (ours, largest stream) vs {base:.0f} MB (ImageFolder, no buffer); "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    result = {
        "bench": "memory",
        "ours": ours,
        "baseline": base,
        "unit": "MB peak RSS growth per loader worker",
        "ratio": round(ours / base, 3) if base else None,
        "streams": {k: v["growth_mb"] for k, v in rows.items()},
        "photo_bytes_mean": mean,
        "photos": args.photos,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
