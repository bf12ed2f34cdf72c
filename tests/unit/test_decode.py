"""Every image mode decodes to the 8-bit RGB a viewer shows (issue 40 item 6).

Each expected picture comes from an independent reference: the raw values the file was written from,
turned into 8-bit RGB with numpy arithmetic (scaling, palette look-up, alpha compositing, rotation), and
where PIL would also write the file, a PNG writer of our own (zlib + struct, the PNG specification) so
that no PIL code path sits on both sides.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tristage.data.config import SourceConfig
from tristage.data.decode import open_rgb
from tristage.data.sources import RawItem, Skips

RNG = np.random.default_rng(0)
BACKGROUND = (20, 200, 90)  # a non-white background, so compositing is really checked


def chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC-32 of type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(
    width: int, height: int, bit_depth: int, colour_type: int, rows: np.ndarray, extra: bytes = b""
) -> bytes:
    """A PNG file from raw rows (big-endian samples), written by hand: signature, IHDR, IDAT, IEND
    (https://www.w3.org/TR/png/#5DataRep), plus ``extra`` chunks (PLTE, tRNS, eXIf) before IDAT."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + extra
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def decode(data: bytes, background=(255, 255, 255)) -> tuple[np.ndarray, Skips]:
    skips = Skips()
    image = open_rgb(RawItem(key="k", image=data), skips, background)
    assert image is not None and image.mode == "RGB"
    return np.asarray(image), skips


def composite(rgb: np.ndarray, alpha: np.ndarray, background) -> np.ndarray:
    """Straight alpha over an opaque background, rounded: (c * a + b * (255 - a)) / 255."""
    a = alpha[..., None].astype(np.float64)
    out = (rgb.astype(np.float64) * a + np.array(background, np.float64) * (255 - a)) / 255
    return np.round(out).astype(np.uint8)


def close(got: np.ndarray, expected: np.ndarray, tolerance: int = 0) -> bool:
    return (
        got.shape == expected.shape and int(np.abs(got.astype(int) - expected.astype(int)).max()) <= tolerance
    )


def test_16_bit_grayscale_is_scaled_not_clipped():
    """The issue's case: a 16-bit grayscale PNG was cached nearly white (convert("RGB") clips at 255)."""
    values = RNG.integers(0, 65536, size=(24, 32), dtype=np.uint16)
    values[0, :4] = [0, 257, 32896, 65535]
    got, _ = decode(png(32, 24, 16, 0, values.astype(">u2")))
    expected = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert close(got, np.repeat(expected[..., None], 3, axis=2))
    assert list(got[0, :4, 0]) == [0, 1, 128, 255]
    assert (got > 240).mean() < 0.1  # was 99.7 % before


def test_16_bit_rgb_is_within_one_of_the_exact_scaling():
    values = RNG.integers(0, 65536, size=(8, 8, 3), dtype=np.uint16)
    got, _ = decode(png(8, 8, 16, 2, values.reshape(8, 24).astype(">u2")))
    expected = np.round(values.astype(np.float64) * 255 / 65535)
    assert close(got, expected, tolerance=1)


def test_palette_image_is_looked_up_in_its_palette():
    palette = RNG.integers(0, 256, size=(16, 3), dtype=np.uint8)
    indices = RNG.integers(0, 16, size=(10, 12), dtype=np.uint8)
    got, _ = decode(png(12, 10, 8, 3, indices, chunk(b"PLTE", palette.tobytes())))
    assert close(got, palette[indices])


def test_palette_transparency_is_composited_on_the_background():
    palette = RNG.integers(0, 256, size=(4, 3), dtype=np.uint8)
    alphas = np.array([0, 90, 200, 255], np.uint8)  # tRNS: one alpha per palette entry
    indices = RNG.integers(0, 4, size=(6, 7), dtype=np.uint8)
    extra = chunk(b"PLTE", palette.tobytes()) + chunk(b"tRNS", alphas.tobytes())
    got, _ = decode(png(7, 6, 8, 3, indices, extra), BACKGROUND)
    assert close(got, composite(palette[indices], alphas[indices], BACKGROUND), tolerance=1)


@pytest.mark.parametrize("colour_type", [4, 6])  # LA, RGBA
def test_alpha_is_composited_on_the_configured_background(colour_type):
    channels = 2 if colour_type == 4 else 4
    pixels = RNG.integers(0, 256, size=(9, 11, channels), dtype=np.uint8)
    pixels[0, 0, -1], pixels[0, 1, -1] = 0, 255  # fully transparent and fully opaque pixels
    got, _ = decode(png(11, 9, 8, colour_type, pixels.reshape(9, -1)), BACKGROUND)
    colour = np.repeat(pixels[..., :1], 3, axis=2) if channels == 2 else pixels[..., :3]
    expected = composite(colour, pixels[..., -1], BACKGROUND)
    assert close(got, expected, tolerance=1)
    assert tuple(got[0, 0]) == BACKGROUND and tuple(got[0, 1]) == tuple(colour[0, 1])


def test_the_default_background_is_white():
    pixels = np.zeros((4, 4, 4), np.uint8)  # black, fully transparent
    got, _ = decode(png(4, 4, 8, 6, pixels.reshape(4, -1)))
    assert (got == 255).all()
    assert SourceConfig(kind="wds").alpha_background == [255, 255, 255]


def test_cmyk_is_converted_by_the_subtractive_formula():
    cmyk = RNG.integers(0, 256, size=(6, 8, 4), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.frombytes("CMYK", (8, 6), cmyk.tobytes()).save(buffer, format="TIFF")  # lossless CMYK
    got, _ = decode(buffer.getvalue())
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    assert close(got, np.round((255 - c) * (255 - k) / 255), tolerance=1)


@pytest.mark.parametrize(
    ("orientation", "turn"), [(3, 2), (6, -1), (8, 1)]
)  # np.rot90 k: + is counter-clockwise
def test_exif_orientation_is_turned_upright(orientation, turn):
    """Orientation 6 is "rotate 90 clockwise to view", 8 counter-clockwise, 3 half a turn (EXIF 2.3,
    tag 0x0112)."""
    pixels = RNG.integers(0, 256, size=(5, 9, 3), dtype=np.uint8)
    exif = b"MM\x00\x2a\x00\x00\x00\x08" + struct.pack(">HHHIHH", 1, 0x0112, 3, 1, orientation, 0) + b"\0" * 4
    got, _ = decode(png(9, 5, 8, 2, pixels.reshape(5, -1), chunk(b"eXIf", exif)))
    assert close(got, np.rot90(pixels, k=turn))


def test_an_animated_image_keeps_its_first_frame_and_is_noted():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((250, 10, 10), (10, 250, 10))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:])  # APNG
    got, skips = decode(buffer.getvalue())
    assert (got == (250, 10, 10)).all()
    assert skips.noted == {"animated_first_frame": 1} and not skips.counts


def test_the_cache_summary_counts_animated_images(tmp_path):
    """Through the cache pass: an animated image is cached (its first frame) and counted, not skipped."""
    from accelerate import Accelerator

    from tristage.data.cache import run_cache
    from tristage.data.config import DataConfig, EncoderConfig
    from tristage.demo.tiny_run import tiny_vae

    still, moving = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(still, format="PNG")
    frames = [Image.new("RGB", (64, 64), c) for c in ((30, 30, 200), (30, 200, 30))]
    frames[0].save(moving, format="PNG", save_all=True, append_images=frames[1:])
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for name, payload in (
            ("a.png", still.getvalue()),
            ("a.cls", b"1"),
            ("b.png", moving.getvalue()),
            ("b.cls", b"2"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    source = SourceConfig(kind="imagenet_wds", paths=[str(tmp_path / "shard.tar")])
    data = DataConfig(source=source, cache_dir=str(tmp_path / "cache"), resolution=64)
    enc = EncoderConfig(vae=str(tiny_vae(tmp_path / "vae")), text_encoder=None, tokenizer=None)
    manifest = run_cache(data, enc, Accelerator(cpu=True))
    assert manifest["samples"] == 2 and manifest["skipped"] == {}
    assert manifest["noted"] == {"animated_first_frame": 1}
    report = json.loads(Path(tmp_path / "cache" / "skipped.json").read_text())
    assert report["noted"] == {"animated_first_frame": 1} and report["examples"]["animated_first_frame"] == [
        "b"
    ]
