"""Dataset converters: official dataset layouts -> WebDataset shards (+ img2dataset indexing in place).

Owns: reading each dataset exactly as distributed (`plan_<format>`: the records of every split),
the dense class ids of each labeled split, and the resumable, parallel, deterministic shard writer
(`write_split`). Shard file I/O goes through `shards.py` (atomic tar, index.json, classes.json).

Per split: records are sorted by source path, then shuffled with a fixed seed (every shard gets a
mix of classes, which the P x K batcher needs), keyed `%08d` by that order, and cut into shards of
`shard_size`. Every image is decoded once here: an unreadable one is left out, counted and listed
in `rejects.txt`. JPEG/PNG/WEBP sources in RGB or grayscale are stored byte-for-byte (no quality
loss); others, and everything when `resize` is set (shorter side, only ever shrinking), are
re-encoded as JPEG. A finished shard leaves a record in `.parts/<shard>.json` (count, rejects and
a hash of its plan): re-running skips shards whose record matches and rewrites the others.
Output: single-split formats write into OUT; cub/cars196/inshop write OUT/<split>/.
Tests: tests/unit/test_writers.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import UserError
from ..fileio import atomic_write_json
from ..progress import progress as progress_bar
from .shards import count_tar_samples, shard_name, write_classes, write_index, write_shard
from .tars import TarSamples, image_bytes

FILE_EXTS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
PARTS_DIR = ".parts"
REJECTS_FILE = "rejects.txt"
_STORE_AS_IS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


class DatasetLayoutError(ValueError, UserError):
    """The --root directory does not look like the dataset it was said to be."""


@dataclass
class Record:
    """One source image. `label_key` orders classes (their dense id); None = unlabeled split."""

    src: Path
    label_key: Any = None
    class_name: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class SplitPlan:
    name: str
    records: list[Record]
    labeled: bool
    class_names: list[str] | None = None  # id -> name; shared mapping for query/gallery


# ----------------------------------------------------------------------------------- layouts
def _find(root: Path, *candidates: str) -> Path:
    for c in candidates:
        if (root / c).exists():
            return root / c
    raise DatasetLayoutError(
        f"{root}: none of {', '.join(candidates)} found (is --root the dataset's top directory, as distributed?)"
    )


def _read_id_lines(path: Path) -> dict[str, str]:
    """`id value...` lines -> {id: value} (value keeps inner spaces)."""
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise DatasetLayoutError(f"{path}:{n}: expected 'id value', got {line!r}")
        out[parts[0]] = parts[1].strip()
    return out


def _dense(records: list[Record]) -> list[str]:
    """Assign dense ids by sorted label_key; returns id -> class name. Records get meta['cls']."""
    keys = sorted({r.label_key for r in records})
    ids = {k: i for i, k in enumerate(keys)}
    names: dict[int, str] = {}
    for r in records:
        r.meta["cls"] = ids[r.label_key]
        names[ids[r.label_key]] = r.class_name or str(r.label_key)
    return [names[i] for i in range(len(keys))]


def _half_split(records: list[Record], what: str) -> dict[str, SplitPlan]:
    """DML protocol: the first half of the sorted class ids train, the rest test (CUB 1-100/101-200,
    Cars196 1-98/99-196)."""
    classes = sorted({r.label_key for r in records})
    if len(classes) < 2:
        raise DatasetLayoutError(f"{what}: need at least 2 classes for a train/test class split, got {len(classes)}")
    train_set = set(classes[: len(classes) // 2])
    train = [r for r in records if r.label_key in train_set]
    test = [r for r in records if r.label_key not in train_set]
    return {
        "train": SplitPlan("train", train, True, _dense(train)),
        "test": SplitPlan("test", test, True, _dense(test)),
    }


def plan_cub(root: Path) -> dict[str, SplitPlan]:
    if not (root / "images.txt").exists() and (root / "CUB_200_2011" / "images.txt").exists():
        root = root / "CUB_200_2011"
    images = _read_id_lines(_find(root, "images.txt"))
    labels = _read_id_lines(_find(root, "image_class_labels.txt"))
    classes = _read_id_lines(_find(root, "classes.txt"))
    records = []
    for img_id, rel in images.items():
        if img_id not in labels:
            raise DatasetLayoutError(f"{root}/image_class_labels.txt has no class for image id {img_id}")
        c = int(labels[img_id])
        records.append(Record(root / "images" / rel, c, classes.get(str(c), str(c)), {"source": f"images/{rel}"}))
    return _half_split(records, "cub")


def _mat_scalar(x: Any) -> Any:
    """Unwrap scipy.io.loadmat's nested 0-d / 1-element arrays."""
    while isinstance(x, np.ndarray):
        if x.size != 1:
            if x.dtype.kind in "US":
                return "".join(x.ravel().tolist())
            raise DatasetLayoutError(f"cars_annos.mat: expected a scalar field, got shape {x.shape}")
        x = x.reshape(-1)[0]
    return x.item() if hasattr(x, "item") else x


def plan_cars196(root: Path) -> dict[str, SplitPlan]:
    import scipy.io

    mat_path = _find(root, "cars_annos.mat")
    try:
        mat = scipy.io.loadmat(str(mat_path))
    except Exception as e:  # scipy raises several types for a bad file
        raise DatasetLayoutError(f"{mat_path}: not a readable MATLAB file ({e})") from e
    if "annotations" not in mat:
        raise DatasetLayoutError(
            f"{mat_path}: no 'annotations' struct (keys: {sorted(k for k in mat if not k.startswith('__'))})"
        )
    ann = mat["annotations"].reshape(-1)
    names = [str(_mat_scalar(n)) for n in mat["class_names"].reshape(-1)] if "class_names" in mat else []
    records = []
    for a in ann:
        rel = str(_mat_scalar(a["relative_im_path"]))
        c = int(_mat_scalar(a["class"]))
        name = names[c - 1] if 0 < c <= len(names) else str(c)
        records.append(Record(root / rel, c, name, {"source": rel, "official_test": int(_mat_scalar(a["test"]))}))
    return _half_split(records, "cars196")


def plan_inshop(root: Path) -> dict[str, SplitPlan]:
    part = _find(root, "list_eval_partition.txt", "Eval/list_eval_partition.txt")
    lines = [ln.split() for ln in part.read_text().splitlines()]
    rows = [ln for ln in lines if len(ln) == 3 and ln[2] in ("train", "query", "gallery")]
    if not rows:
        raise DatasetLayoutError(f"{part}: no 'image_name item_id train|query|gallery' lines")
    base = root if (root / rows[0][0]).exists() or not (root / "Img" / rows[0][0]).exists() else root / "Img"
    by_split: dict[str, list[Record]] = {"train": [], "query": [], "gallery": []}
    for rel, item, status in rows:
        by_split[status].append(Record(base / rel, item, item, {"source": rel, "item_id": item}))
    train = by_split["train"]
    # query and gallery share one id space (retrieval compares their labels)
    qg = by_split["query"] + by_split["gallery"]
    qg_names = _dense(qg)
    return {
        "train": SplitPlan("train", train, True, _dense(train)),
        "query": SplitPlan("query", by_split["query"], True, qg_names),
        "gallery": SplitPlan("gallery", by_split["gallery"], True, qg_names),
    }


def _hidden_truth(records: list[Record]) -> None:
    """Unlabeled companions: the true label goes only into json ("label", "class_name")."""
    keys = sorted({r.label_key for r in records})
    ids = {k: i for i, k in enumerate(keys)}
    for r in records:
        r.meta["label"] = ids[r.label_key]
        r.meta["class_name"] = r.class_name
        r.label_key = None


def plan_nabirds(root: Path) -> dict[str, SplitPlan]:
    images = _read_id_lines(_find(root, "images.txt"))
    labels = _read_id_lines(_find(root, "image_class_labels.txt"))
    classes = _read_id_lines(_find(root, "classes.txt"))
    records = []
    for img_id, rel in images.items():
        c = labels.get(img_id)
        if c is None:
            raise DatasetLayoutError(f"{root}/image_class_labels.txt has no class for image id {img_id}")
        records.append(Record(root / "images" / rel, int(c), classes.get(c, c), {"source": f"images/{rel}"}))
    _hidden_truth(records)
    return {"unlabeled": SplitPlan("unlabeled", records, False)}


def _image_files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in FILE_EXTS)


def plan_compcars(root: Path) -> dict[str, SplitPlan]:
    image_dir = _find(root, "image", "data/image")
    records = []
    for p in _image_files(image_dir):
        parts = p.relative_to(image_dir).parts
        if len(parts) != 4:
            continue  # not image/<make>/<model>/<year>/<file>
        make, model, year, _ = parts
        rel = p.relative_to(image_dir.parent).as_posix()
        records.append(
            Record(p, (make, model), f"{make}/{model}", {"source": rel, "make": make, "model": model, "year": year})
        )
    if not records:
        raise DatasetLayoutError(f"{image_dir}: no images under image/<make>/<model>/<year>/")
    _hidden_truth(records)
    return {"unlabeled": SplitPlan("unlabeled", records, False)}


def plan_fashion200k(root: Path) -> dict[str, SplitPlan]:
    label_dir = _find(root, "labels")
    seen: dict[str, Record] = {}
    for lf in sorted(label_dir.glob("*.txt")):
        for ln in lf.read_text(errors="replace").splitlines():
            parts = ln.split("\t") if "\t" in ln else ln.split(maxsplit=2)
            if len(parts) < 1 or not parts[0].strip():
                continue
            rel = parts[0].strip()
            if rel in seen:
                continue
            item_dir = str(Path(rel).parent.as_posix())
            desc = parts[2].strip() if len(parts) > 2 else ""
            category = Path(rel).parts[1] if len(Path(rel).parts) > 2 else ""
            seen[rel] = Record(
                root / rel,
                item_dir,
                item_dir,
                {"source": rel, "description": desc, "category": category, "label_file": lf.name},
            )
    if not seen:
        raise DatasetLayoutError(f"{label_dir}: no image lines in labels/*.txt")
    records = list(seen.values())
    _hidden_truth(records)
    return {"unlabeled": SplitPlan("unlabeled", records, False)}


def plan_imagefolder(root: Path) -> dict[str, SplitPlan]:
    if not root.is_dir():
        raise DatasetLayoutError(f"{root} is not a directory")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    records = []
    for d in class_dirs:
        for p in _image_files(d):
            records.append(Record(p, d.name, d.name, {"source": p.relative_to(root).as_posix()}))
    if records:
        return {"train": SplitPlan("train", records, True, _dense(records))}
    flat = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in FILE_EXTS)
    if not flat:
        raise DatasetLayoutError(f"{root}: no images (class sub-directories or a flat folder of images)")
    return {"unlabeled": SplitPlan("unlabeled", [Record(p, None, None, {"source": p.name}) for p in flat], False)}


PLANNERS: dict[str, Callable[[Path], dict[str, SplitPlan]]] = {
    "imagefolder": plan_imagefolder,
    "cub": plan_cub,
    "cars196": plan_cars196,
    "inshop": plan_inshop,
    "nabirds": plan_nabirds,
    "compcars": plan_compcars,
    "fashion200k": plan_fashion200k,
}
MULTI_SPLIT = {"cub", "cars196", "inshop"}
FORMATS = sorted([*PLANNERS, "img2dataset"])


# ------------------------------------------------------------------------------------ writing
def load_image(src: Path, resize: int = 0) -> tuple[str, bytes]:
    """Decode a source image fully once; return (member ext, bytes to store). Raises on bad images."""
    data = src.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # full decode: a truncated/corrupt file raises here
        fmt, mode, size = im.format, im.mode, im.size
        if min(size) < 1:
            raise ValueError(f"empty image {size}")
        if resize and min(size) > resize:
            scale = resize / min(size)
            new = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
            return "jpg", _jpeg(im.convert("RGB").resize(new, Image.BICUBIC, reducing_gap=3.0))
        if fmt in _STORE_AS_IS and mode in ("RGB", "L"):
            return _STORE_AS_IS[fmt], data
        return "jpg", _jpeg(im.convert("RGB"))


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@dataclass
class ShardJob:
    path: Path
    part: Path
    rows: list[tuple[str, str, int, str, dict[str, Any]]]  # key, src, cls (-1 unlabeled), class name, meta
    resize: int
    plan_hash: str


def _plan_hash(rows: Sequence[tuple], resize: int) -> str:
    h = hashlib.sha256(json.dumps([rows, resize], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def write_one_shard(job: ShardJob) -> dict[str, Any]:
    """Decode, encode and write one shard atomically, then its `.parts` record. Module level: runs in
    worker processes."""
    rejects: list[list[str]] = []

    def samples() -> Iterable[dict[str, Any]]:
        for key, src, cls, cname, meta in job.rows:
            try:
                ext, data = load_image(Path(src), job.resize)
            except Exception as e:  # any decoder/IO failure is a reject, never a crash
                rejects.append([src, f"{type(e).__name__}: {str(e)[:200]}"])
                continue
            body = {"source": meta.get("source", src), **{k: v for k, v in meta.items() if k not in ("cls",)}}
            sample: dict[str, Any] = {"__key__": key, ext: data}
            if cls >= 0:
                sample["cls"] = cls
                body["class_name"] = cname
            sample["json"] = json.dumps(body, sort_keys=True).encode()
            yield sample

    count = write_shard(job.path, samples(), mtime=0.0)
    if count == 0:
        job.path.unlink(missing_ok=True)
    record = {"name": job.path.name, "count": count, "rejects": rejects, "plan": job.plan_hash}
    atomic_write_json(job.part, record, indent=None)
    return record


def _finished(job: ShardJob) -> dict[str, Any] | None:
    if not job.part.exists():
        return None
    try:
        rec = json.loads(job.part.read_text())
    except ValueError:
        return None
    if rec.get("plan") != job.plan_hash or (rec.get("count", 0) > 0 and not job.path.exists()):
        return None
    return rec


def write_split(
    plan: SplitPlan,
    out_dir: Path,
    *,
    prefix: str | None = None,
    shard_size: int = 1000,
    workers: int = 1,
    resize: int = 0,
    seed: int = 0,
    progress: bool = True,
    extra_index: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write one split as shards under out_dir (resumable). Returns its index.json body + counts."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    prefix = prefix or plan.name
    out_dir.mkdir(parents=True, exist_ok=True)
    records = sorted(plan.records, key=lambda r: str(r.src))
    random.Random(seed).shuffle(records)
    rows = [
        (f"{i:08d}", str(r.src), int(r.meta.get("cls", -1)) if plan.labeled else -1, r.class_name or "", r.meta)
        for i, r in enumerate(records)
    ]
    jobs = []
    for s, start in enumerate(range(0, len(rows), shard_size)):
        chunk = rows[start : start + shard_size]
        name = shard_name(prefix, s)
        jobs.append(
            ShardJob(out_dir / name, out_dir / PARTS_DIR / f"{name}.json", chunk, resize, _plan_hash(chunk, resize))
        )
    _remove_stale(out_dir, prefix, {j.path.name for j in jobs})
    results = {j.path.name: r for j in jobs if (r := _finished(j)) is not None}
    todo = [j for j in jobs if j.path.name not in results]
    bar = progress_bar(len(rows), out_dir.name, "img", enabled=progress)
    bar.update(sum(len(j.rows) for j in jobs if j.path.name in results))
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
            for job, rec in zip(todo, pool.map(write_one_shard, todo)):
                results[job.path.name] = rec
                bar.update(len(job.rows))
    else:
        for job in todo:
            results[job.path.name] = write_one_shard(job)
            bar.update(len(job.rows))
    bar.close()
    ordered = [results[j.path.name] for j in jobs]
    rejects = [r for rec in ordered for r in rec["rejects"]]
    (out_dir / REJECTS_FILE).write_text("".join(f"{src}\t{why}\n" for src, why in rejects))
    if plan.labeled:
        write_classes(out_dir, plan.class_names or [])
    # the split written is the one asked for: a single-split format's --split names it (and its shards)
    extra = {"split": prefix, "rejected": len(rejects), "written_now": len(todo), **(extra_index or {})}
    if plan.labeled:
        extra["num_classes"] = len(plan.class_names or [])
    return write_index(
        out_dir, [r for r in ordered if r["count"] > 0], "labeled" if plan.labeled else "unlabeled", **extra
    )


def _remove_stale(out_dir: Path, prefix: str, keep: set[str]) -> None:
    """Shards of an earlier plan (e.g. another shard size) that the current plan does not write."""
    for part in (out_dir / PARTS_DIR).glob(f"{prefix}-*.tar.json"):
        name = part.name[: -len(".json")]
        if name not in keep:
            (out_dir / name).unlink(missing_ok=True)
            part.unlink(missing_ok=True)


def convert(
    fmt: str,
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    split: str = "all",
    shard_size: int = 1000,
    workers: int = 1,
    resize: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Convert a dataset; returns {split: index body}. Multi-split formats write OUT/<split>/."""
    root, out = Path(root), Path(out)
    if fmt == "img2dataset":
        return {"unlabeled": index_img2dataset(root, out, workers=workers, progress=progress)}
    if fmt not in PLANNERS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not root.is_dir():
        raise DatasetLayoutError(f"--root {root} is not a directory")
    plans = PLANNERS[fmt](root)
    if split != "all" and fmt in MULTI_SPLIT and split not in plans:
        raise ValueError(f"{fmt} has splits {', '.join(plans)}; --split {split!r} is not one of them")
    done = {}
    for name, plan in plans.items():
        if fmt in MULTI_SPLIT and split not in ("all", name):
            continue
        # a multi-split format writes a dir per split; a single-split one writes here, named by --split
        dest, prefix = (out / name, None) if fmt in MULTI_SPLIT else (out, split if split != "all" else None)
        done[prefix or name] = write_split(
            plan,
            dest,
            prefix=prefix,
            shard_size=shard_size,
            workers=workers,
            resize=resize,
            seed=seed,
            progress=progress,
            extra_index={"format": fmt},
        )
    return done


# ------------------------------------------------------------------------------- img2dataset
def validate_tar(path: str) -> dict[str, Any]:
    """Decode every image of one img2dataset tar once: {name, count, corrupt, truncated, rejects}."""
    tar = TarSamples(path)
    count, rejects = 0, []
    for s in tar:
        count += 1
        try:
            with Image.open(io.BytesIO(image_bytes(s))) as im:
                im.load()
        except Exception as e:  # any failure = corrupt sample; readers skip it too
            rejects.append([f"{Path(path).name}:{s['__key__']}", f"{type(e).__name__}: {str(e)[:200]}"])
    if tar.truncated:
        rejects.append([Path(path).name, f"truncated tar ({tar.error})"])
    return {
        "count": count,
        "corrupt": len(rejects) - int(tar.truncated),
        "truncated": tar.truncated,
        "rejects": rejects,
    }


def _tar_stamp(p: Path) -> str:
    st = p.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def index_img2dataset(root: Path, out: Path, *, workers: int = 1, progress: bool = True) -> dict[str, Any]:
    """Validate img2dataset WebDataset output in place (no copy) and write OUT/index.json pointing at
    its tars (relative paths), OUT/rejects.txt, per-tar records in OUT/.parts (resumable)."""
    root, out = Path(root), Path(out)
    tars = sorted(p for p in root.glob("*.tar") if re.search(r"\d+\.tar$", p.name) and not p.name.startswith("."))
    if not tars:
        raise DatasetLayoutError(f"{root}: no img2dataset shards (<digits>.tar) found")
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    todo = []
    for t in tars:
        part = out / PARTS_DIR / f"{t.name}.json"
        if part.exists():
            rec = json.loads(part.read_text())
            if rec.get("stamp") == _tar_stamp(t):
                results[t.name] = rec
                continue
        todo.append(t)
    bar = progress_bar(len(tars), f"validate {root.name}", "shard", enabled=progress)
    bar.update(len(results))
    pool = ProcessPoolExecutor(max_workers=min(workers, len(todo))) if workers > 1 and len(todo) > 1 else None
    try:
        it = pool.map(validate_tar, [str(t) for t in todo]) if pool else map(validate_tar, [str(t) for t in todo])
        for t, rec in zip(todo, it):
            rec.update(name=os.path.relpath(t, out), stamp=_tar_stamp(t))
            atomic_write_json(out / PARTS_DIR / f"{t.name}.json", rec, indent=None)  # read back on resume
            results[t.name] = rec
            bar.update(1)
    finally:
        if pool:
            pool.shutdown()
        bar.close()
    ordered = [results[t.name] for t in tars]
    rejects = [r for rec in ordered for r in rec["rejects"]]
    (out / REJECTS_FILE).write_text("".join(f"{a}\t{b}\n" for a, b in rejects))
    return write_index(
        out,
        [r for r in ordered if r["count"] > 0],
        "unlabeled",
        format="img2dataset",
        source=str(root.resolve()),
        corrupt=sum(r["corrupt"] for r in ordered),
        truncated=[r["name"] for r in ordered if r["truncated"]],
        rejected=len(rejects),
    )


__all__ = [
    "convert",
    "write_split",
    "index_img2dataset",
    "load_image",
    "PLANNERS",
    "FORMATS",
    "Record",
    "SplitPlan",
    "DatasetLayoutError",
    "count_tar_samples",
]
