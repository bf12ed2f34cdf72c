"""Train the small vision encoder that stands in for REPA's DINOv2-B in the demo.

REPA (Yu et al., ICLR 2025) aligns an early DiT block with a frozen, pretrained encoder's patch
features; its reference encoder is DINOv2-B (``facebook/dinov2-base``).  The offline demo cannot
download it, and DINOv2 has never seen a world of flat coloured shapes, so the demo's encoder is a
``transformers.Dinov2Model`` of the same class (4 layers, width 64, patch 8: an 8 x 8 token grid at 64 px,
the demo stage-1 DiT's own grid), trained *once* by this script on the demo's own renders, its weights
committed next to it in ``demo/assets/demo_encoder`` and loaded with ``AutoModel.from_pretrained`` by the
cache pass, as a hub id would be.

Objective (supervised, dense): every patch token of the last hidden state -- after the final LayerNorm,
the features REPA aligns with -- predicts through linear heads (thrown away afterwards) what lies under
its patch: the kind of the shape it belongs to, or background (4 classes), the surface colour (6 shape
colours and 3 backgrounds) and the share of the patch the shape covers.  A patch on a circle's edge
must say "circle", so patch features carry the shape's identity as well as the local geometry, which
is what DINOv2's patch features give a DiT on ImageNet.  Renders: random position and size (``sample_scene``)
and object-centric (``centred_scene``, the stage-1 layout), every colour x shape x background except the
text stages' six held-out combinations (as the demo VAE's renders).

Re-create the committed weights with::

    python -m tristage.demo.assets.train_demo_encoder --threads 1

(1500 steps of 64 renders, after rendering 6512; 1382 s on one thread of a shared 2-core machine.)
It is seeded (data, initialisation, batch order), so the same torch version and thread
count reproduce the same weights.  The committed ones score, on 512 held-out renders: the kind of
95.1 % of the patches on a shape, the surface of 99.9 % of all patches, the coverage within 0.011.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tristage.demo.assets.train_demo_vae import coverage, to_tensor
from tristage.demo.encoders import IMAGENET_MEAN, IMAGENET_STD, build_vision_encoder, save_vision_encoder
from tristage.demo.synthetic import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    centred_scene,
    render,
    sample_scene,
    text_combinations,
)

OUT_DIR = Path(__file__).parent / "demo_encoder"
SIDE, PATCH = 64, 8  # render side and encoder patch: the demo stage-1 DiT's 8 x 8 token grid
SURFACES = (*COLOURS, *BACKGROUNDS)  # a patch's surface class: the shape's colour or the background's
COVERED = 0.25  # a patch belongs to the shape when the shape covers more than this share of it


def render_set(rng: random.Random, n: int) -> dict[str, torch.Tensor]:
    """``n`` renders (half object-centric) with per-patch kind, surface and coverage targets."""
    combos, pixels, kinds, surfaces, covers = text_combinations(), [], [], [], []
    for i in range(n):
        colour, shape, background = combos[rng.randrange(len(combos))]
        layout = centred_scene if i % 2 else sample_scene
        image = to_tensor(render(layout(rng, colour, shape, background, SIDE, SIDE)))  # [-1, 1]
        shape_rgb = torch.tensor(COLOURS[colour], dtype=torch.float32) / 127.5 - 1.0
        background_rgb = torch.tensor(BACKGROUNDS[background], dtype=torch.float32) / 127.5 - 1.0
        cover = F.avg_pool2d(coverage(image, shape_rgb, background_rgb), PATCH).flatten()  # (64,)
        on = cover > COVERED
        kinds.append(torch.where(on, 1 + SHAPES.index(shape), 0))
        surfaces.append(torch.where(on, SURFACES.index(colour), SURFACES.index(background)))
        pixels.append(image)
        covers.append(cover)
    stacked = (pixels, kinds, surfaces, covers)
    return dict(zip(("pixels", "kind", "surface", "cover"), (torch.stack(p) for p in stacked)))


class Heads(torch.nn.Module):
    """Linear read-outs of the patch tokens (training only; the saved encoder has none)."""

    def __init__(self, width: int):
        super().__init__()
        self.kind = torch.nn.Linear(width, 1 + len(SHAPES))
        self.surface = torch.nn.Linear(width, len(SURFACES))
        self.cover = torch.nn.Linear(width, 1)


def patch_tokens(encoder, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, N, D): the encoder's normalised patch tokens, as the cache pass
    preprocesses them (``data/repa_features.py``: [0, 1], ImageNet mean and std)."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = ((pixels + 1.0) / 2.0 - mean) / std
    return encoder(pixel_values=x).last_hidden_state[:, 1:]


def losses(encoder, heads: Heads, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy of kind and surface per patch plus 4 x the coverage MSE; and the accuracies."""
    tokens = patch_tokens(encoder, batch["pixels"])  # (B, N, D)
    kind, surface = heads.kind(tokens), heads.surface(tokens)
    cover = heads.cover(tokens).squeeze(-1)
    loss = F.cross_entropy(kind.flatten(0, 1), batch["kind"].flatten())
    loss = loss + F.cross_entropy(surface.flatten(0, 1), batch["surface"].flatten())
    loss = loss + 4.0 * F.mse_loss(cover, batch["cover"])
    on = batch["kind"] > 0
    stats = {
        "kind_acc_on_shape": (kind.argmax(-1) == batch["kind"])[on].float().mean().item(),
        "surface_acc": (surface.argmax(-1) == batch["surface"]).float().mean().item(),
        "cover_mae": (cover - batch["cover"]).abs().mean().item(),
    }
    return loss, stats


def train(args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, float]]:
    """Seeded training on ``args.images`` renders; returns the encoder and its held-out accuracies."""
    rng = random.Random(args.seed)
    data, held_out = render_set(rng, args.images), render_set(rng, 512)
    encoder = build_vision_encoder(patch=PATCH, image_size=SIDE, seed=args.seed).train()
    heads = Heads(encoder.config.hidden_size)
    params = [*encoder.parameters(), *heads.parameters()]
    optim = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    order = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        for group in optim.param_groups:  # cosine to 0 after 100 warm-up steps
            group["lr"] = (
                args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
            )
        rows = torch.randint(len(data["pixels"]), (args.batch_size,), generator=order)
        loss, stats = losses(encoder, heads, {k: v[rows] for k, v in data.items()})
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if step % 200 == 0:
            print(f"step {step} loss {loss.item():.4f} {json.dumps(stats)}", flush=True)
    encoder.eval()
    with torch.no_grad():
        _, stats = losses(encoder, heads, held_out)
    return encoder, stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6000, help="training renders")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    encoder, stats = train(args)
    save_vision_encoder(encoder, args.out)
    print(f"held-out patches: {json.dumps(stats)}; {time.perf_counter() - start:.0f} s; saved {args.out}")


if __name__ == "__main__":
    main()
