"""Weights-only initial load (``init_from``): the explicit stage handoff, separate from resume.

The source is a previous stage's ``final/`` (or a model folder).  What happens
depends on (source class, target class), looked up in :data:`CONVERTERS`:

* DiT -> DiT: a plain load (continue stage 1 elsewhere);
* DiT -> PixArt: the paper's adaLN-single re-parameterisation (:func:`train.handoff.dit_to_pixart`);
* PixArt -> PixArt: a load that recomputes the positional embedding for the new
  resolution and, when the target is PixArt-MS, adds the micro-condition
  embedders with a zeroed output so the outputs are unchanged at initialisation.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import PixArtTransformer2DModel

from train.config import Config
from train.models import ClassConditionalDiT

POS_EMBED = "pos_embed.pos_embed"  # fixed sin-cos buffer; recomputed for the target resolution
MS_PREFIXES = ("adaln_single.emb.resolution_embedder.", "adaln_single.emb.aspect_ratio_embedder.")


def model_folder(path: str | Path) -> Path:
    """The model folder inside a ``final/`` (``final/transformer``) or the folder itself."""
    path = Path(path)
    return path / "transformer" if (path / "transformer" / "config.json").is_file() else path


def source_class(folder: Path) -> str:
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: init_from is not a model folder (no config.json)")
    return json.loads(config.read_text())["_class_name"]


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


def _dit_to_dit(folder: Path, model: torch.nn.Module, cfg: Config) -> None:
    load_matching(model, ClassConditionalDiT.from_pretrained(folder).state_dict())


def _dit_to_pixart(folder: Path, model: torch.nn.Module, cfg: Config) -> None:
    from train.handoff import dit_to_pixart

    dit = ClassConditionalDiT.from_pretrained(folder)
    pixart = dit_to_pixart(
        dit, cfg.model.caption_channels, cfg.model.sample_size, cfg.model.interpolation_scale
    )
    load_matching(model, pixart.state_dict(), allow_missing=MS_PREFIXES)
    _zero_micro_conditions(model)


def _pixart_to_pixart(folder: Path, model: torch.nn.Module, cfg: Config) -> None:
    source = PixArtTransformer2DModel.from_pretrained(folder)
    had_ms = bool(source.config.use_additional_conditions)
    load_matching(model, source.state_dict(), allow_missing=() if had_ms else MS_PREFIXES)
    if not had_ms:
        _zero_micro_conditions(model)


def _zero_micro_conditions(model: torch.nn.Module) -> None:
    """New MS embedders start with a zero output layer, so adding them changes nothing at init."""
    emb = getattr(model, "adaln_single", None)
    for name in ("resolution_embedder", "aspect_ratio_embedder"):
        embedder = getattr(emb.emb, name, None) if emb is not None else None
        if embedder is not None:
            torch.nn.init.zeros_(embedder.linear_2.weight)
            torch.nn.init.zeros_(embedder.linear_2.bias)


CONVERTERS: dict[tuple[str, type], Callable[[Path, torch.nn.Module, Config], None]] = {
    ("ClassConditionalDiT", ClassConditionalDiT): _dit_to_dit,
    ("ClassConditionalDiT", PixArtTransformer2DModel): _dit_to_pixart,
    ("PixArtTransformer2DModel", PixArtTransformer2DModel): _pixart_to_pixart,
}


def load_initial_weights(model: torch.nn.Module, cfg: Config) -> None:
    """Fill ``model`` from ``cfg.init_from``, converting the architecture where the stage changes it."""
    folder = model_folder(cfg.init_from)
    key = (source_class(folder), type(model))
    if key not in CONVERTERS:
        raise ValueError(f"init_from {folder}: no handoff from {key[0]} to {type(model).__name__}")
    CONVERTERS[key](folder, model, cfg)
