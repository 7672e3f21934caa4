"""Dataset layouts, read exactly as distributed, before anything is written: `plan_<format>` (the
records of every split, the dense class ids of each labeled one) and `walk_tree` (every file under
a root: an image to read, or skipped with why). What each format reads and writes:
slade_dist/data/README.md "Writing shards"; writers.py writes the plans.
Tests: tests/unit/test_writers.py (through writers.convert), tests/integration/test_hazards.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .rejects import reason

FILE_EXTS = (".jpg", ".jpeg", ".jfif", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


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
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path under the root, why not read)


@dataclass
class Tree:
    """Every file under a root: the images to read, and the rest with why they are not read."""

    images: list[Path]
    skipped: list[tuple[str, str]]


def walk_tree(root: Path) -> Tree:
    """All files under root, sorted, accounted for. Files with an image extension (FILE_EXTS) are
    images; any other file is skipped ("unknown extension"), as is anything that is not a file or
    directory. Hidden directories are not entered; a directory symlink is followed unless it points
    at the root, at a directory enclosing it (a loop) or at a directory read already."""
    tree = Tree([], [])
    seen: set[Path] = set()

    def visit(d: Path, enclosing: tuple[Path, ...]) -> None:
        seen.add(d.resolve())
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:  # unreadable (permissions): listed, the rest of the tree is still read
            tree.skipped.append((d.relative_to(root).as_posix() + "/", f"directory not readable ({reason(e)})"))
            return
        for entry in entries:
            path = Path(entry.path)
            rel = path.relative_to(root).as_posix()
            if entry.is_dir():
                target = path.resolve()
                if entry.name.startswith("."):
                    tree.skipped.append((rel + "/", "hidden directory (not read)"))
                elif entry.is_symlink() and target in enclosing:
                    tree.skipped.append(
                        (rel, f"symlink to an enclosing directory ({target.name or '/'}): not followed")
                    )
                elif target in seen:
                    tree.skipped.append((rel, "link to a directory read already: not followed"))
                else:
                    visit(path, (*enclosing, target))
            elif entry.is_file():
                if path.suffix.lower() in FILE_EXTS:
                    tree.images.append(path)
                else:
                    tree.skipped.append(
                        (rel, f"unknown extension {path.suffix or '(none)'!r}: not an image format read here")
                    )
            else:
                tree.skipped.append((rel, "not a regular file (broken link, device, socket)"))

    visit(root, (root.resolve(),))
    return tree


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


def _id_records(root: Path) -> list[Record]:
    """CUB's and NABirds' layout: images.txt, image_class_labels.txt, classes.txt, images/."""
    images = _read_id_lines(_find(root, "images.txt"))
    labels = _read_id_lines(_find(root, "image_class_labels.txt"))
    classes = _read_id_lines(_find(root, "classes.txt"))
    records = []
    for img_id, rel in images.items():
        if img_id not in labels:
            raise DatasetLayoutError(f"{root}/image_class_labels.txt has no class for image id {img_id}")
        c = int(labels[img_id])
        records.append(Record(root / "images" / rel, c, classes.get(str(c), str(c)), {"source": f"images/{rel}"}))
    return records


def plan_cub(root: Path) -> dict[str, SplitPlan]:
    if not (root / "images.txt").exists() and (root / "CUB_200_2011" / "images.txt").exists():
        root = root / "CUB_200_2011"
    return _half_split(_id_records(root), "cub")


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
    records = _id_records(root)
    _hidden_truth(records)
    return {"unlabeled": SplitPlan("unlabeled", records, False)}


def plan_compcars(root: Path) -> dict[str, SplitPlan]:
    image_dir = _find(root, "image", "data/image")
    records = []
    tree = walk_tree(image_dir)
    for p in tree.images:
        parts = p.relative_to(image_dir).parts
        if len(parts) != 4:
            tree.skipped.append((p.relative_to(image_dir).as_posix(), "not under image/<make>/<model>/<year>/"))
            continue
        make, model, year, _ = parts
        rel = p.relative_to(image_dir.parent).as_posix()
        records.append(
            Record(p, (make, model), f"{make}/{model}", {"source": rel, "make": make, "model": model, "year": year})
        )
    if not records:
        raise DatasetLayoutError(f"{image_dir}: no images under image/<make>/<model>/<year>/")
    _hidden_truth(records)
    return {"unlabeled": SplitPlan("unlabeled", records, False, skipped=tree.skipped)}


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


def plan_imagefolder(root: Path, unlabeled: bool = False) -> dict[str, SplitPlan]:
    """Class folders (ROOT/<class>/**) -> a labeled split; loose images (ROOT/*.jpg) -> an
    unlabeled one. Both at once is refused (no silent relabel), unless `unlabeled`: then every
    image under the root is one unlabeled split, sub-folders included."""
    if not root.is_dir():
        raise DatasetLayoutError(f"{root} is not a directory")
    tree = walk_tree(root)
    if not tree.images:
        raise DatasetLayoutError(f"{root}: no images (class sub-directories or a flat folder of images)")
    rel = [p.relative_to(root) for p in tree.images]
    loose = [r for r in rel if len(r.parts) == 1]
    nested = sorted({r.parts[0] for r in rel if len(r.parts) > 1})
    if unlabeled or not nested:
        records = [Record(p, None, None, {"source": r.as_posix()}) for p, r in zip(tree.images, rel)]
        return {"unlabeled": SplitPlan("unlabeled", records, False, skipped=tree.skipped)}
    if loose:
        raise DatasetLayoutError(
            f"{root} holds {len(loose)} loose images (e.g. {loose[0].as_posix()!r}) and sub-folders with images "
            f"({', '.join(nested[:5])}{', ...' if len(nested) > 5 else ''}): a flat folder is one unlabeled set, a "
            f"folder of class folders a labeled one. Pass --split unlabeled to read every image under it as one "
            f"unlabeled set, or move the loose images into class folders"
        )
    records = [Record(p, r.parts[0], r.parts[0], {"source": r.as_posix()}) for p, r in zip(tree.images, rel)]
    return {"train": SplitPlan("train", records, True, _dense(records), skipped=tree.skipped)}


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
