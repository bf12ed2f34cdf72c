"""The demo's shape classifier and adherence report, measured through the exported diffusers pipelines.

:func:`classify` reads a sample the way a person would, without the model being judged:

1. **Background**: the median of the border pixels, named by the nearest demo background colour.
2. **Foreground**: pixels more than ``FOREGROUND_DISTANCE`` RGB units from that background.
   (The kind, step 5, uses the object's outline at half contrast instead: see ``coverage``.)
3. **Objects**: 8-connected components of the foreground; those of at least ``MIN_OBJECT`` of the
   image are objects.  A sample is a *single shape* when there is exactly one object and the rest of
   the foreground (specks, haze) is under ``MAX_STRAY`` of its area.
4. **Colour**: the median colour of the object's pixels, named by the nearest palette entry.
5. **Kind**: two numbers of the object's coverage inside its bounding box, its *fill* (area / box area:
   square 1, circle pi/4, triangle 1/2) and the height of its centroid (half way down for a circle or
   a square, two thirds for a triangle with its apex up, as :func:`synthetic.render` draws them), name
   the nearest ideal kind.  Soft corners (a decoder's rounding) move these numbers little.  The kind
   is None -- a blob that is none of the three -- unless the object is also convex (``MIN_SOLIDITY``
   of its convex hull), about as tall as wide (``MAX_ASPECT``), near the ideal (``MAX_FEATURE``) and
   overlaps the ideal shape drawn in its box (IoU >= ``MIN_IOU``).
6. **Size and position**: the area is the object's *coverage* (each pixel's fraction of the object's
   colour against the background, so anti-aliased edges count in part); the side follows from the
   kind's area ratio (circle pi/4, square 1, triangle 1/2), "large" above ``synthetic.LARGE_ABOVE``
   of the short image side as in :func:`synthetic.caption`.  The centre is the coverage centroid (for
   a triangle moved up by side/6 to its bounding-box centre, where :class:`synthetic.Scene` puts it),
   placed in the 3 x 3 grid of the caption's position words.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, DiTPipeline, PixArtAlphaPipeline
from PIL import Image

from tristage.demo import synthetic
from tristage.train.inference.grid import grid
from tristage.train.models.pipelines import load_exported

FOREGROUND_DISTANCE = 60.0  # RGB units from the background: about half the closest palette/background pair
MIN_OBJECT = 0.005  # share of the image a component needs to count as an object (smaller: a speck)
MAX_STRAY = 0.10  # foreground outside the object, as a share of its area, that a single shape may have
MIN_IOU = 0.65  # least IoU with the ideal shape (drawn in the object's box) to be named that kind
MIN_SOLIDITY = 0.85  # least area / convex-hull area: a cluster of blobs is far from convex
MAX_FEATURE = 1.5  # largest distance to the nearest ideal in FEATURE_SCALE units
# (fill, centroid height) of the ideal kinds, and the scale of each number in the distance.
IDEAL_FEATURES = {"circle": (math.pi / 4, 0.5), "square": (1.0, 0.5), "triangle": (0.5, 2 / 3)}
FEATURE_SCALE = (0.1, 0.05)
MAX_ASPECT = 1.4  # longest / shortest side of the object's bounding box (every demo shape is 1.0)
# synthetic.render's PIL shapes include their last pixel on the 4x canvas: sides come out ~1/3 px large.
RENDER_BIAS = 0.35
AREA_RATIO = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # area / side**2 of each kind
NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]  # 8-connectivity


@dataclass(frozen=True)
class Reading:
    """What :func:`classify` sees in one image."""

    background: str  # nearest demo background colour to the border's median
    objects: int  # connected foreground components of at least MIN_OBJECT of the image
    single: bool  # exactly one object, and stray foreground under MAX_STRAY of it
    colour: str | None  # palette name of the largest object's median colour (None: no object)
    shape: str | None  # circle / square / triangle, None if the object is none of them (step 5)
    iou: float  # IoU of the largest object with the ideal shape of its nearest kind
    size: str | None  # "small" / "large"
    position: str | None  # one of the caption's nine position phrases


def nearest(colour: np.ndarray, table: dict[str, tuple[int, int, int]]) -> str:
    names = list(table)
    return names[int(np.argmin([np.linalg.norm(colour - np.array(table[n])) for n in names]))]


def components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask (H, W), each as a boolean mask, largest first."""
    seen = np.zeros_like(mask)
    height, width = mask.shape
    found = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for dy, dx in NEIGHBOURS:
                v, u = y + dy, x + dx
                if 0 <= v < height and 0 <= u < width and mask[v, u] and not seen[v, u]:
                    seen[v, u] = True
                    queue.append((v, u))
        component = np.zeros_like(mask)
        component[tuple(np.array(pixels).T)] = True
        found.append(component)
    return sorted(found, key=lambda c: -int(c.sum()))


def ideal_shapes(height: int, width: int) -> dict[str, np.ndarray]:
    """Masks (height, width) of each kind filling a box of that size, sampled at pixel centres."""
    y, x = np.mgrid[0:height, 0:width] + 0.5
    u, v = (x - width / 2) / (width / 2), y / height  # u in [-1, 1] across, v in [0, 1] down
    return {
        "circle": u**2 + (2 * v - 1) ** 2 <= 1.0,
        "square": np.ones((height, width), dtype=bool),
        "triangle": np.abs(u) <= v,  # apex at the top centre, base along the bottom
    }


def hull_area(obj: np.ndarray) -> float:
    """Area of the convex hull of the object's pixel squares (their corners), Andrew's monotone chain."""
    rows, cols = np.nonzero(obj)
    corners = {(int(x + dx), int(y + dy)) for y, x in zip(rows, cols) for dx in (0, 1) for dy in (0, 1)}
    points = sorted(corners)

    def chain(pts: list[tuple[int, int]]) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for p in pts:
            while len(out) >= 2 and _cross(out[-2], out[-1], p) <= 0:
                out.pop()
            out.append(p)
        return out[:-1]

    hull = chain(points) + chain(points[::-1])
    return 0.5 * abs(sum(a[0] * b[1] - b[0] * a[1] for a, b in zip(hull, hull[1:] + hull[:1])))


def _cross(o: tuple[int, int], a: tuple[int, int], b: tuple[int, int]) -> int:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def best_shape(obj: np.ndarray, alpha: np.ndarray) -> tuple[str | None, float, str]:
    """(kind or None, IoU with that kind's ideal, the nearest kind even if rejected) of one object.

    ``obj`` is the object's outline mask, ``alpha`` its coverage: fill and centroid height are taken
    from the coverage inside the outline's box, so an edge that falls on a pixel's middle (coverage
    about 0.5, half of that row above the outline's threshold) does not make a square ragged.
    """
    rows, cols = np.nonzero(obj)
    inside = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    box, cover = obj[inside], alpha[inside].clip(0.0, 1.0)
    fill = float(cover.mean())
    height = float((cover.sum(1) * (np.arange(box.shape[0]) + 0.5)).sum() / max(cover.sum(), 1e-6))
    height /= box.shape[0]  # 0 top, 1 bottom
    distance = {
        kind: math.hypot((fill - f) / FEATURE_SCALE[0], (height - h) / FEATURE_SCALE[1])
        for kind, (f, h) in IDEAL_FEATURES.items()
    }
    nearest_kind = min(distance, key=distance.get)
    ideal = ideal_shapes(*box.shape)[nearest_kind]
    iou = float((box & ideal).sum() / (box | ideal).sum())
    convex = box.sum() >= MIN_SOLIDITY * hull_area(obj)
    upright = max(box.shape) / min(box.shape) <= MAX_ASPECT
    ok = convex and upright and distance[nearest_kind] <= MAX_FEATURE and iou >= MIN_IOU
    return (nearest_kind if ok else None), iou, nearest_kind


def dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    out = mask.copy()
    for dy, dx in NEIGHBOURS:
        out |= padded[1 + dy : 1 + dy + mask.shape[0], 1 + dx : 1 + dx + mask.shape[1]]
    return out


def coverage(arr: np.ndarray, obj: np.ndarray, background: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """(H, W): each pixel's share of the object's colour against the background, near the object.

    Unclipped within two pixels of the object: the renderer's Lanczos ringing over- and undershoots
    on either side of an edge and cancels out in a sum.
    """
    direction = colour - background
    alpha = (arr - background) @ direction / max(float(direction @ direction), 1.0)
    return alpha.clip(-0.5, 1.5) * dilate(dilate(obj))


def size_and_position(alpha: np.ndarray, kind: str) -> tuple[str, str]:
    """Size word and position phrase of an object from its coverage (anti-aliased edges in part)."""
    height, width = alpha.shape
    area = float(alpha.sum())
    side = math.sqrt(max(area, 0.0) / AREA_RATIO[kind]) - RENDER_BIAS
    y, x = np.mgrid[0:height, 0:width] + 0.5
    cx, cy = float((alpha * x).sum()) / max(area, 1.0), float((alpha * y).sum()) / max(area, 1.0)
    if kind == "triangle":  # the area centroid sits side/6 below the bounding-box centre
        cy -= side / 6
    return synthetic.size_word(side, height, width), synthetic.position_phrase(cx, cy, height, width)


def classify(image: Image.Image | np.ndarray) -> Reading:
    """Background, object count, colour, kind, size and position of one image (module docstring)."""
    arr = np.asarray(image, dtype=np.float32)[..., :3]
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    background = np.median(border, axis=0)
    mask = np.linalg.norm(arr - background, axis=-1) > FOREGROUND_DISTANCE
    found = components(mask)
    objects = [c for c in found if c.sum() >= MIN_OBJECT * mask.size]
    background_name = nearest(background, synthetic.BACKGROUNDS)
    if not objects:
        return Reading(background_name, 0, False, None, None, 0.0, None, None)
    obj = objects[0]
    stray = int(mask.sum() - obj.sum())
    single = len(objects) == 1 and stray <= MAX_STRAY * obj.sum()
    colour = np.median(arr[obj], axis=0)  # median: robust to anti-aliased edge pixels
    alpha = coverage(arr, obj, background, colour)
    # The outline at half contrast: a soft (decoded) edge neither grows nor shrinks the shape.
    kind, iou, fitted = best_shape((components(alpha > 0.5) or [obj])[0], alpha)
    size, position = size_and_position(alpha, kind or fitted)
    palette = nearest(colour, synthetic.COLOURS)
    return Reading(background_name, len(objects), single, palette, kind, iou, size, position)


@dataclass(frozen=True)
class Asked:
    """What a prompt or class asks for; None: not asked."""

    colour: str
    shape: str
    background: str | None = None
    size: str | None = None
    position: str | None = None


PROPERTIES = ("single", "shape", "colour", "background", "size", "position", "all")


def score(reading: Reading, asked: Asked) -> dict[str, bool | None]:
    """Per property: met (only a single shape meets any), or None where the prompt does not ask."""
    checks = {
        "shape": reading.shape == asked.shape,
        "colour": reading.colour == asked.colour,
        "background": None if asked.background is None else reading.background == asked.background,
        "size": None if asked.size is None else reading.size == asked.size,
        "position": None if asked.position is None else reading.position == asked.position,
    }
    scored = {k: None if v is None else reading.single and v for k, v in checks.items()}
    scored["all"] = reading.single and all(v for v in checks.values() if v is not None)
    return {"single": reading.single, **scored}


def rates(scores: list[dict[str, bool | None]]) -> dict[str, float | int]:
    """Share of samples meeting each property, over the samples that ask for it."""
    out: dict[str, float | int] = {"samples": len(scores)}
    for prop in PROPERTIES:
        asked = [s[prop] for s in scores if s[prop] is not None]
        if asked:
            out[prop] = round(sum(asked) / len(asked), 4)
    return out


# -- through the exported pipelines ----------------------------------------------------------------
STEPS, GUIDANCE = 20, 4.5


def held_out_prompts() -> list[tuple[str, Asked]]:
    """Two prompts per held-out combination: the bare phrase, and a caption naming size and position.

    Small shapes go to corners and large ones to the middle row / column, where the training captions
    put them most often (a large shape's centre cannot be far into a corner).
    """
    where = list(synthetic.POSITIONS.values())
    corners, middles = where[0::2][:4] + where[8:], where[1::2]  # (0,0) (0,2) (1,1) (2,0) (2,2) | edges
    prompts = []
    for i, (colour, shape, background) in enumerate(sorted(synthetic.HELD_OUT)):
        core = synthetic.core_phrase(colour, shape, background)
        size, position = ("small", corners[i % len(corners)]) if i % 2 else ("large", middles[i % 4])
        prompts.append((core, Asked(colour, shape, background)))
        prompts.append(
            (f"A {size} shape: {core}. It is {position}.", Asked(colour, shape, background, size, position))
        )
    return prompts


def seen_prompts() -> list[tuple[str, Asked]]:
    """The held-out prompts with the background changed to the next one in ``BACKGROUNDS``: the same
    kinds, colours, sizes and positions, as combinations the text stages did train on."""
    backgrounds = list(synthetic.BACKGROUNDS)
    prompts = []
    for prompt, asked in held_out_prompts():
        seen = backgrounds[(backgrounds.index(asked.background) + 1) % len(backgrounds)]
        text = prompt.replace(f"{asked.background} background", f"{seen} background")
        prompts.append((text, replace(asked, background=seen)))
    return prompts


def stage1_adherence(pipe: DiTPipeline, per_class: int, seed: int = 0) -> tuple[dict, list[Image.Image]]:
    """Every class ``per_class`` times through ``pipe``: one shape of the class's kind and colour."""
    names = [synthetic.class_name(i) for i in range(len(synthetic.CLASSES))]
    ids = [i for name in names for i in pipe.get_label_ids([name]) * per_class]
    g = torch.Generator().manual_seed(seed)
    images = pipe(ids, guidance_scale=GUIDANCE, num_inference_steps=STEPS, generator=g).images
    scores = [score(classify(im), Asked(*synthetic.CLASSES[i])) for im, i in zip(images, ids)]
    report = rates(scores)
    report["per_class"] = {
        name: rates(scores[k * per_class : (k + 1) * per_class])["all"] for k, name in enumerate(names)
    }
    return report, images


def load_pipeline(export_dir: Path) -> DiffusionPipeline:
    """An exported demo pipeline (``DiTPipeline`` or ``PixArtAlphaPipeline``), its progress bar off."""
    pipe = load_exported(export_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def score_pipeline(pipe: DiffusionPipeline, per_prompt: int, seed: int = 0) -> dict:
    """The ``adherence`` scorer (entry point group ``tristage.scorers``, pyproject.toml) that
    ``tristage eval --adherence`` runs: every class through a ``DiTPipeline`` (stage 1), the held-out
    prompts through a ``PixArtAlphaPipeline`` (the text stages); ``per_prompt`` samples each."""
    pipe.set_progress_bar_config(disable=True)
    if isinstance(pipe, DiTPipeline):
        return stage1_adherence(pipe, per_prompt, seed)[0]
    return prompt_adherence(pipe, held_out_prompts(), per_prompt, seed)[0]


def prompt_adherence(
    pipe: PixArtAlphaPipeline,
    prompts: list[tuple[str, Asked]],
    per_prompt: int,
    seed: int = 0,
    size: int = synthetic.STAGE3_RESOLUTION,
) -> tuple[dict, list[Image.Image]]:
    """``prompts`` through ``pipe`` at ``size`` px, ``per_prompt`` samples each."""
    per_prompt_rate, scores, images = {}, [], []
    for prompt, asked in prompts:
        g = torch.Generator().manual_seed(seed)
        out = pipe(
            prompt,
            num_images_per_prompt=per_prompt,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            height=size,
            width=size,
            generator=g,
            use_resolution_binning=False,
            clean_caption=False,  # the demo's captions are plain; True needs beautifulsoup4 and ftfy
        ).images
        prompt_scores = [score(classify(im), asked) for im in out]
        per_prompt_rate[prompt] = rates(prompt_scores)["all"]
        scores += prompt_scores
        images += out
    return {**rates(scores), "per_prompt": per_prompt_rate}, images


def adherence_report(out: Path, per_prompt: int, seed: int = 0) -> dict:
    """Measure both exports and write the sample grids."""
    per_class = min(per_prompt, 4)
    stage1, images1 = stage1_adherence(load_pipeline(out / "stage1" / "export"), per_class, seed)
    grid(images1, columns=per_class * 3).save(out / "stage1" / "samples.png")
    pipe = load_pipeline(out / "export")
    held, images3 = prompt_adherence(pipe, held_out_prompts(), per_prompt, seed)
    grid(images3, columns=per_prompt).save(out / "samples.png")
    per_seen = max(1, per_prompt // 2)
    seen, images_seen = prompt_adherence(pipe, seen_prompts(), per_seen, seed)
    grid(images_seen, columns=per_seen).save(out / "samples_seen.png")
    return {"stage1": stage1, "held_out": held, "seen": seen}
