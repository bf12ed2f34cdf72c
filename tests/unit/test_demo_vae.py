"""The committed demo VAE (``demo/assets/demo_vae``) reconstructs every demo colour faithfully.

Red/orange and purple/blue are close hues: a blurry VAE shifts one into the other, and every
adherence number of the demo would then measure the VAE, not the model.  Nor may it lose a shape's
kind: the adherence classifier must read its reconstructions right.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from tristage.demo.adherence import Asked, classify, score
from tristage.demo.assets.train_demo_vae import LARGE_SIZES
from tristage.demo.synthetic import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    STAGE3_RESOLUTION,
    STAGE3_SIZES,
    Scene,
    render,
    sample_scene,
    text_scene,
)

VAE_DIR = Path(__file__).resolve().parents[2] / "demo" / "assets" / "demo_vae"
TOLERANCE = 20.0  # RGB units, Euclidean


def shape_colour(image: Image.Image | np.ndarray) -> str | None:
    """Name the palette colour of the shape in ``image``, or None if no shape stands out.

    The background is the median of the border pixels; shape pixels are those
    far (> 60 RGB units) from it.  Their median colour is matched to the nearest
    palette entry.  (The demo's adherence report reads kind, colour, background, size and position
    with ``demo/adherence.classify``; this reads the colour alone.)
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


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return AutoencoderKL.from_pretrained(VAE_DIR).eval()


def _all_scenes(height: int, width: int, seed: int):
    """Every colour x shape x background, at random positions and sizes."""
    rng = random.Random(seed)
    combos = [(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]
    return [sample_scene(rng, *combo, height, width) for combo in combos]


def _few_scenes(height: int, width: int, seed: int):
    """Every colour once, cycling through the shapes and backgrounds (large images are slow on CPU)."""
    rng = random.Random(seed)
    shapes, backgrounds = list(SHAPES), list(BACKGROUNDS)
    return [
        sample_scene(rng, colour, shapes[i % 3], backgrounds[(i + i // 3) % 3], height, width)
        for i, colour in enumerate(COLOURS)
    ]


def _to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images) / 127.5 - 1.0).float().permute(0, 3, 1, 2)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def _reconstruct(vae: AutoencoderKL, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(reconstruction from the posterior mean, reconstruction from a posterior sample)."""
    posterior = vae.encode(_to_tensor(images)).latent_dist
    mode = vae.decode(posterior.mode()).sample
    sample = vae.decode(posterior.sample(generator=torch.Generator().manual_seed(0))).sample
    return _to_uint8(mode), _to_uint8(sample)


def _check(vae: AutoencoderKL, scenes) -> float:
    originals = [np.asarray(render(s), dtype=np.float32) for s in scenes]
    recons, sampled = _reconstruct(vae, originals)
    worst = 0.0
    failures = []
    for scene, orig, rec, samp in zip(scenes, originals, recons, sampled, strict=True):
        name = f"{scene.colour} {scene.shape} on {scene.background} ({scene.height}x{scene.width})"
        mask = np.linalg.norm(orig - np.array(BACKGROUNDS[scene.background]), axis=-1) > 60
        mean_err = float(np.linalg.norm(rec[mask].mean(0) - orig[mask].mean(0)))
        median_err = float(np.linalg.norm(np.median(rec[mask], axis=0) - np.array(COLOURS[scene.colour])))
        worst = max(worst, mean_err, median_err)
        if mean_err > TOLERANCE or median_err > TOLERANCE:
            failures.append(f"{name}: mean colour off by {mean_err:.1f}, median by {median_err:.1f}")
        if shape_colour(rec) != scene.colour:
            failures.append(f"{name}: reconstruction reads as {shape_colour(rec)}")
        if shape_colour(samp) != scene.colour:
            failures.append(f"{name}: decoded posterior sample reads as {shape_colour(samp)}")
    assert not failures, "\n".join(failures)
    return worst


def test_config_has_sd_vae_interface_at_factor_4(vae: AutoencoderKL) -> None:
    """4 latent channels and a scaling factor, as sd-vae-ft-ema; factor 4, not 8 (train_demo_vae.py)."""
    config = vae.config
    assert config.latent_channels == 4
    assert 2 ** (len(config.block_out_channels) - 1) == 4
    with torch.no_grad():
        latent = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
    assert latent.shape == (1, 4, 16, 16)


def test_scaling_factor_gives_the_scripts_latent_scale(vae: AutoencoderKL) -> None:
    """std 4, not 1: the demo's small latents want a log-SNR shift (train_demo_vae.py docstring)."""
    scenes = _all_scenes(64, 64, seed=7)
    images = _to_tensor([np.asarray(render(s), dtype=np.float32) for s in scenes])
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
    assert 0.7 * 4 < float(latents.std()) < 1.4 * 4


def test_reconstructs_every_colour_shape_background_at_64px(vae: AutoencoderKL) -> None:
    _check(vae, _all_scenes(64, 64, seed=0))


# Two of the large sizes the VAE trained at, and the demo's stage-3 sizes.
@pytest.mark.parametrize("height,width", [*LARGE_SIZES[:2], *STAGE3_SIZES])
def test_reconstructs_every_colour_at_stage3_sizes(vae: AutoencoderKL, height: int, width: int) -> None:
    _check(vae, _few_scenes(height, width, seed=1))


@pytest.mark.parametrize("side", [64, STAGE3_RESOLUTION])
def test_reconstructions_keep_the_shape_kind(vae: AutoencoderKL, side: int) -> None:
    """Through the demo VAE, the text stages' images (object-centric and placed) stay one shape of their
    kind and colour to the adherence classifier: a kind the models miss is the model's, not the VAE's."""
    rng = random.Random(5)
    scenes = [
        text_scene(rng, colour, shape, background, side, side)
        for colour in COLOURS
        for shape in SHAPES
        for background in BACKGROUNDS
        for _ in range(2)
    ]
    recons, sampled = _reconstruct(vae, [np.asarray(render(s), dtype=np.float32) for s in scenes])
    for decoded in (recons, sampled):  # from the posterior mean, and from a posterior sample
        readings = [classify(d.astype(np.uint8)) for d in decoded]
        wrong = [
            f"{s.colour} {s.shape} on {s.background}: {r.shape} ({r.colour}, single {r.single})"
            for s, r in zip(scenes, readings, strict=True)
            if not score(r, Asked(s.colour, s.shape, s.background))["all"]
        ]
        assert len(wrong) <= 0.02 * len(scenes), wrong


def test_each_colour_has_one_code_whatever_the_background(vae: AutoencoderKL) -> None:
    """The latent layout of ``train_demo_vae.CODES``: a colour's code does not depend on its background,
    and the close hues (red/orange, purple/blue) are far apart in latent space."""
    from tristage.demo.assets.train_demo_vae import CODES, FACTOR

    codes: dict[str, list[torch.Tensor]] = {c: [] for c in COLOURS}
    for colour in COLOURS:
        for background in BACKGROUNDS:
            square = Scene(colour, "square", background, 64, 64, cx=32.0, cy=32.0, side=36.0)  # px 14-50
            image = _to_tensor([np.asarray(render(square), dtype=np.float32)])
            with torch.no_grad():
                latent = vae.encode(image).latent_dist.mean
            inside = slice(16 // FACTOR, 48 // FACTOR)  # the latent pixels inside the square
            codes[colour].append(latent[0, :, inside, inside].mean((1, 2)))
    for colour, per_background in codes.items():
        target = torch.tensor(CODES[colour])
        for code, background in zip(per_background, BACKGROUNDS, strict=True):
            assert float((code - target).norm()) < 0.6, f"{colour} on {background}: {code.tolist()}"
    for a, b in (("red", "orange"), ("purple", "blue"), ("yellow", "orange")):
        assert float((codes[a][0] - codes[b][0]).norm()) > 2.0, (a, b)


@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_blurred_latents_still_decode_to_the_shapes_colour(vae: AutoencoderKL, background: str) -> None:
    """A diffusion sample is never exactly an encoder output: a 3x3-blurred latent (the colour's code
    mixed with the background's) must still decode to the colour, not to a hue the mixture passes."""
    from tristage.demo.assets.train_demo_vae import box_blur

    rng = random.Random(11)
    scenes = [
        sample_scene(rng, colour, shape, background, 128, 128) for colour in COLOURS for shape in SHAPES
    ]
    images = _to_tensor([np.asarray(render(s), dtype=np.float32) for s in scenes])
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean
        decoded = _to_uint8(vae.decode(box_blur(latents)).sample)
    read = [shape_colour(d) for d in decoded]
    wrong = [f"{s.colour} {s.shape}: {r}" for s, r in zip(scenes, read, strict=True) if r != s.colour]
    assert len(wrong) <= 1, wrong  # at most one of 18


def test_token_sketch_is_flat_per_token_and_between_the_codes():
    """The decoder phase's inputs look like what the demo DiT draws: one value per 2x2 token, on the
    segment from the background code towards the shape's code (scaled by a gain of 0.9-1.4)."""
    from tristage.demo.assets.train_demo_vae import CODES, sketch_degrade, token_sketch

    background, shape = torch.tensor(CODES["gray"]), torch.tensor(CODES["red"])
    cover = torch.zeros(2, 1, 16, 16)
    cover[:, :, 5:11, 4:9] = 1.0  # a block that does not sit on the 2x2 token grid
    cover[:, :, 4, 6] = 0.5
    z = background[None, :, None, None] + cover * (shape - background)[None, :, None, None]
    torch.manual_seed(0)
    sketch = token_sketch(z)
    tokens = sketch.unfold(2, 2, 2).unfold(3, 2, 2)  # (B, C, 8, 8, 2, 2)
    assert torch.equal(tokens, tokens[..., :1, :1].expand_as(tokens))
    along = torch.einsum("bchw,c->bhw", sketch - background[None, :, None, None], shape - background)
    along = along / (shape - background).square().sum()
    off = (
        sketch - background[None, :, None, None] - along[:, None] * (shape - background)[None, :, None, None]
    )
    assert off.abs().max() < 1e-5
    assert along.min() >= -1e-6 and 0.9 <= along.max() <= 1.4 + 1e-6
    assert float(along[:, 0, 0].abs().max()) < 1e-6  # the background stays the background
    noisy = sketch_degrade(z, fraction=1.0, max_noise=0.0)
    assert not torch.equal(noisy, z) and noisy.shape == z.shape
