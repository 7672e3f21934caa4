"""The image decoder contract of every stage, converter and validator (`decode`: encoded bytes ->
uint8 (3, H, W) RGB, or `CorruptImage` with a short reason, which every caller skips and counts;
the contract: slade_dist/data/README.md "The decoder contract") and the train / eval transforms
(torchvision v2) with the per-batch normalisation.
Tests: tests/unit/test_transforms.py (the contract, case by case), tests/unit/test_readers.py.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as tvf

from ..config import DataConfig

try:  # libjpeg-turbo straight into a tensor; deprecated in torchvision 0.29 (torchcodec), PIL otherwise
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # pragma: no cover - a torchvision without image decoding
    decode_image = None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
STAGE_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})  # what a shard's image member may hold
CONVERTER_FORMATS = STAGE_FORMATS | {"BMP", "PPM", "TIFF"}  # what the converters read (and re-encode)
BACKGROUND = 255  # alpha is composited on white: what a browser shows behind a transparent product photo
PILLOW_MAX_PIXELS = 2 * 89_478_485  # Pillow refuses to open larger images (DecompressionBombError)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_PIL_ONLY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})  # 16/32-bit gray: torchvision fails
_ORIENTATION = 0x0112


class CorruptImage(ValueError):
    """Encoded bytes outside the decoder contract: undecodable, too large, unsupported."""


@dataclass(frozen=True)
class ImageLimits:
    """What `decode` accepts: header limits and formats (data.max_image_pixels, data.max_aspect_ratio)."""

    max_pixels: int
    max_aspect_ratio: float
    formats: frozenset[str] = STAGE_FORMATS

    @classmethod
    def of(cls, data_cfg: Any, formats: frozenset[str] = STAGE_FORMATS) -> ImageLimits:
        """The limits a DataConfig sets."""
        return cls(int(data_cfg.max_image_pixels), float(data_cfg.max_aspect_ratio), formats)


DEFAULT_LIMITS = ImageLimits.of(DataConfig())
CONVERTER_LIMITS = ImageLimits.of(DataConfig(), CONVERTER_FORMATS)


@dataclass(frozen=True)
class Header:
    """What the header says, before any pixel is decoded."""

    format: str
    width: int
    height: int
    mode: str
    orientation: int  # EXIF orientation 1..8 (1: as stored)
    alpha: bool

    @property
    def plain_jpeg(self) -> bool:
        """A JPEG that torchvision's batched decode_jpeg reads as is (YCbCr / gray, not CMYK)."""
        return self.format == "JPEG" and self.mode in ("RGB", "L")


def read_header(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> Header:
    """The header of encoded bytes, checked against the contract; CorruptImage when outside it (the
    device-decode path checks images in the loader workers with it, then decodes on the rank)."""
    with _open(data) as im:
        return _checked_header(im, limits)


def _open(data: bytes) -> Image.Image:
    if not data:
        raise CorruptImage("empty image member")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise CorruptImage(f"over Pillow's limit of {PILLOW_MAX_PIXELS} pixels ({_first_line(e)})") from e
    except Exception as e:  # Pillow raises many types for a header it cannot parse
        raise CorruptImage(f"not an image Pillow can identify ({type(e).__name__})") from e


def _checked_header(im: Image.Image, limits: ImageLimits) -> Header:
    # Pillow's lazy open parsed the header only: a bomb is refused here before a pixel is decoded
    fmt, (w, h) = im.format or "?", im.size
    if fmt not in limits.formats:
        raise CorruptImage(f"format {fmt} is not read here ({', '.join(sorted(limits.formats))})")
    if w < 1 or h < 1:
        raise CorruptImage(f"empty image {w}x{h}")
    if w * h > limits.max_pixels:
        raise CorruptImage(f"{w}x{h} = {w * h} pixels, over data.max_image_pixels={limits.max_pixels}")
    if max(w, h) / min(w, h) > limits.max_aspect_ratio:
        raise CorruptImage(f"{w}x{h}: aspect ratio over data.max_aspect_ratio={limits.max_aspect_ratio:g}")
    if getattr(im, "is_animated", False):
        raise CorruptImage(f"animated {fmt} ({getattr(im, 'n_frames', '?')} frames)")
    try:  # the base method reads what the header parse found; PNG's own override decodes the image
        orientation = int(Image.Image.getexif(im).get(_ORIENTATION, 1) or 1)
    except Exception:  # a damaged EXIF block: the pixels may still be fine, shown as stored
        orientation = 1
    alpha = im.mode in _ALPHA_MODES or "transparency" in im.info
    return Header(fmt, w, h, im.mode, orientation if 1 <= orientation <= 8 else 1, alpha)


def decode(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> torch.Tensor:
    """Encoded image bytes -> uint8 tensor (3, H, W), RGB, under the module's contract. Raises
    CorruptImage for anything outside it (checked from the header before decoding)."""
    return decode_with_header(data, limits)[1]


def decode_with_header(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> tuple[Header, torch.Tensor]:
    """`decode`, with the header it checked (the converters keep a file's bytes by its format)."""
    with _open(data) as im:
        head = _checked_header(im, limits)
        try:
            # torchvision's libjpeg-turbo / libpng / libwebp straight into a tensor; Pillow for 16-bit
            # gray and the converters' other formats
            if head.format in STAGE_FORMATS and head.mode not in _PIL_ONLY_MODES and decode_image is not None:
                img = _decode_tv(data, head.alpha)
            else:
                img = _decode_pil(im, head.alpha)
        except CorruptImage:
            raise
        except (RuntimeError, UserWarning, ValueError, OSError, SyntaxError, MemoryError) as e:
            raise CorruptImage(_first_line(e)) from e
    img = composite(tvf.to_dtype(img, torch.uint8, scale=True))  # 16 bits: the high byte, never clipped
    if img.ndim != 3 or img.shape[0] != 3 or img.shape[1] < 1 or img.shape[2] < 1:
        raise CorruptImage(f"decoded to an unexpected shape {tuple(img.shape)}")
    return head, orient(img, head.orientation)


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def _decode_tv(data: bytes, alpha: bool) -> torch.Tensor:
    with warnings.catch_warnings():
        # libjpeg reports some damage (e.g. a premature end) only as a warning: treat it as corrupt
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", DeprecationWarning)
        mode = ImageReadMode.RGB_ALPHA if alpha else ImageReadMode.RGB
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)


def _decode_pil(im: Image.Image, alpha: bool) -> torch.Tensor:
    im.load()  # a truncated or damaged file raises here
    if im.mode == "F":
        raise CorruptImage("floating-point image (no 8-bit reading is defined for it)")
    if im.mode in _PIL_ONLY_MODES:  # 16/32-bit gray: the high byte of 16 bits (clipped above)
        gray = np.asarray(im).astype(np.int64)
        arr = np.repeat(np.clip(gray >> 8, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    else:
        arr = np.asarray(im.convert("RGBA" if alpha else "RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def composite(img: torch.Tensor) -> torch.Tensor:
    """(4, H, W) uint8 RGBA -> (3, H, W) RGB over BACKGROUND (rounded); other shapes unchanged.
    Done in bands of about 2^20 pixels, so the int32 arithmetic never holds a full-size copy."""
    if img.ndim != 3 or img.shape[0] != 4:
        return img
    out = torch.empty((3, *img.shape[1:]), dtype=torch.uint8)
    rows = max(1, (1 << 20) // max(1, img.shape[2]))
    for r in range(0, img.shape[1], rows):
        rgb, a = img[:3, r : r + rows].to(torch.int32), img[3:, r : r + rows].to(torch.int32)
        out[:, r : r + rows] = ((rgb * a + BACKGROUND * (255 - a) + 127) // 255).to(torch.uint8)
    return out


def orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) as a viewer shows it, given the EXIF orientation tag (Pillow's exif_transpose)."""
    ops = {
        2: lambda x: x.flip(-1),
        3: lambda x: x.flip(-2, -1),
        4: lambda x: x.flip(-2),
        5: lambda x: x.transpose(-2, -1),
        6: lambda x: torch.rot90(x, -1, (-2, -1)),
        7: lambda x: x.transpose(-2, -1).flip(-2, -1),
        8: lambda x: torch.rot90(x, 1, (-2, -1)),
    }
    op = ops.get(orientation)
    return img if op is None else op(img).contiguous()


def pil_image(img: torch.Tensor) -> Image.Image:
    """A decoded (3, H, W) uint8 tensor as a Pillow RGB image (the converters' re-encode)."""
    return Image.fromarray(img.permute(1, 2, 0).numpy(), "RGB")


def eval_resize_for(image_size: int, base_image_size: int, base_resize_size: int) -> int:
    """Shorter side before the center crop when the crop size is overridden (keeps the config ratio)."""
    if image_size == base_image_size:
        return base_resize_size
    return max(image_size, round(image_size * base_resize_size / base_image_size))


def train_geometry(image_size: int, crop_scale_min: float, augment: Any = None) -> v2.Compose:
    """The train transform on uint8 images: ToImage + `augment_steps` (augment None: crop + flip)."""
    return v2.Compose([v2.ToImage(), *augment_steps(image_size, crop_scale_min, augment)])


def augment_steps(image_size: int, crop_scale_min: float, augment: Any = None) -> list[v2.Transform]:
    """An AugmentConfig (config.py) as transforms: crop, flip, rotation, colour jitter, grayscale,
    blur; an option at its "off" value adds nothing. augment None: today's crop + flip."""
    if augment is None:
        return [
            v2.RandomResizedCrop(image_size, scale=(crop_scale_min, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    a = augment
    scale_min = crop_scale_min if a.crop_scale_min is None else a.crop_scale_min
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(
            image_size, scale=(scale_min, a.crop_scale_max), ratio=(a.crop_ratio_min, a.crop_ratio_max), antialias=True
        )
    ]
    if a.flip:
        steps.append(v2.RandomHorizontalFlip())
    if a.rotation_degrees > 0:
        steps.append(v2.RandomRotation(a.rotation_degrees))
    jitter = (a.jitter_brightness, a.jitter_contrast, a.jitter_saturation, a.jitter_hue)
    if any(j > 0 for j in jitter) and a.jitter_p > 0:
        steps.append(v2.RandomApply([v2.ColorJitter(*jitter)], p=a.jitter_p))
    if a.grayscale_p > 0:
        steps.append(v2.RandomGrayscale(p=a.grayscale_p))
    if a.blur_p > 0:
        steps.append(
            v2.RandomApply([v2.GaussianBlur(blur_kernel(image_size), (a.blur_sigma_min, a.blur_sigma_max))], p=a.blur_p)
        )
    return steps


def blur_kernel(image_size: int) -> int:
    """Odd kernel of about 10% of the crop (SimCLR / SwAV), at least 3: wide enough for sigma 2 at 224 px."""
    k = max(3, int(0.1 * image_size))
    return k if k % 2 else k + 1


def eval_max_size(resize_size: int, max_aspect_ratio: float = DEFAULT_LIMITS.max_aspect_ratio) -> int:
    """The eval resize's cap on the longer side: what an image at the aspect-ratio limit reaches,
    so images inside the contract resize exactly as without a cap and none can reach more."""
    return math.ceil(resize_size * max_aspect_ratio) + 1


def eval_geometry(image_size: int, resize_size: int, max_size: int | None = None) -> v2.Compose:
    """Shorter side to resize_size (longer side at most max_size; default: the default aspect
    limit's), center crop image_size."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(resize_size, max_size=max_size or eval_max_size(resize_size), antialias=True),
            v2.CenterCrop(image_size),
        ]
    )


def normalization() -> v2.Compose:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def full_transform(geometry: v2.Compose) -> v2.Compose:
    """Per-sample geometry + float + normalize: the textbook pipeline (PIL or tensor input; what
    bench/loader.py hands the torchvision ImageFolder baseline)."""
    return v2.Compose([geometry, normalization()])


_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0
_INV_STD = 1.0 / (torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0)


def normalize_batch(images_u8: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float32 normalised, identical (to float rounding) to `normalization()`;
    into `out` when given (a loader worker's shared-memory batch). The readers run the geometry per
    sample on uint8 and this once per batch: less work and 4x less memory traffic per sample."""
    out = torch.empty(images_u8.shape, dtype=torch.float32, device=images_u8.device) if out is None else out
    out.copy_(images_u8)
    return out.sub_(_MEAN.to(images_u8.device)).mul_(_INV_STD.to(images_u8.device))
