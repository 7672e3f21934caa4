"""Dataset converters: `convert` (a format's plans from layouts.py, written split by split by the
resumable, parallel, deterministic shard writer `write_split`) and the img2dataset validator
(`index_img2dataset`). Shard file I/O is shards.py's, `rejects.txt` rejects.py's. What a shard holds
and the properties (every file accounted for, determinism, resume): slade_dist/data/README.md
"Writing shards". Tests: tests/unit/test_writers.py, tests/integration/test_hazards.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..fileio import atomic_write_json
from ..progress import progress as progress_bar
from .layouts import FORMATS, MULTI_SPLIT, PLANNERS, DatasetLayoutError, SplitPlan, plan_imagefolder
from .rejects import reason, write_rejects
from .shards import encode_jpeg, shard_name, write_classes, write_index, write_shard
from .tars import TarSamples, image_bytes
from .transforms import (
    CONVERTER_LIMITS,
    DEFAULT_LIMITS,
    CorruptImage,
    ImageLimits,
    decode,
    decode_with_header,
    pil_image,
)

PARTS_DIR = ".parts"
_STORE_AS_IS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
# bumped when what a shard or a validation holds changes (the decoder contract): older records are redone
WRITER_VERSION = 2


# ------------------------------------------------------------------------------------ writing
def load_image(src: Path, resize: int = 0, limits: ImageLimits = CONVERTER_LIMITS) -> tuple[str, bytes]:
    """Decode a source image fully once, by the decoder contract; return (member ext, bytes to
    store). CorruptImage (with the contract's reason) for one outside it, OSError when unreadable."""
    data = src.read_bytes()
    head, img = decode_with_header(data, limits)  # header limits first, then the full decode: damage raises here
    fmt = head.format
    h, w = img.shape[1:]
    if resize and min(h, w) > resize:
        scale = resize / min(h, w)
        new = (max(1, round(w * scale)), max(1, round(h * scale)))
        return "jpg", encode_jpeg(pil_image(img).resize(new, Image.BICUBIC, reducing_gap=3.0))
    if fmt in _STORE_AS_IS:  # the stages decode these bytes by the same contract: kept as they are
        return _STORE_AS_IS[fmt], data
    return "jpg", encode_jpeg(pil_image(img))  # BMP / PPM / TIFF: the contract's 8-bit RGB


@dataclass
class ShardJob:
    path: Path
    part: Path
    rows: list[tuple[str, str, int, str, dict[str, Any]]]  # key, src, cls (-1 unlabeled), class name, meta
    resize: int
    plan_hash: str


def _plan_hash(rows: Sequence[tuple], resize: int) -> str:
    h = hashlib.sha256(json.dumps([rows, resize, WRITER_VERSION], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def write_one_shard(job: ShardJob) -> dict[str, Any]:
    """Decode, encode and write one shard atomically, then its `.parts` record. Module level: runs in
    worker processes."""
    rejects: list[dict[str, str]] = []

    def samples() -> Iterable[dict[str, Any]]:
        for key, src, cls, cname, meta in job.rows:
            try:
                ext, data = load_image(Path(src), job.resize)
            except Exception as e:  # any decoder/IO failure is a reject, never a crash
                rejects.append({"path": meta.get("source", src), "reason": reason(e), "action": "rejected"})
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
    for job, rec in zip(todo, _map(write_one_shard, todo, workers)):
        results[job.path.name] = rec
        bar.update(len(job.rows))
    bar.close()
    ordered = [results[j.path.name] for j in jobs]
    rejects = [r for rec in ordered for r in rec["rejects"]]
    skipped = [{"path": path, "reason": why, "action": "skipped"} for path, why in plan.skipped]
    write_rejects(out_dir, rejects + skipped)
    if plan.labeled:
        write_classes(out_dir, plan.class_names or [])
    # the split written is the one asked for: a single-split format's --split names it (and its shards)
    extra = {
        "split": prefix,
        "rejected": len(rejects),
        "skipped": len(skipped),
        "written_now": len(todo),
        **(extra_index or {}),
    }
    if plan.labeled:
        extra["num_classes"] = len(plan.class_names or [])
    return write_index(
        out_dir, [r for r in ordered if r["count"] > 0], "labeled" if plan.labeled else "unlabeled", **extra
    )


def _map(fn: Callable[[Any], Any], items: list[Any], workers: int) -> Iterator[Any]:
    """fn over items in order; in up to `workers` processes when there is more than one item."""
    if workers > 1 and len(items) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(items))) as pool:
            yield from pool.map(fn, items)
    else:
        yield from map(fn, items)


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
    plans = plan_imagefolder(root, unlabeled=split == "unlabeled") if fmt == "imagefolder" else PLANNERS[fmt](root)
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
def validate_tar(path: str, limits: ImageLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Decode every image of one img2dataset tar once, by the stages' decoder contract and tar
    reader (so it calls bad exactly what they skip): {count, corrupt, truncated, rejects}. corrupt
    counts what the stages count as corrupt: images outside the contract and samples left out
    for a repeated key."""
    tar = TarSamples(path)
    count, rejects = 0, []
    name = Path(path).name
    for s in tar:
        count += 1
        try:
            decode(image_bytes(s), limits)
        except CorruptImage as e:  # the stages skip and count it alike
            rejects.append({"path": f"{name}:{s['__key__']}", "reason": reason(e), "action": "rejected"})
    corrupt = len(rejects) + tar.duplicates
    if tar.duplicates:
        why = f"{tar.duplicates} samples repeat the key of an earlier sample of the tar (left out)"
        rejects.append({"path": name, "reason": why, "action": "rejected"})
    if tar.truncated:
        why = f"truncated tar ({reason(ValueError(tar.error))})"
        rejects.append({"path": name, "reason": why, "action": "rejected"})
    return {"count": count, "corrupt": corrupt, "truncated": tar.truncated, "rejects": rejects}


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
            if rec.get("stamp") == _tar_stamp(t) and rec.get("version") == WRITER_VERSION:
                results[t.name] = rec
                continue
        todo.append(t)
    bar = progress_bar(len(tars), f"validate {root.name}", "shard", enabled=progress)
    bar.update(len(results))
    try:
        for t, rec in zip(todo, _map(validate_tar, [str(t) for t in todo], workers)):
            rec.update(name=os.path.relpath(t, out), stamp=_tar_stamp(t), version=WRITER_VERSION)
            atomic_write_json(out / PARTS_DIR / f"{t.name}.json", rec, indent=None)  # read back on resume
            results[t.name] = rec
            bar.update(1)
    finally:
        bar.close()
    ordered = [results[t.name] for t in tars]
    rejects = [r for rec in ordered for r in rec["rejects"]]
    write_rejects(out, rejects)
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
