"""Aspect-ratio buckets (PixArt's ASPECT_RATIO_{256,512,1024} tables) and resize + crop.

The tables are taken from diffusers (which ships PixArt's), keyed by the
height/width ratio as a string and holding ``[height, width]`` in pixels.  Other
base resolutions (the 128 px demo) scale the 256 table and round each side to a
multiple of 16 (VAE factor x patch: 8 x 2 for PixArt, 4 x 4 for the demo), re-keyed by the
rounded sides' real ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
)
from PIL import Image

_TABLES = {256: ASPECT_RATIO_256_BIN, 512: ASPECT_RATIO_512_BIN, 1024: ASPECT_RATIO_1024_BIN}
MAX_RATIO = 4.0  # PixArt's tables span 0.25 .. 4.0; anything beyond is dropped and counted
MULTIPLE = 16  # VAE factor x patch size: 8 x 2 (PixArt-XL/2 on sd-vae), 4 x 4 (the demo)


def bucket_table(resolution: int) -> dict[str, tuple[int, int]]:
    """``ratio -> (height, width)`` for a base resolution."""
    if resolution in _TABLES:
        return {k: (int(v[0]), int(v[1])) for k, v in _TABLES[resolution].items()}
    scale = resolution / 256
    table: dict[str, tuple[int, int]] = {}
    for h, w in _TABLES[256].values():
        hh, ww = _round(h * scale), _round(w * scale)
        table.setdefault(f"{hh / ww:.2f}", (hh, ww))
    return table


def _round(x: float) -> int:
    return max(MULTIPLE, int(round(x / MULTIPLE)) * MULTIPLE)


@dataclass(frozen=True)
class Placement:
    """How one image was fitted into its bucket (kept for PixArt-MS micro-conditions)."""

    bucket: tuple[int, int]  # (height, width) of the training image
    original: tuple[int, int]  # (height, width) before resizing
    crop: tuple[int, int]  # (top, left) of the crop in the resized image


class RatioOutOfRange(ValueError):
    """The image is more elongated than the table allows (> 4:1)."""


def choose_bucket(height: int, width: int, table: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """Nearest ratio (h / w) in ``table``; raises :class:`RatioOutOfRange` beyond 4:1."""
    ratio = height / width
    if ratio > MAX_RATIO or ratio < 1 / MAX_RATIO:
        raise RatioOutOfRange(f"aspect ratio {ratio:.2f} outside [1/{MAX_RATIO:g}, {MAX_RATIO:g}]")
    key = min(table, key=lambda r: abs(float(r) - ratio))
    return table[key]


def fit(image: Image.Image, bucket: tuple[int, int]) -> tuple[Image.Image, Placement]:
    """Resize so the image covers ``bucket`` (keeping its ratio), then centre-crop to it."""
    bh, bw = bucket
    w, h = image.size
    scale = max(bh / h, bw / w)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    resized = image.resize((rw, rh), Image.BICUBIC) if (rw, rh) != (w, h) else image
    top, left = (rh - bh) // 2, (rw - bw) // 2
    cropped = resized.crop((left, top, left + bw, top + bh))
    return cropped, Placement(bucket=bucket, original=(h, w), crop=(top, left))


def place(image: Image.Image, resolution: int, multi_aspect: bool) -> tuple[Image.Image, Placement]:
    """Fit ``image`` into its bucket: nearest-ratio bucket, or a square crop when not multi-aspect."""
    w, h = image.size
    if multi_aspect:
        bucket = choose_bucket(h, w, bucket_table(resolution))
    else:
        if max(h, w) / min(h, w) > MAX_RATIO:
            raise RatioOutOfRange(f"aspect ratio {h / w:.2f} outside [1/{MAX_RATIO:g}, {MAX_RATIO:g}]")
        bucket = (resolution, resolution)
    return fit(image, bucket)
