"""Near-copies of a photo: making them, and telling them from other photos.

Owns `CopyEdits` (the ranges: crop area, resize factor, rotation, JPEG re-encode quality, the share
of copies that keep the original bytes), `make_copy` (one edited copy of encoded image bytes, every
draw from the caller's numpy Generator, so a seed fixes the copy), and the copy check the curate
stage runs (slade_dist/pseudo/curate/): `signature` (a colour histogram to find candidates with
FAISS, and a colour thumbnail) and `copy_match` (the pixel check of a candidate pair, a `Match`:
gradient maps correlated over the crops, scales and small rotations a copy may have undergone,
then the colours compared at the best alignment).
Why pixels and not the teacher embedding: a metric-learning embedding is trained to put every image
of a class together, so it cannot tell an edited copy of a test image from another photo of the
same class (measured on the demo: README / docs/SCALING.md).
Users of the edits: the demo plants copies of test images and duplicate groups in its unlabeled
split (data/demo.py, with its own fixed ranges); the curate stage calibrates its thresholds on
copies drawn from the config's ranges (`curate.copy_*`).
Tests: tests/unit/test_curate.py.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
from scipy.ndimage import correlate1d

from .shards import encode_jpeg

__all__ = ["CopyEdits", "Match", "make_copy", "signature", "copy_match", "THUMB", "HIST_DIM"]

MIN_SIDE = 8  # pixels: a resize never goes below this (the eval transform needs an image)
CACHED_IMAGES = 4096  # thumbnails whose gradient maps / templates copy_score keeps (~50 KB each at most)
# each geometric edit is applied with this probability; a copy is always re-encoded, so a copy
# that drew no geometric edit is a pure re-encode
EDIT_P = {"crop": 0.7, "resize": 0.7, "rotate": 0.5}


@dataclass(frozen=True)
class CopyEdits:
    """Ranges of the edits (each drawn uniformly)."""

    min_area: float = 0.5  # crop keeps [min_area, 1] of the area, aspect ratio in [3/4, 4/3]
    max_rotation: float = 10.0  # degrees, either way
    min_scale: float = 0.5  # resize factor of both sides
    max_scale: float = 1.5
    min_quality: int = 30  # JPEG quality of the re-encode, in [min_quality, max_quality]
    max_quality: int = 95
    exact_share: float = 0.0  # share of copies that are the original bytes (a re-upload)


def make_copy(data: bytes, rng: np.random.Generator, edits: CopyEdits) -> tuple[bytes, str]:
    """(copy bytes, what was done: e.g. "crop 0.71 + rotate -4.2 + jpeg q52") of an encoded image."""
    if edits.exact_share > 0 and rng.random() < edits.exact_share:
        return data, "same bytes"
    img = Image.open(io.BytesIO(data)).convert("RGB")
    done = []
    if rng.random() < EDIT_P["crop"]:
        img, area = _crop(img, rng, edits.min_area)
        done.append(f"crop {area:.2f}")
    if rng.random() < EDIT_P["resize"]:
        f = float(rng.uniform(edits.min_scale, edits.max_scale))
        w, h = (max(MIN_SIDE, round(v * f)) for v in img.size)
        img = img.resize((w, h), Image.BILINEAR)
        done.append(f"resize {f:.2f}")
    if rng.random() < EDIT_P["rotate"] and edits.max_rotation > 0:
        angle = float(rng.uniform(-edits.max_rotation, edits.max_rotation))
        img = img.rotate(angle, resample=Image.BILINEAR, expand=False, fillcolor=(0, 0, 0))
        done.append(f"rotate {angle:.1f}")
    q = int(rng.integers(edits.min_quality, edits.max_quality + 1))
    done.append(f"jpeg q{q}")
    return encode_jpeg(img, quality=q), " + ".join(done)


def _crop(img: Image.Image, rng: np.random.Generator, min_area: float) -> tuple[Image.Image, float]:
    """A random crop keeping [min_area, 1] of the area (aspect ratio in [3/4, 4/3], clipped to the image)."""
    w, h = img.size
    area = float(rng.uniform(min_area, 1.0))
    ratio = math.exp(float(rng.uniform(math.log(3 / 4), math.log(4 / 3))))
    cw = max(1, min(w, round(math.sqrt(area * w * h * ratio))))
    ch = max(1, min(h, round(math.sqrt(area * w * h / ratio))))
    x = int(rng.integers(0, w - cw + 1))
    y = int(rng.integers(0, h - ch + 1))
    return img.crop((x, y, x + cw, y + ch)), cw * ch / (w * h)


# ---------------------------------------------------------------------------- copy signatures
THUMB = 32  # pixels on a signature thumbnail's long side (the pixel check's resolution)
HIST_BINS = 8  # per RGB channel: a 512-bin colour histogram
HIST_DIM = HIST_BINS**3
HIST_SIDE = 64  # pixels: larger images are box-reduced to about this long side for the histogram
BINOMIAL = np.array([1, 4, 6, 4, 1], np.float32) / 16


class Match(NamedTuple):
    """A candidate pair's pixel check: `structure`, the best normalised cross-correlation of the
    gradient maps (1 = the same picture); `colour`, the mean absolute RGB difference (grey levels,
    0-255, both sides blurred) between the two at that best alignment."""

    structure: float
    colour: float


def signature(data: bytes) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(colour histogram (HIST_DIM,) float32, unit L2 norm of the bins' square roots; colour
    thumbnail (THUMB, THUMB, 3) uint8 RGB, the image in its top-left corner; the thumbnail's (h, w)).
    Raises PIL's errors for bytes that are not an image."""
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (4 * THUMB, 4 * THUMB))  # JPEG: decode at a reduced scale, enough for both
    rgb = img.convert("RGB")
    factor = max(rgb.size) // HIST_SIDE  # the colours of a few thousand pixels are enough
    small = rgb.reduce(factor) if factor > 1 else rgb
    hist = np.sqrt(_soft_histogram(np.asarray(small).reshape(-1, 3))).astype(np.float32)
    hist /= max(float(np.linalg.norm(hist)), 1e-12)
    w, h = rgb.size
    s = THUMB / max(w, h)
    tw, th = max(1, round(w * s)), max(1, round(h * s))
    thumb = np.zeros((THUMB, THUMB, 3), np.uint8)
    thumb[:th, :tw] = np.asarray(rgb.resize((tw, th), Image.BILINEAR), np.uint8)
    return hist, thumb, (th, tw)


def _soft_histogram(pixels: np.ndarray) -> np.ndarray:
    """(HIST_DIM,) colour histogram of (n, 3) RGB pixels, each shared between the 2 x 2 x 2 nearest
    bin centres (trilinear weights). Why not hard bins: a flat background whose colour sits at a
    bin edge jumps to the next bin under a JPEG re-encode, and an edited copy then lands far from
    its original (measured on the demo: copy-to-original distances 0.50 at the 99th percentile hard,
    0.29 soft, and 27x fewer distinct candidates within the radius that keeps the copies)."""
    x = pixels.astype(np.float32) / (256 // HIST_BINS) - 0.5  # bin centres at integers
    lo = np.floor(x)
    frac = x - lo
    # per channel, the lower and upper bin (2, n, 3) as offsets into the flat histogram, and weights
    idx = np.clip(np.stack([lo, lo + 1]).astype(np.int64), 0, HIST_BINS - 1) * np.array([HIST_BINS**2, HIST_BINS, 1])
    w = np.stack([1.0 - frac, frac])
    flat = idx[:, None, None, :, 0] + idx[None, :, None, :, 1] + idx[None, None, :, :, 2]
    weight = w[:, None, None, :, 0] * w[None, :, None, :, 1] * w[None, None, :, :, 2]
    return np.bincount(flat.ravel(), weight.ravel(), HIST_DIM)


def copy_match(a: np.ndarray, b: np.ndarray, min_area: float, max_rotation: float) -> Match:
    """How well one image is an edited copy of the other, from their colour thumbnails (each cut
    to its (h, w)). Structure: the best normalised cross-correlation of gradient-magnitude maps
    over the crops (linear scale down to sqrt(min_area) of the other, any position), rotations in
    [-max_rotation, max_rotation] (steps of at most 1.5 degrees), both ways round. Gradients, not
    intensities: two photos with the same flat background correlate in intensity, not in edges.
    Colour: at that alignment, the small image warped onto the other, both blurred, the mean
    absolute RGB difference. Why both: a different photo of a similar subject (one class, one
    pose) can share the outline of the subject at 32 px; it does not share the colours of every
    pixel (background, lighting, clutter), which an edited copy within the ranges keeps up to
    JPEG noise. An image's gradient map and templates are cached (LRU): a test image meets many
    pool images, a pool image its candidates."""
    best, where = -1.0, None
    for small, big in ((a, b), (b, a)):
        image = _searched(big.tobytes(), big.shape)
        templates = _templates(small.tobytes(), small.shape, big.shape[:2], min_area, max_rotation)
        for stack, warps in zip(templates.gradients, templates.warps):
            score, i, y, x = _best_ncc(stack, image)
            if score > best:
                best, where = score, (small, big, warps[i], y, x)
    if where is None:
        return Match(-1.0, 255.0)
    return Match(best, _colour_difference(*where))


Warp = tuple[tuple[int, int], float, int]  # (resized (w, h), angle, margin)


class _Templates(NamedTuple):
    # per scale (the likeliest first: a whole copy): the zero-mean, unit-norm gradient maps of its
    # rotations stacked (angles, h, w), and the warp of each
    gradients: tuple[np.ndarray, ...]
    warps: tuple[tuple[Warp, ...], ...]


@functools.lru_cache(maxsize=CACHED_IMAGES)
def _searched(data: bytes, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The gradient map of a thumbnail and the summed-area tables of it and its square."""
    g = _gradient(_gray(np.frombuffer(data, np.uint8).reshape(shape))).astype(np.float64)
    sat = np.pad(g.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sat2 = np.pad((g * g).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    return g, sat, sat2


@functools.lru_cache(maxsize=CACHED_IMAGES)
def _templates(
    data: bytes, shape: tuple[int, ...], big_shape: tuple[int, ...], min_area: float, max_rotation: float
) -> _Templates:
    """Gradient maps of a thumbnail at each scale and rotation searched inside an image of
    big_shape, the likeliest first (a whole copy, unrotated), and the warp of each."""
    h, w = shape[:2]
    k = max(big_shape) / max(h, w)
    lo = math.sqrt(min_area) * min(big_shape) / max(big_shape)
    scales = np.geomspace(lo, 1.0, max(2, min(8, math.ceil(math.log(1 / lo) / math.log(1.04)) + 1)))
    steps = math.ceil(max_rotation / 1.5)
    angles = np.linspace(-max_rotation, max_rotation, 2 * steps + 1) if steps else np.zeros(1)
    img = Image.fromarray(np.frombuffer(data, np.uint8).reshape(shape))
    gradients, warps = [], []
    for f in scales[::-1]:
        size = (max(MIN_SIDE, round(w * k * f)), max(MIN_SIDE, round(h * k * f)))
        margin = 1 + math.ceil(0.5 * max(size) * math.tan(math.radians(max_rotation)))  # rotation corners
        here = [(size, float(angle), margin) for angle in sorted(angles, key=abs)]
        maps = [_gradient(_gray(_warp(img, *warp))) for warp in here]
        if min(maps[0].shape) >= MIN_SIDE:
            tz = np.stack(maps) - np.mean(maps, axis=(1, 2), keepdims=True)
            gradients.append(tz / np.maximum(np.linalg.norm(tz, axis=(1, 2), keepdims=True), 1e-6))
            warps.append(tuple(here))
    return _Templates(tuple(gradients), tuple(warps))


def _warp(img: Image.Image, size: tuple[int, int], angle: float, margin: int) -> np.ndarray:
    """The thumbnail resized, rotated about its centre and cut by the margin its corners need."""
    moved = img.resize(size, Image.BILINEAR)
    if angle:
        moved = moved.rotate(angle, resample=Image.BILINEAR)
    return np.asarray(moved)[margin:-margin, margin:-margin]


def _colour_difference(
    small: np.ndarray, big: np.ndarray, warp: tuple[tuple[int, int], float, int], y: int, x: int
) -> float:
    """Mean absolute RGB difference of the warped small thumbnail and the window of the big one
    it was found at (both blurred: edges a pixel off must not count as a different colour)."""
    moved = _warp(Image.fromarray(small), *warp).astype(np.float32)
    window = big[y : y + moved.shape[0], x : x + moved.shape[1]].astype(np.float32)
    return float(np.abs(_blur(moved - window)).mean())  # the blur is linear: blur(a) - blur(b) = blur(a - b)


def _gray(rgb: np.ndarray) -> np.ndarray:
    """Luma (ITU-R 601, as PIL's "L") in float32."""
    return (rgb[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.float32)


def _gradient(a: np.ndarray) -> np.ndarray:
    gx, gy = np.zeros_like(a), np.zeros_like(a)
    gx[:, 1:-1] = a[:, 2:] - a[:, :-2]
    gy[1:-1] = a[2:] - a[:-2]
    # the square root lifts faint edges (background detail tells two photos apart; the main
    # object's outline alone does not), the blur lets edges a pixel off still meet
    return _blur(np.sqrt(np.hypot(gx, gy)))


def _blur(a: np.ndarray) -> np.ndarray:
    """Separable binomial blur [1 4 6 4 1] / 16 (about a Gaussian of sigma 1) over the first two
    axes (a trailing channel axis is blurred per channel), edges repeated."""
    for axis in (0, 1):
        a = correlate1d(a, BINOMIAL, axis=axis, mode="nearest")
    return a


def _best_ncc(stack: np.ndarray, searched: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[float, int, int, int]:
    """Highest normalised cross-correlation of zero-mean, unit-norm templates of one size
    (stack: (n, h, w)) over every position inside the searched image (window sums from its
    summed-area tables), and where: (score, template, y, x)."""
    image, sat, sat2 = searched
    _, th, tw = stack.shape
    if th > image.shape[0] or tw > image.shape[1]:
        return -1.0, 0, 0, 0
    num = np.einsum("ijkl,nkl->nij", sliding_window_view(image, (th, tw)), stack, optimize=True)
    s1 = sat[th:, tw:] - sat[:-th, tw:] - sat[th:, :-tw] + sat[:-th, :-tw]
    s2 = sat2[th:, tw:] - sat2[:-th, tw:] - sat2[th:, :-tw] + sat2[:-th, :-tw]
    ncc = num / np.sqrt(np.maximum(s2 - s1 * s1 / (th * tw), 1e-6))
    n, y, x = np.unravel_index(int(np.argmax(ncc)), ncc.shape)
    return float(ncc[n, y, x]), int(n), int(y), int(x)
