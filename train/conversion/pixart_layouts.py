"""PixArt-alpha weights: the official release <-> diffusers' ``PixArtTransformer2DModel``.

``load_pixart_checkpoint`` reads the released weights (``PixArt-XL-2-{256,512,1024-MS}.pth``,
https://github.com/PixArt-alpha/PixArt-alpha, ``diffusion/model/nets/PixArt.py`` / ``PixArtMS.py``) or a
diffusers folder / state dict -- a stage-3 starting point; ``pixart_to_official_state_dict`` writes the
official layout back. Each release keeps its own position table: the official ``lewei_scale`` (1.0 at
256 and 512 px, 2.0 at 1024) is diffusers' default ``max(sample_size // 64, 1)``, and the checkpoint's
``pos_embed`` is compared with the table it gets.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from diffusers import PixArtTransformer2DModel

from tristage.train.conversion import keymap as km

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# PixArt-alpha checkpoints: the official release <-> diffusers' PixArtTransformer2DModel
# ---------------------------------------------------------------------------------------------

# Official tensors diffusers has no place for.  ``y_embedding`` is the official null caption, a random,
# untrained (120, 4096) buffer (PixArt_blocks.py ``CaptionEmbedder``); diffusers uses T5("") instead.
# The model loader leaves it out; ``official_null_caption`` returns it (``data.null_caption: buffer``
# trains and samples with it). ``pos_embed`` is the fixed sin-cos table: its grid gives sample_size, and
# it is compared with the table the loaded model computes.
OFFICIAL_PIXART_NULL_CAPTION = "y_embedder.y_embedding"
OFFICIAL_PIXART_POS_EMBED = "pos_embed"
_OFFICIAL_PIXART_MS_KEY = "csize_embedder.mlp.0.weight"  # only PixArtMS has the size embedder
_DIFFUSERS_PIXART_MS_KEY = "adaln_single.emb.resolution_embedder.linear_1.weight"
_PIXART_SHAPE_KEYS = ("pos_embed.proj.weight", "proj_out.weight", "caption_projection.linear_1.weight")


def _pixart_official_pairs(depth: int, ms: bool) -> list[tuple[str, str]]:
    """diffusers names vs the official ones for tensors that map one-to-one (fused projections apart)."""
    top = [
        ("pos_embed.proj", "x_embedder.proj"),
        ("adaln_single.emb.timestep_embedder.linear_1", "t_embedder.mlp.0"),
        ("adaln_single.emb.timestep_embedder.linear_2", "t_embedder.mlp.2"),
        ("adaln_single.linear", "t_block.1"),
        ("caption_projection.linear_1", "y_embedder.y_proj.fc1"),
        ("caption_projection.linear_2", "y_embedder.y_proj.fc2"),
        ("proj_out", "final_layer.linear"),
    ]
    # PixArtMS.py: csize_embedder / ar_embedder are SizeEmbedders, an MLP like the timestep embedder's.
    micro = (("resolution_embedder", "csize_embedder"), ("aspect_ratio_embedder", "ar_embedder"))
    for ours, theirs in micro if ms else ():
        top += [(f"adaln_single.emb.{ours}.linear_{n + 1}", f"{theirs}.mlp.{2 * n}") for n in range(2)]
    block = [
        ("attn1.to_out.0", "attn.proj"),
        ("attn2.to_q", "cross_attn.q_linear"),
        ("attn2.to_out.0", "cross_attn.proj"),
        ("ff.net.0.proj", "mlp.fc1"),
        ("ff.net.2", "mlp.fc2"),
    ]
    blocks = [(f"transformer_blocks.{i}.{a}", f"blocks.{i}.{b}") for i in range(depth) for a, b in block]
    tables = [("scale_shift_table", "final_layer.scale_shift_table")] + [
        (f"transformer_blocks.{i}.scale_shift_table", f"blocks.{i}.scale_shift_table") for i in range(depth)
    ]
    return km.with_wb(top + blocks) + tables


def _pixart_official_fused(depth: int) -> list[tuple[list[str], str]]:
    """diffusers' separate projections vs the official fused ones, rows stacked in this order:
    self-attention ``attn.qkv`` = q; k; v (timm ``Attention``), cross-attention ``cross_attn.kv_linear``
    = k; v (PixArt_blocks.py ``MultiHeadCrossAttention`` views it as (..., 2, heads, head_dim))."""
    fused = []
    for i in range(depth):
        ours = f"transformer_blocks.{i}"
        for p in km.WB:
            fused.append(([f"{ours}.attn1.to_{n}.{p}" for n in "qkv"], f"blocks.{i}.attn.qkv.{p}"))
            fused.append(([f"{ours}.attn2.to_{n}.{p}" for n in "kv"], f"blocks.{i}.cross_attn.kv_linear.{p}"))
    return fused


def pixart_state_dict_from_official(
    state: Mapping[str, torch.Tensor], use_additional_conditions: bool | None = None
) -> tuple[km.StateDict, km.StateDict]:
    """Official PixArt-alpha keys -> diffusers keys; returns ``(converted, dropped)``.

    ``dropped`` holds the official-only tensors that were present: the null-caption buffer and the fixed
    ``pos_embed``. Depth comes from the block indices; the MS embedders are expected when
    ``use_additional_conditions`` says so, or (None) when the checkpoint has them.
    Missing or unexpected keys raise ``ValueError`` naming them.
    """
    state = km.unwrap_state_dict(state)
    depth = km.num_blocks(state, "blocks.")
    ms = _OFFICIAL_PIXART_MS_KEY in state if use_additional_conditions is None else use_additional_conditions
    pairs, fused = _pixart_official_pairs(depth, ms), _pixart_official_fused(depth)
    optional = {OFFICIAL_PIXART_NULL_CAPTION, OFFICIAL_PIXART_POS_EMBED} & set(state)
    km.check_keys(state, {b for _, b in pairs} | {b for _, b in fused} | optional, "official PixArt-alpha")
    src = km.Tracked(state)
    out = {a: src[b] for a, b in pairs}
    for names, key in fused:
        out.update(zip(names, src[key].chunk(len(names), dim=0), strict=True))  # (n*D, ...) -> n x (D, ...)
    dropped = {key: src[key] for key in sorted(optional)}
    src.assert_all_read("official PixArt-alpha")
    return out, dropped


def pixart_to_official_state_dict(
    model: PixArtTransformer2DModel, null_caption: torch.Tensor | None = None
) -> km.StateDict:
    """The model in the official PixArt-alpha layout (fused qkv and kv, fixed ``pos_embed`` included).

    diffusers has no null-caption buffer: pass ``null_caption`` (``(tokens, caption_channels)``) to write one
    as ``y_embedder.y_embedding``, which the official code needs for caption dropout and CFG.
    """
    depth, ms = model.config.num_layers, model.adaln_single.emb.use_additional_conditions
    src = km.Tracked(km.detached(model))
    out = {b: src[a].clone() for a, b in _pixart_official_pairs(depth, ms)}
    for names, fused in _pixart_official_fused(depth):
        out[fused] = torch.cat([src[n] for n in names], dim=0)  # (n*D, D) or (n*D,)
    out[OFFICIAL_PIXART_POS_EMBED] = model.pos_embed.pos_embed.detach().cpu().float().clone()  # (1, N, D)
    if null_caption is not None:
        out[OFFICIAL_PIXART_NULL_CAPTION] = null_caption.detach().cpu().clone()
    src.assert_all_read("PixArt -> official")
    return out


def default_interpolation_scale(sample_size: int) -> float:
    """The official ``lewei_scale`` per release (256 and 512 px: 1.0, 1024 px: 2.0) = diffusers' default
    ``max(sample_size // 64, 1)`` (``PixArtTransformer2DModel`` with ``interpolation_scale=None``)."""
    return float(max(sample_size // 64, 1))


def official_null_caption(state: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The official null-caption buffer ``y_embedder.y_embedding`` (tokens, caption_channels), if any."""
    null = km.unwrap_state_dict(state).get(OFFICIAL_PIXART_NULL_CAPTION)
    return None if null is None else null.detach().float().clone()


def _official_layout(state, sample_size: int | None, use_additional_conditions: bool | None):
    """Official keys -> (diffusers state, sample size, the checkpoint's position table or None); the
    size defaults to the grid of ``pos_embed``."""
    converted, dropped = pixart_state_dict_from_official(state, use_additional_conditions)
    if OFFICIAL_PIXART_NULL_CAPTION in dropped:
        log.warning(
            "official PixArt-alpha checkpoint: its null caption %s %s is not part of the diffusers model; "
            'data.null_caption: buffer trains with it, t5_empty (diffusers) with T5("")',
            OFFICIAL_PIXART_NULL_CAPTION,
            tuple(dropped[OFFICIAL_PIXART_NULL_CAPTION].shape),
        )
    pos_embed = dropped.get(OFFICIAL_PIXART_POS_EMBED)
    if sample_size is None and pos_embed is not None:
        tokens, patch = pos_embed.shape[1], converted["pos_embed.proj.weight"].shape[-1]
        grid = math.isqrt(tokens)
        if grid * grid != tokens:
            raise ValueError(f"official pos_embed has {tokens} tokens: not a square grid; pass sample_size")
        sample_size = grid * patch
    return converted, sample_size, pos_embed


def _diffusers_layout(state, sample_size: int | None, use_additional_conditions: bool | None):
    return dict(state), sample_size, None


# A layout is recognised by one key only it has; each returns (diffusers-named state, sample size, table).
_PIXART_LAYOUTS: dict[str, Callable[..., tuple[km.StateDict, int | None, torch.Tensor | None]]] = {
    "x_embedder.proj.weight": _official_layout,
    "pos_embed.proj.weight": _diffusers_layout,
}


def _pixart_config_from_shapes(
    state: Mapping[str, torch.Tensor],
    heads: int,
    sample_size: int,
    interpolation_scale: float | None,
    ms: bool,
) -> dict:
    """``PixArtTransformer2DModel`` arguments read off the tensor shapes (diffusers names)."""
    missing = [key for key in _PIXART_SHAPE_KEYS if key not in state]
    if missing:
        raise ValueError(f"PixArt state dict does not match: missing keys: {km.listing(missing)}")
    dim, in_channels, patch, _ = state["pos_embed.proj.weight"].shape  # conv (D, C, p, p)
    if interpolation_scale is None:
        interpolation_scale = default_interpolation_scale(sample_size)
    return dict(
        num_attention_heads=heads,
        attention_head_dim=km.head_dim(dim, heads),
        in_channels=in_channels,
        out_channels=state["proj_out.weight"].shape[0] // patch**2,  # learned sigma: 2 * in_channels
        num_layers=km.num_blocks(state, "transformer_blocks."),
        cross_attention_dim=dim,
        caption_channels=state["caption_projection.linear_1.weight"].shape[1],
        sample_size=sample_size,
        patch_size=patch,
        interpolation_scale=interpolation_scale,
        use_additional_conditions=ms,
    )


def _pixart_filled(model: PixArtTransformer2DModel, state: Mapping[str, torch.Tensor], what: str):
    km.check_keys(state, set(model.state_dict()), f"{what} -> PixArtTransformer2DModel")
    model.load_state_dict(state, strict=True)
    return model.eval()


def _pixart_from_state_dict(
    state: Mapping[str, torch.Tensor],
    sample_size: int | None,
    interpolation_scale: float | None,
    use_additional_conditions: bool | None,
    heads: int,
) -> PixArtTransformer2DModel:
    state = km.unwrap_state_dict(state)
    layouts = [fn for key, fn in _PIXART_LAYOUTS.items() if key in state]
    if len(layouts) != 1:
        raise ValueError(
            "cannot tell the PixArt checkpoint layout: expected official PixArt-alpha keys "
            "(x_embedder.*, blocks.N.*) or diffusers PixArtTransformer2DModel keys "
            "(pos_embed.proj.*, transformer_blocks.N.*); "
            f"got: {km.listing(sorted(state), 8)}"
        )
    state, sample_size, table = layouts[0](state, sample_size, use_additional_conditions)
    if sample_size is None:
        raise ValueError("this PixArt state dict has no pos_embed to read the grid from: pass sample_size")
    ms = _DIFFUSERS_PIXART_MS_KEY in state if use_additional_conditions is None else use_additional_conditions
    config = _pixart_config_from_shapes(state, heads, sample_size, interpolation_scale, ms)
    model = _pixart_filled(PixArtTransformer2DModel(**config), state, "PixArt state dict")
    _check_position_table(model, table)
    return model


def _check_position_table(model: PixArtTransformer2DModel, table: torch.Tensor | None) -> None:
    """One warning line when the model's sin-cos table is not the checkpoint's at the same grid: the
    release was trained with another ``interpolation_scale`` (a new resolution changes the grid: fine)."""
    ours = model.pos_embed.pos_embed.detach().cpu().float()
    if table is None or table.shape != ours.shape or torch.allclose(table.float(), ours, atol=1e-5):
        return
    log.warning(
        "official pos_embed differs from the table at interpolation_scale=%s (sample_size %s): the "
        "checkpoint was trained with another scale, so outputs differ from the release's",
        model.pos_embed.interpolation_scale,
        model.config.sample_size,
    )


def _pixart_from_folder(
    folder: Path,
    sample_size: int | None,
    interpolation_scale: float | None,
    use_additional_conditions: bool | None,
) -> PixArtTransformer2DModel:
    """A ``save_pretrained`` folder: config.json gives the architecture, arguments that are not None
    override it; the safetensors weights must fill it exactly."""
    config = json.loads((folder / "config.json").read_text())
    overrides = {
        "sample_size": sample_size,
        "interpolation_scale": interpolation_scale,
        "use_additional_conditions": use_additional_conditions,
    }
    config.update({key: value for key, value in overrides.items() if value is not None})
    model = PixArtTransformer2DModel.from_config(config)
    return _pixart_filled(model, km.read_safetensors(folder), str(folder))


def load_pixart_checkpoint(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    sample_size: int | None = None,
    interpolation_scale: float | None = None,
    use_additional_conditions: bool | None = None,
    num_attention_heads: int = 16,
) -> PixArtTransformer2DModel:
    """Load PixArt-alpha weights into diffusers' ``PixArtTransformer2DModel`` (a stage-3 starting point).

    ``source`` is a state dict, a ``.pth``/``.pt``/``.safetensors`` file, or a folder (or a folder whose
    ``transformer/`` subfolder) holding a diffusers ``config.json``. The layout is told by its keys:

    * the official release ``PixArt-XL-2-{256,512,1024-MS}.pth`` (nested under ``state_dict`` or not):
      depth, hidden size, caption channels, patch size, learned sigma and (None ->) the MS embedders are
      read off the tensors, ``sample_size`` off the ``pos_embed`` grid; fused qkv / kv are split; the
      official null-caption buffer ``y_embedder.y_embedding`` is left out of the model (logged;
      :func:`official_null_caption` returns it);
    * diffusers' ``PixArtTransformer2DModel`` keys (a bare state dict needs ``sample_size``).

    ``interpolation_scale`` defaults to the release's own (:func:`default_interpolation_scale`; a table
    that disagrees with the checkpoint's ``pos_embed`` is logged) for state dicts, to config.json's for
    folders.
    ``num_attention_heads`` cannot be read off the weights (PixArt-XL/2: 16); a folder's config.json has it.
    Any source key no rule consumed, or any model key left unfilled, raises ``ValueError`` naming them.
    """
    if not isinstance(source, Mapping):
        path = Path(source)
        if not path.is_file():
            folder = km.model_folder(path)
            return _pixart_from_folder(folder, sample_size, interpolation_scale, use_additional_conditions)
        source = km.read_weights_file(path)
    return _pixart_from_state_dict(
        source, sample_size, interpolation_scale, use_additional_conditions, num_attention_heads
    )
