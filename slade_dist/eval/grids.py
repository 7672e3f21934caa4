"""Retrieval grids, the picture people look at to trust a retrieval model: seeded queries, each
with its top-k references framed green (the query's class) or red (another), read from the shards;
the eval stage draws one for the teacher and the final model.
Tests: tests/unit/test_grids.py; the stage's PNG and TensorBoard image: tests/integration/test_vit_chain.py.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from ..data.shards import shard_paths
from ..data.tars import TarSamples, image_bytes
from ..fileio import atomic_path
from .metrics import drop_self, knn_search

__all__ = [
    "Split",
    "GridLayout",
    "pick_queries",
    "nearest",
    "render_grid",
    "retrieval_grid",
    "read_thumbnails",
    "save_png",
]

QUERY_RGB = (40, 90, 200)  # frame of the query tile
SAME_RGB = (0, 160, 60)  # a result of the query's class
OTHER_RGB = (215, 40, 40)  # a result of another class
BACKGROUND_RGB = (255, 255, 255)
MISSING_RGB = (128, 128, 128)  # an image that could not be read (counted as corrupt by the stage)


@dataclass
class Split:
    """One side of a search: L2-normalised embeddings (n, d), their labels and keys, and the shard
    dir the images are read from (keys sorted, as eval/stage.py's embed_split returns them)."""

    emb: np.ndarray
    labels: np.ndarray
    keys: list[str]
    shard_dir: str


@dataclass(frozen=True)
class GridLayout:
    """rows x (1 + k) framed tiles under a title line; two caption lines under every tile."""

    rows: int
    k: int
    tile: int = 96
    frame: int = 4
    gap: int = 6
    caption: int = 26  # two lines of the default font: class names are long ("blue-headed long 3-stripe ...")
    title: int = 20

    @property
    def cell(self) -> int:
        return self.tile + 2 * self.frame

    def size(self) -> tuple[int, int]:
        """(width, height) of the whole picture; the query column is set off by one extra gap."""
        width = self.gap + (1 + self.k) * (self.cell + self.gap) + self.gap
        height = self.title + self.gap + self.rows * (self.cell + self.caption + self.gap)
        return width, height

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), exclusive ends, of the framed tile of a row's column (0: the query)."""
        x0 = self.gap + col * (self.cell + self.gap) + (self.gap if col > 0 else 0)
        y0 = self.title + self.gap + row * (self.cell + self.caption + self.gap)
        return x0, y0, x0 + self.cell, y0 + self.cell


def pick_queries(labels: np.ndarray, n: int, seed: int, answerable: np.ndarray | None = None) -> np.ndarray:
    """Up to n row indices: classes in a seeded order, one image of each before a second of any.

    answerable: a mask of the rows whose class has something to find (self protocol: another image
    of the class; In-shop: a gallery image of it); the others are never picked."""
    labels = np.asarray(labels).reshape(-1)
    ok = np.ones(len(labels), bool) if answerable is None else np.asarray(answerable, bool)
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.unique(labels[ok]))
    pools = [rng.permutation(np.flatnonzero(ok & (labels == c))) for c in classes]
    picks: list[int] = []
    depth = 0
    while len(picks) < n and any(depth < len(p) for p in pools):
        picks.extend(int(p[depth]) for p in pools if depth < len(p))
        depth += 1
    return np.array(picks[:n], dtype=np.int64)


def nearest(queries: Split, refs: Split, rows: np.ndarray, k: int, same_set: bool, chunk_size: int) -> np.ndarray:
    """(len(rows), k') indices into refs of each query row's nearest references, best first
    (k' = k, fewer when refs are fewer). same_set: queries are refs; each row's own index is left out."""
    k_search = min(k + (1 if same_set else 0), len(refs.keys))
    sim, idx = knn_search(queries.emb[rows], refs.emb, k_search, chunk_size=chunk_size)
    if same_set:
        sim, idx = drop_self(sim, idx, rows)
    return idx[:, :k]


def _fit(img: Image.Image | None, tile: int) -> Image.Image:
    """A square tile: the image's centre, scaled (a grey square for an unreadable image)."""
    if img is None:
        return Image.new("RGB", (tile, tile), MISSING_RGB)
    return ImageOps.fit(img.convert("RGB"), (tile, tile), Image.Resampling.BILINEAR)


def _fitting(draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont, text: str, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-1]
    return text


def _caption(
    draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont, text: str, x: int, y: int, width: int, lines: int = 1
) -> None:
    """`text` in up to `lines` lines of `width` pixels (word-wrapped; what does not fit is cut)."""
    words, rows = text.split(), []
    while words and len(rows) < lines:
        row = words.pop(0)
        while words and draw.textlength(f"{row} {words[0]}", font=font) <= width:
            row = f"{row} {words.pop(0)}"
        rows.append(_fitting(draw, font, row, width))
    for i, row in enumerate(rows):
        draw.text((x, y + 12 * i), row, fill=(0, 0, 0), font=font)


def render_grid(
    title: str,
    layout: GridLayout,
    query_images: Sequence[Image.Image | None],
    result_images: Sequence[Sequence[Image.Image | None]],
    same: np.ndarray,
    captions: Sequence[Sequence[str]],
) -> Image.Image:
    """The picture: row r = query_images[r] framed blue, then result_images[r][j] framed green where
    same[r, j] (the result has the query's class) else red; captions[r] = the row's 1 + k captions."""
    canvas = Image.new("RGB", layout.size(), BACKGROUND_RGB)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    _caption(draw, font, title, layout.gap, 4, layout.size()[0] - 2 * layout.gap)
    for r, query in enumerate(query_images):
        tiles = [(query, QUERY_RGB)] + [
            (img, SAME_RGB if same[r, j] else OTHER_RGB) for j, img in enumerate(result_images[r])
        ]
        for c, (img, colour) in enumerate(tiles):
            x0, y0, x1, y1 = layout.cell_box(r, c)
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
            canvas.paste(_fit(img, layout.tile), (x0 + layout.frame, y0 + layout.frame))
            _caption(draw, font, captions[r][c], x0, y1 + 1, layout.cell, lines=2)
    return canvas


def read_thumbnails(shard_dir: str, keys: Iterable[str]) -> dict[str, Image.Image]:
    """The decoded images of `keys` from a shard dir (one pass, stops once all are found); an
    undecodable or absent one is simply not in the result."""
    wanted = set(keys)
    found: dict[str, Image.Image] = {}
    for path in shard_paths(shard_dir):
        for sample in TarSamples(path):
            key = sample.get("__key__")
            if key not in wanted or key in found:
                continue
            try:
                found[key] = Image.open(io.BytesIO(image_bytes(sample))).convert("RGB")
            except Exception:  # corrupt or no image member: a grey tile (the metrics counted it)
                continue
            if len(found) == len(wanted):
                return found
    return found


def retrieval_grid(
    title: str,
    queries: Split,
    refs: Split,
    *,
    n: int,
    k: int,
    seed: int,
    chunk_size: int,
    tile: int,
    class_names: Sequence[str] | None = None,
) -> tuple[Image.Image, dict[str, np.ndarray]]:
    """The grid of n seeded queries with their top-k (refs is queries: self protocol). Returns the
    picture and what it shows: {"queries": rows, "results": (n, k) ref indices, "same": (n, k) bool}."""
    same_set = queries is refs
    if same_set:  # another image of the class to find
        _, inverse, counts = np.unique(queries.labels, return_inverse=True, return_counts=True)
        answerable = counts[inverse] > 1
    else:  # a gallery image of the class
        answerable = np.isin(queries.labels, refs.labels)
    rows = pick_queries(queries.labels, n, seed, answerable)
    results = nearest(queries, refs, rows, k, same_set, chunk_size) if len(rows) else np.zeros((0, k), np.int64)
    same = refs.labels[results] == queries.labels[rows][:, None]
    q_keys = [queries.keys[i] for i in rows]
    r_keys = [[refs.keys[j] for j in row] for row in results]
    q_imgs = read_thumbnails(queries.shard_dir, q_keys)
    r_imgs = q_imgs if same_set else {}
    r_imgs = {**r_imgs, **read_thumbnails(refs.shard_dir, {key for row in r_keys for key in row} - set(r_imgs))}

    def name(label: int) -> str:  # the id first: long names that differ only at the end still differ
        known = class_names is not None and 0 <= label < len(class_names)
        return f"{label}: {class_names[label]}" if known else str(label)

    captions = [
        [f"query {name(int(queries.labels[i]))}"] + [name(int(refs.labels[j])) for j in results[r]]
        for r, i in enumerate(rows)
    ]
    layout = GridLayout(rows=len(rows), k=results.shape[1], tile=tile)
    picture = render_grid(
        title,
        layout,
        [q_imgs.get(key) for key in q_keys],
        [[r_imgs.get(key) for key in row] for row in r_keys],
        same,
        captions,
    )
    return picture, {"queries": rows, "results": results, "same": same}


def save_png(picture: Image.Image, path: Path) -> Path:
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return path
