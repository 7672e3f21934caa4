"""Benchmark: our WebDataset training pipeline vs torchvision ImageFolder + DataLoader.

Both read the SAME JPEG files (written here into a temp ImageFolder; our shards store those bytes
unchanged), apply the same transforms (slade_dist.data.transforms: RandomResizedCrop(scale=(0.16,1))
+ flip + float + ImageNet normalisation), with the same worker count and batch size, in this one
process, alternating rounds. Ours: labeled_batches (resampled shards, P x K batcher, decode +
augment in workers, one normalisation per batch). Baseline: ImageFolder(PIL loader) + random
sampler + default collate. Figure: images/s delivered to the main process. A third row, ours with
data.decode: device on this machine's device (the CPU here: workers hand over the JPEG bytes, the
main process decodes each batch with torchvision.io.decode_jpeg and transforms it; on a GPU the
decode is nvJPEG's), is reported beside them ("device_decode"). "where_time_goes_us": each step's
microseconds per image on one thread (tar read, header check, decode, crop, normalisation; PIL
open and the per-image transform for the baseline) beside the worker time each pipeline spent per
delivered image (the rest is the queue to the main process, scheduling and the machine's load).
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


def _per_image_us(fn, items: list) -> float:
    t0 = time.perf_counter()
    for x in items:
        fn(x)
    return 1e6 * (time.perf_counter() - t0) / len(items)


def where_time_goes(shards: Path, folder: Path, cfg: DataConfig, batch: int, n: int = 96) -> dict[str, dict]:
    """Microseconds per image of each step, in this process on one thread (what a loader worker
    spends on it), ours and the baseline, on the same n images. Ours: the tar read (tars.TarSamples),
    the decoder contract's header check (PIL open + EXIF: part of the decode, shown alone), the decode,
    crop + flip, the batch normalisation's share. ImageFolder: PIL open + RGB convert, then
    crop + flip + float + normalise per image."""
    from torchvision.datasets.folder import pil_loader

    from slade_dist.data.tars import TarSamples, image_bytes

    geometry = transforms.train_geometry(cfg.image_size, cfg.crop_scale_min)
    samples: list[dict] = []
    t0 = time.perf_counter()
    for tar in sorted(shards.glob("*.tar")):
        samples += list(TarSamples(tar))
        if len(samples) >= n:
            break
    tar_us = 1e6 * (time.perf_counter() - t0) / len(samples)
    data = [image_bytes(s) for s in samples[:n]]
    limits = transforms.ImageLimits.of(cfg)
    decoded = [transforms.decode(d, limits) for d in data]  # warm-up + the crops' input
    crops = [geometry(x) for x in decoded]
    stack = torch.stack(crops[:batch])
    transforms.normalize_batch(stack)  # warm-up: the allocator's first 19 MB block costs 10x a later one
    t0 = time.perf_counter()
    for _ in range(10):
        transforms.normalize_batch(stack)
    ours = {
        "tar_read": tar_us,
        "header_check": _per_image_us(lambda d: transforms.read_header(d, limits), data),
        "decode_incl_header": _per_image_us(lambda d: transforms.decode(d, limits), data),
        "crop_flip": _per_image_us(geometry, decoded),
        "normalise": 1e6 * (time.perf_counter() - t0) / (10 * len(stack)),
    }
    paths = sorted(folder.rglob("*.jpg"))[:n]
    full = transforms.full_transform(geometry)
    pils = [pil_loader(str(p)) for p in paths]
    base = {
        "open_rgb": _per_image_us(lambda p: pil_loader(str(p)), paths),
        "crop_flip_normalise": _per_image_us(full, pils),
    }
    for d in (ours, base):
        d["sum"] = sum(d.values()) - (d["header_check"] if d is ours else 0)  # the header is inside the decode
    return {"ours": {k: round(v) for k, v in ours.items()}, "baseline": {k: round(v) for k, v in base.items()}}


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
        breakdown = where_time_goes(shards, folder, cfg, args.P * args.K)
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
    # worker time per delivered image: what the pipelines cost beyond the steps above is the queue
    # to the main process, worker scheduling and the machine's other load
    spent = {"ours": 1e6 * args.workers / o, "baseline": 1e6 * args.workers / b}
    for who in ("ours", "baseline"):
        breakdown[who]["worker_us_per_image_delivered"] = round(spent[who])
    print(
        "where the time goes (us per image, one thread): ours "
        + ", ".join(f"{k} {v}" for k, v in breakdown["ours"].items())
        + "; ImageFolder "
        + ", ".join(f"{k} {v}" for k, v in breakdown["baseline"].items())
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
        "where_time_goes_us": breakdown,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
