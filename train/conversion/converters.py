"""The ``init_from`` conversions, one per (source layout, target family); each family's spec
(``train/families.py``) holds the ones it accepts, and ``init_from.py`` tells what a source holds and
dispatches:

* any DiT (our stage-1 ``final/``, the official DiT-XL/2 ``.pt``, a DiT ``train.py`` checkpoint -- its
  EMA by default, ``init_from_weights: model`` for the raw weights --, a diffusers DiT folder or state
  dict) -> DiT: a strict load; the target's ``model.freq_shift`` must be the source's;
* any DiT -> PixArt: the paper's adaLN-single re-parameterisation (:mod:`.reparam`);
* PixArt (a ``final/``, a diffusers folder, an official ``PixArt-XL-2-*.pth``, a bare state dict) ->
  PixArt: a load that recomputes the positional embedding for the new resolution and, when the target
  is PixArt-MS, adds the micro-condition embedders with a zeroed output (outputs unchanged at init).

A conversion returns the source's null-caption buffer when the weights file has one (the official
``.pth``'s ``y_embedding``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import PixArtTransformer2DModel

from tristage.train.config import Config, ConfigError
from tristage.train.conversion.dit_layouts import load_dit_checkpoint
from tristage.train.conversion.keymap import read_weights_file
from tristage.train.conversion.pixart_layouts import load_pixart_checkpoint, official_null_caption
from tristage.train.conversion.reparam import dit_to_pixart
from tristage.train.models.dit import ClassConditionalDiT
from tristage.train.models.pixart import init_caption_projection

POS_EMBED = "pos_embed.pos_embed"  # fixed sin-cos buffer; recomputed for the target resolution
MS_PREFIXES = ("adaln_single.emb.resolution_embedder.", "adaln_single.emb.aspect_ratio_embedder.")
# What ``init_from`` can hold besides a folder of a known class: weights files, by layout.
OFFICIAL_DIT = "official DiT .pt"
DIT_STATE_DICT = "DiTTransformer2DModel state dict"
OFFICIAL_PIXART = "official PixArt-alpha .pth"
PIXART_STATE_DICT = "PixArtTransformer2DModel state dict"
DIT_SOURCES = (ClassConditionalDiT.__name__, "DiTTransformer2DModel", OFFICIAL_DIT, DIT_STATE_DICT)
PIXART_SOURCES = (PixArtTransformer2DModel.__name__, OFFICIAL_PIXART, PIXART_STATE_DICT)


def load_matching(
    model: torch.nn.Module, state: dict[str, torch.Tensor], allow_missing: tuple[str, ...] = ()
) -> None:
    """Strict load except for the positional-embedding buffer and ``allow_missing`` prefixes."""
    state = {k: v for k, v in state.items() if k != POS_EMBED}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k != POS_EMBED and not k.startswith(allow_missing)]
    if missing or result.unexpected_keys:
        raise KeyError(
            f"init_from keys do not match: missing={missing[:10]} unexpected={result.unexpected_keys[:10]}"
        )


def _load_dit(source: Path, model: torch.nn.Module, cfg: Config) -> ClassConditionalDiT:
    """Any DiT layout, with the target's head count (the official .pt cannot tell it) and sample size."""
    return load_dit_checkpoint(
        source,
        num_attention_heads=model.config.num_attention_heads,
        sample_size=model.config.sample_size,
        weights=cfg.init_from_weights,
    )


def _dit_to_dit(source: Path, model: torch.nn.Module, cfg: Config) -> None:
    dit = _load_dit(source, model, cfg)
    if dit.config.freq_shift != model.config.freq_shift:
        raise ConfigError(
            f"init_from {source}: this DiT embeds timesteps with freq_shift {dit.config.freq_shift} "
            f"(official DiT 0, diffusers 1); set model.freq_shift: {dit.config.freq_shift} "
            f"(the run has {model.config.freq_shift})"
        )
    load_matching(model, dit.state_dict())


def _dit_to_pixart(source: Path, model: torch.nn.Module, cfg: Config) -> None:
    dit = _load_dit(source, model, cfg)
    sample_size, scale = model.config.sample_size, model.pos_embed.interpolation_scale
    pixart = dit_to_pixart(dit, cfg.model.caption_channels, sample_size, scale)
    load_matching(model, pixart.state_dict(), allow_missing=MS_PREFIXES)
    init_caption_projection(model, cfg.model.caption_embed_std)  # a new layer: the configured init
    _zero_micro_conditions(model)


def _pixart_to_pixart(source: Path, model: torch.nn.Module, cfg: Config) -> torch.Tensor | None:
    """A folder, an official ``.pth`` or a bare state dict, read at the target's grid and head count."""
    state = read_weights_file(source, cfg.init_from_weights) if source.is_file() else source
    loaded = load_pixart_checkpoint(
        state,
        sample_size=model.config.sample_size,
        interpolation_scale=model.pos_embed.interpolation_scale,
        num_attention_heads=model.config.num_attention_heads,
    )
    _load_pixart(loaded, model)
    return official_null_caption(state) if source.is_file() else None


def _load_pixart(source: PixArtTransformer2DModel, model: torch.nn.Module) -> None:
    """Strict copy; an MS target of a non-MS source gets zero-output micro-condition embedders."""
    # The module flag, not config.use_additional_conditions: None there means "MS iff sample_size 128".
    had_ms = bool(source.adaln_single.emb.use_additional_conditions)
    load_matching(model, source.state_dict(), allow_missing=() if had_ms else MS_PREFIXES)
    if not had_ms:
        _zero_micro_conditions(model)


def _zero_micro_conditions(model: PixArtTransformer2DModel) -> None:
    """New MS embedders start with a zero output layer, so adding them changes nothing at init."""
    emb = model.adaln_single.emb
    if emb.use_additional_conditions:
        for embedder in (emb.resolution_embedder, emb.aspect_ratio_embedder):
            torch.nn.init.zeros_(embedder.linear_2.weight)
            torch.nn.init.zeros_(embedder.linear_2.bias)


Converter = Callable[[Path, torch.nn.Module, Config], "torch.Tensor | None"]
# source kind -> conversion into the family's model: what each family's spec accepts as ``init_from``
DIT_CONVERTERS: dict[str, Converter] = {kind: _dit_to_dit for kind in DIT_SOURCES}
PIXART_CONVERTERS: dict[str, Converter] = {
    **{kind: _dit_to_pixart for kind in DIT_SOURCES},
    **{kind: _pixart_to_pixart for kind in PIXART_SOURCES},
}
