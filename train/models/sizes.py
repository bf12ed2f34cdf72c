"""Named transformer sizes (DiT paper Table 1; PixArt-XL/2 = DiT-XL/2)."""

from __future__ import annotations

from dataclasses import dataclass


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
    "demo/4": Size(6, 4, 32, 4),
    "demo-narrow/2": Size(6, 4, 16, 2),
    "tiny": Size(2, 2, 16, 2),
}


def size_of(name: str) -> Size:
    """Look up a size, with an error that lists the known ones."""
    if name not in SIZES:
        raise ValueError(f"unknown model size {name!r}; known: {', '.join(SIZES)}")
    return SIZES[name]
