"""``tristage sample EXPORT_DIR``: PNGs from an exported pipeline, plus the settings used (JSON)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from tristage.errors import SampleError

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

# --sampler name -> diffusers scheduler class (built from the exported scheduler's config).  Names, not
# classes: this module is imported to build `tristage --help`, which must not load diffusers.
SAMPLERS = {
    "dpm-solver++": "DPMSolverMultistepScheduler",
    "sa-solver": "SASolverScheduler",
    "ddim": "DDIMScheduler",
    "iddpm": "DDPMScheduler",
}
TRAINING_SIZE = "training.json"  # written into an export by train/inference/export.py: the trained size


# The export's DPM-Solver++ config carries algorithm_type="dpmsolver++", which SA-Solver rejects; it takes
# "data_prediction" (x0 form, as PixArt-Sigma's SA-Solver sampling).  DDIM and DDPM clip their x0
# estimate to [-1, 1] unless told not to: right for pixels, wrong for VAE latents (the official DiT /
# PixArt samplers run with clip_denoised=False); measured on the demo's stage-1 export, 72 samples,
# DDIM 50 steps: single shape 18 % clipped, 79 % not (DPM-Solver++ 76 %).
SAMPLER_OPTIONS: dict[str, dict] = {
    "sa-solver": {"algorithm_type": "data_prediction"},
    "ddim": {"clip_sample": False},
    "iddpm": {"clip_sample": False},
}


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export_dir", help="an exported PixArtAlphaPipeline or DiTPipeline folder")
    parser.add_argument(
        "--prompt", action="append", default=[], help="prompt (repeatable); DiT: a class label"
    )
    parser.add_argument("--prompt-file", help="one prompt per line")
    parser.add_argument(
        "--unconditional",
        action="store_true",
        help="also sample with no prompt (PixArt: the empty caption); a blank --prompt is refused without it",
    )
    parser.add_argument("--negative-prompt", default="", help="negative prompt (PixArt)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (the same seed, the same images)")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps")
    parser.add_argument("--guidance", type=float, default=4.5, help="classifier-free guidance scale")
    parser.add_argument(
        "--sampler",
        choices=sorted(SAMPLERS),
        default="dpm-solver++",
        help="diffusers scheduler to sample with",
    )
    parser.add_argument("--width", type=int, default=None, help="pixels (default: the trained size)")
    parser.add_argument("--height", type=int, default=None, help="pixels (default: the trained size)")
    parser.add_argument("--aspect", type=float, default=None, help="height / width; overrides --height")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt")
    parser.add_argument("--out", default="samples", help="folder for the PNGs and settings.json")


def load_pipeline(export_dir: str, sampler: str = "dpm-solver++") -> DiffusionPipeline:
    if not (Path(export_dir) / "model_index.json").is_file():
        raise SampleError(f"{export_dir}: not a pipeline folder (model_index.json missing)")
    from tristage.train.models.pipelines import load_exported

    quiet_loading()
    pipe = load_exported(export_dir)
    set_sampler(pipe, sampler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def quiet_loading() -> None:
    """No loading progress bars: a command's output stays its own lines.  Warnings stay on: the calls
    that caused them are fixed where they are made (``load_exported``, ``clean_caption=False``)."""
    import transformers
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def set_sampler(pipe: DiffusionPipeline, sampler: str) -> None:
    """Swap the scheduler, keeping the exported noise schedule (betas, prediction type)."""
    if sampler not in SAMPLERS:
        raise SampleError(f"unknown sampler {sampler!r}; choose one of {', '.join(sorted(SAMPLERS))}")
    import diffusers

    scheduler = getattr(diffusers, SAMPLERS[sampler])
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config, **SAMPLER_OPTIONS.get(sampler, {}))


def is_class_conditional(pipe: DiffusionPipeline) -> bool:
    return hasattr(pipe, "get_label_ids")  # DiTPipeline: the prompt is a class label


def check_numbers(steps: int, num_images: int, guidance: float) -> None:
    if steps < 1:
        raise SampleError(f"steps must be >= 1, got {steps}")
    if num_images < 1:
        raise SampleError(f"num-images must be >= 1, got {num_images}")
    if guidance < 0:
        raise SampleError(f"guidance must be >= 0, got {guidance}")


def prompts_of(args: argparse.Namespace) -> list[str]:
    """The prompts to sample, in order; ``--unconditional`` adds the empty one.  A blank ``--prompt`` is
    refused unless ``--unconditional`` is given (then it is that empty prompt): alone it would silently
    sample the unconditional model.  Blank prompt-file lines are skipped."""
    for n, prompt in enumerate(args.prompt, 1):
        if not prompt.strip() and not args.unconditional:
            raise SampleError(
                f"--prompt number {n} is empty; give text, or --unconditional to sample without a prompt"
            )
    prompts = [p for p in args.prompt if p.strip()]
    if args.prompt_file:
        prompts += [p.strip() for p in Path(args.prompt_file).read_text().splitlines() if p.strip()]
    if args.unconditional:
        prompts.append("")
    if not prompts:
        raise SampleError("give at least one --prompt, a --prompt-file or --unconditional")
    return prompts


def size_of(pipe: DiffusionPipeline, args: argparse.Namespace) -> tuple[int, int]:
    """(height, width): flags, else the size the model was trained at."""
    native = trained_size(pipe)
    width = args.width or native
    height = round(width * args.aspect / 16) * 16 if args.aspect else (args.height or native)
    return height, width


def trained_size(pipe: DiffusionPipeline) -> int:
    """The export's record of the training resolution; for a foreign pipeline, the transformer's
    ``sample_size`` in pixels.  A tristage export needs the record: PixArt's ``sample_size`` also sets the
    position-embedding base, so it may differ from the trained size (the demo: 32 latents, 96 px)."""
    record = Path(pipe.name_or_path or "") / TRAINING_SIZE
    if record.is_file():
        return int(json.loads(record.read_text())["resolution"])
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)  # DiTPipeline has no vae_scale_factor
    return pipe.transformer.config.sample_size * scale


def generate(pipe: DiffusionPipeline, prompt: str, args: argparse.Namespace, height: int, width: int):
    import torch

    g = torch.Generator().manual_seed(args.seed)
    if is_class_conditional(pipe):
        if not prompt:
            raise SampleError(
                "--unconditional needs a text pipeline (PixArt); a DiT export samples class labels"
            )
        try:
            ids = pipe.get_label_ids([prompt]) * args.num_images
        except ValueError:
            known = ", ".join(sorted(pipe.labels)[:20])
            raise SampleError(f"unknown class label {prompt!r}; known labels include: {known}") from None
        return pipe(ids, guidance_scale=args.guidance, num_inference_steps=args.steps, generator=g).images
    texts = buffer_null(pipe, Path(args.export_dir), prompt) if not args.negative_prompt else {}
    return pipe(
        **(texts or {"prompt": prompt, "negative_prompt": args.negative_prompt}),
        num_images_per_prompt=args.num_images,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        height=height,
        width=width,
        generator=g,
        use_resolution_binning=False,
        clean_caption=False,  # the prompt is used as typed (True needs beautifulsoup4 and ftfy)
    ).images


def buffer_null(pipe: DiffusionPipeline, export_dir: Path, prompt: str) -> dict:
    """An export trained with ``data.null_caption: buffer`` keeps its null beside ``model_index.json``:
    the prompt's T5 features, and as the negative the buffer under the prompt's own mask (how the model
    was trained and how PixArt-alpha samples). ``{}`` when there is none (the pipeline's T5("") is right)."""
    from tristage.train.models.null_caption import load_buffer

    buffer = load_buffer(export_dir)
    if buffer is None:
        return {}
    embeds, mask, _, _ = pipe.encode_prompt(
        prompt, do_classifier_free_guidance=False, max_sequence_length=buffer.shape[0]
    )  # (1, L, C), (1, L): padded to the training token budget, the buffer's length
    if not prompt:  # --unconditional: the trained null itself is the condition
        embeds = buffer[None].to(embeds.dtype)
    return {
        "prompt_embeds": embeds,
        "prompt_attention_mask": mask,
        "negative_prompt": None,  # the pipeline's default "" would clash with the embeddings
        "negative_prompt_embeds": buffer[None].to(embeds.dtype),
        "negative_prompt_attention_mask": mask,
    }


def run_sample(args: argparse.Namespace) -> list[Path]:
    check_numbers(args.steps, args.num_images, args.guidance)
    prompts = prompts_of(args)
    pipe = load_pipeline(args.export_dir, args.sampler)
    height, width = size_of(pipe, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for p, prompt in enumerate(prompts):
        for i, image in enumerate(generate(pipe, prompt, args, height, width)):
            path = out / f"{p:03d}_{i:02d}.png"
            image.save(path)
            written.append(path)
    settings = {**vars(args), "height": height, "width": width, "files": [str(w) for w in written]}
    (out / "settings.json").write_text(json.dumps(settings, indent=1, default=str))
    return written
