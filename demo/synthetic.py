"""The offline demo world: coloured shapes on plain backgrounds.

The world is small enough to learn on two CPU cores in minutes, yet it has the
structure the three PixArt stages need: 18 classes (colour x shape) for the
class-conditional stage 1, LLaVA-style captions for stage 2, and a scored,
higher-resolution set for stage 3.  Six colour/shape/background
combinations are held out of the text stages so that samples for them test
composition rather than memorisation.

Every writer emits the *raw* formats the real readers consume (ImageNet-style
webdataset tars with ``.cls``, SA-1B tars with a LLaVA caption file, an
aesthetic image folder with JSONL metadata), so the demo exercises the same
code paths as a real run.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
# (colour, shape, background) triples that never appear in stage 2 or stage 3 data.
HELD_OUT: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("red", "triangle", "black"),
        ("green", "circle", "gray"),
        ("blue", "square", "white"),
        ("yellow", "triangle", "gray"),
        ("purple", "square", "black"),
        ("orange", "circle", "white"),
    }
)
# Stage 1 classes: colour x shape, in a fixed order (class id = index).
CLASSES: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)

POSITIONS = {
    (0, 0): "in the top left",
    (0, 1): "near the top",
    (0, 2): "in the top right",
    (1, 0): "on the left",
    (1, 1): "centered",
    (1, 2): "on the right",
    (2, 0): "in the bottom left",
    (2, 1): "near the bottom",
    (2, 2): "in the bottom right",
}
# Captions of a placed shape (placed_scene) name its size and position; those of an object-centric one
# (centred_scene) name neither.  Either way the caption fixes the layout, as far as a sample is judged.
_PLACED_TEMPLATES = (
    "A {size} shape: {core}. It is {where}.",
    "The picture features {core}; the {shape} is {size} and {where}.",
    "This is a simple illustration of {core}. The {shape} is {size}; it is {where}.",
)
_PLAIN_TEMPLATES = (
    "The image shows {core}.",
    "In this picture there is {core}.",
    "This is a simple illustration of {core}.",
)
_TEMPLATES = _PLACED_TEMPLATES + _PLAIN_TEMPLATES  # every caption template (the demo T5's vocabulary)


def class_name(index: int) -> str:
    """Human label of stage-1 class ``index``, e.g. ``"red circle"``."""
    colour, shape = CLASSES[index]
    return f"{colour} {shape}"


def core_phrase(colour: str, shape: str, background: str) -> str:
    """The phrase every caption contains: ``a {colour} {shape} on a {background} background``."""
    return f"a {colour} {shape} on a {background} background"


SIDE_RANGE = (0.30, 0.60)  # sample_scene's sides (the VAE's training renders), share of the short side
OBJECT_SIDE = 0.60  # the side of an object-centric shape (centred_scene), share of the short side
SIDES = {"small": 0.46, "large": 0.64}  # the two sizes a placed shape's caption names (placed_scene);
# was 0.40 / 0.60 (and 0.33 / 0.55 before that): each step up raised the text stages' kinds (docs/demo.md,
# changelog).  A small shape still fits its corner cell's third of the image flush.
LARGE_ABOVE = 0.55  # a side above this share of the short side is "large" (between the two SIDES)


@dataclass(frozen=True)
class Scene:
    """One drawn image: what is in it and where."""

    colour: str
    shape: str
    background: str
    height: int
    width: int
    cx: float  # centre x, pixels
    cy: float  # centre y, pixels
    side: float  # shape size, pixels
    placed: bool = True  # False: object-centric, and its caption names no size or position


def sample_scene(
    rng: random.Random, colour: str, shape: str, background: str, height: int, width: int
) -> Scene:
    """Random position and a size of 30-60% of the short side, fully inside the image."""
    side = rng.uniform(*SIDE_RANGE) * min(height, width)
    cx = rng.uniform(side / 2, width - side / 2)
    cy = rng.uniform(side / 2, height - side / 2)
    return Scene(colour, shape, background, height, width, cx, cy, side)


def centred_scene(
    rng: random.Random, colour: str, shape: str, background: str, height: int, width: int
) -> Scene:
    """An object-centric scene, as ImageNet's photos are: a side of ``OBJECT_SIDE`` of the short side, at
    the image's centre.  (`rng` is unused: the layout is fixed.)  Not jittered: with the centre anywhere
    within 5 % of the side, a stage-1 shape's edges fell anywhere inside an 8 px token, and the demo's
    2000 steps drew shapes flat per token (kind 54-68 %); exactly centred, with ``objective.detail_weight``,
    79-83 %.  A side of 0.60, not 0.45: stage 1 alone, kind 79 / 81 % -> 90 / 93 % (sampling seeds 0 / 1);
    a shape spans more tokens, and the demo VAE keeps larger triangles' tips (docs/demo.md,
    changelog)."""
    side = OBJECT_SIDE * min(height, width)
    cx, cy = width / 2, height / 2
    return Scene(colour, shape, background, height, width, cx, cy, side, placed=False)


def placed_scene(
    rng: random.Random, colour: str, shape: str, background: str, height: int, width: int
) -> Scene:
    """A shape of one of the two ``SIDES``, centred on one cell of the 3x3 grid of the position words
    (moved inward until it fits: a large shape in a corner cell still has its centre in that cell)."""
    side = SIDES[rng.choice(list(SIDES))] * min(height, width)
    row, col = rng.randrange(3), rng.randrange(3)
    cx = min(max((col + 0.5) * width / 3, side / 2), width - side / 2)
    cy = min(max((row + 0.5) * height / 3, side / 2), height - side / 2)
    return Scene(colour, shape, background, height, width, cx, cy, side)


# Share of the text-stage images (stages 2 and 3) that are object-centric, with a caption naming no size
# or position; the rest are placed, and their captions name both.  Stage 1's images are all
# object-centric.  A caption that fixes the layout is what lets a few hundred CPU steps learn one clean
# shape per prompt: with sizes and positions drawn at random (sample_scene) the same budget drew
# clusters of blobs (docs/demo.md, changelog).
PLAIN_SHARE = 1 / 3


def text_scene(
    rng: random.Random, colour: str, shape: str, background: str, height: int, width: int
) -> Scene:
    """One image of the text stages: object-centric (``PLAIN_SHARE``) or placed."""
    layout = centred_scene if rng.random() < PLAIN_SHARE else placed_scene
    return layout(rng, colour, shape, background, height, width)


def render(scene: Scene, supersample: int = 4) -> Image.Image:
    """Draw ``scene`` with anti-aliased edges (drawn large, then downsampled)."""
    s = supersample
    img = Image.new("RGB", (scene.width * s, scene.height * s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    fill = COLOURS[scene.colour]
    cx, cy, r = scene.cx * s, scene.cy * s, scene.side * s / 2
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return img.resize((scene.width, scene.height), Image.LANCZOS)


def caption(scene: Scene, rng: random.Random) -> str:
    """A LLaVA-style caption that always contains :func:`core_phrase`, and for a placed shape its size
    word and position phrase."""
    core = core_phrase(scene.colour, scene.shape, scene.background)
    if not scene.placed:
        return rng.choice(_PLAIN_TEMPLATES).format(core=core)
    where = position_phrase(scene.cx, scene.cy, scene.height, scene.width)
    size = size_word(scene.side, scene.height, scene.width)
    return rng.choice(_PLACED_TEMPLATES).format(core=core, where=where, size=size, shape=scene.shape)


def size_word(side: float, height: int, width: int) -> str:
    """The caption's size word for a shape of ``side`` pixels in a ``height`` x ``width`` image."""
    return "large" if side > LARGE_ABOVE * min(height, width) else "small"


def position_phrase(cx: float, cy: float, height: int, width: int) -> str:
    """The caption's position phrase for a centre (``cx``, ``cy``): its cell of the 3 x 3 grid."""
    return POSITIONS[(min(int(3 * cy / height), 2), min(int(3 * cx / width), 2))]


def text_combinations() -> list[tuple[str, str, str]]:
    """All (colour, shape, background) triples allowed in the text stages."""
    return [(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS if (c, s, b) not in HELD_OUT]


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=95, subsampling=0)
    else:
        img.save(buf, format=fmt)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(payload))


def _shard_chunks(n: int, per_shard: int) -> Iterator[range]:
    for start in range(0, n, per_shard):
        yield range(start, min(n, start + per_shard))


def write_stage1(out: Path, n: int, size: int = 64, seed: int = 0, per_shard: int = 500) -> Path:
    """ImageNet-style webdataset tars (``KEY.png`` + ``KEY.cls``) plus ``synsets.txt``.

    Backgrounds are random; every class gets the same number of images, all object-centric.
    """
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    (out / "synsets.txt").write_text("".join(f"n{i:08d} {class_name(i)}\n" for i in range(len(CLASSES))))
    for shard, idx in enumerate(_shard_chunks(n, per_shard)):
        with tarfile.open(out / f"imagenet-{shard:05d}.tar", "w") as tar:
            for i in idx:
                label = i % len(CLASSES)
                colour, shape = CLASSES[label]
                scene = centred_scene(rng, colour, shape, rng.choice(list(BACKGROUNDS)), size, size)
                _add(tar, f"{i:08d}.png", _encode(render(scene), "PNG"))
                _add(tar, f"{i:08d}.cls", str(label).encode())
    return out


def write_stage2(out: Path, n: int, size: int = 64, seed: int = 1, per_shard: int = 500) -> Path:
    """SA-1B-style tars (``sa_N.jpg`` + ``sa_N.json``) and a LLaVA caption JSONL (id -> caption)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    combos = text_combinations()
    with open(out / "llava_captions.jsonl", "w") as captions:
        for shard, idx in enumerate(_shard_chunks(n, per_shard)):
            with tarfile.open(out / f"sa_{shard:06d}.tar", "w") as tar:
                for i in idx:
                    scene = text_scene(rng, *combos[i % len(combos)], size, size)
                    image_id = f"sa_{i + 1}"
                    meta = {
                        "image": {
                            "image_id": i + 1,
                            "width": size,
                            "height": size,
                            "file_name": f"{image_id}.jpg",
                        }
                    }
                    _add(tar, f"{image_id}.jpg", _encode(render(scene), "JPEG"))
                    _add(tar, f"{image_id}.json", json.dumps(meta).encode())
                    captions.write(json.dumps({"id": image_id, "caption": caption(scene, rng)}) + "\n")
    return out


# Stage 3's base resolution (demo/configs/stage3.yaml data.resolution; the report samples at it) and the
# (height, width) of its images.  96, not 128: sampled from the same stage-2 export, 96 px kept more of
# stage 2's kinds (held-out 48 %, seen 52 %; 128 px: 31 / 40 %), and stage 3 took 65 s, not 90.
# Square only, not three aspect buckets (96 x 96, 80 x 112, 112 x 80): diffusers' PixArt position table
# spans the same range along each axis whatever the grid, so a square in an 80 x 112 image is a tall
# rectangle to the model, and without PixArt's aspect-ratio micro-conditioning (the MS variant's
# embedders need a hidden width divisible by 3; the demo's is 64) it cannot tell the two apart.  Stage 3
# alone from one stage 2: placed kinds over all 54 size x position x kind prompts 62 % with the three
# buckets, 67 % with milder ones (88 x 104, 104 x 88), 87 % square only (docs/demo.md, changelog).
STAGE3_RESOLUTION = 96
STAGE3_SIZES: tuple[tuple[int, int], ...] = ((96, 96),)


def write_stage3(out: Path, n: int, seed: int = 2) -> Path:
    """An aesthetic image folder with ``metadata.jsonl`` (file, caption, aesthetic_score).

    About a quarter of the images get a score below 5.0 (they are drawn like the rest), so the
    stage's score threshold has work to do.
    """
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    combos = text_combinations()
    with open(out / "metadata.jsonl", "w") as meta:
        for i in range(n):
            height, width = STAGE3_SIZES[i % len(STAGE3_SIZES)]
            scene = text_scene(rng, *combos[(i // len(STAGE3_SIZES)) % len(combos)], height, width)
            score = rng.uniform(5.5, 7.5) if rng.random() > 0.25 else rng.uniform(3.0, 4.9)
            name = f"{i:06d}.png"
            render(scene).save(images / name)
            record = {"file": name, "caption": caption(scene, rng), "aesthetic_score": round(score, 3)}
            meta.write(json.dumps(record) + "\n")
    return out


def shape_colour(image: Image.Image | np.ndarray) -> str | None:
    """Name the palette colour of the shape in ``image``, or None if no shape stands out.

    The background is the median of the border pixels; shape pixels are those
    far (> 60 RGB units) from it.  Their median colour is matched to the nearest
    palette entry.  The VAE tests read colours with it; the demo's adherence report reads kind,
    colour, background, size and position with ``demo/adherence.classify``.
    """
    arr = np.asarray(image, dtype=np.float32)[..., :3]
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    background = np.median(border, axis=0)
    mask = np.linalg.norm(arr - background, axis=-1) > 60
    if mask.sum() < 0.02 * mask.size:
        return None
    centre = np.median(arr[mask], axis=0)  # median: robust to anti-aliased edge pixels
    names = list(COLOURS)
    dists = [np.linalg.norm(centre - np.array(COLOURS[n])) for n in names]
    return names[int(np.argmin(dists))]
