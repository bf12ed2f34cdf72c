"""Weights-only initial load (``init_from``): the explicit stage handoff, separate from resume.

What ``init_from`` holds is told first (:func:`source_kind`): a folder by its config.json
``_class_name``, a single weights file by a key only its layout has (:data:`FILE_LAYOUTS`). The
(source kind, target class) pair picks the conversion in :data:`CONVERTERS`:

* any DiT (our stage-1 ``final/``, the official DiT-XL/2 ``.pt``, a DiT ``train.py`` checkpoint -- its
  EMA by default, ``init_from_weights: model`` for the raw weights --, a diffusers DiT folder or state
  dict) -> DiT: a strict load; the target's ``model.freq_shift`` must be the source's;
* any DiT -> PixArt: the paper's adaLN-single re-parameterisation (:mod:`.reparam`);
* PixArt (a ``final/``, a diffusers folder, an official ``PixArt-XL-2-*.pth``, a bare state dict) ->
  PixArt: a load that recomputes the positional embedding for the new resolution and, when the target
  is PixArt-MS, adds the micro-condition embedders with a zeroed output (outputs unchanged at init).

Every conversion returns the source's null-caption buffer when it has one (the official ``.pth``'s
``y_embedding``, or the ``null_caption_buffer.safetensors`` a stage trained with it left in ``final/``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import PixArtTransformer2DModel
from safetensors import safe_open

from tristage.train.config import Config, ConfigError
from tristage.train.conversion.dit_layouts import DIFFUSERS_DIT_KEY, OFFICIAL_DIT_KEY, load_dit_checkpoint
from tristage.train.conversion.keymap import read_weights_file
from tristage.train.conversion.pixart_layouts import load_pixart_checkpoint, official_null_caption
from tristage.train.conversion.reparam import dit_to_pixart
from tristage.train.models.dit import ClassConditionalDiT
from tristage.train.models.pixart import init_caption_projection
from tristage.train.training.null_caption import load_buffer

POS_EMBED = "pos_embed.pos_embed"  # fixed sin-cos buffer; recomputed for the target resolution
MS_PREFIXES = ("adaln_single.emb.resolution_embedder.", "adaln_single.emb.aspect_ratio_embedder.")
# What ``init_from`` can hold besides a folder of a known class: weights files, by layout.
OFFICIAL_DIT = "official DiT .pt"
DIT_STATE_DICT = "DiTTransformer2DModel state dict"
OFFICIAL_PIXART = "official PixArt-alpha .pth"
PIXART_STATE_DICT = "PixArtTransformer2DModel state dict"
HUB_CLASS = "Transformer2DModel"  # the hub's older DiT and PixArt folders both carry this class name

FILE_LAYOUTS: dict[str, str] = {
    OFFICIAL_DIT_KEY: OFFICIAL_DIT,
    DIFFUSERS_DIT_KEY: DIT_STATE_DICT,
    "y_embedder.y_proj.fc1.weight": OFFICIAL_PIXART,  # PixArt.py's caption MLP
    "caption_projection.linear_1.weight": PIXART_STATE_DICT,
}
DIT_SOURCES = (ClassConditionalDiT.__name__, "DiTTransformer2DModel", OFFICIAL_DIT, DIT_STATE_DICT)
PIXART_SOURCES = (PixArtTransformer2DModel.__name__, OFFICIAL_PIXART, PIXART_STATE_DICT)


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
CONVERTERS: dict[tuple[str, type], Converter] = {
    **{(kind, ClassConditionalDiT): _dit_to_dit for kind in DIT_SOURCES},
    **{(kind, PixArtTransformer2DModel): _dit_to_pixart for kind in DIT_SOURCES},
    **{(kind, PixArtTransformer2DModel): _pixart_to_pixart for kind in PIXART_SOURCES},
}


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
    key = (source_kind(path, cfg.init_from_weights), type(model))
    if key not in CONVERTERS:
        raise ConfigError(f"init_from {source}: no handoff from {key[0]} to {type(model).__name__}")
    try:
        null = CONVERTERS[key](source, model, cfg)
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
