"""``tristage sample EXPORT_DIR``: PNGs from an exported pipeline, plus the settings used (JSON)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    SASolverScheduler,
)

# --sampler name -> diffusers scheduler class (built from the exported scheduler's config).
SAMPLERS = {
    "dpm-solver++": DPMSolverMultistepScheduler,
    "sa-solver": SASolverScheduler,
    "ddim": DDIMScheduler,
    "iddpm": DDPMScheduler,
}


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export_dir", help="an exported PixArtAlphaPipeline or DiTPipeline folder")
    parser.add_argument(
        "--prompt", action="append", default=[], help="prompt (repeatable); DiT: a class label"
    )
    parser.add_argument("--prompt-file", help="one prompt per line")
    parser.add_argument("--negative-prompt", default="", help="negative prompt (PixArt)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default="dpm-solver++")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--aspect", type=float, default=None, help="height / width; overrides --height")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt")
    parser.add_argument("--out", default="samples")


def load_pipeline(export_dir: str, sampler: str) -> DiffusionPipeline:
    if not (Path(export_dir) / "model_index.json").is_file():
        raise FileNotFoundError(f"{export_dir}: not a pipeline folder (model_index.json missing)")
    pipe = DiffusionPipeline.from_pretrained(export_dir)
    pipe.scheduler = SAMPLERS[sampler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompts_of(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        prompts += [p.strip() for p in Path(args.prompt_file).read_text().splitlines() if p.strip()]
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompt-file")
    return prompts


def size_of(pipe: DiffusionPipeline, args: argparse.Namespace) -> tuple[int, int]:
    """(height, width): flags, else the model's native training size."""
    native = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    width = args.width or native
    height = round(width * args.aspect / 16) * 16 if args.aspect else (args.height or native)
    return height, width


def generate(pipe: DiffusionPipeline, prompt: str, args: argparse.Namespace, height: int, width: int):
    g = torch.Generator().manual_seed(args.seed)
    if hasattr(pipe, "get_label_ids"):  # DiTPipeline: the prompt is a class label
        ids = pipe.get_label_ids([prompt]) * args.num_images
        return pipe(ids, guidance_scale=args.guidance, num_inference_steps=args.steps, generator=g).images
    return pipe(
        prompt,
        negative_prompt=args.negative_prompt,
        num_images_per_prompt=args.num_images,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        height=height,
        width=width,
        generator=g,
        use_resolution_binning=False,
    ).images


def run_sample(args: argparse.Namespace) -> list[Path]:
    pipe = load_pipeline(args.export_dir, args.sampler)
    height, width = size_of(pipe, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for p, prompt in enumerate(prompts_of(args)):
        for i, image in enumerate(generate(pipe, prompt, args, height, width)):
            path = out / f"{p:03d}_{i:02d}.png"
            image.save(path)
            written.append(path)
    settings = {**vars(args), "height": height, "width": width, "files": [str(w) for w in written]}
    (out / "settings.json").write_text(json.dumps(settings, indent=1, default=str))
    return written
