"""The hazard corpus: what a web crawl holds, as small files (bombs are tiny on disk).

Used by tests/unit/test_{transforms,tars,writers,readers,multicrop,pseudo_index}.py and the
end-to-end tests/integration/test_hazards.py. Every generator is deterministic.

- `png_bytes`: a PNG of any bit depth / channel count (Pillow cannot write 16-bit RGB), written
  with zlib row by row, so a 10^4 x 10^4 bilevel bomb costs kilobytes of memory and disk;
- `HAZARDS`: name -> (bytes maker, what the decoder contract does with it);
- `photo_jpeg`: an ordinary photo-like JPEG (class-coloured, so a tiny model can learn from it);
- `flat_root` / `class_root`: the converters' input trees with the tree hazards (a sub-folder in
  a flat root, a `loop -> .` symlink, names that are not UTF-8 or hold a newline, unknown
  extensions);
- `cut_points`: byte offsets that cut a tar inside a header, inside an image member's data, on a
  member boundary and inside the end-of-archive blocks.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(arr: np.ndarray) -> bytes:
    """(H, W[, C]) uint8 or uint16 array -> PNG bytes (C: 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA)."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    h, w, c = arr.shape
    depth = 16 if arr.dtype == np.uint16 else 8
    rows = arr.astype(">u2" if depth == 16 else "u1")
    raw = b"".join(b"\0" + rows[i].tobytes() for i in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, depth, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")


@functools.cache
def bilevel_bomb(width: int, height: int) -> bytes:
    """A 1-bit gray PNG of width x height zeros, compressed row by row (a few KB for 10^8 pixels)."""
    z = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    parts = [z.compress(row) for _ in range(height)]
    idat = b"".join(parts) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def photo_jpeg(seed: int, cls: int = 0, size: tuple[int, int] = (48, 40), quality: int = 90) -> bytes:
    """An ordinary JPEG: a class colour, a class-dependent stripe and noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.array([(cls * 67) % 256, (cls * 131 + 60) % 256, (cls * 29 + 120) % 256], dtype=np.float32)
    img = np.ones((h, w, 3), np.float32) * base + rng.normal(0, 18, (h, w, 3))
    img[:, (cls * 5) % w : (cls * 5) % w + 6] = 255 - base
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def rgb16_png(cls: int = 0) -> bytes:
    """16-bit RGB: a gradient whose high bytes span 0..255 (x257 would overflow uint8 everywhere)."""
    h, w = 40, 48
    ramp = np.linspace(0, 65535, w, dtype=np.float64)[None, :, None] * np.ones((h, 1, 3))
    ramp[..., cls % 3] = 65535 - ramp[..., cls % 3]
    return png_bytes(ramp.astype(np.uint16))


def gray16_png() -> bytes:
    """16-bit gray whose values sit mid-range: clipping to 255 would whiten 99 % of it."""
    h, w = 40, 48
    return png_bytes((np.linspace(2000, 60000, h * w).reshape(h, w)).astype(np.uint16))


def rgba_png() -> bytes:
    """Red, fully transparent on the left half, opaque on the right."""
    arr = np.zeros((40, 48, 4), np.uint8)
    arr[..., 0] = 200
    arr[:, 24:, 3] = 255
    return png_bytes(arr)


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    """A 48x24 JPEG (white left quarter) tagged with an EXIF orientation (6: shown rotated 90 cw)."""
    arr = np.zeros((24, 48, 3), np.uint8)
    arr[:, :12] = 255
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def animated_gif() -> bytes:
    frames = [Image.fromarray(np.full((16, 16, 3), v, np.uint8)) for v in (0, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def truncated_jpeg() -> bytes:
    data = photo_jpeg(99, 1)
    return data[: len(data) // 2]


# name -> (bytes, accepted by the stage contract?)
HAZARDS: dict[str, tuple[Callable[[], bytes], bool]] = {
    "rgb16.png": (rgb16_png, True),
    "gray16.png": (gray16_png, True),
    "rgba.png": (rgba_png, True),
    "exif6.jpg": (exif_rotated_jpeg, True),
    "aspect_200000x1.png": (lambda: bilevel_bomb(200_000, 1), False),
    "aspect_1000000x1.png": (lambda: bilevel_bomb(1_000_000, 1), False),
    "pixels_10000x10000.png": (lambda: bilevel_bomb(10_000, 10_000), False),  # 100 Mpx: over our limit
    "pixels_20000x20000.png": (lambda: bilevel_bomb(20_000, 20_000), False),  # 400 Mpx: over Pillow's too
    "animated_gif_as.jpg": (animated_gif, False),
    "truncated.jpg": (truncated_jpeg, False),
    "empty.jpg": (lambda: b"", False),
}
UNKNOWN_EXTS = ("clip.gif", "photo.avif", "photo.heic", "notes.txt")  # listed as skipped by the converters


def flat_root(root: Path, n: int = 12, seed: int = 0) -> dict[str, list[str]]:
    """A flat unlabeled folder: n photos, every HAZARD, unknown extensions, a `thumbs/` sub-folder
    with 2 photos, a `loop -> .` symlink, a name that is not UTF-8 and one with a newline and a tab.
    Returns the relative paths by what the converter must do with them (written / rejected /
    skipped; the symlink is in none)."""
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[str]] = {"written": [], "rejected": [], "skipped": []}
    for i in range(n):
        (root / f"img{i:03d}.jpg").write_bytes(photo_jpeg(seed + i, i % 4))
        out["written"].append(f"img{i:03d}.jpg")
    for name, (make, ok) in HAZARDS.items():
        (root / name).write_bytes(make())
        out["written" if ok else "rejected"].append(name)
    for name in UNKNOWN_EXTS:
        (root / name).write_bytes(animated_gif() if name.endswith(".gif") else b"\0" * 64)
        out["skipped"].append(name)
    (root / "photo.jfif").write_bytes(photo_jpeg(seed + 500, 2))  # a JPEG by another name
    out["written"].append("photo.jfif")
    (root / "thumbs").mkdir()
    for i in range(2):
        (root / "thumbs" / f"t{i}.jpg").write_bytes(photo_jpeg(seed + 100 + i, 3))
        out["written"].append(f"thumbs/t{i}.jpg")
    latin1 = os.fsdecode(b"caf\xe9.jpg")  # a Latin-1 name: not UTF-8 (surrogate-escaped by Python)
    (root / latin1).write_bytes(truncated_jpeg())
    out["rejected"].append(latin1)
    latin1_ok = os.fsdecode(b"na\xefve.jpg")
    (root / latin1_ok).write_bytes(photo_jpeg(seed + 600, 1))
    out["written"].append(latin1_ok)
    forged = "evil\nname\t.jpg"
    (root / forged).write_bytes(b"\xff\xd8 not a jpeg")
    out["rejected"].append(forged)
    os.symlink(".", root / "loop")
    return out


def class_root(root: Path, classes: int, per_class: int, seed: int = 0, hazards: bool = True) -> dict[str, list[str]]:
    """An ImageFolder tree (root/<class>/*.jpg) with a `loop -> .` symlink at the root and, when
    `hazards`, the contract hazards spread over the classes. Same return as flat_root."""
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[str]] = {"written": [], "rejected": [], "skipped": []}
    for c in range(classes):
        d = root / f"class{c:02d}"
        d.mkdir()
        for i in range(per_class):
            (d / f"{i:03d}.jpg").write_bytes(photo_jpeg(seed + 1000 * c + i, c))
            out["written"].append(f"class{c:02d}/{i:03d}.jpg")
    if hazards:
        for j, (name, (make, ok)) in enumerate(HAZARDS.items()):
            rel = f"class{j % classes:02d}/{name}"
            (root / rel).write_bytes(make())
            out["written" if ok else "rejected"].append(rel)
        for j, name in enumerate(UNKNOWN_EXTS):
            rel = f"class{j % classes:02d}/{name}"
            (root / rel).write_bytes(b"\0" * 64)
            out["skipped"].append(rel)
        rel = f"class00/{os.fsdecode(b'caf' + bytes([0xE9]) + b'.jpg')}"
        (root / rel).write_bytes(truncated_jpeg())
        out["rejected"].append(rel)
    os.symlink(".", root / "loop")
    return out


def cut_points(tar_path: Path) -> dict[str, int]:
    """Byte offsets cutting a tar whose samples each hold an image and a later member: inside a
    header, inside an image member's data, on the boundary between two members of one sample and
    between two samples, inside the end-of-archive blocks; all cut the middle sample (or none)."""
    with tarfile.open(tar_path) as tf:
        members = tf.getmembers()
        end = tf.offset
    images = [m for m in members if m.name.rsplit(".", 1)[-1] in ("jpg", "png", "webp")]
    mid = images[len(images) // 2]
    later = members[members.index(mid) + 1]  # another member of mid's sample
    next_sample = images[len(images) // 2 + 1]
    return {
        "inside_header": later.offset + 100,
        "inside_image": mid.offset_data + max(1, mid.size // 2),
        "member_boundary": later.offset,
        "between_samples": next_sample.offset,
        "inside_end_blocks": end + 300,
    }


def big_photo_jpeg(width: int = 3000, height: int = 2000) -> bytes:
    """A photo-sized JPEG (smooth patterns, ~260 KB at 3000 x 2000): 18 MB once decoded."""
    yy, xx = np.mgrid[0:height, 0:width]
    photo = np.stack([(xx // 7) % 256, (yy // 5) % 256, ((xx + yy) // 9) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "JPEG", quality=90)
    return buf.getvalue()


_RSS_PROBE = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
def status(key):
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
    return int(line.split()[1]) / 1024
{setup}
Path("/proc/self/clear_refs").write_text("5")  # forget the imports' and the setup's peak (VmHWM)
before = status("VmRSS")
{run}
print(json.dumps({{"growth_mb": status("VmHWM") - before}}))
"""


def rss_growth_mb(repo: Path, setup: str, run: str, timeout: float = 300) -> float:
    """Peak-RSS growth (MB) of `run` in a fresh Python process, after `setup` (both code strings);
    the process' peak is reset after the setup, so imports and fixtures do not count."""
    import subprocess
    import sys
    import textwrap

    code = _RSS_PROBE.format(setup=textwrap.dedent(setup), run=textwrap.dedent(run))
    out = subprocess.run([sys.executable, "-c", code, str(repo)], capture_output=True, text=True, timeout=timeout)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return float(__import__("json").loads(out.stdout.splitlines()[-1])["growth_mb"])
