"""Cached T5 storage: plain casts and per-token-scaled fp8 (half the bytes of bf16)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load, save

from tristage.data.config import DataConfig, EncoderConfig
from tristage.data.text_codec import FP8_MAX, decode_into, decoded_dtype, encode_text_feature


def decode_text_feature(stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """Stored tensors -> a new (L, C) feature, as the loader decodes each row into its batch."""
    out = torch.empty(stored["t5"].shape, dtype=decoded_dtype(stored))
    decode_into(stored, out)
    return out


def test_fp8_round_trip_is_close_and_half_the_bytes():
    torch.manual_seed(0)
    x = torch.randn(80, 4096) * torch.logspace(-2, 2, 80)[:, None]  # rows of very different scales
    stored = encode_text_feature(x, "float8_e4m3fn")
    assert stored["t5"].dtype == torch.float8_e4m3fn and stored["t5_scale"].shape == (80, 1)
    assert stored["t5"].float().abs().max() <= FP8_MAX
    back = decode_text_feature(load(save(stored)))  # through safetensors bytes, as the loader reads
    rel = (back - x).norm(dim=1) / x.norm(dim=1)
    assert rel.max() < 0.05  # per-token scaling keeps every row's relative error small
    bf16 = len(save(encode_text_feature(x, "bfloat16")))
    assert len(save(stored)) < 0.51 * bf16


def test_casts_and_unknown_name():
    x = torch.randn(3, 8)
    assert decode_text_feature(encode_text_feature(x, "bfloat16")).dtype == torch.bfloat16
    torch.testing.assert_close(decode_text_feature(encode_text_feature(x, "float32")), x)
    with pytest.raises(ValueError, match="text_feature_dtype"):
        encode_text_feature(x, "int4")


def test_fingerprint_tracks_text_dtype():
    from tristage.data.fingerprint import fingerprint

    data, enc = DataConfig(), EncoderConfig(text_encoder="/nonexistent/t5")
    a = fingerprint(data, enc)
    enc.text_feature_dtype = "float8_e4m3fn"
    assert fingerprint(data, enc)["text_feature_dtype"] != a["text_feature_dtype"]
