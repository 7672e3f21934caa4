"""Benchmark: our WebDataset training pipeline vs torchvision ImageFolder + DataLoader.

Both read the SAME JPEG files (written here into a temp ImageFolder; our shards store those bytes
unchanged), apply the same transforms (slade_dist.data.transforms: RandomResizedCrop(scale=(0.16,1))
+ flip + float + ImageNet normalisation), with the same worker count and batch size, in this one
process, alternating rounds. Ours: labeled_batches (resampled shards, P x K batcher, decode +
augment in workers, one normalisation per batch). Baseline: ImageFolder(PIL loader) + random
sampler + default collate. Figure: images/s delivered to the main process. A third row, ours with
data.decode: device on this machine's device (the CPU here: workers hand over the JPEG bytes, the
main process decodes each batch with torchvision.io.decode_jpeg and transforms it; on a GPU the
decode is nvJPEG's), is reported beside them ("device_decode").
Last output line: one JSON object {"bench", "ours", "baseline", "unit", "ratio", ...}.

  python bench/loader.py            # 2000 images of 500x375, 2 workers
  python bench/loader.py --quick    # 300 images, under a minute
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slade_dist.config import DataConfig  # noqa: E402
from slade_dist.data import transforms, writers  # noqa: E402
from slade_dist.data.readers import labeled_batches  # noqa: E402


def make_images(root: Path, n: int, classes: int, size: tuple[int, int], seed: int = 0) -> int:
    """n photo-like JPEGs (smooth gradients + texture, ~quality 90) in root/<class>/; returns bytes."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    noise = rng.normal(0, 12, (h, 2 * w, 3)).astype(np.float32)  # sliced per image: cheap variety
    waves = [
        np.stack([60 * np.sin(xx * f * (k + 1) + yy * f * 0.7) for k in range(3)], -1)
        for f in np.linspace(0.005, 0.05, 8)
    ]
    total = 0
    for i in range(n):
        c = i % classes
        off = int(rng.integers(0, w))
        img = waves[i % 8] + rng.uniform(0, 128, 3).astype(np.float32) + noise[:, off : off + w]
        buf = io.BytesIO()
        Image.fromarray(np.clip(img + 64, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        p = root / f"class{c:03d}" / f"{i:06d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(buf.getvalue())
        total += len(buf.getvalue())
    return total


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def time_batches(it, n_batches: int, warmup: int) -> float:
    """images/s over n_batches after `warmup` batches (worker start-up excluded)."""
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    n = 0
    for _ in range(n_batches):
        b = next(it)
        images = b["images"] if isinstance(b, dict) else b[0]
        n += images.shape[0]
    return n / (time.perf_counter() - t0)


def run_ours(shards: Path, cfg: DataConfig, P: int, K: int, n_batches: int, warmup: int) -> float:
    stream = labeled_batches(shards, cfg, P, K, seed=0, rank=0, world=1)
    return time_batches(stream, n_batches, warmup)


def run_device(shards: Path, cfg: DataConfig, P: int, K: int, n_batches: int, warmup: int) -> float:
    """Ours with data.decode: device (the rank decodes the JPEGs of each batch)."""
    return run_ours(shards, dataclasses.replace(cfg, decode="device"), P, K, n_batches, warmup)


def run_baseline(folder: Path, cfg: DataConfig, batch: int, n_batches: int, warmup: int) -> float:
    from torchvision.datasets import ImageFolder

    tf = transforms.full_transform(transforms.train_geometry(cfg.image_size, cfg.crop_scale_min))
    ds = ImageFolder(str(folder), transform=tf)
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=10**9)  # never runs out
    dl = torch.utils.data.DataLoader(
        ds,
        batch_size=batch,
        sampler=sampler,
        num_workers=cfg.num_workers,
        drop_last=True,
        multiprocessing_context="fork",
    )
    return time_batches(iter(dl), n_batches, warmup)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced size (under a minute)")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--classes", type=int, default=50)
    ap.add_argument("--width", type=int, default=500)
    ap.add_argument("--height", type=int, default=375)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--P", type=int, default=8)
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--batches", type=int, default=60, help="timed batches per round")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (ours, baseline) averaged")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.classes, args.batches, args.rounds = 300, 15, 15, 2
    torch.set_num_threads(1)
    cfg = dataclasses.replace(
        DataConfig(),
        image_size=args.image_size,
        num_workers=args.workers,
        max_buffered=max(1000, 4 * args.P * args.K),
        shuffle_buffer=200,
    )
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        folder, shards = Path(tmp) / "folder", Path(tmp) / "shards"
        nbytes = make_images(folder, args.images, args.classes, (args.width, args.height))
        t0 = time.perf_counter()
        writers.convert("imagefolder", folder, shards, shard_size=200, workers=args.workers, progress=False)
        write_s = time.perf_counter() - t0
        ours, base, dev = [], [], []
        for r in range(args.rounds):
            ours.append(run_ours(shards, cfg, args.P, args.K, args.batches, warmup=3))
            base.append(run_baseline(folder, cfg, args.P * args.K, args.batches, warmup=3))
            dev.append(run_device(shards, cfg, args.P, args.K, args.batches, warmup=3))
            print(
                f"round {r}: ours {ours[-1]:.1f} img/s, baseline (ImageFolder) {base[-1]:.1f} img/s, "
                f"ours with data.decode=device ({device_name()}) {dev[-1]:.1f} img/s",
                flush=True,
            )
    o, b, d = float(np.mean(ours)), float(np.mean(base)), float(np.mean(dev))
    print(
        f"{args.images} JPEGs {args.width}x{args.height} (mean {nbytes / args.images / 1024:.1f} KiB), "
        f"{args.workers} workers, batch {args.P}x{args.K}, crop {args.image_size}: "
        f"ours {o:.1f} img/s vs ImageFolder {b:.1f} img/s -> ratio {o / b:.2f} (goal >= 1.3); "
        f"shard writing {args.images / write_s:.0f} img/s; data.decode=device on {device_name()}: {d:.1f} img/s "
        f"(ratio {d / b:.2f})"
    )
    result = {
        "bench": "loader",
        "ours": round(o, 1),
        "baseline": round(b, 1),
        "unit": "images/s",
        "ratio": round(o / b, 3),
        "images": args.images,
        "workers": args.workers,
        "write_images_per_s": round(args.images / write_s, 1),
        "device_decode": {"device": device_name(), "images_per_s": round(d, 1), "ratio": round(d / b, 3)},
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
