"""Training FLOPs per image of the transformer, for TFLOP/s and MFU.

Conventions: a multiply-add is 2 FLOPs; one training step costs 3 x the forward (the backward computes
gradients with respect to activations and to weights, each about one forward).  Every matrix product is
counted -- the linears, the patch-embedding convolution and both attention products -- and nothing
elementwise (norms, activations, softmax, adaLN modulation, the loss), which is at most a few percent at
these widths.  The 3x rule slightly over-counts the layers whose input needs no gradient (the patch
embedding and the first caption / timestep linears have no input gradient: 2x, not 3x); on the tiny test
model that is < 1 % of the total (tests/test_flops.py checks the formula against
``torch.utils.flop_counter.FlopCounterMode``).  PixArt-MS micro-condition embedders are left out.

Per block, with N image tokens, L text tokens and width D (MLP ratio 4), forward:

* self-attention projections q, k, v, out:   2 N (4 D^2)
* self-attention scores QK^T and values AV:  2 * 2 N^2 D
* cross-attention q and out (image tokens):  2 N (2 D^2)                          (PixArt)
* cross-attention k and v (text tokens):     2 L (2 D^2)                          (PixArt)
* cross-attention scores and values:         2 * 2 N L D                          (PixArt)
* MLP D -> 4D -> D:                          2 N (2 * 4 D^2)
* adaLN-Zero linear D -> 6D, per image:      2 D (6 D)                            (DiT; PixArt adds a table)

Once per image: patch embedding 2 N (p^2 C_in) D, timestep MLP 2 (256 D + D^2), final linear
2 N D (p^2 C_out); PixArt: caption MLP 2 L (C_text D + D^2) and the global adaLN-single linear 2 D (6 D);
DiT: the final adaLN linear 2 D (2 D).
"""

from __future__ import annotations

from collections.abc import Callable

from tristage.train.models.sizes import size_of

TIMESTEP_CHANNELS = 256  # sinusoidal timestep features fed to the timestep MLP (DiT and PixArt)


def _pixart_terms(d: int, n: int, text: int, caption_channels: int) -> tuple[float, float]:
    """(per-block, per-image) forward FLOPs PixArt adds: cross-attention; caption MLP, adaLN-single."""
    cross = 2 * n * 2 * d * d + 2 * text * 2 * d * d + 2 * 2 * n * text * d
    once = 2 * text * (caption_channels * d + d * d) + 2 * d * 6 * d
    return cross, once


def _dit_terms(d: int, n: int, text: int, caption_channels: int) -> tuple[float, float]:
    """(per-block, per-image) forward FLOPs the class-conditional DiT adds: adaLN-Zero linears."""
    return 2 * d * 6 * d, 2 * d * 2 * d


FAMILY_TERMS: dict[str, Callable[[int, int, int, int], tuple[float, float]]] = {
    "pixart": _pixart_terms,
    "dit": _dit_terms,
}


def forward_flops_per_image(model, tokens: int, text_tokens: int, out_channels: int | None = None) -> float:
    """Forward FLOPs of one image through the transformer described by ``model`` (a ModelConfig).

    ``tokens``: image tokens N = (latent side / patch)^2; ``text_tokens``: caption length L (0 for DiT);
    ``out_channels``: defaults to 2 x in_channels (learned sigma)."""
    size = size_of(model.size)
    d, n, p = size.num_attention_heads * size.attention_head_dim, tokens, size.patch_size
    c_out = out_channels if out_channels is not None else 2 * model.in_channels
    block = 2 * n * 4 * d * d + 2 * 2 * n * n * d + 2 * n * 2 * 4 * d * d
    extra_block, extra_once = FAMILY_TERMS[model.family](d, n, text_tokens, model.caption_channels)
    once = 2 * n * p * p * model.in_channels * d  # patch embedding
    once += 2 * (TIMESTEP_CHANNELS * d + d * d)  # timestep MLP
    once += 2 * n * d * p * p * c_out  # final linear
    return size.num_layers * (block + extra_block) + once + extra_once


def train_flops_per_image(model, tokens: int, text_tokens: int, out_channels: int | None = None) -> float:
    """Training FLOPs of one image: 3 x :func:`forward_flops_per_image` (forward + backward)."""
    return 3.0 * forward_flops_per_image(model, tokens, text_tokens, out_channels)


def image_tokens(resolution: int, patch_size: int, vae_factor: int = 8) -> int:
    """Image tokens of a square ``resolution`` px image: (resolution / 8 / patch)^2."""
    side = resolution // vae_factor // patch_size
    return side * side
