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
Planted for measuring the curate stage (off by default): `demo.planted_test_copies` edited copies
of test images (crop, resize, JPEG re-encode, small rotation, or the same bytes: data/copies.py)
and `demo.duplicate_groups` unlabeled images with `duplicate_group_size - 1` edited copies each,
mixed into unlabeled/ under ordinary keys with ordinary json (the class they show). Which key is
what goes to `<out>/planted.json` only, outside every shard directory: nothing that trains reads it.
Each image's RNG is seeded by (seed, split, index), so shards are identical whatever the worker
count, and the ordinary unlabeled images are the same images with or without planted ones.
Tests: tests/unit/test_demo.py.
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
from ..fileio import atomic_write_json
from ..progress import progress as progress_bar
from .copies import CopyEdits, make_copy
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
PLANTED_FILE = "planted.json"  # beside the split dirs: the planted copies' identity (measuring only)
# the planted copies' edits: a quarter are the same bytes (a re-upload), the rest near-copies as a
# crawl holds them (resized, re-encoded, borders cropped, slightly rotated); the curate stage's
# calibration draws from its own, slightly wider config ranges (curate.copy_*)
PLANTED_EDITS = CopyEdits(
    min_area=0.8, max_rotation=3.0, min_scale=0.5, max_scale=2.0, min_quality=50, max_quality=95, exact_share=0.25
)


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
    """Global class id of every drawn (not planted) sample of a split, in drawing order."""
    t, s, e = cfg.train_classes, cfg.test_classes, cfg.extra_classes
    if split == "train":
        return [c for c in range(t) for _ in range(cfg.labeled_per_class)]
    if split == "test":
        return [c for c in range(t, t + s) for _ in range(cfg.test_per_class)]
    ids = [c for c in range(t + s + e) for _ in range(cfg.unlabeled_per_class)]
    return [ids[i] for i in np.random.default_rng([cfg.seed, 99]).permutation(len(ids))]


# An entry of the unlabeled plan: ("image", j) the j-th drawn image, ("test_copy", t, c) planted
# copy c of test image t, ("dup", j, g, m) copy m of drawn image j, the original of group g.
Entry = tuple


def _unlabeled_plan(cfg: DemoConfig) -> list[Entry]:
    """Every unlabeled sample in key order: the drawn images, and the planted copies mixed in."""
    drawn = _split_plan(cfg, "unlabeled")
    entries: list[Entry] = [("image", j) for j in range(len(drawn))]
    planted = _planted_entries(cfg, len(drawn))
    if not planted:
        return entries  # exactly the plan of a demo without planted copies
    merged = entries + planted
    return [merged[i] for i in np.random.default_rng([cfg.seed, 98]).permutation(len(merged))]


def _planted_entries(cfg: DemoConfig, n_drawn: int) -> list[Entry]:
    n_test = len(_split_plan(cfg, "test"))
    if cfg.planted_test_copies and not n_test:
        raise ValueError("demo.planted_test_copies needs test images (demo.test_classes x test_per_class)")
    if cfg.duplicate_groups > n_drawn:
        raise ValueError(f"demo.duplicate_groups={cfg.duplicate_groups} is more than the {n_drawn} unlabeled images")
    rng = np.random.default_rng([cfg.seed, 97])
    # distinct test images while there are enough of them, then some get a second copy
    tests = rng.permutation(max(cfg.planted_test_copies, n_test))[: cfg.planted_test_copies] % n_test
    originals = rng.choice(n_drawn, cfg.duplicate_groups, replace=False)
    out: list[Entry] = [("test_copy", int(t), c) for c, t in enumerate(tests)]
    out += [("dup", int(j), g, m) for g, j in enumerate(originals) for m in range(1, cfg.duplicate_group_size)]
    return out


def _split_of(cfg: DemoConfig, global_id: int) -> str:
    if global_id < cfg.train_classes:
        return "train"
    return "test" if global_id < cfg.train_classes + cfg.test_classes else "extra"


def _image(cfg: DemoConfig, split: str, i: int, gid: int, table: list[tuple[int, ...]]) -> bytes:
    """The JPEG of drawn sample i of a split (class gid)."""
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), i])
    img = render(table[gid], cfg.image_size, rng)
    return encode_jpeg(img, quality=int(rng.integers(75, 95)))


def _key(split: str, i: int) -> str:
    return f"{split}{i:07d}"


def _samples(
    cfg: DemoConfig, split: str, start: int, stop: int, plan: list[int], table: list[tuple[int, ...]]
) -> Iterator[dict[str, Any]]:
    offset = {"train": 0, "test": cfg.train_classes}.get(split, 0)
    for i in range(start, stop):
        gid = plan[i]
        sample: dict[str, Any] = {"__key__": _key(split, i), "jpg": _image(cfg, split, i, gid, table)}
        sample["cls"] = gid - offset
        sample["json"] = json.dumps({"source": "demo", "class_name": class_name(table[gid])}).encode()
        yield sample


def _unlabeled_samples(
    cfg: DemoConfig, start: int, stop: int, table: list[tuple[int, ...]], planted: list[dict[str, Any]]
) -> Iterator[dict[str, Any]]:
    """Unlabeled samples [start, stop); a planted one's identity is appended to `planted`."""
    plan, drawn, tests = _unlabeled_plan(cfg), _split_plan(cfg, "unlabeled"), _split_plan(cfg, "test")
    for i in range(start, stop):
        entry = plan[i]
        key = _key("unlabeled", i)
        if entry[0] == "image":
            gid = drawn[entry[1]]
            jpg = _image(cfg, "unlabeled", entry[1], gid, table)
        elif entry[0] == "test_copy":
            _, t, c = entry
            gid = tests[t]
            jpg, edit = make_copy(
                _image(cfg, "test", t, gid, table), np.random.default_rng([cfg.seed, 96, c]), PLANTED_EDITS
            )
            planted.append({"kind": "test_copy", "key": key, "of": _key("test", t), "edit": edit})
        else:
            _, j, g, m = entry
            gid = drawn[j]
            jpg, edit = make_copy(
                _image(cfg, "unlabeled", j, gid, table), np.random.default_rng([cfg.seed, 95, g, m]), PLANTED_EDITS
            )
            planted.append({"kind": "dup", "key": key, "group": g, "of_image": j, "edit": edit})
        # hidden truth, only for purity/NMI and pair precision, never trained on; a planted copy's
        # json is an ordinary one (the class it shows)
        meta = {"source": "demo", "class_name": class_name(table[gid]), "label": gid, "split": _split_of(cfg, gid)}
        yield {"__key__": key, "jpg": jpg, "json": json.dumps(meta).encode()}


def _split_size(cfg: DemoConfig, split: str) -> int:
    return len(_unlabeled_plan(cfg)) if split == "unlabeled" else len(_split_plan(cfg, split))


def _write_one(args: tuple[DemoConfig, str, int, str]) -> dict[str, Any]:
    cfg, split, shard_idx, out = args
    table = class_table(cfg)
    start = shard_idx * cfg.shard_size
    stop = min(start + cfg.shard_size, _split_size(cfg, split))
    name = shard_name(split, shard_idx)
    planted: list[dict[str, Any]] = []
    if split == "unlabeled":
        samples = _unlabeled_samples(cfg, start, stop, table, planted)
    else:
        samples = _samples(cfg, split, start, stop, _split_plan(cfg, split), table)
    n = write_shard(Path(out) / split / name, samples, mtime=0.0)
    return {"name": name, "count": n, "planted": planted}


def _planted_truth(cfg: DemoConfig, reported: list[dict[str, Any]]) -> dict[str, Any]:
    """planted.json: each test copy (its key, the test key it copies, the edit) and each duplicate
    group (the original's key first, then its copies' keys, and their edits)."""
    original_key = {e[1]: _key("unlabeled", i) for i, e in enumerate(_unlabeled_plan(cfg)) if e[0] == "image"}
    groups: dict[int, dict[str, Any]] = {}
    for r in sorted((r for r in reported if r["kind"] == "dup"), key=lambda r: r["key"]):
        g = groups.setdefault(r["group"], {"keys": [original_key[r["of_image"]]], "edits": ["original"]})
        g["keys"].append(r["key"])
        g["edits"].append(r["edit"])
    copies = sorted(
        ({k: r[k] for k in ("key", "of", "edit")} for r in reported if r["kind"] == "test_copy"), key=lambda r: r["key"]
    )
    return {
        "about": "identity of the demo's planted copies, for measuring the curate stage only; nothing trains on it",
        "test_copies": copies,
        "duplicate_groups": [groups[g] for g in sorted(groups)],
    }


def generate(cfg: DemoConfig, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Write train/, test/, unlabeled/ under cfg.out. Skips the work when the same parameters
    were already written (the parameters are stored in each index.json). Returns counts + rate."""
    out = Path(cfg.out)
    params = asdict(cfg)
    params.pop("workers")  # the worker count never changes the bytes written
    params.pop("out")
    if cfg.planted_test_copies or cfg.duplicate_groups:  # the planted edits' ranges change the bytes too
        params["planted_edits"] = asdict(PLANTED_EDITS)
    if not force and _already_written(out, params):
        return {"skipped": True, "out": str(out)}
    table = class_table(cfg)
    jobs = []
    for split in SPLITS:
        n = _split_size(cfg, split)
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
    _write_planted(out, cfg, [p for r in results["unlabeled"] for p in r.pop("planted")])
    for split in SPLITS:
        for r in results[split]:
            r.pop("planted", None)
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


def _write_planted(out: Path, cfg: DemoConfig, reported: list[dict[str, Any]]) -> None:
    path = out / PLANTED_FILE
    if cfg.planted_test_copies or cfg.duplicate_groups:
        atomic_write_json(path, _planted_truth(cfg, reported), indent=1)
    else:
        path.unlink(missing_ok=True)  # another demo's truth must not describe these shards


def read_planted(out: str | Path) -> dict[str, Any]:
    """The planted copies' identity of a demo written under `out` (measuring code only)."""
    return json.loads((Path(out) / PLANTED_FILE).read_text())


def _already_written(out: Path, params: dict[str, Any]) -> bool:
    try:
        return all(read_index(out / s, rebuild=False).get("demo") == params for s in SPLITS)
    except (FileNotFoundError, json.JSONDecodeError):
        return False
