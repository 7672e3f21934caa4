"""Dataset converters (slade_dist/data/writers.py + CLI): tiny fake copies of each official layout
are converted and read back with the right labels and splits; corrupt images are rejected and
listed; writing is deterministic and resumable; img2dataset output is validated in place."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from slade_dist.data import writers
from slade_dist.data.readers import iter_shard
from slade_dist.data.rejects import read_rejects
from slade_dist.data.shards import read_classes, read_index, shard_paths, write_shard
from tests import _hazards as H

REPO = Path(__file__).resolve().parents[2]


def jpeg(color: int, size: int = 24) -> bytes:
    a = np.zeros((size, size, 3), np.uint8)
    a[..., 0] = color * 37 % 256
    a[..., 1] = np.arange(size)[None, :] * 5 % 256
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def put(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def read_split(d: Path) -> list[tuple[str, int, dict]]:
    """(key, cls, meta) of every sample in a shard dir, via the reader."""
    out = []
    for p in shard_paths(d):
        out.extend((k, c, m) for k, _, c, m in iter_shard(p))
    return out


CORRUPT = jpeg(1)[:40]  # a JPEG cut short: PIL refuses it


# --------------------------------------------------------------------------- fake layouts
def make_cub(root: Path) -> Path:
    base = root / "CUB_200_2011"
    images, labels, classes = [], [], []
    n = 0
    for c in range(1, 5):
        cname = f"{c:03d}.Bird_{c}"
        classes.append(f"{c} {cname}")
        for j in range(3):
            n += 1
            rel = f"{cname}/Bird_{c}_{j}.jpg"
            put(base / "images" / rel, CORRUPT if (c, j) == (1, 0) else jpeg(c))
            images.append(f"{n} {rel}")
            labels.append(f"{n} {c}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "classes.txt").write_text("\n".join(classes) + "\n")
    (base / "train_test_split.txt").write_text("".join(f"{i} 1\n" for i in range(1, n + 1)))
    return root


def make_cars(root: Path) -> Path:
    dt = [
        ("relative_im_path", "O"),
        ("bbox_x1", "O"),
        ("bbox_y1", "O"),
        ("bbox_x2", "O"),
        ("bbox_y2", "O"),
        ("class", "O"),
        ("test", "O"),
    ]
    rows = []
    for c in range(1, 5):
        for j in range(2):
            rel = f"car_ims/{len(rows) + 1:06d}.jpg"
            put(root / rel, jpeg(c))
            rows.append((rel, np.uint8(1), np.uint8(1), np.uint8(20), np.uint8(20), np.uint8(c), np.uint8(j)))
    ann = np.zeros((1, len(rows)), dtype=dt)
    for i, r in enumerate(rows):
        ann[0, i] = r
    names = np.empty((1, 4), dtype=object)
    for i in range(4):
        names[0, i] = f"Make Model {i + 1}"
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": ann, "class_names": names})
    return root


def make_inshop(root: Path) -> Path:
    rows = []
    plan = {
        "id_00000001": ["train"] * 3,
        "id_00000007": ["train"] * 2,
        "id_00000002": ["query", "gallery", "gallery"],
        "id_00000005": ["query", "gallery"],
    }
    for i, (item, statuses) in enumerate(plan.items()):
        for j, st in enumerate(statuses):
            rel = f"img/WOMEN/Dresses/{item}/{j:02d}_1_front.jpg"
            put(root / "Img" / rel, jpeg(i))
            rows.append(f"{rel}    {item} {st}")
    (root / "Eval").mkdir(parents=True)
    (root / "Eval" / "list_eval_partition.txt").write_text(
        f"{len(rows)}\nimage_name item_id evaluation_status\n" + "\n".join(rows) + "\n"
    )
    return root


def make_nabirds(root: Path) -> Path:
    images, labels = [], []
    for c in (295, 313):
        for j in range(3):
            uid = f"{c:04d}{j:04d}-aaaa-bbbb-cccc-dddddddddddd"
            rel = f"{c:04d}/{uid.replace('-', '')}.jpg"
            put(root / "images" / rel, jpeg(c))
            images.append(f"{uid} {rel}")
            labels.append(f"{uid} {c}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "classes.txt").write_text("0 Birds\n295 Black-footed Albatross\n313 Laysan Albatross\n")
    return root


def make_compcars(root: Path) -> Path:
    for make, model, year in [("78", "1", "2014"), ("78", "3", "2012"), ("5", "12", "2010")]:
        for j in range(2):
            put(root / "data" / "image" / make / model / year / f"{j:04x}a.jpg", jpeg(int(model)))
    return root


def make_fashion(root: Path) -> Path:
    lines = []
    for item in ("51727804", "50001111"):
        for j in range(2):
            rel = f"women/dresses/casual_and_day_dresses/{item}/{item}_{j}.jpeg"
            put(root / rel, jpeg(int(item[-1])))
            lines.append(f"{rel}\t0.83\tblack casual dress {item}")
    lines.append("women/dresses/casual_and_day_dresses/9/9_0.jpeg\t0.5\tmissing file")
    put(root / "labels" / "dress_train_detect_all.txt", ("\n".join(lines) + "\n").encode())
    return root


def make_img2dataset(root: Path) -> Path:
    root.mkdir(parents=True)
    for s in range(3):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tf:
            for j in range(4):
                key = f"{s:05d}{j:04d}"
                for ext, data in [
                    ("jpg", CORRUPT if (s, j) == (1, 2) else jpeg(j)),
                    ("json", json.dumps({"key": key, "url": f"http://x/{key}", "status": "success"}).encode()),
                    ("txt", b"a caption"),
                ]:
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
        (root / f"{s:05d}_stats.json").write_text("{}")
    raw = (root / "00002.tar").read_bytes()
    (root / "00002.tar").write_bytes(raw[: len(raw) // 2 + 100])  # truncated mid-member
    return root


# ------------------------------------------------------------------------------------ tests
def test_cub_class_split_labels_and_rejects(tmp_path):
    out = tmp_path / "out"
    done = writers.convert("cub", make_cub(tmp_path / "cub"), out, shard_size=4, progress=False)
    assert set(done) == {"train", "test"}
    train, test = read_split(out / "train"), read_split(out / "test")
    assert len(train) == 5 and len(test) == 6  # one train image was corrupt
    assert read_classes(out / "train") == ["001.Bird_1", "002.Bird_2"]
    assert read_classes(out / "test") == ["003.Bird_3", "004.Bird_4"]
    for split, rows in (("train", train), ("test", test)):
        names = read_classes(out / split)
        for _, cls, meta in rows:
            assert names[cls] == meta["class_name"] and meta["source"].startswith(f"images/{meta['class_name']}/")
    rejects = (out / "train" / "rejects.txt").read_text().splitlines()
    assert len(rejects) == 1 and "Bird_1_0.jpg" in rejects[0]
    idx = read_index(out / "train")
    assert idx["total"] == 5 and idx["rejected"] == 1 and idx["kind"] == "labeled" and idx["num_classes"] == 2


def test_cars196_mat_split(tmp_path):
    out = tmp_path / "out"
    writers.convert("cars196", make_cars(tmp_path / "cars"), out, progress=False)
    train, test = read_split(out / "train"), read_split(out / "test")
    assert read_classes(out / "train") == ["Make Model 1", "Make Model 2"]
    assert read_classes(out / "test") == ["Make Model 3", "Make Model 4"]
    assert sorted(c for _, c, _ in train) == [0, 0, 1, 1] and sorted(c for _, c, _ in test) == [0, 0, 1, 1]
    assert all(m["source"].startswith("car_ims/") for _, _, m in train + test)


def test_inshop_query_gallery_share_ids(tmp_path):
    out = tmp_path / "out"
    writers.convert("inshop", make_inshop(tmp_path / "inshop"), out, progress=False)
    train, query, gallery = (read_split(out / s) for s in ("train", "query", "gallery"))
    assert (len(train), len(query), len(gallery)) == (5, 2, 3)
    assert read_classes(out / "query") == read_classes(out / "gallery") == ["id_00000002", "id_00000005"]
    assert read_classes(out / "train") == ["id_00000001", "id_00000007"]
    for rows, split in ((train, "train"), (query, "query"), (gallery, "gallery")):
        names = read_classes(out / split)
        assert all(names[c] == m["item_id"] for _, c, m in rows)


@pytest.mark.parametrize(
    "fmt,maker,n,n_labels",
    [("nabirds", make_nabirds, 6, 2), ("compcars", make_compcars, 6, 3), ("fashion200k", make_fashion, 4, 2)],
)
def test_unlabeled_companions_keep_truth_in_json_only(tmp_path, fmt, maker, n, n_labels):
    out = tmp_path / "out"
    writers.convert(fmt, maker(tmp_path / fmt), out, progress=False)
    rows = read_split(out)
    assert len(rows) == n and all(c == -1 for _, c, _ in rows)  # no cls member
    assert not (out / "classes.json").exists() and read_index(out)["kind"] == "unlabeled"
    by_label: dict[int, set] = {}
    for _, _, m in rows:
        by_label.setdefault(m["label"], set()).add(m["class_name"])
    assert len(by_label) == n_labels and all(len(v) == 1 for v in by_label.values())
    if fmt == "fashion200k":
        assert "missing file" not in json.dumps([m for _, _, m in rows])
        assert "9_0.jpeg" in (out / "rejects.txt").read_text()
    if fmt == "nabirds":
        assert {m["class_name"] for _, _, m in rows} == {"Black-footed Albatross", "Laysan Albatross"}


def test_imagefolder_labeled_and_flat(tmp_path):
    src = tmp_path / "folder"
    for c in ("b_cls", "a_cls"):
        for j in range(3):
            put(src / c / "sub" / f"{j}.jpg", jpeg(len(c) + j))
    put(src / "a_cls" / "x.png", jpeg(3))  # a JPEG named .png: stored as what it is
    writers.convert("imagefolder", src, tmp_path / "lab", progress=False)
    rows = read_split(tmp_path / "lab")
    names = read_classes(tmp_path / "lab")
    assert names == ["a_cls", "b_cls"] and len(rows) == 7
    assert all(m["source"].split("/")[0] == names[c] for _, c, m in rows)
    flat = tmp_path / "flat"
    for j in range(3):
        put(flat / f"{j}.jpg", jpeg(j))
    writers.convert("imagefolder", flat, tmp_path / "unl", progress=False)
    assert [c for _, c, _ in read_split(tmp_path / "unl")] == [-1] * 3
    assert shard_paths(tmp_path / "unl")[0].name == "unlabeled-000000.tar"


def test_deterministic_across_workers_and_resumable(tmp_path):
    src = tmp_path / "folder"
    for c in range(3):
        for j in range(4):
            put(src / f"c{c}" / f"{j}.jpg", jpeg(c * 4 + j))
    a, b = tmp_path / "a", tmp_path / "b"
    writers.convert("imagefolder", src, a, shard_size=5, workers=1, progress=False)
    writers.convert("imagefolder", src, b, shard_size=5, workers=2, progress=False)
    names = [p.name for p in shard_paths(a)]
    assert names == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)  # byte-identical
    # resume: a lost shard is rewritten, finished ones are skipped (not rewritten)
    before = {n: (a / n).stat().st_mtime_ns for n in names}
    (a / names[1]).unlink()
    idx = writers.convert("imagefolder", src, a, shard_size=5, progress=False)["train"]
    assert idx["written_now"] == 1 and idx["total"] == 12
    assert (a / names[0]).stat().st_mtime_ns == before[names[0]]
    assert (a / names[1]).read_bytes() == (b / names[1]).read_bytes()
    # another shard size replaces the old plan's shards
    idx = writers.convert("imagefolder", src, a, shard_size=12, progress=False)["train"]
    assert [p.name for p in sorted(a.glob("*.tar"))] == ["train-000000.tar"] and idx["total"] == 12


def test_resize_shrinks_shorter_side(tmp_path):
    src = tmp_path / "folder"
    im = Image.new("RGB", (60, 40), (200, 10, 10))
    (src / "c").mkdir(parents=True)
    im.save(src / "c" / "big.png")
    writers.convert("imagefolder", src, tmp_path / "out", resize=20, progress=False)
    ((key, img, cls, meta),) = list(iter_shard(shard_paths(tmp_path / "out")[0]))
    assert tuple(img.shape) == (3, 20, 30) and cls == 0


def test_img2dataset_validated_in_place(tmp_path):
    src = make_img2dataset(tmp_path / "i2d")
    out = tmp_path / "index"
    idx = writers.convert("img2dataset", src, out, progress=False)["unlabeled"]
    assert idx["corrupt"] == 1 and idx["truncated"] == [os.path.relpath(src / "00002.tar", out)]
    paths = shard_paths(out)
    assert [p.resolve() for p in paths] == [(src / f"{s:05d}.tar").resolve() for s in range(3)]
    assert not list(out.glob("*.tar"))  # nothing copied
    rejects = (out / "rejects.txt").read_text()
    assert "00001.tar:000010002" in rejects and "truncated" in rejects
    assert idx["shards"][0]["count"] == 4 and idx["shards"][2]["count"] < 4
    again = writers.convert("img2dataset", src, out, progress=False)["unlabeled"]  # resumable: same answer
    assert again["shards"] == idx["shards"]


def test_cli_write_help_and_errors(tmp_path, capsys):
    from slade_dist.data.__main__ import main

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-m", "slade_dist.data", "write", "--help"], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert r.returncode == 0 and "cars_annos.mat" in r.stdout
    root = make_cub(tmp_path / "cub")
    assert (
        main(
            [
                "write",
                "--format",
                "cub",
                "--root",
                str(root),
                "--out",
                str(tmp_path / "o"),
                "--split",
                "test",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "test: 6 images in 1 shards, 0 rejected, 2 classes" in capsys.readouterr().out
    assert not (tmp_path / "o" / "train").exists()
    assert main(["write", "--format", "cars196", "--root", str(root), "--out", str(tmp_path / "p")]) == 2
    assert "cars_annos.mat" in capsys.readouterr().err
    (tmp_path / "o" / "test" / "index.json").unlink()
    assert main(["index", str(tmp_path / "o" / "test")]) == 0
    assert read_index(tmp_path / "o" / "test")["total"] == 6


def test_cli_write_prints_and_records_the_split_it_wrote(tmp_path, capsys):
    """A single-split format written with --split test is the test split: in the output line, the
    shard names and index.json (it used to say "train")."""
    from slade_dist.data.__main__ import main

    src = tmp_path / "folder"
    for c in ("a_cls", "b_cls"):
        for j in range(2):
            put(src / c / f"{j}.jpg", jpeg(len(c) + j))
    out = tmp_path / "test_split"
    assert main(["write", "--format", "imagefolder", "--root", str(src), "--out", str(out), "--split", "test"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("test: 4 images in 1 shards") and "train" not in printed, printed
    assert read_index(out)["split"] == "test"
    assert [p.name for p in shard_paths(out)] == ["test-000000.tar"]
    cub_out = tmp_path / "cub"
    writers.convert("cub", make_cub(tmp_path / "cub_src"), cub_out, split="test", progress=False)
    assert read_index(cub_out / "test")["split"] == "test"  # multi-split formats: OUT/<split>/


# ------------------------------------------------------------------------ a crawl's hazards
def accounted(out: Path) -> dict[str, set[str]]:
    """What the converter did with each file: written (json "source"), rejected, skipped."""
    recs = read_rejects(out)
    return {
        "written": {m["source"] for _, _, m in read_split(out)},
        "rejected": {r["path"] for r in recs if r["action"] == "rejected"},
        "skipped": {r["path"] for r in recs if r["action"] == "skipped"},
    }


def test_flat_root_with_a_sub_folder_is_refused_not_relabeled(tmp_path):
    """Case 7: 119 flat images + thumbs/ with 2 became "2 images, 1 class", labeled."""
    H.flat_root(tmp_path / "flat")
    with pytest.raises(writers.DatasetLayoutError, match="--split unlabeled"):
        writers.convert("imagefolder", tmp_path / "flat", tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "index.json").exists()


def test_flat_root_every_file_written_rejected_or_skipped(tmp_path):
    """Cases 3, 7, 8, 10: with --split unlabeled the whole tree is one unlabeled set; the `loop -> .`
    symlink is not followed; gif/avif/heic/txt are listed as skipped; a name that is not UTF-8 and
    one holding a newline and a tab are rejected and listed on one JSON line each."""
    want = H.flat_root(tmp_path / "flat")
    out = tmp_path / "out"
    idx = writers.convert("imagefolder", tmp_path / "flat", out, split="unlabeled", progress=False)["unlabeled"]
    got = accounted(out)
    assert got["written"] == set(want["written"]) and idx["kind"] == "unlabeled"
    assert got["rejected"] == set(want["rejected"])
    assert got["skipped"] == set(want["skipped"]) | {"loop"}
    assert idx["total"] == len(want["written"]) and idx["rejected"] == len(want["rejected"])
    assert idx["skipped"] == len(want["skipped"]) + 1
    lines = (out / "rejects.txt").read_bytes().splitlines()
    assert len(lines) == idx["rejected"] + idx["skipped"] and all(line.isascii() for line in lines)
    latin1 = next(r for r in read_rejects(out) if r["path"].startswith("caf"))
    assert os.fsencode(latin1["path"]) == b"caf\xe9.jpg"  # the bytes of the name come back
    reasons = " ".join(r["reason"] for r in read_rejects(out))
    assert " at 0x" not in reasons and "aspect ratio" in reasons and "max_image_pixels" in reasons
    first = (out / "rejects.txt").read_bytes()
    writers.convert("imagefolder", tmp_path / "flat", tmp_path / "again", split="unlabeled", progress=False)
    assert (tmp_path / "again" / "rejects.txt").read_bytes() == first  # the same file on every run


def test_labeled_root_loop_symlink_adds_no_class(tmp_path):
    """Case 7: `loop -> .` at a labeled root added a class holding a copy of every image."""
    want = H.class_root(tmp_path / "lab", classes=3, per_class=4)
    out = tmp_path / "out"
    idx = writers.convert("imagefolder", tmp_path / "lab", out, progress=False)["train"]
    assert read_classes(out) == ["class00", "class01", "class02"] and idx["num_classes"] == 3
    got = accounted(out)
    assert got["written"] == set(want["written"]) and got["rejected"] == set(want["rejected"])
    assert got["skipped"] == set(want["skipped"]) | {"loop"}


def test_stored_pixels_follow_the_contract(tmp_path):
    """Case 9: 16-bit gray was clipped, RGBA flattened without compositing, EXIF ignored. Sources the
    stages read are stored as they are, and the stages decode them by the contract; a BMP is
    re-encoded from the contract's pixels."""
    src = tmp_path / "flat"
    for name in ("gray16.png", "rgba.png", "exif6.jpg", "rgb16.png"):
        put(src / name, H.HAZARDS[name][0]())
    Image.new("RGB", (30, 20), (10, 200, 30)).save(src / "plain.bmp")
    out = tmp_path / "out"
    writers.convert("imagefolder", src, out, progress=False)
    got = {meta["source"]: img for _, img, _, meta in iter_shard(shard_paths(out)[0])}
    assert (got["gray16.png"] == 255).float().mean() < 0.05
    assert got["rgba.png"][:, 0, 0].tolist() == [255, 255, 255] and got["rgba.png"][:, 0, 47].tolist() == [200, 0, 0]
    assert got["exif6.jpg"].shape == (3, 48, 24)
    assert got["rgb16.png"].dtype == torch.uint8
    assert got["plain.bmp"].shape == (3, 20, 30) and abs(int(got["plain.bmp"][1].float().mean()) - 200) < 4


def test_img2dataset_validator_and_stages_agree(tmp_path):
    """Case 10 (and 5): the validator passed an animated GIF the stages skipped and rejected a bomb
    they embedded. Both now use one contract and one tar reader: what it lists is what they skip."""
    root = tmp_path / "i2d"
    root.mkdir()
    hazards = {name: make() for name, (make, _) in H.HAZARDS.items()}
    rows = [{"__key__": f"{j:09d}", "jpg": H.photo_jpeg(j)} for j in range(4)]
    rows += [{"__key__": f"{100 + j:09d}", "jpg": data} for j, data in enumerate(hazards.values())]
    write_shard(root / "00000.tar", rows)
    out = tmp_path / "index"
    idx = writers.convert("img2dataset", root, out, progress=False)["unlabeled"]
    listed = {r["path"].split(":")[1] for r in read_rejects(out)}
    bad = {f"{100 + j:09d}" for j, (_, ok) in enumerate(H.HAZARDS.values()) if not ok}
    assert listed == bad and idx["corrupt"] == len(bad)
    it = iter_shard(shard_paths(out)[0])
    read = {k for k, *_ in it}
    assert read == {r["__key__"] for r in rows} - bad and it.corrupt == len(bad)


def test_rejected_names_in_any_encoding_one_json_line_each(tmp_path):
    """Cases 3 and 10: a rejected file whose name is not UTF-8 crashed the converter while writing
    rejects.txt (no index.json); a newline or tab in a name forged lines; reasons carried a memory
    address, so the file differed on every run."""
    src = tmp_path / "flat"
    for j in range(3):
        put(src / f"{j}.jpg", jpeg(j))
    put(src / os.fsdecode(b"caf\xe9.jpg"), CORRUPT)
    put(src / "two\nlines\tname.jpg", b"not an image at all")
    out = tmp_path / "out"
    idx = writers.convert("imagefolder", src, out, progress=False)["unlabeled"]
    assert idx["total"] == 3 and idx["rejected"] == 2 and (out / "index.json").exists()
    lines = (out / "rejects.txt").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["action"] == "rejected" for line in lines)
    paths = {os.fsencode(json.loads(line)["path"]) for line in lines}
    assert paths == {b"caf\xe9.jpg", b"two\nlines\tname.jpg"}
    assert " at 0x" not in (out / "rejects.txt").read_text()
    writers.convert("imagefolder", src, tmp_path / "again", progress=False)
    assert (tmp_path / "again" / "rejects.txt").read_bytes() == (out / "rejects.txt").read_bytes()


def test_unknown_extensions_are_listed_as_skipped(tmp_path):
    """Case 8: .gif, .avif, .heic files were in no count and not in rejects.txt; .jfif is a JPEG."""
    src = tmp_path / "flat"
    put(src / "a.jpg", jpeg(1))
    put(src / "b.jfif", jpeg(2))
    for name in ("c.gif", "d.avif", "e.heic"):
        put(src / name, b"\0" * 32)
    out = tmp_path / "out"
    idx = writers.convert("imagefolder", src, out, progress=False)["unlabeled"]
    assert idx["total"] == 2 and idx["skipped"] == 3
    skipped = {r["path"]: r["reason"] for r in read_rejects(out) if r["action"] == "skipped"}
    assert set(skipped) == {"c.gif", "d.avif", "e.heic"} and all("unknown extension" in r for r in skipped.values())
