"""Sample grids: the one tiling helper used by validation, the demo report and the sample CLI."""

from __future__ import annotations

from PIL import Image


def grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Images (all the same size) tiled row by row."""
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
    for i, image in enumerate(images):
        canvas.paste(image, ((i % columns) * w, (i // columns) * h))
    return canvas
