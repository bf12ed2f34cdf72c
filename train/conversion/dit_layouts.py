"""DiT weights in every layout we meet, to and from our shared-embedder ``ClassConditionalDiT``.

* the official DiT release (``DiT-XL-2-256x256.pt``) and DiT ``train.py`` checkpoints
  (https://github.com/facebookresearch/DiT/blob/main/models.py): fused qkv, ``blocks.N.*``, timestep
  sinusoid shift 0;
* diffusers' ``DiTTransformer2DModel`` (folder or state dict): a copy of the timestep and class
  embedders in every block, shift 1;
* our own stage-1 ``save_pretrained`` folder, which records its shift in config.json (``freq_shift``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel

from tristage.train.conversion.keymap import (
    WB,
    Tracked,
    as_dtype,
    check_keys,
    detached,
    head_dim,
    listing,
    model_folder,
    num_blocks,
    read_safetensors,
    read_weights_file,
    unwrap_state_dict,
    with_wb,
)
from tristage.train.models.dit import ClassConditionalDiT

log = logging.getLogger(__name__)

# The official DiT and our DiT normalise with eps 1e-6; diffusers' DiT defaults to 1e-5 (its MLP norm).
DIT_NORM_EPS = 1e-6
# Timestep sinusoid shift per layout: the official DiT has none, diffusers' DiT embedder uses 1
# (``CombinedTimestepLabelEmbeddings`` hard-codes downscale_freq_shift=1, so DiTPipeline always uses 1).
OFFICIAL_FREQ_SHIFT = 0
DIFFUSERS_FREQ_SHIFT = 1
OFFICIAL_DIT_KEY = "y_embedder.embedding_table.weight"  # the class table: only the official DiT has it
DIFFUSERS_DIT_KEY = "transformer_blocks.0.norm1.linear.weight"


def _official_pairs(depth: int) -> list[tuple[str, str]]:
    """Our names vs the official DiT's; the fused qkv and the fixed ``pos_embed`` are handled apart."""
    top = [
        ("pos_embed.proj", "x_embedder.proj"),
        ("timestep_embedder.linear_1", "t_embedder.mlp.0"),
        ("timestep_embedder.linear_2", "t_embedder.mlp.2"),
        ("proj_out_1", "final_layer.adaLN_modulation.1"),
        ("proj_out_2", "final_layer.linear"),
    ]
    block = [
        ("attn1.to_out.0", "attn.proj"),
        ("ff.net.0.proj", "mlp.fc1"),
        ("ff.net.2", "mlp.fc2"),
        ("adaln", "adaLN_modulation.1"),
    ]
    blocks = [(f"transformer_blocks.{i}.{a}", f"blocks.{i}.{b}") for i in range(depth) for a, b in block]
    return with_wb(top + blocks) + [("class_embedder.weight", OFFICIAL_DIT_KEY)]


def _official_qkv(depth: int) -> list[tuple[list[str], str]]:
    """Our separate q, k, v projections vs the official fused ``attn.qkv`` (rows stacked q; k; v)."""
    return [
        ([f"transformer_blocks.{i}.attn1.to_{n}.{p}" for n in "qkv"], f"blocks.{i}.attn.qkv.{p}")
        for i in range(depth)
        for p in WB
    ]


def _diffusers_pairs(depth: int) -> list[tuple[str, str]]:
    """Our names vs diffusers' ``DiTTransformer2DModel`` for everything but the per-block embedders."""
    same = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"]
    pairs = [(n, n) for n in ("pos_embed.proj", "proj_out_1", "proj_out_2")]
    for i in range(depth):
        pairs += [(f"transformer_blocks.{i}.{n}",) * 2 for n in same]
        pairs.append((f"transformer_blocks.{i}.adaln", f"transformer_blocks.{i}.norm1.linear"))
    return with_wb(pairs)


def _diffusers_embedder_copies(depth: int) -> list[tuple[str, list[str]]]:
    """Our shared embedder tensors vs the copy diffusers keeps in every block's ``norm1.emb``."""
    shared = with_wb(
        (f"timestep_embedder.{n}", f"timestep_embedder.{n}") for n in ("linear_1", "linear_2")
    ) + [("class_embedder.weight", "class_embedder.embedding_table.weight")]
    return [
        (ours, [f"transformer_blocks.{i}.norm1.emb.{theirs}" for i in range(depth)])
        for ours, theirs in shared
    ]


# ---------------------------------------------------------------------------------------------
# In: official DiT / diffusers DiT / our stage-1 folder -> ClassConditionalDiT
# ---------------------------------------------------------------------------------------------


def _dit_for(ours: Mapping[str, torch.Tensor], sample_size: int, heads: int, freq_shift: int):
    """A ``ClassConditionalDiT`` shaped like the (our-named) tensors ``ours``."""
    dim, in_channels, patch, _ = ours["pos_embed.proj.weight"].shape  # conv (D, C, p, p)
    return ClassConditionalDiT(
        sample_size=sample_size,
        patch_size=patch,
        in_channels=in_channels,
        out_channels=ours["proj_out_2.weight"].shape[0] // patch**2,
        num_layers=num_blocks(ours, "transformer_blocks."),
        num_attention_heads=heads,
        attention_head_dim=head_dim(dim, heads),
        num_classes=ours["class_embedder.weight"].shape[0] - 1,  # last row = null class
        freq_shift=freq_shift,
    )


def _from_official(state: Mapping[str, torch.Tensor], num_attention_heads: int, sample_size: int | None):
    """The grid of the official ``pos_embed`` sets the sample size (``sample_size`` is not needed)."""
    depth = num_blocks(state, "blocks.")
    check_keys(
        state,
        {b for _, b in _official_pairs(depth)} | {b for _, b in _official_qkv(depth)} | {"pos_embed"},
        "official DiT",
    )
    src = Tracked(state)
    ours = {a: src[b] for a, b in _official_pairs(depth)}
    for names, fused in _official_qkv(depth):
        ours.update(zip(names, src[fused].chunk(3, dim=0), strict=True))
    tokens, patch = src["pos_embed"].shape[1], ours["pos_embed.proj.weight"].shape[-1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"official pos_embed has {tokens} tokens: not a square grid")
    dit = _dit_for(ours, grid * patch, num_attention_heads, OFFICIAL_FREQ_SHIFT)
    # The official pos_embed is a frozen sin-cos table (MAE formula); ours is recomputed, so only verify it.
    if not torch.allclose(src["pos_embed"].float(), dit.pos_embed.pos_embed, atol=1e-5):
        raise ValueError("official pos_embed differs from the fixed 2-D sin-cos table this DiT recomputes")
    src.assert_all_read("official DiT")
    dit.load_state_dict(ours, strict=True)
    return dit


def _identical_copies(state: Mapping[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    first = state[keys[0]]
    for key in keys[1:]:
        if not torch.equal(state[key], first):
            raise ValueError(
                f"per-block embedder copies differ: {key} != {keys[0]}; "
                "our DiT shares one timestep/class embedder, so this checkpoint cannot be represented"
            )
    return first


def _from_diffusers(state: Mapping[str, torch.Tensor], num_attention_heads: int, sample_size: int | None):
    depth = num_blocks(state, "transformer_blocks.")
    pairs, copies = _diffusers_pairs(depth), _diffusers_embedder_copies(depth)
    check_keys(state, {b for _, b in pairs} | {k for _, keys in copies for k in keys}, "diffusers DiT")
    if sample_size is None:
        raise ValueError(
            "a bare diffusers DiT state dict needs sample_size (a saved folder's config.json has it)"
        )
    src = Tracked(state)
    ours = {a: src[b] for a, b in pairs}
    ours.update({name: _identical_copies(src, keys) for name, keys in copies})
    dit = _dit_for(ours, sample_size, num_attention_heads, DIFFUSERS_FREQ_SHIFT)
    src.assert_all_read("diffusers DiT")
    dit.load_state_dict(ours, strict=True)
    return dit


# A layout is recognised by one key only it has; the loaders share one signature.
_STATE_DICT_LAYOUTS: dict[str, Callable[..., ClassConditionalDiT]] = {
    OFFICIAL_DIT_KEY: _from_official,
    DIFFUSERS_DIT_KEY: _from_diffusers,
}


def _from_state_dict(state: Mapping[str, torch.Tensor], num_attention_heads: int, sample_size: int | None):
    loaders = [fn for key, fn in _STATE_DICT_LAYOUTS.items() if key in state]
    if len(loaders) != 1:
        raise ValueError(
            "cannot tell the DiT checkpoint layout: expected official DiT keys (x_embedder.*, blocks.N.*) "
            "or diffusers DiTTransformer2DModel keys (transformer_blocks.N.norm1.*); "
            f"got: {listing(sorted(state), 8)}"
        )
    return loaders[0](state, num_attention_heads, sample_size)


def _from_weights_folder(folder: Path, config: dict, num_attention_heads: int, sample_size: int | None):
    """A diffusers-style folder (``DiTTransformer2DModel``, or the older ``Transformer2DModel`` name the
    hub's DiT folders carry): the layout is told by its keys; heads and sample size come from config.json."""
    eps = config.get("norm_eps", 1e-5)  # diffusers' default when the config predates the key
    if eps != DIT_NORM_EPS:
        warnings.warn(
            f"{folder}: norm_eps={eps} but our DiT uses {DIT_NORM_EPS}; outputs will differ slightly",
            stacklevel=3,
        )
    heads = config.get("num_attention_heads", num_attention_heads)
    return _from_state_dict(read_safetensors(folder), heads, config.get("sample_size", sample_size))


def load_dit_checkpoint(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    num_attention_heads: int = 16,
    sample_size: int | None = None,
    weights: str = "ema",
) -> ClassConditionalDiT:
    """Load a DiT into our shared-embedder ``ClassConditionalDiT``, keeping its timestep shift.

    ``source`` is a state dict, a ``.pt``/``.safetensors`` file, or a folder (or a folder whose
    ``transformer/`` subfolder) holding a ``config.json``. The layout is told by key sets:
    the official DiT release or a DiT ``train.py`` checkpoint (freq_shift 0, fused qkv split into q, k, v;
    ``weights`` picks the checkpoint's "ema" -- the default, as DiT's sample.py -- or "model"), or diffusers'
    ``DiTTransformer2DModel`` (freq_shift 1; its per-block embedder copies must be identical).
    Folders whose config.json names ``ClassConditionalDiT`` (our stage-1 ``save_pretrained``) load as
    they are; any other folder is read from its safetensors weights by the same key-set rules.

    ``num_attention_heads`` cannot be read off the weights (official DiT: 16 for XL and L, 12 for B,
    6 for S; a folder's config.json overrides it); ``sample_size`` is needed only for a bare
    diffusers state dict. Missing, unexpected or inconsistent keys raise ``ValueError`` naming them.
    """
    if isinstance(source, Mapping):
        return _from_state_dict(unwrap_state_dict(source, weights), num_attention_heads, sample_size)
    path = Path(source)
    if path.is_file():
        return _from_state_dict(read_weights_file(path, weights), num_attention_heads, sample_size)
    folder = model_folder(path)
    config = json.loads((folder / "config.json").read_text())
    if config.get("_class_name") == ClassConditionalDiT.__name__:
        return ClassConditionalDiT.from_pretrained(folder)
    return _from_weights_folder(folder, config, num_attention_heads, sample_size)


# ---------------------------------------------------------------------------------------------
# Out: our DiT in the official layout / as diffusers' DiTTransformer2DModel
# ---------------------------------------------------------------------------------------------


def dit_to_official_state_dict(dit: ClassConditionalDiT) -> dict[str, torch.Tensor]:
    """Our DiT in the official DiT release's key layout (fused qkv, fixed ``pos_embed`` included)."""
    if dit.config.freq_shift != OFFICIAL_FREQ_SHIFT:
        log.warning(
            "the official DiT uses timestep freq_shift %d, this DiT %d: the official code will compute "
            "different outputs",
            OFFICIAL_FREQ_SHIFT,
            dit.config.freq_shift,
        )
    depth = dit.config.num_layers
    src = Tracked(detached(dit))
    out = {b: src[a].clone() for a, b in _official_pairs(depth)}
    for names, fused in _official_qkv(depth):
        out[fused] = torch.cat([src[n] for n in names], dim=0)  # (3D, D) or (3D,)
    out["pos_embed"] = dit.pos_embed.pos_embed.detach().cpu().float().clone()  # (1, N, D)
    src.assert_all_read("DiT -> official")
    return out


def dit_to_diffusers(dit: ClassConditionalDiT) -> DiTTransformer2DModel:
    """Our DiT as diffusers' ``DiTTransformer2DModel`` (the layout ``DiTPipeline`` loads).

    diffusers keeps a copy of the timestep and class embedders in every block; each gets ours. Its
    timestep sinusoid is hard-coded to shift 1, which no weight change can emulate (the frequencies
    themselves differ), so a shift-0 DiT (the official weights) exports with one warning line: the
    pipeline then samples a slightly different model (docs/handoff.md, "Export").
    """
    cfg = dit.config
    if cfg.freq_shift != DIFFUSERS_FREQ_SHIFT:
        log.warning(
            "DiTPipeline embeds timesteps with freq_shift %d, this DiT was trained with %d: the exported "
            "pipeline's outputs differ from this DiT's (sample with tristage's own model for exact results)",
            DIFFUSERS_FREQ_SHIFT,
            cfg.freq_shift,
        )
    model = DiTTransformer2DModel(
        num_attention_heads=cfg.num_attention_heads,
        attention_head_dim=cfg.attention_head_dim,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_layers=cfg.num_layers,
        sample_size=cfg.sample_size,
        patch_size=cfg.patch_size,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=cfg.num_classes,
        norm_type="ada_norm_zero",
        norm_eps=DIT_NORM_EPS,
    )
    src = Tracked(detached(dit))
    target = {b: src[a] for a, b in _diffusers_pairs(cfg.num_layers)}
    for name, keys in _diffusers_embedder_copies(cfg.num_layers):
        target.update({key: src[name] for key in keys})
    src.assert_all_read("DiT -> diffusers")
    model.load_state_dict(target, strict=True)
    return as_dtype(model, dit.dtype)
