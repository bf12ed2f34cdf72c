"""Weights-only initial load (``init_from``): the explicit stage handoff, separate from resume.

The source is a previous stage's ``final/`` (or a model folder).  What happens
depends on (source class, target class), looked up in :data:`CONVERTERS`:

* DiT -> DiT: a plain load (continue stage 1 elsewhere);
* DiT -> PixArt: the paper's adaLN-single re-parameterisation (``handoff.dit_to_pixart``);
* PixArt -> PixArt: a load that recomputes the positional embedding for the new
  resolution and, when the target is PixArt-MS, adds the micro-condition
  embedders with a zeroed output so the outputs are unchanged at initialisation.

``init_from`` may also be a single weights file -- the released PixArt-alpha
``PixArt-XL-2-{256,512,1024-MS}.pth`` or a bare ``PixArtTransformer2DModel`` state
dict (``.safetensors``).  A file has no config.json; its layout, told by a key only
that layout has (:data:`FILE_LAYOUTS`), stands in for the class name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import PixArtTransformer2DModel

from tristage.train.config import Config
from tristage.train.models.dit import ClassConditionalDiT
from tristage.train.models.pixart import init_caption_projection

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
    from tristage.train.conversion.handoff import dit_to_pixart

    dit = ClassConditionalDiT.from_pretrained(folder)
    pixart = dit_to_pixart(
        dit, cfg.model.caption_channels, cfg.model.sample_size, cfg.model.interpolation_scale
    )
    load_matching(model, pixart.state_dict(), allow_missing=MS_PREFIXES)
    init_caption_projection(model, cfg.model.caption_embed_std)  # a new layer: the configured init
    _zero_micro_conditions(model)


def _pixart_to_pixart(folder: Path, model: torch.nn.Module, cfg: Config) -> None:
    _load_pixart(PixArtTransformer2DModel.from_pretrained(folder), model)


def _pixart_file_to_pixart(path: Path, model: torch.nn.Module, cfg: Config) -> None:
    """An official ``.pth`` (or a bare diffusers state dict), read at the target's grid and head count."""
    from tristage.train.conversion.handoff import load_pixart_checkpoint

    source = load_pixart_checkpoint(
        path,
        sample_size=model.config.sample_size,
        interpolation_scale=model.pos_embed.interpolation_scale,
        num_attention_heads=model.config.num_attention_heads,
    )
    _load_pixart(source, model)


def _load_pixart(source: PixArtTransformer2DModel, model: torch.nn.Module) -> None:
    """Strict copy; an MS target of a non-MS source gets zero-output micro-condition embedders."""
    # The module flag, not config.use_additional_conditions: None there means "MS iff sample_size 128".
    had_ms = bool(source.adaln_single.emb.use_additional_conditions)
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


OFFICIAL_PIXART = "official PixArt-alpha .pth"
PIXART_STATE_DICT = "PixArtTransformer2DModel state dict"

# A weights file's layout by a key only it has (the official names: PixArt.py's caption MLP ``y_proj``).
FILE_LAYOUTS: dict[str, str] = {
    "y_embedder.y_proj.fc1.weight": OFFICIAL_PIXART,
    "caption_projection.linear_1.weight": PIXART_STATE_DICT,
}

CONVERTERS: dict[tuple[str, type], Callable[[Path, torch.nn.Module, Config], None]] = {
    ("ClassConditionalDiT", ClassConditionalDiT): _dit_to_dit,
    ("ClassConditionalDiT", PixArtTransformer2DModel): _dit_to_pixart,
    ("PixArtTransformer2DModel", PixArtTransformer2DModel): _pixart_to_pixart,
    (OFFICIAL_PIXART, PixArtTransformer2DModel): _pixart_file_to_pixart,
    (PIXART_STATE_DICT, PixArtTransformer2DModel): _pixart_file_to_pixart,
}


def source_kind(path: Path) -> str:
    """What ``init_from`` holds: a folder's ``_class_name``, or a weights file's layout (FILE_LAYOUTS)."""
    if not path.is_file():
        return source_class(model_folder(path))
    from tristage.train.conversion.handoff import read_weights_file

    keys = read_weights_file(path).keys()  # memory-mapped: no copy of the weights
    kinds = [kind for key, kind in FILE_LAYOUTS.items() if key in keys]
    if len(kinds) != 1:
        raise ValueError(
            f"init_from {path}: not a known weights-file layout (known: {', '.join(FILE_LAYOUTS.values())})"
        )
    return kinds[0]


def load_initial_weights(model: torch.nn.Module, cfg: Config) -> None:
    """Fill ``model`` from ``cfg.init_from``, converting the architecture where the stage changes it."""
    path = Path(cfg.init_from)
    source = path if path.is_file() else model_folder(path)
    key = (source_kind(path), type(model))
    if key not in CONVERTERS:
        raise ValueError(f"init_from {source}: no handoff from {key[0]} to {type(model).__name__}")
    CONVERTERS[key](source, model, cfg)
