"""Image conversion: every mode reaches the model as the image a viewer shows, through one function.

Each case is checked end to end: ``VLBatcher.process_images`` of the file (opened by the manifest
path, ``lgrpo.data.open_image``, and handed to the batcher as Pillow opened it) against
``process_images`` of the correctly converted image, which each test builds by hand.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lgrpo.batching import VLBatcher
from lgrpo.data import open_image
from lgrpo.images import MAX_ASPECT, ImageProblem, image_problem, to_rgb


@pytest.fixture(scope="module")
def batcher():
    return VLBatcher.from_pretrained("tiny")


def _upright() -> Image.Image:
    """56 x 84, four differently coloured quadrants: every flip or turn of it is a different image."""
    a = np.zeros((84, 56, 3), np.uint8)
    a[:42, :28] = (250, 0, 0)
    a[:42, 28:] = (0, 250, 0)
    a[42:, :28] = (0, 0, 250)
    a[42:, 28:] = (250, 250, 0)
    a[5:10, 3:50] = (10, 10, 10)  # an asymmetric stripe near the top
    return Image.fromarray(a, "RGB")


def _same_model_input(batcher, got: Image.Image, expected: Image.Image) -> None:
    a, b = batcher.process_images([got])[0], batcher.process_images([expected])[0]
    assert torch.equal(a.grid_thw, b.grid_thw)
    assert torch.equal(a.pixel_values, b.pixel_values)


def _both_paths(batcher, path: Path, expected: Image.Image) -> None:
    """The manifest path (open_image) and a caller's own Image.open both give the expected pixels."""
    _same_model_input(batcher, open_image(path), expected)
    with Image.open(path) as img:
        _same_model_input(batcher, img, expected)


# How a camera stores the upright picture for each EXIF orientation (EXIF 2.3, tag 0x0112).
STORED = {
    2: lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    3: lambda im: im.transpose(Image.Transpose.ROTATE_180),
    6: lambda im: im.transpose(Image.Transpose.ROTATE_90),  # shown after turning 90 degrees clockwise
    8: lambda im: im.transpose(Image.Transpose.ROTATE_270),
}


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_orientation_is_applied(tmp_path, batcher, orientation):
    upright = _upright()
    stored = STORED[orientation](upright)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.png"
    stored.save(path, exif=exif)
    _both_paths(batcher, path, upright)
    assert to_rgb(to_rgb(Image.open(path))).size == upright.size  # idempotent: the tag is gone after


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path, batcher):
    ramp = (np.arange(56 * 56, dtype=np.float64).reshape(56, 56) * 65535 / (56 * 56 - 1)).astype(np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    grey = np.round(ramp / 257.0).astype(np.uint8)  # 65535 -> 255, a straight line in between
    expected = Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    _both_paths(batcher, path, expected)
    assert (np.asarray(open_image(path)) == 255).mean() < 0.01  # convert("RGB") alone: 99.6% white


def _alpha_cases() -> tuple[np.ndarray, np.ndarray]:
    """RGBA pixels and, by hand, the same pixels over white: alpha 0 -> white, 255 -> the colour,
    128 -> (c * 128 + 255 * 127) / 255."""
    rgba = np.zeros((56, 56, 4), np.uint8)
    want = np.zeros((56, 56, 3), np.uint8)
    rgba[:, :20] = (10, 200, 30, 0)  # transparent: whatever colour it holds must not show
    want[:, :20] = 255
    rgba[:, 20:40] = (10, 20, 30, 255)
    want[:, 20:40] = (10, 20, 30)
    rgba[:, 40:] = (0, 100, 255, 128)
    want[:, 40:] = (127, 177, 255)  # 255 * 127/255 = 127; (100 * 128 + 255 * 127) / 255 = 177.2
    return rgba, want


def test_rgba_is_composited_over_white(tmp_path, batcher):
    rgba, want = _alpha_cases()
    path = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(path)
    _both_paths(batcher, path, Image.fromarray(want, "RGB"))


def test_greyscale_with_alpha_is_composited_over_white(tmp_path, batcher):
    la = np.zeros((56, 56, 2), np.uint8)
    la[:, :28] = (0, 0)      # transparent black -> white
    la[:, 28:] = (60, 255)   # opaque grey
    path = tmp_path / "la.png"
    Image.fromarray(la, "LA").save(path)
    want = np.zeros((56, 56, 3), np.uint8)
    want[:, :28] = 255
    want[:, 28:] = 60
    _both_paths(batcher, path, Image.fromarray(want, "RGB"))


def test_palette_with_a_transparent_index_is_composited_over_white(tmp_path, batcher):
    idx = np.zeros((56, 56), np.uint8)
    idx[:, 28:] = 1
    img = Image.fromarray(idx, "P")
    img.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)  # index 0 black (transparent), 1 red
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    want = np.zeros((56, 56, 3), np.uint8)
    want[:, :28] = 255
    want[:, 28:] = (200, 30, 40)
    _both_paths(batcher, path, Image.fromarray(want, "RGB"))


def test_cmyk_bilevel_and_greyscale(tmp_path, batcher):
    cmyk = np.zeros((56, 56, 4), np.uint8)
    cmyk[:, 14:28, 3] = 255   # key (black)
    cmyk[:, 28:42, 0] = 255   # cyan
    path = tmp_path / "c.jpg"  # JPEG is lossy: compare with the decoded file's own CMYK values
    Image.fromarray(cmyk, "CMYK").save(path, quality=100)
    c, m, y, k = (np.asarray(Image.open(path)).astype(np.int64)[..., i] for i in range(4))
    want = np.stack([np.clip(255 - c - k, 0, 255), np.clip(255 - m - k, 0, 255),
                     np.clip(255 - y - k, 0, 255)], -1).astype(np.uint8)
    _both_paths(batcher, path, Image.fromarray(want, "RGB"))
    assert np.asarray(open_image(path))[0, 0].tolist() == [255, 255, 255]

    bits = (np.arange(56 * 56).reshape(56, 56) % 3 == 0)
    path = tmp_path / "b.png"
    Image.fromarray(bits).convert("1").save(path)
    want = np.repeat((bits * 255).astype(np.uint8)[..., None], 3, axis=2)
    _both_paths(batcher, path, Image.fromarray(want, "RGB"))


# --- checks before decoding -----------------------------------------------------------------------


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims width x height and holds no pixel data (what a bomb's header reads as)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_bombs_and_elongated_images_are_refused_from_the_header(tmp_path):
    for w, h in ((100_000, 100_000), (10_000, 10_000)):  # beyond 2x Pillow's limit, and between 1x and 2x
        bomb = _png_header_only(tmp_path / f"bomb{w}.png", w, h)
        size, problem = image_problem(bomb)
        assert problem is not None and ("bomb" in problem or "pixels" in problem), problem
        with pytest.raises(ImageProblem):
            open_image(bomb)
    long = tmp_path / "long.png"
    Image.new("RGB", (MAX_ASPECT * 2, 1)).save(long)
    assert "aspect ratio 400" in image_problem(long)[1]
    with pytest.raises(OSError, match="aspect ratio"):
        open_image(long)


def test_header_check_passes_a_truncated_jpeg_and_decode_finds_it(tmp_path):
    path = tmp_path / "t.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert image_problem(path) == ((64, 64), None)
    size, problem = image_problem(path, decode=True)
    assert size == (64, 64) and "truncated" in problem
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert image_problem(empty)[1] is not None
