"""Stages 2-3: diffusers' PixArtTransformer2DModel, built and initialised as PixArt-alpha does."""

from __future__ import annotations

from diffusers import PixArtTransformer2DModel
from torch import nn

from tristage.train.models.sizes import Size


def build_pixart(
    size: Size,
    sample_size: int,
    in_channels: int,
    out_channels: int,
    caption_channels: int,
    interpolation_scale: float | None,
    use_additional_conditions: bool,
    caption_embed_std: float = 0.02,
) -> PixArtTransformer2DModel:
    """A freshly initialised PixArt transformer (adaLN-single, cross-attention to T5).

    ``interpolation_scale`` None is diffusers' ``max(sample_size // 64, 1)``, the official ``lewei_scale``."""
    model = PixArtTransformer2DModel(
        num_attention_heads=size.num_attention_heads,
        attention_head_dim=size.attention_head_dim,
        in_channels=in_channels,
        out_channels=out_channels,
        num_layers=size.num_layers,
        cross_attention_dim=size.num_attention_heads * size.attention_head_dim,
        sample_size=sample_size,
        patch_size=size.patch_size,
        interpolation_scale=interpolation_scale,
        use_additional_conditions=use_additional_conditions,
        caption_channels=caption_channels,
    )
    init_pixart_weights(model, caption_embed_std)
    return model


def init_pixart_weights(model: PixArtTransformer2DModel, caption_embed_std: float = 0.02) -> None:
    """PixArt's initialisation (PixArt.py ``initialize_weights``): xavier linears,
    N(0, 0.02) for the timestep and caption MLPs, zero cross-attention output and final linear."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    proj = model.pos_embed.proj
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    emb = model.adaln_single.emb.timestep_embedder
    for layer in (emb.linear_1, emb.linear_2, model.adaln_single.linear):
        nn.init.normal_(layer.weight, std=0.02)
    init_caption_projection(model, caption_embed_std)
    for block in model.transformer_blocks:
        nn.init.zeros_(block.attn2.to_out[0].weight)
        nn.init.zeros_(block.attn2.to_out[0].bias)
    nn.init.zeros_(model.proj_out.weight)
    nn.init.zeros_(model.proj_out.bias)


def init_caption_projection(model: PixArtTransformer2DModel, std: float) -> None:
    """N(0, std) caption MLP (PixArt: 0.02, sized for 4096-wide T5-XXL features; narrow demo
    encoders need a larger std for the caption to reach the cross-attention at a useful scale)."""
    for layer in (model.caption_projection.linear_1, model.caption_projection.linear_2):
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)
