"""data.decode: device: the worker half (`prepare`: the header checked against the decoder
contract, a plain JPEG handed over as bytes, anything else decoded on the worker) and the rank half
(`DeviceDecoder`: the batch's JPEGs decoded in one torchvision.io.decode_jpeg call on the rank's
device). Behaviour: slade_dist/data/README.md "Reading" (data.decode: device).
Tests: tests/unit/test_device_decode.py (equal to the worker path on CPU), tests/unit/test_readers.py.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import dist
from .transforms import ImageLimits, decode, normalize_batch, orient, read_header

try:
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover - a torchvision without image decoding
    decode_jpeg = None

__all__ = ["EncodedJpeg", "prepare", "decode_jpegs", "DeviceDecoder"]


@dataclass
class EncodedJpeg:
    """A JPEG the rank decodes: its bytes (uint8, 1-D; shared memory across the loader's queue)
    and the EXIF orientation its header carries."""

    data: torch.Tensor
    orientation: int


def prepare(data: bytes, limits: ImageLimits, geometry: Callable, on_device: bool) -> torch.Tensor | EncodedJpeg:
    """The worker half: a plain JPEG's bytes when on_device, else the image decoded and
    transformed here. CorruptImage for anything outside the contract (the header decides)."""
    if on_device:
        head = read_header(data, limits)
        if head.plain_jpeg and decode_jpeg is not None:
            return EncodedJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), head.orientation)
    return geometry(decode(data, limits))


def decode_jpegs(items: list[EncodedJpeg], device: torch.device) -> list[torch.Tensor | None]:
    """uint8 (3, H, W) RGB per JPEG, oriented, on `device`; None where decoding fails. One batched
    call; when it fails (one damaged JPEG fails the batch), each JPEG alone."""
    if not items:
        return []
    try:
        out = _decode([x.data for x in items], device)
    except (RuntimeError, UserWarning, ValueError):
        out = []
        for x in items:
            try:
                out.extend(_decode([x.data], device))
            except (RuntimeError, UserWarning, ValueError):
                out.append(None)
    return [None if img is None else orient(img, x.orientation) for img, x in zip(out, items)]


def _decode(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # libjpeg's "premature end" is a warning: corrupt, as on the workers
        warnings.simplefilter("ignore", DeprecationWarning)
        out = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
    for img in out:
        if img.ndim != 3 or img.shape[0] != 3:
            raise RuntimeError(f"decoded to an unexpected shape {tuple(img.shape)}")
    return out


class DeviceDecoder:
    """The rank half, called by readers.BatchStream on each batch a worker sent with "pending"
    items (tensors already transformed, or EncodedJpeg); fills "images" (normalised, on the device)
    and counts the JPEGs that failed here in `corrupt`. group: K for P x K batches (a failed entry
    is refilled from its group of K; all K failed: the batch is dropped), None for finite passes
    (failed rows are dropped with their keys)."""

    def __init__(self, geometry: Callable, device: torch.device | None = None, group: int | None = None) -> None:
        self.geometry, self.group = geometry, group
        self.device = device
        self.corrupt = 0
        self.rng = random.Random(0)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any] | None:
        items: list[Any] = batch.pop("pending")
        device = self.device if self.device is not None else dist.device()
        jpegs = [i for i, x in enumerate(items) if isinstance(x, EncodedJpeg)]
        raw: dict[int, torch.Tensor] = {}
        for i, img in zip(jpegs, decode_jpegs([items[i] for i in jpegs], device)):
            if img is None:
                items[i] = None
                self.corrupt += 1
            else:
                raw[i] = img
                items[i] = self.geometry(img)
        keep = self._refill(items, raw) if self.group else [i for i, x in enumerate(items) if x is not None]
        if keep is None or not keep:
            return None
        if len(keep) < len(items):
            for k in ("keys", "shards", "meta"):
                if k in batch:
                    batch[k] = [batch[k][i] for i in keep]
            batch["labels"] = batch["labels"][keep]
        images = torch.stack([torch.as_tensor(items[i]).to(device) for i in keep])
        batch["images"] = normalize_batch(images)
        return batch

    def _refill(self, items: list[Any], raw: dict[int, torch.Tensor]) -> list[int] | None:
        """P x K: a failed entry becomes a fresh transform of a decoded entry of its own group."""
        for g in range(0, len(items), self.group):
            members = range(g, min(g + self.group, len(items)))
            good = [i for i in members if items[i] is not None]
            if not good:
                return None
            for i in members:
                if items[i] is None:
                    j = self.rng.choice(good)
                    items[i] = self.geometry(raw[j]) if j in raw else items[j]
        return list(range(len(items)))
