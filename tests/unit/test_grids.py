"""Tests for slade_dist/eval/grids.py: seeded queries across classes, and a PNG whose size, rows and
frames agree with the labels and with an independent brute-force search (self protocol and the
In-shop query/gallery protocol), read back from real shards."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from slade_dist.data.shards import encode_jpeg, shard_name, write_classes, write_index, write_shard
from slade_dist.eval.grids import (
    OTHER_RGB,
    QUERY_RGB,
    SAME_RGB,
    GridLayout,
    Split,
    pick_queries,
    retrieval_grid,
    save_png,
)


def colour_of(i: int) -> tuple[int, int, int]:
    """A distinct flat colour per image (JPEG keeps a flat colour within a few levels)."""
    return (40 + (i * 37) % 200, 40 + (i * 71) % 200, 40 + (i * 113) % 200)


def write_split(out, labels: np.ndarray, prefix: str, first: int = 0) -> list[str]:
    """Labeled shards of flat-colour images; image i (global id first + i) has colour_of(first + i)."""
    keys = [f"{prefix}_{first + i:04d}" for i in range(len(labels))]
    samples = [
        {
            "__key__": key,
            "jpg": encode_jpeg(Image.new("RGB", (24, 24), colour_of(first + i))),
            "cls": str(int(c)),
        }
        for i, (key, c) in enumerate(zip(keys, labels))
    ]
    shards = []
    for s in range(2):
        name = shard_name(prefix, s)
        shards.append({"name": name, "count": write_shard(out / name, samples[s::2])})
    write_index(out, shards, "labeled")
    write_classes(out, [f"class{c}" for c in range(int(labels.max()) + 1)])
    return keys


def clustered(labels: np.ndarray, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(int(labels.max()) + 1, 16))
    x = centres[labels] + noise * rng.normal(size=(len(labels), 16))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_top_k(q: np.ndarray, g: np.ndarray, k: int, own: int | None) -> list[int]:
    sim = g @ q
    if own is not None:
        sim[own] = -np.inf
    return [int(i) for i in np.argsort(-sim, kind="stable")[:k]]


def frame_rgb(png: Image.Image, box: tuple[int, int, int, int]) -> tuple[int, int, int]:
    return png.getpixel((box[0] + 1, box[1] + 1))


def tile_rgb(png: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    x = (box[0] + box[2]) // 2
    y = (box[1] + box[3]) // 2
    return np.array(png.getpixel((x, y)), dtype=int)


def check_picture(png, shown, layout, q_labels, g_labels, q_first, g_first, q_emb, g_emb, same_set):
    """Every row: a blue-framed query showing its own image, then the brute-force top-k, each framed
    green exactly when its label is the query's, each showing that image."""
    assert png.size == layout.size()
    for r, qi in enumerate(shown["queries"]):
        assert frame_rgb(png, layout.cell_box(r, 0)) == QUERY_RGB
        assert np.abs(tile_rgb(png, layout.cell_box(r, 0)) - colour_of(q_first + qi)).max() <= 8
        expect = brute_top_k(q_emb[qi], g_emb, layout.k, qi if same_set else None)
        assert shown["results"][r].tolist() == expect
        for c, gi in enumerate(expect, start=1):
            same = g_labels[gi] == q_labels[qi]
            assert frame_rgb(png, layout.cell_box(r, c)) == (SAME_RGB if same else OTHER_RGB), (r, c)
            assert np.abs(tile_rgb(png, layout.cell_box(r, c)) - colour_of(g_first + gi)).max() <= 8


def test_pick_queries_is_seeded_one_per_class_first_and_only_answerable():
    labels = np.repeat(np.arange(5), 4)
    a = pick_queries(labels, 5, seed=3)
    assert sorted(labels[a].tolist()) == [0, 1, 2, 3, 4]  # one of each class
    assert a.tolist() == pick_queries(labels, 5, seed=3).tolist()
    assert a.tolist() != pick_queries(labels, 5, seed=4).tolist()
    b = pick_queries(labels, 8, seed=3)
    assert len(set(b.tolist())) == 8 and np.bincount(labels[b]).max() == 2  # a second round only then
    assert len(pick_queries(labels, 100, seed=0)) == 20  # no more than there are
    answerable = labels != 2
    c = pick_queries(labels, 20, seed=0, answerable=answerable)
    assert len(c) == 16 and 2 not in labels[c].tolist()


def test_self_protocol_png_size_rows_and_frames_agree_with_the_labels(tmp_path):
    labels = np.repeat(np.arange(6), 5)
    labels[[0, 7]] = labels[[7, 0]]  # not sorted by class: rows and labels must still agree
    labels = np.append(labels, 6)  # a lone image: never a query (nothing of its class to find)
    keys = write_split(tmp_path / "test", labels, "test")
    emb = clustered(labels, noise=1.2, seed=0)  # noisy: both right and wrong results appear
    split = Split(emb, labels, keys, str(tmp_path / "test"))
    picture, shown = retrieval_grid("teacher", split, split, n=6, k=4, seed=0, chunk_size=8, tile=20)
    path = save_png(picture, tmp_path / "eval" / "retrieval_teacher.png")
    png = Image.open(path).convert("RGB")
    layout = GridLayout(rows=6, k=4, tile=20)
    assert len(shown["queries"]) == 6 and shown["results"].shape == (6, 4)
    assert sorted(labels[shown["queries"]].tolist()) == [0, 1, 2, 3, 4, 5]
    assert 0 < shown["same"].sum() < shown["same"].size  # the test sees both frame colours
    check_picture(png, shown, layout, labels, labels, 0, 0, emb, emb, same_set=True)
    # the same seed picks the same queries for another model (teacher and final side by side)
    other = Split(clustered(labels, noise=0.3, seed=1), labels, keys, split.shard_dir)
    _, shown2 = retrieval_grid("final", other, other, n=6, k=4, seed=0, chunk_size=8, tile=20)
    assert shown2["queries"].tolist() == shown["queries"].tolist()
    assert shown2["same"].mean() > shown["same"].mean()  # the cleaner model finds more of the class


def test_query_gallery_protocol_frames_agree_with_the_labels(tmp_path):
    q_labels = np.array([0, 1, 2, 3, 9])  # class 9 has no gallery image: never a query
    g_labels = np.repeat(np.arange(4), 3)
    q_keys = write_split(tmp_path / "query", q_labels, "query")
    g_keys = write_split(tmp_path / "gallery", g_labels, "gallery", first=100)
    both = clustered(np.concatenate([q_labels, g_labels]), noise=1.0, seed=2)
    q = Split(both[:5], q_labels, q_keys, str(tmp_path / "query"))
    g = Split(both[5:], g_labels, g_keys, str(tmp_path / "gallery"))
    picture, shown = retrieval_grid("student r1", q, g, n=10, k=3, seed=1, chunk_size=4, tile=16)
    assert sorted(q_labels[shown["queries"]].tolist()) == [0, 1, 2, 3]
    layout = GridLayout(rows=4, k=3, tile=16)
    png = Image.open(save_png(picture, tmp_path / "g.png")).convert("RGB")
    check_picture(png, shown, layout, q_labels, g_labels, 0, 100, q.emb, g.emb, same_set=False)


def test_grid_layout_cells_do_not_overlap_and_fit():
    layout = GridLayout(rows=3, k=5, tile=30)
    w, h = layout.size()
    boxes = [layout.cell_box(r, c) for r in range(3) for c in range(6)]
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 + layout.caption <= h
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


@pytest.mark.parametrize("n", [1, 3])
def test_fewer_references_than_k_shows_what_there_is(tmp_path, n):
    labels = np.array([0, 0, 1][: n + 1] if n < 3 else [0, 0, 1, 1])
    keys = write_split(tmp_path / "t", labels, "t")
    split = Split(clustered(labels, 0.1, 0), labels, keys, str(tmp_path / "t"))
    picture, shown = retrieval_grid("m", split, split, n=2, k=10, seed=0, chunk_size=8, tile=16)
    assert shown["results"].shape[1] == len(labels) - 1
    assert picture.size == GridLayout(rows=len(shown["queries"]), k=len(labels) - 1, tile=16).size()
