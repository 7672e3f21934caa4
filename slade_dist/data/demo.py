"""Procedural "fine-grained" demo dataset: deterministic, CPU-fast, written as WebDataset shards.

Owns: the generator behind `python -m slade_dist demo-data`. Every class is a combination of fine
attributes of a small bird-like object (body shape, head colour, number of wing stripes, tail
shape, eye side); classes share this attribute vocabulary, so what is learned on the labeled train
classes transfers to the class-disjoint test classes, as on CUB. Nuisance variation per image:
pose (rotation, mirror), scale, position, body-colour jitter, background colour and clutter,
JPEG noise. Splits (formats of docs/ARCHITECTURE.md "Data formats"):
  train/      labeled, `cls` dense 0..T-1, few images per class
  test/       labeled, class-disjoint from train, `cls` dense 0..S-1
  unlabeled/  many images of train, test and extra unseen classes; the true class is only in
              `json` ("label", "class_name", "split") for measuring pseudo-label purity.
Each image's RNG is seeded by (seed, split, index), so shards are identical whatever the worker
count. Tests: tests/unit/test_demo.py.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..config import DemoConfig
from ..progress import progress as progress_bar
from .shards import encode_jpeg, read_index, shard_name, write_classes, write_index, write_shard

# The attribute vocabulary. 4 x 4 x 4 x 2 x 2 = 256 distinct classes at most.
BODY_SHAPES = ("ellipse", "round", "long", "diamond")
HEAD_COLOURS = ((220, 40, 40), (40, 90, 220), (240, 200, 30), (30, 170, 60))
HEAD_NAMES = ("red", "blue", "yellow", "green")
STRIPES = (0, 1, 2, 3)
TAILS = ("fan", "spike")
EYES = ("dark", "white")
MAX_CLASSES = len(BODY_SHAPES) * len(HEAD_COLOURS) * len(STRIPES) * len(TAILS) * len(EYES)
SPLITS = ("train", "test", "unlabeled")


def class_table(cfg: DemoConfig) -> list[tuple[int, int, int, int, int]]:
    """Attribute tuples of all classes (train, then test, then extra), a seeded draw."""
    n = cfg.train_classes + cfg.test_classes + cfg.extra_classes
    if n > MAX_CLASSES:
        raise ValueError(
            f"demo: {n} classes requested but the attribute space has {MAX_CLASSES}; "
            f"lower demo.train_classes/test_classes/extra_classes"
        )
    combos = list(
        itertools.product(
            range(len(BODY_SHAPES)), range(len(HEAD_COLOURS)), range(len(STRIPES)), range(len(TAILS)), range(len(EYES))
        )
    )
    order = np.random.default_rng(cfg.seed).permutation(len(combos))[:n]
    return [combos[i] for i in order]


def class_name(attrs: tuple[int, ...]) -> str:
    b, h, s, t, e = attrs
    return f"{HEAD_NAMES[h]}-headed {BODY_SHAPES[b]} {STRIPES[s]}-stripe {TAILS[t]}-tail {EYES[e]}-eye"


def _rotate(points: np.ndarray, angle: float, centre: np.ndarray) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return (points - centre) @ np.array([[c, s], [-s, c]]) + centre


def render(attrs: tuple[int, ...], size: int, rng: np.random.Generator) -> Image.Image:
    """One image of the class with these attributes, nuisance drawn from rng."""
    body, head, stripes, tail, eye = attrs
    bg = rng.integers(60, 200, size=3)
    img = Image.new("RGB", (size, size), tuple(int(v) for v in bg))
    draw = ImageDraw.Draw(img)
    u = size / 64.0  # geometry is designed on a 64 px canvas
    for _ in range(int(rng.integers(3, 9))):  # background clutter
        col = tuple(int(v) for v in np.clip(bg + rng.integers(-70, 70, size=3), 0, 255))
        x, y = rng.uniform(0, size, size=2)
        r = rng.uniform(2, 8) * u
        if rng.random() < 0.5:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=col)
        else:
            draw.line(
                [x, y, x + rng.uniform(-20, 20) * u, y + rng.uniform(-20, 20) * u], fill=col, width=max(1, int(u * 2))
            )
    scale = rng.uniform(0.7, 1.05) * u
    angle = rng.uniform(-0.5, 0.5)
    mirror = -1.0 if rng.random() < 0.5 else 1.0
    centre = np.array([size / 2, size / 2]) + rng.uniform(-6, 6, size=2) * u
    body_col = np.array([150, 110, 80]) + rng.integers(-40, 40, size=3)

    def pts(local: list[tuple[float, float]]) -> list[tuple[float, float]]:
        p = np.array(local, dtype=float) * scale
        p[:, 0] *= mirror
        return [tuple(v) for v in _rotate(p + centre, angle, centre)]

    def ellipse_poly(cx: float, cy: float, rx: float, ry: float, n: int = 20) -> list[tuple[float, float]]:
        return [(cx + rx * math.cos(2 * math.pi * k / n), cy + ry * math.sin(2 * math.pi * k / n)) for k in range(n)]

    # tail first (behind the body)
    if TAILS[tail] == "fan":
        draw.polygon(pts([(-14, 0), (-26, -9), (-26, 9)]), fill=tuple(int(v) for v in body_col * 0.7))
    else:
        draw.polygon(pts([(-12, -2), (-30, 0), (-12, 2)]), fill=tuple(int(v) for v in body_col * 0.6))
    shape = BODY_SHAPES[body]
    rx, ry = {"ellipse": (16, 10), "round": (12, 12), "long": (20, 7), "diamond": (16, 11)}[shape]
    outline = [(-rx, 0), (0, -ry), (rx, 0), (0, ry)] if shape == "diamond" else ellipse_poly(0, 0, rx, ry)
    draw.polygon(pts(outline), fill=tuple(int(v) for v in np.clip(body_col, 0, 255)))
    for k in range(STRIPES[stripes]):  # wing stripes: the finest detail
        x0 = -6 + 5 * k
        draw.line(pts([(x0, -ry * 0.6), (x0 + 3, ry * 0.6)]), fill=(25, 25, 25), width=max(1, int(scale * 1.6)))
    hx = rx + 5
    draw.polygon(pts(ellipse_poly(hx, -3, 6, 6, 12)), fill=HEAD_COLOURS[head])
    draw.polygon(pts([(hx + 5, -4), (hx + 11, -2), (hx + 5, 0)]), fill=(230, 150, 40))  # beak
    eye_col = (10, 10, 10) if EYES[eye] == "dark" else (250, 250, 250)
    draw.polygon(pts(ellipse_poly(hx + 2, -5, 1.8, 1.8, 8)), fill=eye_col)
    return img


def _split_plan(cfg: DemoConfig, split: str) -> list[int]:
    """Global class id of every sample of a split, in sample order."""
    t, s, e = cfg.train_classes, cfg.test_classes, cfg.extra_classes
    if split == "train":
        return [c for c in range(t) for _ in range(cfg.labeled_per_class)]
    if split == "test":
        return [c for c in range(t, t + s) for _ in range(cfg.test_per_class)]
    ids = [c for c in range(t + s + e) for _ in range(cfg.unlabeled_per_class)]
    return [ids[i] for i in np.random.default_rng([cfg.seed, 99]).permutation(len(ids))]


def _split_of(cfg: DemoConfig, global_id: int) -> str:
    if global_id < cfg.train_classes:
        return "train"
    return "test" if global_id < cfg.train_classes + cfg.test_classes else "extra"


def _samples(
    cfg: DemoConfig, split: str, start: int, stop: int, plan: list[int], table: list[tuple[int, ...]]
) -> Iterator[dict[str, Any]]:
    split_id = SPLITS.index(split)
    offset = {"train": 0, "test": cfg.train_classes}.get(split, 0)
    for i in range(start, stop):
        gid = plan[i]
        rng = np.random.default_rng([cfg.seed, split_id, i])
        img = render(table[gid], cfg.image_size, rng)
        sample: dict[str, Any] = {
            "__key__": f"{split}{i:07d}",
            "jpg": encode_jpeg(img, quality=int(rng.integers(75, 95))),
        }
        meta = {"source": "demo", "class_name": class_name(table[gid])}
        if split == "unlabeled":  # hidden truth: only for purity/NMI, never trained on
            meta.update(label=gid, split=_split_of(cfg, gid))
        else:
            sample["cls"] = gid - offset
        sample["json"] = json.dumps(meta).encode()
        yield sample


def _write_one(args: tuple[DemoConfig, str, int, str]) -> dict[str, Any]:
    cfg, split, shard_idx, out = args
    plan = _split_plan(cfg, split)
    table = class_table(cfg)
    start = shard_idx * cfg.shard_size
    stop = min(start + cfg.shard_size, len(plan))
    name = shard_name(split, shard_idx)
    n = write_shard(Path(out) / split / name, _samples(cfg, split, start, stop, plan, table), mtime=0.0)
    return {"name": name, "count": n}


def generate(cfg: DemoConfig, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Write train/, test/, unlabeled/ under cfg.out. Skips the work when the same parameters
    were already written (the parameters are stored in each index.json). Returns counts + rate."""
    out = Path(cfg.out)
    params = asdict(cfg)
    params.pop("workers")  # the worker count never changes the bytes written
    params.pop("out")
    if not force and _already_written(out, params):
        return {"skipped": True, "out": str(out)}
    table = class_table(cfg)
    jobs = []
    for split in SPLITS:
        n = len(_split_plan(cfg, split))
        jobs += [(cfg, split, k, str(out)) for k in range(math.ceil(n / cfg.shard_size))]
    t0 = time.time()
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    bar = progress_bar(len(jobs), "demo shards", "shard", enabled=progress)
    with ProcessPoolExecutor(max_workers=cfg.workers) as pool:
        for job, res in zip(jobs, pool.map(_write_one, jobs)):
            results[job[1]].append(res)
            bar.update(1)
    bar.close()
    seconds = time.time() - t0
    for split in SPLITS:
        extra = {"demo": params}
        write_index(out / split, results[split], "unlabeled" if split == "unlabeled" else "labeled", **extra)
    t = cfg.train_classes
    write_classes(out / "train", [class_name(a) for a in table[:t]])
    write_classes(out / "test", [class_name(a) for a in table[t : t + cfg.test_classes]])
    total = sum(r["count"] for rs in results.values() for r in rs)
    return {
        "skipped": False,
        "out": str(out),
        "images": total,
        "seconds": round(seconds, 2),
        "images_per_minute": round(total / max(seconds, 1e-9) * 60),
        "counts": {s: sum(r["count"] for r in rs) for s, rs in results.items()},
    }


def _already_written(out: Path, params: dict[str, Any]) -> bool:
    try:
        return all(read_index(out / s, rebuild=False).get("demo") == params for s in SPLITS)
    except (FileNotFoundError, json.JSONDecodeError):
        return False
