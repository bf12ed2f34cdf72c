"""The stage-1 class-conditional DiT.

Stage 1 trains a DiT exactly as the DiT paper defines it (Peebles & Xie 2023,
https://github.com/facebookresearch/DiT/blob/main/models.py): ONE shared
timestep embedder and ONE shared class embedder feed a per-block adaLN-Zero
modulation.  diffusers' ``DiTTransformer2DModel`` instead keeps a copy of both
embedders inside every block, so we train our own module (same sub-module names
as diffusers where they exist) and convert to diffusers' layout only on export.

Stages 2 and 3 train diffusers' ``PixArtTransformer2DModel`` directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import PatchEmbed, TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from tristage.train.models.sizes import Size


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
    freq_shift: int = 1,
) -> ClassConditionalDiT:
    """A freshly initialised stage-1 DiT (``freq_shift``: 1 diffusers' sinusoid, 0 the official DiT's)."""
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
        freq_shift=freq_shift,
    )
