"""Train the tiny frozen VAE that stands in for PixArt's ``sd-vae-ft-ema`` in the demo.

PixArt-alpha never trains its autoencoder: every stage encodes images with the
frozen, pretrained Stable Diffusion VAE (``sd-vae-ft-ema``, downsample factor 8,
4 latent channels, latents multiplied by a fixed ``scaling_factor``) and only
trains the diffusion transformer in that latent space.  The offline demo cannot
download that VAE, and it is far too large for two CPU cores anyway.

The analogue is a small ``diffusers.AutoencoderKL`` with the same interface
(4 latent channels, a ``scaling_factor`` in its config) but downsample factor 4,
not 8, that was trained *once*, by this script, on the demo world of
:mod:`data.synthetic`, with its weights committed next to it in
``demo/assets/demo_vae``.  The demo then loads it with
``AutoencoderKL.from_pretrained`` and keeps it frozen, exactly as a real run
treats ``sd-vae-ft-ema``.  Training the VAE at demo time instead would spend
most of the demo's CPU time budget on a component the paper does not train.

Factor 4 because the demo's images are small: at 64 px a factor-8 VAE has 8x8
latents, a shape of 19-38 px covers 2-5 latent pixels, and decoding clean
latents of 108 renders gave the right kind (circle, square, triangle) 60 % of
the time (it rounded small triangles and squares).  This factor-4 VAE (16x16
latents at 64 px) gives 95 %, and 100 % at 128 px.  The demo transformers patchify 2x2 latent
pixels (``model.size: demo-narrow/2``): 64 tokens of 8 px at 64 px.

Re-create the committed weights with::

    python -m tristage.demo.assets.train_demo_vae --threads 2

(about 8 minutes on two CPU threads for the first two phases, then about 3 more for the decoder phase).
The committed weights are the first two phases of that run, made before the decoder phase existed, then
the decoder phase alone on one thread (191 s), which reproduces them bit for bit::

    python -m tristage.demo.assets.train_demo_vae --init OLD_DIR --steps-32 0 --steps 0 \
        --out demo/assets/demo_vae

The run is seeded: the data, the initialisation and the batch order are all
fixed, so the same torch version and thread count reproduce the same weights.
The training renders cover every colour x shape x background except the six
held-out combinations of the text stages.

Recipe.  The loss is SD's VAE recipe without its LPIPS and GAN terms (which this
flat-colour world does not need): a summed per-pixel reconstruction term plus a
small KL term, with the decoder trained on *sampled* latents so that decoding
``posterior.sample()`` works as well as decoding the posterior mean.  On top of
it, a *latent layout* term (``--code-weight``):

* every palette colour has a fixed 4-channel code (``CODES``: the even-parity
  corners of the 4-cube and its centre, so any two codes are >= 2 apart and the
  close hues red/orange, purple/blue and yellow/green sit on opposite corners);
  the posterior mean of each latent pixel is pulled (MSE, weight 10) towards the
  codes of the shape and the background mixed by how much of its 4x4 block the
  shape covers.  The decoder stays free to turn that into sharp edges.  Without
  it the VAE found its own layout, and a bad one for a diffusion model: red,
  orange and yellow lay nearly on one ray (orange ~ 0.87 x red), and a colour's
  code depended on the background (GroupNorm's image-wide statistics), so "red"
  was a different target on white, black and gray;

and a *degraded-latent* decoder (``--degrade-fraction``): half of the sampled
latents are mixed with their 3x3 box blur and noised before decoding, against
the sharp image.  A diffusion model's samples are soft versions of encoder
outputs, and classifier-free guidance pushes them past the codes; without this
a blurred purple-on-black latent decoded to green and orange-on-black to red.

Measured through the full demo (same configs and step counts, 2 CPU cores):

==============================  ========================  =====================
demo VAE                        stage 1 (DiTPipeline)     held-out, 128 px
==============================  ========================  =====================
free layout                     83 %                      42 %
codes, weight 1                 94 %                      90 %
codes, weight 10, degraded      99 %                      100 %
==============================  ========================  =====================

(with weight 1 the codes were only loosely kept: orange sat 2 away from its
code, near yellow's.)

A third, *decoder-only* phase (``--decoder-steps``, ``finetune_decoder``): the encoder, and so every
cached latent and the ``scaling_factor``, stays as it is; the decoder learns to render the sharp image
from *token sketches* of its latents (``token_sketch``).  The demo DiT (patch 2) draws each 2x2 token
as one flat, near-binary value, and guidance overshoots the codes by up to about 1.5x: a circle comes
out as a plus sign of tokens, a triangle as a stepped hat.  Three quarters of this phase's latents are
moved a random way towards such a sketch and noised; the rest are degraded as in phase 2.  Measured by
swapping the VAE into the same exports (shape kind, sampling seeds 0 / 1):

========================================  ===========  =============  =============
demo VAE                                   stage 1      held-out       seen
========================================  ===========  =============  =============
phases 1-2 only                            67 / 61 %    27 / 29 %      21 / 25 %
+ decoder phase, 1500 steps (committed)    68 / 68 %    30 / 30 %      35 / 25 %
+ 3000 steps, lr 1e-3, gain up to 1.7      67 / 64 %
+ the same, nine tenths sketches           58 / 61 %
+ 1500 steps, gain up to 1.7, MSE 0.5      67 / 67 %
========================================  ===========  =============  =============

Decoding the clean latents of 108 renders keeps the kind of 87 % at 64 px (phases 1-2: 97 %) and 100 %
at 128 px; decoding their token sketches, 51 % / 98 % (phases 1-2: 46 % / 88 %).

Three more choices make a VAE this small learn the palette within minutes:

* the reconstruction term is L1 *plus* a squared error, pixels of the shape are
  up-weighted, and the L1 error of the shape's *mean* colour is added.  Red/orange
  and purple/blue are close hues; plain L1 pulls as hard on a background pixel
  that is 2 units off as on a shape pixel that is 70 units off, and the model
  settles for one "average warm colour" per background;
* ``norm_num_groups=2``: with one channel per group, GroupNorm is an instance
  norm, which erases the absolute level of a flat region (a plain two-tone
  image normalises to the same pattern whatever its colours);
* a cheap warm-up on 32 px renders (a quarter of the cost of a 64 px step; the
  colour code does not depend on resolution), then alternating steps on 64 px
  renders (with 64 px crops of ``LARGE_SIZES``) and on whole ``LARGE_SIZES`` renders.

The saved weights are an EMA of the weights over the second phase (as the "ema"
in ``sd-vae-ft-ema``).  After training, the std of the posterior means over a
batch of 64 px images sets ``scaling_factor = latent_scale / std``.  SD's VAE
(0.18215) gives unit-variance latents, sized for DiT/PixArt's 32x32 latents at
256 px.  The demo's latents are smaller: the same noise level hides far more of
such a small image (Hoogeboom et al. 2023, "simple diffusion", shift log-SNR by
2 log(32/n) for n x n latents).  ``--latent-scale 4`` applies that shift through
the scaling factor, the one knob that both the cache and diffusers' pipelines
read (SNR x16 at every t).  Measured on demo stage 1 with the factor-8 VAE
(v-prediction, 400 steps): colour adherence 62% at scale 1, 68% at 2, 76% at 4,
69% at 8; with this factor-4 VAE (700 steps, batch 64): single shape 67% at
scale 4, 65% at 2.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from tristage.demo.synthetic import (
    BACKGROUNDS,
    COLOURS,
    render,
    sample_scene,
    text_combinations,
)

OUT_DIR = Path(__file__).resolve().parent / "demo_vae"

# Architecture: 3 blocks -> downsample factor 4; layers_per_block=1 keeps it tiny.
BLOCK_OUT_CHANNELS = (16, 32, 64)
NORM_NUM_GROUPS = 2
LATENT_CHANNELS = 4
CROP = 64  # training patch size (whole 64 px images, or crops of LARGE_SIZES renders)
# The larger renders (height, width): the stage-3 sizes when the committed weights were trained (the demo's
# stage 3 has since moved to 96 px, synthetic.STAGE3_SIZES), fixed here so that the script still
# reproduces those weights.  The VAE decodes both (test_demo_vae).
LARGE_SIZES: tuple[tuple[int, int], ...] = ((128, 128), (96, 160), (160, 96))
FACTOR = 2 ** (len(BLOCK_OUT_CHANNELS) - 1)  # 4 pixels per latent pixel

# The latent code of each palette colour (before the scaling factor). The nine codes are the
# even-parity vertices of the 4-cube plus its centre: any two are at least 2 apart, the
# backgrounds sit on the main diagonal (gray halfway between black and white), and each pair of
# close hues (red/orange, purple/blue, yellow/green) sits on opposite vertices, 4 apart.
CODES: dict[str, tuple[float, float, float, float]] = {
    "white": (1.0, 1.0, 1.0, 1.0),
    "black": (-1.0, -1.0, -1.0, -1.0),
    "gray": (0.0, 0.0, 0.0, 0.0),
    "red": (1.0, 1.0, -1.0, -1.0),
    "orange": (-1.0, -1.0, 1.0, 1.0),
    "purple": (1.0, -1.0, 1.0, -1.0),
    "blue": (-1.0, 1.0, -1.0, 1.0),
    "yellow": (1.0, -1.0, -1.0, 1.0),
    "green": (-1.0, 1.0, 1.0, -1.0),
}


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(BLOCK_OUT_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(BLOCK_OUT_CHANNELS),
        block_out_channels=BLOCK_OUT_CHANNELS,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=NORM_NUM_GROUPS,
        sample_size=64,
    )


def to_tensor(img) -> torch.Tensor:
    """PIL RGB -> float tensor (3, H, W) in [-1, 1] (the range PixArt feeds its VAE)."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def coverage(image: torch.Tensor, shape_rgb: torch.Tensor, background_rgb: torch.Tensor) -> torch.Tensor:
    """Per-pixel fraction of the shape's colour (1, H, W) in [0, 1]: anti-aliased edges get fractions."""
    direction = shape_rgb - background_rgb  # (3,)
    along = torch.einsum("chw,c->hw", image - background_rgb[:, None, None], direction)
    return (along / direction.square().sum()).clamp(0.0, 1.0)[None]


@dataclass
class Pool:
    """Renders (N, 3, H, W) with, per image, the shape's coverage (N, 1, H, W) and the two colour codes."""

    images: torch.Tensor
    alpha: torch.Tensor
    shape_code: torch.Tensor  # (N, 4)
    background_code: torch.Tensor  # (N, 4)

    def __len__(self) -> int:
        return len(self.images)


def render_pool(rng: random.Random, n: int, height: int, width: int) -> Pool:
    """``n`` renders cycling through every combination the text stages may see, random positions/sizes."""
    combos = text_combinations()
    images, alphas, shape_codes, background_codes = [], [], [], []
    for i in range(n):
        colour, shape, background = combos[i % len(combos)]
        image = to_tensor(render(sample_scene(rng, colour, shape, background, height, width)))
        shape_rgb = torch.tensor(COLOURS[colour], dtype=torch.float32) / 127.5 - 1.0
        background_rgb = torch.tensor(BACKGROUNDS[background], dtype=torch.float32) / 127.5 - 1.0
        images.append(image)
        alphas.append(coverage(image, shape_rgb, background_rgb))
        shape_codes.append(torch.tensor(CODES[colour]))
        background_codes.append(torch.tensor(CODES[background]))
    return Pool(*(torch.stack(parts) for parts in (images, alphas, shape_codes, background_codes)))


def latent_target(
    alpha: torch.Tensor, shape_code: torch.Tensor, background_code: torch.Tensor
) -> torch.Tensor:
    """The latent each image should encode to (B, 4, H/4, W/4): the colour codes mixed by coverage."""
    cover = torch.nn.functional.avg_pool2d(alpha, FACTOR)  # (B, 1, h, w)
    return cover * shape_code[:, :, None, None] + (1.0 - cover) * background_code[:, :, None, None]


class Batches:
    """Seeded training batches.

    ``next(batch_size, "32")``: whole 32 px renders (the cheap warm-up phase: the colour code the
    VAE must learn does not depend on resolution, and a step costs a quarter of a 64 px one).
    ``next(batch_size, "64")``: whole 64 px renders, or (``large_fraction`` of the items) random
    64 px crops of ``LARGE_SIZES`` renders, so the VAE sees the larger pixel scale too.
    ``next(batch_size, "stage3")``: whole renders of one of ``LARGE_SIZES`` (cycling through them),
    so GroupNorm and the mid-block attention also see whole large images with large shapes.
    """

    def __init__(self, seed: int, n32: int, n64: int, n_large: int, large_fraction: float):
        rng = random.Random(seed)
        self.tiny = render_pool(rng, n32, 32, 32)
        self.small = render_pool(rng, n64, 64, 64)
        self.large = [render_pool(rng, n_large, h, w) for h, w in LARGE_SIZES]
        self.large_fraction = large_fraction
        self.gen = torch.Generator().manual_seed(seed)
        self.large_calls = 0

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.gen))

    @staticmethod
    def _take(pool: Pool, index, y: slice = slice(None), x: slice = slice(None)) -> tuple[torch.Tensor, ...]:
        return (
            pool.images[index, :, y, x],
            pool.alpha[index, :, y, x],
            pool.shape_code[index],
            pool.background_code[index],
        )

    def _pick(self, pool: Pool, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, alpha, shape_code, background_code = self._take(
            pool, torch.randint(len(pool), (batch_size,), generator=self.gen)
        )
        return images, latent_target(alpha, shape_code, background_code)

    def next(self, batch_size: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (B, 3, H, W), latent targets (B, 4, H/4, W/4))."""
        if kind == "32":
            return self._pick(self.tiny, batch_size)
        if kind == "stage3":
            self.large_calls += 1
            return self._pick(self.large[self.large_calls % len(self.large)], batch_size)
        items = []
        for _ in range(batch_size):
            if float(torch.rand(1, generator=self.gen)) < self.large_fraction:
                pool = self.large[self._randint(len(self.large))]
                i = self._randint(len(pool))
                y = self._randint(pool.images.shape[2] - CROP + 1)
                x = self._randint(pool.images.shape[3] - CROP + 1)
                items.append(self._take(pool, [i], slice(y, y + CROP), slice(x, x + CROP)))
            else:
                items.append(self._take(self.small, [self._randint(len(self.small))]))
        images, alpha, shape_code, background_code = (torch.cat(parts) for parts in zip(*items))
        return images, latent_target(alpha, shape_code, background_code)


def box_blur(z: torch.Tensor) -> torch.Tensor:
    """Each latent pixel replaced by the mean of its 3x3 neighbourhood (edges: of the pixels inside)."""
    return torch.nn.functional.avg_pool2d(z, 3, stride=1, padding=1, count_include_pad=False)


def degrade(z: torch.Tensor, fraction: float, max_noise: float = 0.3) -> torch.Tensor:
    """A ``fraction`` of the latents (B, 4, h, w) blurred and noised, the rest as they are.

    Each chosen latent is mixed with its 3x3 box blur by a random amount and gets Gaussian noise of a
    random std up to ``max_noise`` (in code units). The decoder must still reconstruct the sharp image:
    a diffusion model's samples are never exactly on the encoder's manifold, and a mixture of a colour's
    code and the background's must decode to that colour's shape, not to whichever hue the mixture
    happens to pass (measured before this: a 3x3-blurred purple-on-black latent decoded to green).
    """
    batch = z.shape[0]
    chosen = (torch.rand(batch, 1, 1, 1) < fraction).float()
    mixed = torch.lerp(z, box_blur(z), torch.rand(batch, 1, 1, 1) * chosen)
    return mixed + chosen * max_noise * torch.rand(batch, 1, 1, 1) * torch.randn_like(z)


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """Per image (B,): the weighted L1 + squared error, plus the shape's mean-colour error."""
    # Summed L1 per image, as in SD's VAE loss, with the shape pixels (far from the image's
    # median colour) up-weighted: they are a small part of each image but all of its content.
    median = x.flatten(2).median(dim=2).values[:, :, None, None]
    shape_mask = ((x - median).norm(dim=1, keepdim=True) > 0.2).float()
    err = recon - x
    rec = (
        ((1.0 + args.fg_weight * shape_mask) * (err.abs() + args.mse_weight * err.square())).flatten(1).sum(1)
    )
    # Colour fidelity: the L1 error of the shape's *mean* colour, counted once per shape pixel.
    # Per-pixel terms mostly see edge noise; this one sees only a drift of the whole shape's hue.
    n_mask = shape_mask.flatten(1).sum(1)
    mean_err = (err * shape_mask).flatten(2).sum(2) / n_mask.clamp(min=1.0)[:, None]
    return rec + args.colour_weight * n_mask * mean_err.abs().sum(1)


def token_sketch(z: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """What a DiT of patch size ``patch`` draws early on: each token one flat, near-binary value.

    Per latent (B, 4, h, w): the background code is the median latent pixel, the shape's direction the
    pixel farthest from it; each pixel's coverage along that direction is averaged over its token,
    pushed towards 0 or 1 around a random threshold with a random steepness, scaled by a random gain
    (guidance overshoots the codes) and put back on the two codes, flat within each token.
    """
    batch = z.shape[0]
    background = z.flatten(2).median(dim=2).values[:, :, None, None]
    d = z - background
    far = d.flatten(2).norm(dim=1).argmax(dim=1)  # (B,)
    direction = d.flatten(2)[torch.arange(batch), :, far][:, :, None, None]  # (B, 4, 1, 1)
    cover = (d * direction).sum(1, keepdim=True) / direction.square().sum(1, keepdim=True).clamp(min=1e-6)
    cover = torch.nn.functional.avg_pool2d(cover.clamp(0.0, 1.0), patch)
    threshold = 0.3 + 0.4 * torch.rand(batch, 1, 1, 1)
    steepness = 1.0 + 7.0 * torch.rand(batch, 1, 1, 1)
    cover = ((cover - threshold) * steepness + 0.5).clamp(0.0, 1.0)
    gain = 0.9 + 0.5 * torch.rand(batch, 1, 1, 1)
    flat = background + gain * cover * direction
    return torch.nn.functional.interpolate(flat, scale_factor=patch, mode="nearest")


def sketch_degrade(z: torch.Tensor, fraction: float, max_noise: float = 0.3) -> torch.Tensor:
    """A ``fraction`` of the latents moved a random way towards their token sketch and noised; the rest
    degraded as in the main phase (``degrade``)."""
    batch = z.shape[0]
    chosen = (torch.rand(batch, 1, 1, 1) < fraction).float()
    sketched = torch.lerp(z, token_sketch(z), torch.rand(batch, 1, 1, 1))
    sketched = sketched + max_noise * torch.rand(batch, 1, 1, 1) * torch.randn_like(z)
    return chosen * sketched + (1.0 - chosen) * degrade(z, 1.0, max_noise)


def lr_at(step: int, steps: int, base: float, warmup: int = 50) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def latent_std(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 32) -> float:
    means = [
        vae.encode(images[i : i + batch_size]).latent_dist.mean for i in range(0, len(images), batch_size)
    ]
    return float(torch.cat(means).std())


def finetune_decoder(vae: AutoencoderKL, data: Batches, args: argparse.Namespace) -> None:
    """Decoder-only phase: the encoder (so the latents, the caches and ``scaling_factor``) stays as it is;
    the decoder learns to render the sharp image from token sketches of its latents (``sketch_degrade``).
    Its weights end as their EMA over this phase."""
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=args.decoder_lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    start = time.time()
    for step in range(args.decoder_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.decoder_steps, args.decoder_lr)
        x, _ = (
            data.next(max(1, args.batch_size // 4), "stage3")
            if step % 2
            else data.next(args.batch_size, "64")
        )
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        rec = reconstruction_loss(vae.decode(sketch_degrade(z, args.sketch_fraction)).sample, x, args)
        loss = rec.mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - args.ema_decay)
        if step % 100 == 0 or step == args.decoder_steps - 1:
            print(
                f"decoder step {step:5d}  rec {float(loss.detach()):.4f}  {time.time() - start:.0f}s",
                flush=True,
            )
    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-32", type=int, default=1000, help="warm-up steps on 32 px renders")
    parser.add_argument("--batch-size-32", type=int, default=16)
    parser.add_argument(
        "--steps", type=int, default=1800, help="steps on 64 px renders and crops / whole stage-3 renders"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--kl-weight",
        type=float,
        default=1e-5,
        help="weight of the summed KL against the summed L1, as in SD",
    )
    parser.add_argument("--fg-weight", type=float, default=4.0, help="extra L1 weight of shape pixels")
    parser.add_argument(
        "--mse-weight", type=float, default=4.0, help="squared-error term: pulls hard on wrong colours"
    )
    parser.add_argument(
        "--colour-weight", type=float, default=4.0, help="weight of the shape's mean-colour L1 error"
    )
    parser.add_argument(
        "--code-weight",
        type=float,
        default=10.0,
        help="weight of the posterior mean's MSE to its colour codes",
    )
    parser.add_argument(
        "--degrade-fraction", type=float, default=0.5, help="share of latents blurred/noised before decoding"
    )
    parser.add_argument("--logvar-init", type=float, default=-4.0, help="initial posterior log-variance")
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--latent-scale", type=float, default=4.0, help="std of the scaled latents (see the docstring)"
    )
    parser.add_argument(
        "--decoder-steps", type=int, default=1500, help="decoder-only steps on token sketches"
    )
    parser.add_argument("--decoder-lr", type=float, default=5e-4)
    parser.add_argument(
        "--sketch-fraction",
        type=float,
        default=0.75,
        help="share of decoder-phase latents made token sketches",
    )
    parser.add_argument("--init", type=Path, default=None, help="start from this saved VAE, not from scratch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()
    data = Batches(args.seed, n32=2160, n64=2160, n_large=216, large_fraction=0.25)
    vae = build_vae() if args.init is None else AutoencoderKL.from_pretrained(args.init)
    if args.init is None:
        with torch.no_grad():  # start from a near-deterministic posterior (SD's VAE ends up with a tiny std)
            vae.quant_conv.bias[LATENT_CHANNELS:] += args.logvar_init
    n_params = sum(p.numel() for p in vae.parameters())
    print(f"AutoencoderKL {BLOCK_OUT_CHANNELS}: {n_params / 1e6:.2f}M params", flush=True)

    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    vae.train()
    total = args.steps_32 + args.steps
    ema: list[torch.Tensor] | None = None  # EMA of the weights over the 64 px phase (as in sd-vae-ft-ema)
    for step in range(total):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, args.lr)
        if step < args.steps_32:
            x, target = data.next(args.batch_size_32, "32")
        elif step % 2:  # same pixel count per step: batch_size 64 px images or batch_size / 4 stage-3 ones
            x, target = data.next(max(1, args.batch_size // 4), "stage3")
        else:
            x, target = data.next(args.batch_size, "64")
        posterior = vae.encode(x).latent_dist
        rec = reconstruction_loss(
            vae.decode(degrade(posterior.sample(), args.degrade_fraction)).sample, x, args
        )
        kl = posterior.kl()  # summed over latent elements per image
        code = (posterior.mean - target).square().mean()  # the latent layout: one code per colour
        loss = (rec + args.kl_weight * kl).mean() / x[0].numel() + args.code_weight * code
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step >= args.steps_32:
            with torch.no_grad():
                params = [p.detach() for p in vae.parameters()]
                if ema is None:
                    ema = [p.clone() for p in params]
                else:
                    torch._foreach_lerp_(ema, params, 1.0 - args.ema_decay)
        if step % 50 == 0 or step == total - 1:
            rec_px = float(rec.detach().mean()) / x[0].numel()
            kl_elem = float(kl.detach().mean()) / posterior.mean[0].numel()
            elapsed = time.time() - start
            print(
                f"step {step:5d}  rec {rec_px:.4f}  code {float(code.detach()):.4f}  kl/elem {kl_elem:.3f}  "
                f"{elapsed:.0f}s",
                flush=True,
            )

    if ema is not None:
        with torch.no_grad():
            for p, e in zip(vae.parameters(), ema, strict=True):
                p.copy_(e)
    if args.decoder_steps:
        finetune_decoder(vae, data, args)
    vae.eval()
    std = latent_std(vae, render_pool(random.Random(args.seed + 1), 270, 64, 64).images)
    vae.register_to_config(scaling_factor=args.latent_scale / std)
    args.out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(args.out)
    elapsed = time.time() - start
    factor = args.latent_scale / std
    print(f"latent std {std:.4f} -> scaling_factor {factor:.5f}; saved to {args.out} after {elapsed:.0f}s")


if __name__ == "__main__":
    main()
