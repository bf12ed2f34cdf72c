"""How cached T5 features are stored: a plain cast, or fp8 with a per-token scale.

A 120-token bf16 T5-XXL feature is ~1 MB; at 600 images/s per GPU that is the
cache's bandwidth bill.  ``float8_e4m3fn`` halves it: each token row is divided by
its absolute maximum / 448 (the format's largest finite value) before the cast, and
the per-token scale is stored beside it in float32.  The loader multiplies back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _cast(dtype: torch.dtype) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    def encode(t5: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"t5": t5.to(dtype)}

    return encode


def _fp8(t5: torch.Tensor) -> dict[str, torch.Tensor]:
    scale = t5.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX  # (L, 1)
    return {"t5": (t5.float() / scale).to(torch.float8_e4m3fn), "t5_scale": scale}


# encoders.text_feature_dtype -> encoder of one (L, C) feature into stored tensors
TEXT_CODECS: dict[str, Callable[[torch.Tensor], dict[str, torch.Tensor]]] = {
    "bfloat16": _cast(torch.bfloat16),
    "float16": _cast(torch.float16),
    "float32": _cast(torch.float32),
    "float8_e4m3fn": _fp8,
}


def encode_text_feature(t5: torch.Tensor, dtype_name: str) -> dict[str, torch.Tensor]:
    if dtype_name not in TEXT_CODECS:
        raise ValueError(
            f"encoders.text_feature_dtype: unknown {dtype_name!r}; known: {', '.join(TEXT_CODECS)}"
        )
    return TEXT_CODECS[dtype_name](t5)


def decode_text_feature(stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """Stored tensors -> the (L, C) feature (float32 when scaled, else the stored dtype)."""
    t5 = stored["t5"]
    return t5.float() * stored["t5_scale"] if "t5_scale" in stored else t5
