"""The demo's adherence metric, measured through the exported diffusers pipelines.

For each sample, :func:`data.synthetic.shape_colour` names the palette colour
of the shape; a sample adheres when that is the colour that was asked for.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiTPipeline, PixArtAlphaPipeline
from PIL import Image

from tristage.demo import synthetic
from tristage.train.inference.grid import grid

STEPS, GUIDANCE = 20, 4.5


def held_out_prompts() -> list[tuple[str, str]]:
    """(prompt, asked colour) for the six held-out combinations."""
    return [(synthetic.core_phrase(c, s, b), c) for c, s, b in sorted(synthetic.HELD_OUT)]


def stage1_adherence(export_dir: Path, per_class: int, seed: int = 0) -> tuple[dict, list[Image.Image]]:
    pipe = DiTPipeline.from_pretrained(export_dir)
    pipe.set_progress_bar_config(disable=True)
    names = [synthetic.class_name(i) for i in range(len(synthetic.CLASSES))]
    ids = [i for name in names for i in pipe.get_label_ids([name]) * per_class]
    g = torch.Generator().manual_seed(seed)
    images = pipe(ids, guidance_scale=GUIDANCE, num_inference_steps=STEPS, generator=g).images
    asked = [synthetic.CLASSES[i][0] for i in ids]
    hits = [synthetic.shape_colour(im) == c for im, c in zip(images, asked)]
    return {"samples": len(hits), "rate": sum(hits) / len(hits)}, images


def held_out_adherence(export_dir: Path, per_prompt: int, seed: int = 0) -> tuple[dict, list[Image.Image]]:
    pipe = PixArtAlphaPipeline.from_pretrained(export_dir)
    pipe.set_progress_bar_config(disable=True)
    per_prompt_rate, all_hits, images = {}, [], []
    for prompt, colour in held_out_prompts():
        g = torch.Generator().manual_seed(seed)
        out = pipe(
            prompt,
            num_images_per_prompt=per_prompt,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            height=128,
            width=128,
            generator=g,
            use_resolution_binning=False,
        ).images
        hits = [synthetic.shape_colour(im) == colour for im in out]
        per_prompt_rate[prompt] = sum(hits) / len(hits)
        all_hits += hits
        images += out
    return {
        "samples": len(all_hits),
        "rate": sum(all_hits) / len(all_hits),
        "per_prompt": per_prompt_rate,
    }, images


def adherence_report(out: Path, per_prompt: int) -> dict:
    """Measure both exports and write the sample grids."""
    stage1, images1 = stage1_adherence(out / "stage1" / "export", per_class=min(per_prompt, 4))
    grid(images1, columns=min(per_prompt, 4) * 3).save(out / "stage1" / "samples.png")
    held, images3 = held_out_adherence(out / "export", per_prompt)
    grid(images3, columns=per_prompt).save(out / "samples.png")
    return {"stage1": stage1, "held_out": held}
