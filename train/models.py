"""Model registry: sizes -> diffusers PixArt transformers and the stage-1 class-conditional DiT.

Stage 1 trains a DiT exactly as the DiT paper defines it (Peebles & Xie 2023,
https://github.com/facebookresearch/DiT/blob/main/models.py): ONE shared
timestep embedder and ONE shared class embedder feed a per-block adaLN-Zero
modulation.  diffusers' ``DiTTransformer2DModel`` instead keeps a copy of both
embedders inside every block, so we train our own module (same sub-module names
as diffusers where they exist) and convert to diffusers' layout only on export.

Stages 2 and 3 train diffusers' ``PixArtTransformer2DModel`` directly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers import ModelMixin, PixArtTransformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.embeddings import PatchEmbed, TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn


@dataclass(frozen=True)
class Size:
    """Transformer shape of a named size."""

    num_layers: int  # transformer blocks
    num_attention_heads: int  # heads per attention layer
    attention_head_dim: int  # channels per head; hidden = heads * head_dim
    patch_size: int  # latent pixels per token side


# DiT paper Table 1 (S/B/L/XL), PixArt-XL/2 = DiT-XL/2 shape; "tiny" for tests, "demo" for the CPU demo.
SIZES: dict[str, Size] = {
    "XL/2": Size(28, 16, 72, 2),
    "L/2": Size(24, 16, 64, 2),
    "B/2": Size(12, 12, 64, 2),
    "S/2": Size(12, 6, 64, 2),
    "demo": Size(6, 4, 32, 2),
    "tiny": Size(2, 2, 16, 2),
}


def size_of(name: str) -> Size:
    """Look up a size, with an error that lists the known ones."""
    if name not in SIZES:
        raise ValueError(f"unknown model size {name!r}; known: {', '.join(SIZES)}")
    return SIZES[name]


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block (DiT §3.2); key names follow diffusers' BasicTransformerBlock."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn1 = Attention(query_dim=dim, heads=heads, dim_head=head_dim, bias=True, out_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, mult=mlp_ratio, activation_fn="gelu-approximate")
        self.adaln = nn.Linear(dim, 6 * dim)  # W_i, b_i of the paper's S_i = W_i SiLU(c) + b_i

    def forward(self, x: torch.Tensor, c_silu: torch.Tensor) -> torch.Tensor:
        mod = self.adaln(c_silu)[:, None]  # (B, 1, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = x + gate_msa * self.attn1(self.norm1(x) * (1 + scale_msa) + shift_msa)  # (B, N, D)
        return x + gate_mlp * self.ff(self.norm2(x) * (1 + scale_mlp) + shift_mlp)  # (B, N, D)


class ClassConditionalDiT(ModelMixin, ConfigMixin):
    """DiT with shared timestep/class embedders, adaLN-Zero blocks, learned sigma.

    ``num_classes`` rows plus one null row (id ``num_classes``) for classifier-free
    guidance, as ImageNet's 1000 + 1; diffusers' ``DiTPipeline`` hard-codes 1000
    as the null id, so keep ``num_classes=1000`` for anything you will export.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        out_channels: int = 8,
        num_layers: int = 28,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        num_classes: int = 1000,
        freq_shift: int = 1,
        class_embed_std: float = 0.02,
    ):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        self.pos_embed = PatchEmbed(sample_size, sample_size, patch_size, in_channels, dim)
        # diffusers' DiT uses downscale_freq_shift=1; the official DiT checkpoint was trained with 0.
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=freq_shift)
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.class_embedder = nn.Embedding(num_classes + 1, dim)  # last row = null class
        self.transformer_blocks = nn.ModuleList(
            DiTBlock(dim, num_attention_heads, attention_head_dim) for _ in range(num_layers)
        )
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.proj_out_1 = nn.Linear(dim, 2 * dim)  # final adaLN: shift, scale
        self.proj_out_2 = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.gradient_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT initialisation: xavier linears, N(0, 0.02) embedders, zeroed adaLN and output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        proj = self.pos_embed.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.class_embedder.weight, std=self.config.class_embed_std)
        nn.init.normal_(self.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.timestep_embedder.linear_2.weight, std=0.02)
        for block in self.transformer_blocks:
            nn.init.zeros_(block.adaln.weight)
            nn.init.zeros_(block.adaln.bias)
        for layer in (self.proj_out_1, self.proj_out_2):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def condition(
        self, timestep: torch.Tensor, class_labels: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """c = e_t + e_y, the shared conditioning vector."""
        t_emb = self.timestep_embedder(self.time_proj(timestep).to(dtype))  # (B, D)
        return t_emb + self.class_embedder(class_labels).to(dtype)  # (B, D)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        class_labels: torch.Tensor,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        height, width = hidden_states.shape[-2:]
        x = self.pos_embed(hidden_states)  # (B, N, D)
        timestep = timestep.expand(x.shape[0]) if timestep.ndim == 1 and timestep.numel() == 1 else timestep
        c_silu = F.silu(self.condition(timestep, class_labels, x.dtype))  # (B, D)
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, c_silu)
            else:
                x = block(x, c_silu)
        shift, scale = self.proj_out_1(c_silu).chunk(2, dim=1)  # (B, D) each
        x = self.norm_out(x) * (1 + scale[:, None]) + shift[:, None]
        out = unpatchify(self.proj_out_2(x), height, width, self.config.patch_size)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def unpatchify(x: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """(B, N, p*p*C) tokens -> (B, C, H, W) latents, in diffusers' (h, w, p, q, c) order."""
    h, w = height // patch, width // patch
    x = x.reshape(x.shape[0], h, w, patch, patch, -1)  # (B, h, w, p, p, C)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], -1, h * patch, w * patch)


def build_dit(
    size: Size,
    sample_size: int,
    in_channels: int,
    out_channels: int,
    num_classes: int,
    class_embed_std: float = 0.02,
) -> ClassConditionalDiT:
    """A freshly initialised stage-1 DiT."""
    return ClassConditionalDiT(
        sample_size=sample_size,
        patch_size=size.patch_size,
        in_channels=in_channels,
        out_channels=out_channels,
        num_layers=size.num_layers,
        num_attention_heads=size.num_attention_heads,
        attention_head_dim=size.attention_head_dim,
        num_classes=num_classes,
        class_embed_std=class_embed_std,
    )


def build_pixart(
    size: Size,
    sample_size: int,
    in_channels: int,
    out_channels: int,
    caption_channels: int,
    interpolation_scale: float,
    use_additional_conditions: bool,
    caption_embed_std: float = 0.02,
) -> PixArtTransformer2DModel:
    """A freshly initialised PixArt transformer (adaLN-single, cross-attention to T5)."""
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


def dit_inputs(batch: dict) -> dict:
    """Model keyword arguments of a stage-1 batch."""
    return {"class_labels": batch["labels"]}


def pixart_inputs(batch: dict) -> dict:
    """Model keyword arguments of a text batch (micro-conditions are ignored unless the model is MS)."""
    return {
        "encoder_hidden_states": batch["text"].float(),  # the loader keeps the cached width (bf16)
        "encoder_attention_mask": batch["text_mask"],
        "added_cond_kwargs": {"resolution": batch["resolution"], "aspect_ratio": batch["aspect_ratio"]},
    }


@dataclass(frozen=True)
class Family:
    """How the trainer builds, feeds and reloads one model family."""

    model_class: type  # diffusers-style class with from_pretrained / save_pretrained
    build: object  # (ModelConfig, out_channels) -> model
    inputs: object  # batch -> model keyword arguments


def _build_dit(cfg, out_channels: int) -> ClassConditionalDiT:
    return build_dit(
        size_of(cfg.size),
        cfg.sample_size,
        cfg.in_channels,
        out_channels,
        cfg.num_classes,
        cfg.class_embed_std,
    )


def _build_pixart(cfg, out_channels: int) -> PixArtTransformer2DModel:
    return build_pixart(
        size_of(cfg.size),
        cfg.sample_size,
        cfg.in_channels,
        out_channels,
        cfg.caption_channels,
        cfg.interpolation_scale,
        cfg.use_additional_conditions,
        cfg.caption_embed_std,
    )


FAMILIES: dict[str, Family] = {
    "dit": Family(ClassConditionalDiT, _build_dit, dit_inputs),
    "pixart": Family(PixArtTransformer2DModel, _build_pixart, pixart_inputs),
}


def family_of(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"model.family: unknown family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


# -- speed and memory options (model.attention_backend, model.checkpoint_blocks, train.compile) --------------


def _use_sdpa(model: nn.Module) -> None:
    """PyTorch's fused scaled_dot_product_attention (diffusers' default processor)."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor2_0())


def _use_xformers(model: nn.Module) -> None:
    """xformers' memory-efficient attention; diffusers imports xformers only here, on request.
    ``train.config.check_train_options`` has already checked that the package is installed."""
    model.enable_xformers_memory_efficient_attention()


ATTENTION_PROCESSORS: dict[str, Callable[[nn.Module], None]] = {"sdpa": _use_sdpa, "xformers": _use_xformers}


def set_attention_backend(model: nn.Module, backend: str) -> None:
    """Put every diffusers ``Attention`` of ``model`` on ``backend`` (a key of ATTENTION_PROCESSORS)."""
    ATTENTION_PROCESSORS[backend](model)


def _checkpointed(forward: Callable, *args, **kwargs):
    """Run ``forward`` under non-reentrant activation checkpointing when gradients are being recorded."""
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def enable_checkpointing(model: nn.Module, blocks: int = -1) -> int:
    """Recompute the activations of the first ``blocks`` transformer blocks in backward (-1: all of them).

    diffusers' ``gradient_checkpointing`` flag is one switch for all of PixArt's blocks, so each chosen
    block's ``forward`` is wrapped instead -- one mechanism for both families; parameter names and
    state dicts are untouched. Returns how many blocks are checkpointed."""
    chosen = list(model.transformer_blocks)
    chosen = chosen if blocks < 0 else chosen[:blocks]
    for block in chosen:
        block.forward = functools.partial(_checkpointed, block.forward)
    return len(chosen)


def compile_blocks(model: nn.Module) -> None:
    """``torch.compile`` each transformer block in place (``nn.Module.compile``): one graph per block,
    reused by every block of the same shape, instead of one large graph for the whole model.
    Compilation happens lazily, on the first forward."""
    for block in model.transformer_blocks:
        block.compile()


def build_for_training(cfg, out_channels: int, compile: bool = False) -> nn.Module:
    """A fresh model of ``cfg`` (a ModelConfig) with its attention backend, checkpointing and, with
    ``compile``, per-block ``torch.compile`` applied -- what the Trainer and ``bench train`` run."""
    model = family_of(cfg.family).build(cfg, out_channels)
    set_attention_backend(model, cfg.attention_backend)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model, cfg.checkpoint_blocks)
    if compile:
        compile_blocks(model)
    return model
