"""Stage transitions: DiT checkpoints in, the adaLN-single re-parameterisation, DiT export.

* ``load_dit_checkpoint`` reads the official DiT release (``DiT-XL-2-256x256.pt``,
  https://github.com/facebookresearch/DiT/blob/main/models.py), a diffusers
  ``DiTTransformer2DModel`` (folder or state dict) or our own stage-1 folder into the
  shared-embedder ``ClassConditionalDiT``.
* ``dit_to_pixart`` is the stage 1 -> stage 2 hand-off of PixArt-alpha §2.3
  (https://arxiv.org/abs/2310.00426); the official repo never released code for it.
* ``dit_to_diffusers`` / ``dit_to_official_state_dict`` write our DiT in the other layouts.
* ``load_pixart_checkpoint`` reads the released PixArt-alpha weights (``PixArt-XL-2-{256,512,1024-MS}.pth``,
  https://github.com/PixArt-alpha/PixArt-alpha, ``diffusion/model/nets/PixArt.py`` / ``PixArtMS.py``)
  or a diffusers ``PixArtTransformer2DModel`` (folder or state dict) -- a stage-3 starting point;
  ``pixart_to_official_state_dict`` writes the official layout back.

Every conversion is strict: the full target state dict is built and loaded with
``strict=True``, and a source tensor that no rule consumed is an error naming it.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel
from safetensors.torch import load_file
from torch import nn

from tristage.train.models.dit import ClassConditionalDiT
from tristage.train.models.pixart import build_pixart
from tristage.train.models.sizes import Size

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
_WB = ("weight", "bias")
# The official DiT and our DiT normalise with eps 1e-6; diffusers' DiT defaults to 1e-5 (its MLP norm).
_DIT_NORM_EPS = 1e-6
# Timestep sinusoid shift per layout: the official DiT has none, diffusers' DiT embedder uses 1.
_OFFICIAL_FREQ_SHIFT = 0
_DIFFUSERS_FREQ_SHIFT = 1


class _Tracked(dict):
    """A state dict that remembers which keys were read, so a conversion can prove it used every tensor."""

    def __init__(self, state: Mapping[str, torch.Tensor]):
        super().__init__(state)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        self.read.add(key)
        return super().__getitem__(key)

    def assert_all_read(self, what: str) -> None:
        left = sorted(set(self) - self.read)
        if left:
            raise ValueError(f"{what}: source keys not consumed by any mapping rule: {_listing(left)}")


def _listing(keys: Iterable[str], limit: int = 20) -> str:
    keys = list(keys)
    more = f" ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more if keys else "none"


def _check_keys(state: Mapping[str, torch.Tensor], expected: set[str], what: str) -> None:
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{what} state dict does not match: missing keys: {_listing(missing)}; "
            f"unexpected keys: {_listing(unexpected)}"
        )


def _detached(module: nn.Module) -> StateDict:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def _as_dtype(model, dtype: torch.dtype):
    """``model.to(dtype)`` only when it changes something (diffusers logs a notice on every cast)."""
    return model if model.dtype == dtype else model.to(dtype)


def _num_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Depth = 1 + the largest block index; gaps surface later as missing keys."""
    pattern = re.compile(rf"{re.escape(prefix)}(\d+)\.")
    found = [int(m.group(1)) for k in state if (m := pattern.match(k))]
    return max(found) + 1 if found else 0


def _with_wb(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(f"{a}.{p}", f"{b}.{p}") for a, b in pairs for p in _WB]


# ---------------------------------------------------------------------------------------------
# Key tables: (our key, their key) for tensors that map one-to-one.
# ---------------------------------------------------------------------------------------------


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
    return _with_wb(top + blocks) + [("class_embedder.weight", "y_embedder.embedding_table.weight")]


def _official_qkv(depth: int) -> list[tuple[list[str], str]]:
    """Our separate q, k, v projections vs the official fused ``attn.qkv`` (rows stacked q; k; v)."""
    return [
        ([f"transformer_blocks.{i}.attn1.to_{n}.{p}" for n in "qkv"], f"blocks.{i}.attn.qkv.{p}")
        for i in range(depth)
        for p in _WB
    ]


def _diffusers_pairs(depth: int) -> list[tuple[str, str]]:
    """Our names vs diffusers' ``DiTTransformer2DModel`` for everything but the per-block embedders."""
    same = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"]
    pairs = [(n, n) for n in ("pos_embed.proj", "proj_out_1", "proj_out_2")]
    for i in range(depth):
        pairs += [(f"transformer_blocks.{i}.{n}",) * 2 for n in same]
        pairs.append((f"transformer_blocks.{i}.adaln", f"transformer_blocks.{i}.norm1.linear"))
    return _with_wb(pairs)


def _diffusers_embedder_copies(depth: int) -> list[tuple[str, list[str]]]:
    """Our shared embedder tensors vs the copy diffusers keeps in every block's ``norm1.emb``."""
    shared = _with_wb(
        (f"timestep_embedder.{n}", f"timestep_embedder.{n}") for n in ("linear_1", "linear_2")
    ) + [("class_embedder.weight", "class_embedder.embedding_table.weight")]
    return [
        (ours, [f"transformer_blocks.{i}.norm1.emb.{theirs}" for i in range(depth)])
        for ours, theirs in shared
    ]


# ---------------------------------------------------------------------------------------------
# Checkpoints in: official DiT / diffusers DiT / our stage-1 folder -> ClassConditionalDiT
# ---------------------------------------------------------------------------------------------


def _head_dim(dim: int, heads: int) -> int:
    if dim % heads:
        raise ValueError(f"hidden size {dim} is not divisible by num_attention_heads={heads}")
    return dim // heads


def _from_official(state: Mapping[str, torch.Tensor], num_attention_heads: int, sample_size: int | None):
    depth = _num_blocks(state, "blocks.")
    _check_keys(
        state,
        {b for _, b in _official_pairs(depth)} | {b for _, b in _official_qkv(depth)} | {"pos_embed"},
        "official DiT",
    )
    src = _Tracked(state)
    dim, in_channels, patch, _ = src["x_embedder.proj.weight"].shape
    tokens = src["pos_embed"].shape[1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens or (sample_size is not None and sample_size != grid * patch):
        raise ValueError(
            f"official pos_embed has {tokens} tokens: not a square grid for sample_size={sample_size}"
        )
    dit = ClassConditionalDiT(
        sample_size=grid * patch,
        patch_size=patch,
        in_channels=in_channels,
        out_channels=src["final_layer.linear.weight"].shape[0] // patch**2,
        num_layers=depth,
        num_attention_heads=num_attention_heads,
        attention_head_dim=_head_dim(dim, num_attention_heads),
        num_classes=src["y_embedder.embedding_table.weight"].shape[0] - 1,  # last row = null class
        freq_shift=_OFFICIAL_FREQ_SHIFT,
    )
    ours = {a: src[b] for a, b in _official_pairs(depth)}
    for names, fused in _official_qkv(depth):
        ours.update(zip(names, src[fused].chunk(3, dim=0), strict=True))
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
    depth = _num_blocks(state, "transformer_blocks.")
    pairs, copies = _diffusers_pairs(depth), _diffusers_embedder_copies(depth)
    _check_keys(state, {b for _, b in pairs} | {k for _, keys in copies for k in keys}, "diffusers DiT")
    if sample_size is None:
        raise ValueError(
            "a bare diffusers DiT state dict needs sample_size (a saved folder's config.json has it)"
        )
    src = _Tracked(state)
    ours = {a: src[b] for a, b in pairs}
    ours.update({name: _identical_copies(src, keys) for name, keys in copies})
    dim, in_channels, patch, _ = ours["pos_embed.proj.weight"].shape
    dit = ClassConditionalDiT(
        sample_size=sample_size,
        patch_size=patch,
        in_channels=in_channels,
        out_channels=ours["proj_out_2.weight"].shape[0] // patch**2,
        num_layers=depth,
        num_attention_heads=num_attention_heads,
        attention_head_dim=_head_dim(dim, num_attention_heads),
        num_classes=ours["class_embedder.weight"].shape[0] - 1,  # LabelEmbedding's extra CFG row
        freq_shift=_DIFFUSERS_FREQ_SHIFT,
    )
    src.assert_all_read("diffusers DiT")
    dit.load_state_dict(ours, strict=True)
    return dit


# A layout is recognised by one key only it has; the loaders share one signature.
_STATE_DICT_LAYOUTS: dict[str, Callable[..., ClassConditionalDiT]] = {
    "x_embedder.proj.weight": _from_official,
    "transformer_blocks.0.norm1.linear.weight": _from_diffusers,
}


def _from_state_dict(state: Mapping[str, torch.Tensor], num_attention_heads: int, sample_size: int | None):
    loaders = [fn for key, fn in _STATE_DICT_LAYOUTS.items() if key in state]
    if len(loaders) != 1:
        raise ValueError(
            "cannot tell the DiT checkpoint layout: expected official DiT keys (x_embedder.*, blocks.N.*) "
            "or diffusers DiTTransformer2DModel keys (transformer_blocks.N.norm1.*); "
            f"got: {_listing(sorted(state), 8)}"
        )
    return loaders[0](state, num_attention_heads, sample_size)


def _model_folder(path: Path) -> Path:
    """The folder itself, or its ``transformer/`` subfolder (a stage ``final/`` or a pipeline folder)."""
    for folder in (path, path / "transformer"):
        if (folder / "config.json").is_file():
            return folder
    raise ValueError(f"{path}: no config.json in it or in its transformer/ subfolder")


def _read_safetensors(folder: Path) -> StateDict:
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["diffusion_pytorch_model.safetensors"]
    state: StateDict = {}
    for name in files:
        if not (folder / name).is_file():
            raise ValueError(f"{folder}: weight file {name} is missing")
        state.update(load_file(folder / name))
    return state


def _from_weights_folder(folder: Path, config: dict, num_attention_heads: int, sample_size: int | None):
    """A diffusers-style folder (``DiTTransformer2DModel``, or the older ``Transformer2DModel`` name the
    hub's DiT folders carry): the layout is told by its keys; heads and sample size come from config.json."""
    eps = config.get("norm_eps", 1e-5)  # diffusers' default when the config predates the key
    if eps != _DIT_NORM_EPS:
        warnings.warn(
            f"{folder}: norm_eps={eps} but our DiT uses {_DIT_NORM_EPS}; outputs will differ slightly",
            stacklevel=3,
        )
    heads = config.get("num_attention_heads", num_attention_heads)
    return _from_state_dict(_read_safetensors(folder), heads, config.get("sample_size", sample_size))


def load_dit_checkpoint(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    num_attention_heads: int = 16,
    sample_size: int | None = None,
) -> ClassConditionalDiT:
    """Load a DiT into our shared-embedder ``ClassConditionalDiT``.

    ``source`` is a state dict, a ``.pt``/``.safetensors`` file, or a folder (or a folder whose
    ``transformer/`` subfolder) holding a ``config.json``. The layout is told by key sets:
    the official DiT release (freq_shift 0, fused qkv split into q, k, v) or diffusers'
    ``DiTTransformer2DModel`` (freq_shift 1; its per-block embedder copies must be identical).
    Folders whose config.json names ``ClassConditionalDiT`` (our stage-1 ``save_pretrained``) load as
    they are; any other folder is read from its safetensors weights by the same key-set rules.

    ``num_attention_heads`` cannot be read off the weights (official DiT: 16 for XL and L, 12 for B,
    6 for S; a folder's config.json overrides it); ``sample_size`` is needed only for a bare
    diffusers state dict.
    Missing, unexpected or inconsistent keys raise ``ValueError`` naming them.
    """
    if isinstance(source, Mapping):
        return _from_state_dict(source, num_attention_heads, sample_size)
    path = Path(source)
    if path.is_file():
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        return _from_state_dict(state, num_attention_heads, sample_size)
    folder = _model_folder(path)
    config = json.loads((folder / "config.json").read_text())
    if config.get("_class_name") == ClassConditionalDiT.__name__:
        return ClassConditionalDiT.from_pretrained(folder)
    return _from_weights_folder(folder, config, num_attention_heads, sample_size)


# ---------------------------------------------------------------------------------------------
# Our DiT out: official layout / diffusers DiTTransformer2DModel
# ---------------------------------------------------------------------------------------------


def dit_to_official_state_dict(dit: ClassConditionalDiT) -> StateDict:
    """Our DiT in the official DiT release's key layout (fused qkv, fixed ``pos_embed`` included)."""
    if dit.config.freq_shift != _OFFICIAL_FREQ_SHIFT:
        warnings.warn(
            f"the official DiT uses timestep freq_shift {_OFFICIAL_FREQ_SHIFT}, this DiT "
            f"{dit.config.freq_shift}: the official code will compute different outputs",
            stacklevel=2,
        )
    depth = dit.config.num_layers
    src = _Tracked(_detached(dit))
    out = {b: src[a].clone() for a, b in _official_pairs(depth)}
    for names, fused in _official_qkv(depth):
        out[fused] = torch.cat([src[n] for n in names], dim=0)  # (3D, D) or (3D,)
    out["pos_embed"] = dit.pos_embed.pos_embed.detach().cpu().float().clone()  # (1, N, D)
    src.assert_all_read("DiT -> official")
    return out


def dit_to_diffusers(dit: ClassConditionalDiT) -> DiTTransformer2DModel:
    """Our DiT as diffusers' ``DiTTransformer2DModel`` (the layout ``DiTPipeline`` loads).

    diffusers keeps a copy of the timestep and class embedders in every block; each gets ours.
    """
    cfg = dit.config
    if cfg.freq_shift != _DIFFUSERS_FREQ_SHIFT:
        warnings.warn(
            f"diffusers' DiT embeds timesteps with freq_shift {_DIFFUSERS_FREQ_SHIFT}, this DiT uses "
            f"{cfg.freq_shift}: the exported model's outputs will differ from this DiT's",
            stacklevel=2,
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
        norm_eps=_DIT_NORM_EPS,
    )
    src = _Tracked(_detached(dit))
    target = {b: src[a] for a, b in _diffusers_pairs(cfg.num_layers)}
    for name, keys in _diffusers_embedder_copies(cfg.num_layers):
        target.update({key: src[name] for key in keys})
    src.assert_all_read("DiT -> diffusers")
    model.load_state_dict(target, strict=True)
    return _as_dtype(model, dit.dtype)


# ---------------------------------------------------------------------------------------------
# DiT -> PixArt: the adaLN-single re-parameterisation (PixArt-alpha §2.3)
# ---------------------------------------------------------------------------------------------


def _carried_over(src: _Tracked, depth: int) -> StateDict:
    """Patch embedding, timestep embedder, self-attention, MLP and final linear keep their weights."""
    pairs = [
        ("pos_embed.proj", "pos_embed.proj"),
        ("timestep_embedder.linear_1", "adaln_single.emb.timestep_embedder.linear_1"),
        ("timestep_embedder.linear_2", "adaln_single.emb.timestep_embedder.linear_2"),
        ("proj_out_2", "proj_out"),
    ]
    for i in range(depth):
        for n in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"):
            pairs.append((f"transformer_blocks.{i}.{n}",) * 2)
    return {b: src[a] for a, b in _with_wb(pairs)}


@torch.no_grad()
def _adaln_single(src: _Tracked, dit: ClassConditionalDiT, pixart: PixArtTransformer2DModel, t_ref: int):
    """Global (W_g, b_g), per-block tables E_i and the final table, so PixArt = DiT at (t_ref, null class).

    DiT block i:  S_i(t, y) = W_i SiLU(e_t + e_y) + b_i     (6D: shift, scale, gate for attention, then MLP)
    PixArt:       S_i(t)    = E_i + W_g SiLU(e'_t) + b_g   (BasicTransformerBlock, norm_type ada_norm_single)

    W_g, b_g = the mean over blocks of (W_i, b_i): the paper leaves the choice open; the mean is the single
    matrix closest (least squares) to all W_i, so every block keeps the t-dependence of the average block
    instead of losing it (W_g = 0) or inheriting one arbitrary block's.  E_i then absorbs the difference at
    t_ref.  e_t uses the DiT's own sinusoid shift, e'_t PixArt's (shift 0) with the same embedder weights.
    Computed in float64; the caller casts.
    """
    cfg, depth = dit.config, dit.config.num_layers
    embedder = copy.deepcopy(dit.timestep_embedder).to("cpu", torch.float64)
    t = torch.tensor([t_ref])
    e_dit = embedder(dit.time_proj(t).to(torch.float64))[0]  # (D,)
    e_pix = embedder(pixart.adaln_single.emb.time_proj(t).to(torch.float64))[0]  # (D,)
    c_silu = F.silu(
        e_dit + src["class_embedder.weight"].double()[cfg.num_classes]
    )  # (D,) SiLU(c_ref), null class
    w = torch.stack(
        [src[f"transformer_blocks.{i}.adaln.weight"].double() for i in range(depth)]
    )  # (L, 6D, D)
    b = torch.stack([src[f"transformer_blocks.{i}.adaln.bias"].double() for i in range(depth)])  # (L, 6D)
    w_g, b_g = w.mean(0), b.mean(0)  # (6D, D), (6D,)
    s_dit = torch.einsum("lod,d->lo", w, c_silu) + b  # (L, 6D)
    s_pix = w_g @ F.silu(e_pix) + b_g  # (6D,)
    # diffusers adds scale_shift_table[None] + out.reshape(B, 6, D): row k = DiT's k-th chunk of 6D.
    out = {
        f"transformer_blocks.{i}.scale_shift_table": (s_dit[i] - s_pix).reshape(6, -1) for i in range(depth)
    }
    out.update({"adaln_single.linear.weight": w_g, "adaln_single.linear.bias": b_g})
    # Final layer: DiT (shift, scale) = proj_out_1(SiLU(c)); PixArt = scale_shift_table (2, D) + raw e'_t.
    final = F.linear(c_silu, src["proj_out_1.weight"].double(), src["proj_out_1.bias"].double())  # (2D,)
    out["scale_shift_table"] = final.reshape(2, -1) - e_pix[None]  # (2, D)
    return out


def _warn_if_positions_change(dit: ClassConditionalDiT, pixart: PixArtTransformer2DModel) -> None:
    ours, theirs = dit.pos_embed.pos_embed, pixart.pos_embed.pos_embed
    if ours.shape != theirs.shape or not torch.allclose(ours.cpu().float(), theirs.cpu().float(), atol=1e-6):
        warnings.warn(
            f"PixArt's fixed position table (sample_size={pixart.config.sample_size}, interpolation_scale="
            f"{pixart.pos_embed.interpolation_scale}) differs from the DiT's; outputs match the DiT at t_ref "
            "only approximately",
            stacklevel=3,
        )


def dit_to_pixart(
    dit: ClassConditionalDiT,
    caption_channels: int,
    sample_size: int | None = None,
    interpolation_scale: float | None = None,
    t_ref: int = 500,
) -> PixArtTransformer2DModel:
    """Stage-1 DiT -> stage-2 PixArt by the adaLN-single re-parameterisation (PixArt-alpha §2.3).

    At ``t_ref`` the result equals the DiT with the null class for any caption: self-attention, MLP,
    patch embedding, timestep embedder and final linear carry over; cross-attention and the caption
    projection are freshly initialised with a zero cross-attention output (``init_pixart_weights``).
    ``sample_size`` / ``interpolation_scale`` default to the DiT's, which keeps its position table;
    other values change that table (a warning says so). Returned on CPU in the DiT's dtype, without
    the MS micro-conditions. See ``_adaln_single`` for the choice of the global ``adaln_single.linear``.
    """
    cfg = dit.config
    size = Size(cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim, cfg.patch_size)
    if interpolation_scale is None:
        interpolation_scale = dit.pos_embed.interpolation_scale
    pixart = build_pixart(
        size,
        sample_size=cfg.sample_size if sample_size is None else sample_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        caption_channels=caption_channels,
        interpolation_scale=interpolation_scale,
        use_additional_conditions=False,
    )
    pixart = _as_dtype(pixart, dit.dtype)
    src = _Tracked(_detached(dit))
    target = _carried_over(src, cfg.num_layers) | _adaln_single(src, dit, pixart, t_ref)
    src.assert_all_read("DiT -> PixArt")
    fresh = pixart.state_dict()
    new = {k: v for k, v in fresh.items() if k.startswith("caption_projection.") or ".attn2." in k}
    target = {k: v.to(dit.dtype) for k, v in (target | new).items()}
    _check_keys(target, set(fresh), "PixArt target")
    pixart.load_state_dict(target, strict=True)
    _warn_if_positions_change(dit, pixart)
    return pixart


def convert_dit_to_pixart(
    src: str,
    out: str,
    caption_channels: int,
    interpolation_scale: float | None,
    num_attention_heads: int = 16,
) -> None:
    """CLI entry: any DiT checkpoint ``load_dit_checkpoint`` reads -> a PixArt ``save_pretrained`` folder.

    ``src`` is a stage-1 ``final/`` folder (or its ``transformer/`` subfolder), an official ``.pt``
    file or a diffusers DiT folder; ``num_attention_heads`` matters only for the ``.pt`` file.
    """
    dit = load_dit_checkpoint(src, num_attention_heads=num_attention_heads)
    dit_to_pixart(dit, caption_channels, interpolation_scale=interpolation_scale).save_pretrained(out)


# ---------------------------------------------------------------------------------------------
# PixArt-alpha checkpoints: the official release <-> diffusers' PixArtTransformer2DModel
# ---------------------------------------------------------------------------------------------

# Official tensors diffusers has no place for.  ``y_embedding`` is the official null caption, a random,
# untrained (120, 4096) buffer (PixArt_blocks.py ``CaptionEmbedder``); diffusers -- and our cache, which
# stores T5("") -- use the T5 features of "" instead (DESIGN §5), so it is dropped, and the drop is logged.
# ``pos_embed`` is the fixed sin-cos table; only its token count is read (the grid -> sample_size).
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
    return _with_wb(top + blocks) + tables


def _pixart_official_fused(depth: int) -> list[tuple[list[str], str]]:
    """diffusers' separate projections vs the official fused ones, rows stacked in this order:
    self-attention ``attn.qkv`` = q; k; v (timm ``Attention``), cross-attention ``cross_attn.kv_linear``
    = k; v (PixArt_blocks.py ``MultiHeadCrossAttention`` views it as (..., 2, heads, head_dim))."""
    fused = []
    for i in range(depth):
        ours = f"transformer_blocks.{i}"
        for p in _WB:
            fused.append(([f"{ours}.attn1.to_{n}.{p}" for n in "qkv"], f"blocks.{i}.attn.qkv.{p}"))
            fused.append(([f"{ours}.attn2.to_{n}.{p}" for n in "kv"], f"blocks.{i}.cross_attn.kv_linear.{p}"))
    return fused


def _unwrap_state_dict(state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """The official trainer saves ``{"state_dict": weights, ...}``; take the weights."""
    inner = state.get("state_dict")
    return inner if isinstance(inner, Mapping) else state


def read_weights_file(path: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    """A ``.safetensors`` or ``torch.save`` file, unwrapped from a top-level ``state_dict``.

    ``torch.save`` zip archives are memory-mapped: reading a multi-GB checkpoint just to look at its keys
    (as ``init_from`` does to tell the layout) costs no copy.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    return _unwrap_state_dict(state)


def pixart_state_dict_from_official(
    state: Mapping[str, torch.Tensor], use_additional_conditions: bool | None = None
) -> tuple[StateDict, StateDict]:
    """Official PixArt-alpha keys -> diffusers keys; returns ``(converted, dropped)``.

    ``dropped`` holds the official-only tensors that were present: the null-caption buffer and the fixed
    ``pos_embed``. Depth comes from the block indices; the MS embedders are expected when
    ``use_additional_conditions`` says so, or (None) when the checkpoint has them.
    Missing or unexpected keys raise ``ValueError`` naming them.
    """
    state = _unwrap_state_dict(state)
    depth = _num_blocks(state, "blocks.")
    ms = _OFFICIAL_PIXART_MS_KEY in state if use_additional_conditions is None else use_additional_conditions
    pairs, fused = _pixart_official_pairs(depth, ms), _pixart_official_fused(depth)
    optional = {OFFICIAL_PIXART_NULL_CAPTION, OFFICIAL_PIXART_POS_EMBED} & set(state)
    _check_keys(state, {b for _, b in pairs} | {b for _, b in fused} | optional, "official PixArt-alpha")
    src = _Tracked(state)
    out = {a: src[b] for a, b in pairs}
    for names, key in fused:
        out.update(zip(names, src[key].chunk(len(names), dim=0), strict=True))  # (n*D, ...) -> n x (D, ...)
    dropped = {key: src[key] for key in sorted(optional)}
    src.assert_all_read("official PixArt-alpha")
    return out, dropped


def pixart_to_official_state_dict(
    model: PixArtTransformer2DModel, null_caption: torch.Tensor | None = None
) -> StateDict:
    """The model in the official PixArt-alpha layout (fused qkv and kv, fixed ``pos_embed`` included).

    diffusers has no null-caption buffer: pass ``null_caption`` (``(tokens, caption_channels)``) to write one
    as ``y_embedder.y_embedding``, which the official code needs for caption dropout and CFG.
    """
    depth, ms = model.config.num_layers, model.adaln_single.emb.use_additional_conditions
    src = _Tracked(_detached(model))
    out = {b: src[a].clone() for a, b in _pixart_official_pairs(depth, ms)}
    for names, fused in _pixart_official_fused(depth):
        out[fused] = torch.cat([src[n] for n in names], dim=0)  # (n*D, D) or (n*D,)
    out[OFFICIAL_PIXART_POS_EMBED] = model.pos_embed.pos_embed.detach().cpu().float().clone()  # (1, N, D)
    if null_caption is not None:
        out[OFFICIAL_PIXART_NULL_CAPTION] = null_caption.detach().cpu().clone()
    src.assert_all_read("PixArt -> official")
    return out


def _default_interpolation_scale(sample_size: int) -> float:
    """PixArt's position-table scale is resolution / 512: {256: 0.5, 512: 1, 1024: 2} (DESIGN §5)."""
    return sample_size * 8 / 512


def _official_layout(state, sample_size: int | None, use_additional_conditions: bool | None):
    """Official keys -> (diffusers state, sample size); the size defaults to the grid of ``pos_embed``."""
    converted, dropped = pixart_state_dict_from_official(state, use_additional_conditions)
    if OFFICIAL_PIXART_NULL_CAPTION in dropped:
        log.warning(
            "official PixArt-alpha checkpoint: dropped %s %s, the official random null-caption buffer; "
            'diffusers and tristage use the T5("") features as the null caption instead',
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
    return converted, sample_size


def _diffusers_layout(state, sample_size: int | None, use_additional_conditions: bool | None):
    return dict(state), sample_size


# A layout is recognised by one key only it has; each returns (diffusers-named state, sample size).
_PIXART_LAYOUTS: dict[str, Callable[..., tuple[StateDict, int | None]]] = {
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
        raise ValueError(f"PixArt state dict does not match: missing keys: {_listing(missing)}")
    dim, in_channels, patch, _ = state["pos_embed.proj.weight"].shape  # conv (D, C, p, p)
    if interpolation_scale is None:
        interpolation_scale = _default_interpolation_scale(sample_size)
    return dict(
        num_attention_heads=heads,
        attention_head_dim=_head_dim(dim, heads),
        in_channels=in_channels,
        out_channels=state["proj_out.weight"].shape[0] // patch**2,  # learned sigma: 2 * in_channels
        num_layers=_num_blocks(state, "transformer_blocks."),
        cross_attention_dim=dim,
        caption_channels=state["caption_projection.linear_1.weight"].shape[1],
        sample_size=sample_size,
        patch_size=patch,
        interpolation_scale=interpolation_scale,
        use_additional_conditions=ms,
    )


def _pixart_filled(model: PixArtTransformer2DModel, state: Mapping[str, torch.Tensor], what: str):
    _check_keys(state, set(model.state_dict()), f"{what} -> PixArtTransformer2DModel")
    model.load_state_dict(state, strict=True)
    return model.eval()


def _pixart_from_state_dict(
    state: Mapping[str, torch.Tensor],
    sample_size: int | None,
    interpolation_scale: float | None,
    use_additional_conditions: bool | None,
    heads: int,
) -> PixArtTransformer2DModel:
    state = _unwrap_state_dict(state)
    layouts = [fn for key, fn in _PIXART_LAYOUTS.items() if key in state]
    if len(layouts) != 1:
        raise ValueError(
            "cannot tell the PixArt checkpoint layout: expected official PixArt-alpha keys "
            "(x_embedder.*, blocks.N.*) or diffusers PixArtTransformer2DModel keys "
            "(pos_embed.proj.*, transformer_blocks.N.*); "
            f"got: {_listing(sorted(state), 8)}"
        )
    state, sample_size = layouts[0](state, sample_size, use_additional_conditions)
    if sample_size is None:
        raise ValueError("this PixArt state dict has no pos_embed to read the grid from: pass sample_size")
    ms = _DIFFUSERS_PIXART_MS_KEY in state if use_additional_conditions is None else use_additional_conditions
    config = _pixart_config_from_shapes(state, heads, sample_size, interpolation_scale, ms)
    return _pixart_filled(PixArtTransformer2DModel(**config), state, "PixArt state dict")


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
    return _pixart_filled(model, _read_safetensors(folder), str(folder))


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
      official null-caption buffer ``y_embedder.y_embedding`` is dropped (logged): we use T5("");
    * diffusers' ``PixArtTransformer2DModel`` keys (a bare state dict needs ``sample_size``).

    ``interpolation_scale`` defaults to resolution / 512 for state dicts, to config.json's for folders.
    ``num_attention_heads`` cannot be read off the weights (PixArt-XL/2: 16); a folder's config.json has it.
    Any source key no rule consumed, or any model key left unfilled, raises ``ValueError`` naming them.
    """
    if not isinstance(source, Mapping):
        path = Path(source)
        if not path.is_file():
            folder = _model_folder(path)
            return _pixart_from_folder(folder, sample_size, interpolation_scale, use_additional_conditions)
        source = read_weights_file(path)
    return _pixart_from_state_dict(
        source, sample_size, interpolation_scale, use_additional_conditions, num_attention_heads
    )
