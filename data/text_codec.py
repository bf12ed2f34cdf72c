"""How cached T5 features are stored: a plain cast, or fp8 with a per-token scale.

A 120-token bf16 T5-XXL feature is ~1 MB; at 600 images/s per GPU that is the
cache's bandwidth bill.  ``float8_e4m3fn`` halves it: each token row is divided by
its absolute maximum / 448 (the format's largest finite value) before the cast, and
the per-token scale is stored beside it in float32.  The loader multiplies back, into bfloat16.
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


def decoded_dtype(stored: dict[str, torch.Tensor]) -> torch.dtype:
    """dtype the loader hands out: the stored one, or bfloat16 for scaled fp8.

    Batches stay in the cached width on the host (half the bytes of float32 to copy and
    to move to the GPU); the model's first linear layer casts them on the device.
    """
    return torch.bfloat16 if "t5_scale" in stored else stored["t5"].dtype


def decode_into(stored: dict[str, torch.Tensor], out: torch.Tensor) -> None:
    """Write the (L, C) feature into ``out`` (typically a row of a batch): one converting copy."""
    out.copy_(stored["t5"])
    if "t5_scale" in stored:
        out.mul_(stored["t5_scale"])
