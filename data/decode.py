"""Raw image bytes -> the 8-bit RGB picture a viewer shows, whatever the file's mode.

PIL's ``convert("RGB")`` alone gets several modes wrong, silently:

- 16-bit grayscale (``I;16``, or ``I`` from older Pillow): values are clipped at 255, so a 16-bit PNG
  becomes nearly white.  Here they are scaled, ``round(v * 255 / 65535)``.  (16-bit RGB PNGs are read
  by PIL as 8-bit already, keeping each sample's high byte: at most 1 from that rounding.)
- transparency (``RGBA``, ``LA``, ``PA``, a palette or RGB image with a ``tRNS`` colour): the alpha
  channel is dropped, showing whatever colour the transparent pixels happen to store (often black,
  never what a viewer shows).  Here the image is composited over ``data.source.alpha_background``
  (default white, the background image viewers and web pages show transparent images on).
- EXIF orientation: a phone photo stored sideways stays sideways.  Here it is turned upright
  (``ImageOps.exif_transpose``), so its bucket is chosen from the shape a viewer shows.

CMYK is converted by PIL as ``(255 - C) * (255 - K) / 255`` per channel (no ICC colour management);
palette images through their palette.  An animated image (GIF, APNG, WebP) keeps its first frame and is
counted as ``animated_first_frame`` in the pass's summary.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from tristage.data.sources import RawItem, Skips

SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL's 16-bit (and 32-bit integer) grayscale
WITH_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")
WHITE = (255, 255, 255)


def open_rgb(item: RawItem, skips: Skips, background: tuple[int, int, int] = WHITE) -> Image.Image | None:
    """The item's image as a viewer shows it, in 8-bit RGB; None (counted as ``undecodable_image``)
    when PIL cannot decode it."""
    try:
        image = Image.open(io.BytesIO(item.image))
        if getattr(image, "n_frames", 1) > 1:
            skips.note("animated_first_frame", item.key)
        image.load()  # the first frame
        return to_rgb(ImageOps.exif_transpose(image), background)
    except Exception:  # PIL raises many types for bad files; all mean "undecodable"
        skips.add("undecodable_image", item.key)
        return None


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit scaled, transparency composited over ``background``."""
    if image.mode in SIXTEEN_BIT:
        values = np.asarray(image).astype(np.int64).clip(0, 65535)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("P", "L", "RGB") and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in WITH_ALPHA:
        under = Image.new("RGBA", image.size, (*background, 255))
        return Image.alpha_composite(under, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")
