"""Stage 1 -> stage 2: the adaLN-single re-parameterisation of PixArt-alpha §2.3
(https://arxiv.org/abs/2310.00426; the official repo never released code for it).

DiT block i:  S_i(t, y) = W_i SiLU(e_t + e_y) + b_i     (6D: shift, scale, gate for attention, then MLP)
PixArt:       S_i(t)    = E_i + W_g SiLU(e'_t) + b_g   (diffusers' ada_norm_single blocks)

We take W_g, b_g = the mean over blocks of (W_i, b_i) -- the paper leaves the choice open; the mean is
the single matrix closest (least squares) to all W_i, so every block keeps the average block's
t-dependence instead of losing it (W_g = 0) or inheriting one arbitrary block's -- and let E_i absorb the
difference at t_ref = 500 with the null class. The final layer (DiT: its own adaLN; PixArt: a table plus
the raw t-embedding) is mapped the same way. Self-attention, MLP, patch embedding, timestep embedder and
final linear carry over; cross-attention is new with a zero output, so the caption cannot matter yet.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from diffusers import PixArtTransformer2DModel

from tristage.train.conversion.keymap import StateDict, Tracked, as_dtype, check_keys, detached, with_wb
from tristage.train.models.dit import ClassConditionalDiT
from tristage.train.models.pixart import build_pixart
from tristage.train.models.sizes import Size

log = logging.getLogger(__name__)
T_REF = 500  # the paper's reference timestep


def _carried_over(src: Tracked, depth: int) -> StateDict:
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
    return {b: src[a] for a, b in with_wb(pairs)}


@torch.no_grad()
def _adaln_single(src: Tracked, dit: ClassConditionalDiT, pixart: PixArtTransformer2DModel, t_ref: int):
    """Global (W_g, b_g), per-block tables E_i and the final table, so PixArt = DiT at (t_ref, null class).

    e_t uses the DiT's own sinusoid shift, e'_t PixArt's (shift 0) with the same embedder weights.
    Computed in float64; the caller casts.
    """
    cfg, depth = dit.config, dit.config.num_layers
    embedder = copy.deepcopy(dit.timestep_embedder).to("cpu", torch.float64)
    t = torch.tensor([t_ref])
    e_dit = embedder(dit.time_proj(t).to(torch.float64))[0]  # (D,)
    e_pix = embedder(pixart.adaln_single.emb.time_proj(t).to(torch.float64))[0]  # (D,)
    null = src["class_embedder.weight"].double()[cfg.num_classes]  # (D,) the null class row
    c_silu = F.silu(e_dit + null)  # (D,) SiLU(c_ref)
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
        log.warning(
            "PixArt's fixed position table (sample_size=%s, interpolation_scale=%s) differs from the DiT's; "
            "outputs match the DiT at t_ref only approximately",
            pixart.config.sample_size,
            pixart.pos_embed.interpolation_scale,
        )


def dit_to_pixart(
    dit: ClassConditionalDiT,
    caption_channels: int,
    sample_size: int | None = None,
    interpolation_scale: float | None = None,
    t_ref: int = T_REF,
) -> PixArtTransformer2DModel:
    """Stage-1 DiT -> stage-2 PixArt; at ``t_ref`` it equals the DiT with the null class for any caption.

    ``sample_size`` / ``interpolation_scale`` default to the DiT's, which keeps its position table;
    other values change that table (one warning line says so). Returned on CPU in the DiT's dtype,
    without the MS micro-conditions.
    """
    cfg = dit.config
    size = Size(cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim, cfg.patch_size)
    pixart = build_pixart(
        size,
        sample_size=cfg.sample_size if sample_size is None else sample_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        caption_channels=caption_channels,
        interpolation_scale=dit.pos_embed.interpolation_scale
        if interpolation_scale is None
        else interpolation_scale,
        use_additional_conditions=False,
    )
    pixart = as_dtype(pixart, dit.dtype)
    src = Tracked(detached(dit))
    target = _carried_over(src, cfg.num_layers) | _adaln_single(src, dit, pixart, t_ref)
    src.assert_all_read("DiT -> PixArt")
    fresh = pixart.state_dict()
    new = {k: v for k, v in fresh.items() if k.startswith("caption_projection.") or ".attn2." in k}
    target = {k: v.to(dit.dtype) for k, v in (target | new).items()}
    check_keys(target, set(fresh), "PixArt target")
    pixart.load_state_dict(target, strict=True)
    _warn_if_positions_change(dit, pixart)
    return pixart
