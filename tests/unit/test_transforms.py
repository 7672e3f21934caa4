"""The decoder contract (slade_dist/data/transforms.py), case by case on the hazard corpus
(tests/_hazards.py): 8-bit RGB out, 16-bit scaled not clipped, alpha on white, EXIF orientation as
Pillow's exif_transpose shows it, pixel / aspect / format limits from the header before any
decode, and an eval resize whose longer side is capped."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from slade_dist.config import DataConfig
from slade_dist.data import transforms as T
from tests import _hazards as H


def test_defaults_agree_with_the_config():
    cfg = DataConfig()
    assert T.ImageLimits.of(cfg) == T.DEFAULT_LIMITS


def test_16_bit_rgb_is_scaled_to_8_bits_and_stacks_with_jpegs():
    """Case 1: torchvision decodes 16-bit RGB as uint16; the contract hands out its high byte."""
    img = T.decode(H.rgb16_png())
    assert img.dtype == torch.uint8 and img.shape == (3, 40, 48)
    with Image.open(io.BytesIO(H.rgb16_png())) as im:  # Pillow reads 16-bit RGB by its high byte
        want = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    assert torch.equal(img, want)
    assert 0 < img.float().mean() < 255
    torch.stack([img, T.decode(H.photo_jpeg(0, size=(48, 40)))])  # used to fail: uint16 with uint8


def test_16_bit_gray_is_scaled_not_clipped():
    """Case 9: Pillow's convert("RGB") whitened 99 % of a mid-range 16-bit gray image."""
    img = T.decode(H.gray16_png())
    with Image.open(io.BytesIO(H.gray16_png())) as im:
        high = np.asarray(im).astype(np.int64) >> 8
    assert img.shape == (3, 40, 48) and torch.equal(img[0], img[2])
    assert np.array_equal(img[0].numpy(), high.astype(np.uint8))
    assert (img == 255).float().mean() < 0.05


def test_alpha_is_composited_on_white():
    img = T.decode(H.rgba_png())
    assert img[:, 0, 0].tolist() == [255, 255, 255]  # fully transparent: the background
    assert img[:, 0, 47].tolist() == [200, 0, 0]  # opaque: the colour
    half = np.zeros((4, 4, 4), np.uint8)
    half[..., 3] = 128
    assert T.decode(H.png_bytes(half))[:, 0, 0].tolist() == [127, 127, 127]  # 255 * (1 - 128/255), rounded
    p = Image.new("P", (4, 4))
    p.putpalette([0, 0, 255] + [0] * 765)
    buf = io.BytesIO()
    p.save(buf, "PNG", transparency=0)
    assert T.decode(buf.getvalue())[:, 0, 0].tolist() == [255, 255, 255]  # palette transparency too


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pillow_shows_it(orientation):
    arr = np.random.default_rng(orientation).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "PNG", exif=exif.tobytes())
    with Image.open(io.BytesIO(buf.getvalue())) as shown:
        want = np.asarray(ImageOps.exif_transpose(shown).convert("RGB"))
    got = T.decode(buf.getvalue())
    assert np.array_equal(got.permute(1, 2, 0).numpy(), want)
    assert T.read_header(buf.getvalue()).orientation == orientation


def test_exif_rotated_jpeg_comes_upright():
    img = T.decode(H.exif_rotated_jpeg(6))  # stored 48 wide x 24 high, white left quarter
    assert img.shape == (3, 48, 24)
    assert img[:, :12].float().mean() > 200 and img[:, -12:].float().mean() < 50  # white is now on top


@pytest.mark.parametrize(
    "name, says",
    [
        ("aspect_200000x1.png", "aspect ratio"),
        ("aspect_1000000x1.png", "aspect ratio"),
        ("pixels_10000x10000.png", "max_image_pixels"),
        ("pixels_20000x20000.png", "Pillow's limit"),
        ("animated_gif_as.jpg", "format GIF"),
        ("truncated.jpg", None),
        ("empty.jpg", "empty"),
    ],
)
def test_outside_the_contract_is_corrupt_with_a_reason(name, says):
    """Cases 4, 5, 10: bombs never reach a decoder; a GIF is refused in every stage alike."""
    make, accepted = H.HAZARDS[name]
    assert not accepted
    with pytest.raises(T.CorruptImage, match=says):
        T.decode(make())


def test_bombs_are_refused_from_the_header_alone():
    # read_header never decodes: it refuses the bombs the same way decode does
    for name in ("aspect_1000000x1.png", "pixels_10000x10000.png"):
        with pytest.raises(T.CorruptImage):
            T.read_header(H.HAZARDS[name][0]())
    head = T.read_header(H.photo_jpeg(1))
    assert (head.format, head.width, head.height, head.plain_jpeg) == ("JPEG", 48, 40, True)


def test_limits_come_from_the_config():
    tight = T.ImageLimits.of(DataConfig(max_image_pixels=1000, max_aspect_ratio=1.1))
    with pytest.raises(T.CorruptImage, match="max_image_pixels=1000"):
        T.decode(H.photo_jpeg(1, size=(48, 40)), tight)
    with pytest.raises(T.CorruptImage, match="aspect ratio"):
        T.decode(H.photo_jpeg(1, size=(30, 20)), T.ImageLimits.of(DataConfig(max_aspect_ratio=1.1)))
    loose = T.ImageLimits.of(DataConfig(max_aspect_ratio=300_000.0))
    assert T.decode(H.bilevel_bomb(200_000, 1), loose).shape == (3, 1, 200_000)
    bmp = io.BytesIO()
    Image.new("RGB", (8, 8)).save(bmp, "BMP")
    with pytest.raises(T.CorruptImage, match="format BMP"):
        T.decode(bmp.getvalue())  # a shard member must be JPEG / PNG / WEBP
    assert T.decode(bmp.getvalue(), T.CONVERTER_LIMITS).shape == (3, 8, 8)


def test_eval_resize_caps_the_longer_side():
    """Case 4: eval's Resize(shorter side) made a 12 GB tensor of a 1000000x1 image. Inside the
    aspect limit the cap changes nothing; past it (a raised limit) the longer side stops there."""
    wide = torch.randint(0, 256, (3, 10, 150), dtype=torch.uint8)  # 15:1, inside the default 20:1
    capped, plain = T.eval_geometry(16, 32), T.v2.Compose([T.v2.ToImage(), T.v2.Resize(32, antialias=True)])
    assert torch.equal(capped.transforms[1](capped.transforms[0](wide)), plain(wide))
    long = torch.zeros((3, 10, 5000), dtype=torch.uint8)  # 500:1, as a raised data.max_aspect_ratio lets in
    resize = T.eval_geometry(16, 32, max_size=T.eval_max_size(32)).transforms[1]
    assert resize(long).shape == (3, 1, 641)  # not (3, 32, 16000)
    assert T.eval_max_size(32) == 32 * 20 + 1
