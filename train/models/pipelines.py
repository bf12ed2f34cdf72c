"""The diffusers pipeline of each family, built from its parts: what export saves and what
validation samples with in memory, so both run the one pipeline a user later loads.

Every builder takes ``(transformer, vae, scheduler, text_encoder=None, tokenizer=None)``: the
transformer as trained (ours), the frozen VAE and a DPM-Solver++ from the training noise schedule
(:func:`scheduler_for`).  A class-conditional family has no text parts; a text family without them
(validation: the cache pass stored the prompts' T5 features) is called with ``prompt_embeds``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import DPMSolverMultistepScheduler

from tristage.train.conversion.dit_layouts import dit_to_diffusers
from tristage.train.diffusion.objective import Objective, ObjectiveConfig

if TYPE_CHECKING:  # the pipelines import transformers: loaded when one is built
    from diffusers import AutoencoderKL, DiffusionPipeline, DiTPipeline, PixArtAlphaPipeline


def scheduler_for(objective: ObjectiveConfig) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ over the noise schedule the stage trained with (``Objective.scheduler_kwargs``)."""
    return DPMSolverMultistepScheduler(**Objective(objective).scheduler_kwargs())


def dit_pipeline(
    transformer: torch.nn.Module, vae: AutoencoderKL, scheduler, text_encoder=None, tokenizer=None
) -> DiTPipeline:
    """Our DiT, in diffusers' layout (``dit_layouts.dit_to_diffusers``), in a ``DiTPipeline``
    (class-conditional: the text parts are unused)."""
    from diffusers import DiTPipeline

    diffusers_dit = dit_to_diffusers(transformer).to(transformer.device).eval()
    return DiTPipeline(transformer=diffusers_dit, vae=vae, scheduler=scheduler)


def pixart_pipeline(
    transformer: torch.nn.Module, vae: AutoencoderKL, scheduler, text_encoder=None, tokenizer=None
) -> PixArtAlphaPipeline:
    """The PixArt transformer in a ``PixArtAlphaPipeline``, with the T5 and tokenizer when given."""
    from diffusers import PixArtAlphaPipeline

    return PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def load_exported(export_dir: str | Path, pipeline_class: type | None = None) -> DiffusionPipeline:
    """An exported pipeline folder through ``from_pretrained``, as users load it.

    A ``DiTPipeline``'s ``id2label`` is stored in ``model_index.json``, where JSON makes every key a
    string; diffusers checks the loaded value against ``dict[int, str]`` and warns on each load, so the
    labels are handed over with integer keys (the pipeline's own ``int(key)`` gives the same ids)."""
    from diffusers import DiffusionPipeline

    index = json.loads((Path(export_dir) / "model_index.json").read_text())
    labels = index.get("id2label")
    extra = {"id2label": {int(k): v for k, v in labels.items()}} if labels else {}
    return (pipeline_class or DiffusionPipeline).from_pretrained(export_dir, **extra)
