"""One spec per model family (``model.family``): how the trainer builds, feeds and initialises it, and
the pipeline that export and validation share.  Everything that differs between the families is
here; the rest of the code asks the spec and never branches on the family's name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from diffusers import PixArtTransformer2DModel

from tristage.data.config import EncoderConfig
from tristage.data.repa_features import RepaFeatures
from tristage.train.config import Config
from tristage.train.conversion.converters import DIT_CONVERTERS, PIXART_CONVERTERS, Converter
from tristage.train.models.dit import ClassConditionalDiT, build_dit
from tristage.train.models.pipelines import dit_pipeline, pixart_pipeline
from tristage.train.models.pixart import build_pixart
from tristage.train.models.sizes import size_of


def dit_inputs(batch: dict) -> dict:
    """Model keyword arguments of a stage-1 batch."""
    return {"class_labels": batch["labels"]}


def pixart_inputs(batch: dict) -> dict:
    """Model keyword arguments of a text batch (micro-conditions are ignored unless the model is MS)."""
    return {
        "encoder_hidden_states": batch["text"].float(),  # the loader keeps the cached width (bf16)
        "encoder_attention_mask": batch["text_mask"],
        "added_cond_kwargs": {"resolution": batch["resolution"], "aspect_ratio": batch["aspect_ratio"]},
    }


@dataclass(frozen=True)
class Family:
    """How the trainer builds, feeds and initialises one model family, and its diffusers pipeline."""

    model_class: type  # diffusers-style class with from_pretrained / save_pretrained
    build: Callable  # (ModelConfig, out_channels) -> model
    inputs: Callable[[dict], dict]  # batch -> model keyword arguments (its conditioning)
    needs_text: bool  # conditioned on T5 caption features (else on class labels: no T5 anywhere)
    converters: Mapping[str, Converter]  # init_from source kind -> conversion into this family
    pipeline: Callable  # (transformer, vae, scheduler, text_encoder, tokenizer) -> diffusers pipeline
    token_head: str  # the model's final per-token linear (token masking scatters its output to the grid)


def _build_dit(cfg, out_channels: int) -> ClassConditionalDiT:
    return build_dit(
        size_of(cfg.size),
        cfg.sample_size,
        cfg.in_channels,
        out_channels,
        cfg.num_classes,
        cfg.class_embed_std,
        cfg.freq_shift,
    )


def _build_pixart(cfg, out_channels: int) -> PixArtTransformer2DModel:
    return build_pixart(
        size_of(cfg.size),
        cfg.sample_size,
        cfg.in_channels,
        out_channels,
        cfg.caption_channels,
        cfg.interpolation_scale,
        cfg.use_additional_conditions,
        cfg.caption_embed_std,
    )


# model.family (its choices: train/config.py MODEL_FAMILIES) -> the spec
FAMILIES: dict[str, Family] = {
    # name: Family(model class, build, inputs, needs_text, converters (init_from), pipeline, token head)
    "dit": Family(
        ClassConditionalDiT, _build_dit, dit_inputs, False, DIT_CONVERTERS, dit_pipeline, "proj_out_2"
    ),
    "pixart": Family(
        PixArtTransformer2DModel,
        _build_pixart,
        pixart_inputs,
        True,
        PIXART_CONVERTERS,
        pixart_pipeline,
        "proj_out",
    ),
}


def family_of(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"model.family: unknown family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def feature_encoders(cfg: Config) -> EncoderConfig:
    """The encoders whose features the run's family trains on: a family without text caches no T5
    (``data/`` reads ``text_encoder: None`` as "class-conditional"), whatever ``encoders:`` names."""
    if family_of(cfg.model.family).needs_text:
        return cfg.encoders
    return replace(cfg.encoders, text_encoder=None)


def repa_features(cfg: Config) -> RepaFeatures | None:
    """The REPA encoder features the run trains on (``objective.repa``), or None."""
    repa = cfg.objective.repa
    return None if repa is None else RepaFeatures(repa.encoder, repa.encoder_resolution, repa.feature_dtype)
