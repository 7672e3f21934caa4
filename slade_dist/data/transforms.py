"""Image decoding and the train / eval transforms (torchvision transforms v2).

Owns: decoding encoded image bytes (JPEG/PNG/WEBP, via torchvision's libjpeg-turbo/libpng
decoders straight into a uint8 CHW tensor), the per-sample part of the transforms (train: the
augmentation an AugmentConfig describes, `augment_steps`: RandomResizedCrop, optional flip, rotation,
colour jitter, grayscale, blur; eval: resize the shorter side to resize_size, center crop
image_size), and the float conversion + ImageNet normalisation.
`full_transform` is the classic per-sample Compose (also what bench/loader.py hands the
torchvision ImageFolder baseline); the readers run its geometric part per sample on uint8 and
`normalize_batch` once per batch (same numbers, less work and 4x less memory traffic per sample).
Tests: tests/unit/test_readers.py (decode errors, transform equivalence, output shapes).
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

try:  # libjpeg-turbo straight into a tensor; deprecated in torchvision 0.29 (torchcodec), PIL otherwise
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # pragma: no cover - a torchvision without image decoding
    decode_image = None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class CorruptImage(ValueError):
    """Encoded bytes that do not decode to an image."""


def decode(data: bytes) -> torch.Tensor:
    """Encoded image bytes -> uint8 tensor (3, H, W), RGB. Raises CorruptImage on any decoder failure."""
    if not data:
        raise CorruptImage("empty image member")
    try:
        img = _decode_tv(data) if decode_image is not None else _decode_pil(data)
    except (RuntimeError, UserWarning, ValueError, OSError) as e:
        raise CorruptImage(str(e).splitlines()[0][:200] if str(e) else type(e).__name__) from e
    if img.ndim != 3 or img.shape[0] != 3 or img.shape[1] < 1 or img.shape[2] < 1:
        raise CorruptImage(f"decoded to an unexpected shape {tuple(img.shape)}")
    return img


def _decode_tv(data: bytes) -> torch.Tensor:
    with warnings.catch_warnings():
        # libjpeg reports some damage (e.g. a premature end) only as a warning: treat it as corrupt
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def _decode_pil(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


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


def eval_geometry(image_size: int, resize_size: int) -> v2.Compose:
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(resize_size, antialias=True),
            v2.CenterCrop(image_size),
        ]
    )


def normalization() -> v2.Compose:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def full_transform(geometry: v2.Compose) -> v2.Compose:
    """Per-sample geometry + float + normalize: the textbook pipeline (PIL or tensor input)."""
    return v2.Compose([geometry, normalization()])


_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0
_INV_STD = 1.0 / (torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0)


def normalize_batch(images_u8: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float32 normalised, identical (to float rounding) to `normalization()`."""
    return images_u8.float().sub_(_MEAN).mul_(_INV_STD)
