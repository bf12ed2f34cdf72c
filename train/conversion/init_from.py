"""Weights-only initial load (``init_from``): the explicit stage handoff, separate from resume.

What ``init_from`` holds is told first (:func:`source_kind`): a folder by its config.json
``_class_name``, a single weights file by a key only its layout has (:data:`FILE_LAYOUTS`). The run's
family spec (``train/families.py``) maps that source kind to its conversion
(:mod:`.converters`); a kind it does not list is a one-line error naming ``init_from``.

The source's null-caption buffer comes back with the weights when it has one (the official ``.pth``'s
``y_embedding``, or the ``null_caption_buffer.safetensors`` a stage trained with it left in ``final/``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from tristage.train.config import Config, ConfigError
from tristage.train.conversion.converters import (
    DIT_STATE_DICT,
    OFFICIAL_DIT,
    OFFICIAL_PIXART,
    PIXART_STATE_DICT,
)
from tristage.train.conversion.dit_layouts import DIFFUSERS_DIT_KEY, OFFICIAL_DIT_KEY, load_dit_checkpoint
from tristage.train.conversion.keymap import read_weights_file
from tristage.train.conversion.reparam import dit_to_pixart
from tristage.train.families import family_of
from tristage.train.models.null_caption import load_buffer

HUB_CLASS = "Transformer2DModel"  # the hub's older DiT and PixArt folders both carry this class name

FILE_LAYOUTS: dict[str, str] = {
    OFFICIAL_DIT_KEY: OFFICIAL_DIT,
    DIFFUSERS_DIT_KEY: DIT_STATE_DICT,
    "y_embedder.y_proj.fc1.weight": OFFICIAL_PIXART,  # PixArt.py's caption MLP
    "caption_projection.linear_1.weight": PIXART_STATE_DICT,
}


def model_folder(path: str | Path) -> Path:
    """The model folder inside a ``final/`` (``final/transformer``) or the folder itself."""
    path = Path(path)
    return path / "transformer" if (path / "transformer" / "config.json").is_file() else path


def source_class(folder: Path) -> str:
    config = folder / "config.json"
    if not config.is_file():
        raise ConfigError(f"init_from {folder}: holds no model (no config.json in it or in transformer/)")
    name = json.loads(config.read_text())["_class_name"]
    return _hub_class(folder) if name == HUB_CLASS else name


def _hub_class(folder: Path) -> str:
    """A ``Transformer2DModel`` folder is a DiT when its weights have diffusers' DiT keys."""
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():  # sharded: the index names every key
        keys = set(json.loads(index.read_text())["weight_map"])
    else:
        with safe_open(folder / "diffusion_pytorch_model.safetensors", "pt") as weights:
            keys = set(weights.keys())
    return "DiTTransformer2DModel" if DIFFUSERS_DIT_KEY in keys else "PixArtTransformer2DModel"


def source_kind(path: Path, weights: str = "ema") -> str:
    """What ``init_from`` holds: a folder's ``_class_name``, or a weights file's layout (FILE_LAYOUTS)."""
    if not path.is_file():
        return source_class(model_folder(path))
    keys = read_weights_file(path, weights).keys()  # memory-mapped: no copy of the weights
    kinds = [kind for key, kind in FILE_LAYOUTS.items() if key in keys]
    if len(kinds) != 1:
        raise ConfigError(
            f"init_from {path}: not a known weights-file layout (known: {', '.join(FILE_LAYOUTS.values())})"
        )
    return kinds[0]


def load_initial_weights(model: torch.nn.Module, cfg: Config) -> torch.Tensor | None:
    """Fill ``model`` from ``cfg.init_from``, converting the architecture where the stage changes it.

    Returns the source's null-caption buffer, if it has one. A source that cannot be converted is a
    one-line :class:`ConfigError` naming ``init_from``."""
    path = Path(cfg.init_from)
    source = path if path.is_file() else model_folder(path)
    kind, converters = source_kind(path, cfg.init_from_weights), family_of(cfg.model.family).converters
    if kind not in converters:
        raise ConfigError(f"init_from {source}: no handoff from {kind} to {type(model).__name__}")
    try:
        null = converters[kind](source, model, cfg)
    except (ValueError, KeyError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(
            f"init_from {source}: {str(err.args[0] if err.args else err).splitlines()[0]}"
        ) from None
    if null is None and path.is_dir():  # a final/ (or its transformer/) of a stage that trained with one
        null = load_buffer(path if (path / "transformer").is_dir() else path.parent)
    return null


def convert_dit_to_pixart(
    src: str,
    out: str,
    caption_channels: int,
    interpolation_scale: float | None,
    num_attention_heads: int = 16,
    weights: str = "ema",
) -> None:
    """``tristage convert dit-to-pixart``: any DiT ``load_dit_checkpoint`` reads -> a PixArt folder.

    ``src`` is a stage-1 ``final/`` (or its ``transformer/``), the official ``.pt``, a DiT ``train.py``
    checkpoint (``weights``: its "ema" or "model") or a diffusers DiT folder; ``num_attention_heads``
    matters only for the official files (their weights cannot tell it)."""
    try:
        dit = load_dit_checkpoint(src, num_attention_heads=num_attention_heads, weights=weights)
    except ValueError as err:
        raise ConfigError(f"{src}: {str(err).splitlines()[0]}") from None
    dit_to_pixart(dit, caption_channels, interpolation_scale=interpolation_scale).save_pretrained(out)
