"""REPA targets in the cache pass: a frozen vision encoder's patch features, stored per sample.

REPA (Yu et al., ICLR 2025, https://github.com/sihyun-yu/REPA) aligns an early DiT block with a frozen
encoder's patch tokens.  Every peer framework runs that encoder (DINOv2) at every training step; it is
frozen, so here it runs once, beside the VAE, and each sample's features are stored with its latents
(``KEY.feat.safetensors`` tensor ``repa``, (h, w, D) in ``RepaFeatures.dtype``), fingerprinted
(``data/fingerprint.py``: the encoder's weights, resolution and dtype) and checksummed like the rest.

Preprocessing follows the official ``train.py`` (``preprocess_raw_image``, DINOv2 branch): the image
(the same bucketed crop the VAE encodes) in [0, 1], normalised with the encoder's own mean and std (its
``preprocessor_config.json``), resized bicubic so that an image of ``data.resolution`` becomes
``resolution`` pixels a side (REPA: 224 * resolution // 256); other buckets keep their aspect, each side
a multiple of the encoder's patch.  The features are the patch tokens of the last hidden state, after
the encoder's final LayerNorm (DINOv2's ``x_norm_patchtokens``): the last h * w tokens, behind the CLS
and any register tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TENSOR = "repa"  # the sample tensor holding the features
WIDTH = "repa_width"  # the manifest field holding the encoder width (the projector's output)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class RepaFeatures:
    """Which encoder features a cache holds for REPA (from the run's ``objective.repa``)."""

    encoder: str  # hub id or folder, loaded with AutoModel.from_pretrained
    resolution: int  # encoder input side for an image of data.resolution
    dtype: str  # stored dtype: bfloat16 | float16 | float32


class RepaEncoder:
    """The frozen encoder of a cache pass: pixels -> (B, h, w, D) patch features."""

    def __init__(self, spec: RepaFeatures, base_resolution: int, device: torch.device):
        from transformers import AutoModel
        from transformers.image_processing_base import ImageProcessingMixin

        self.spec, self.base, self.device = spec, base_resolution, device
        self.model = AutoModel.from_pretrained(spec.encoder).to(device).eval().requires_grad_(False)
        processor, _ = ImageProcessingMixin.get_image_processor_dict(spec.encoder)  # no image-processor class
        self.mean = torch.tensor(processor["image_mean"], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(processor["image_std"], device=device).view(1, 3, 1, 1)
        self.patch = int(self.model.config.patch_size)
        self.width = int(self.model.config.hidden_size)
        self.dtype = DTYPES[spec.dtype]

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """Encoder input (h, w) for a bucket of (height, width) pixels: scaled by resolution / base,
        each side rounded to a multiple of the patch (at least one patch)."""
        scale = self.spec.resolution / self.base
        return tuple(max(1, round(side * scale / self.patch)) * self.patch for side in (height, width))

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, h, w, D) patch features (float32; stored in ``dtype``)."""
        x = (pixels.to(self.device, torch.float32) + 1.0) / 2.0  # [0, 1]
        size = self.input_size(*x.shape[-2:])
        if size != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        hidden = self.model(pixel_values=x).last_hidden_state  # (B, 1 + registers + h * w, D)
        h, w = size[0] // self.patch, size[1] // self.patch
        return hidden[:, -h * w :].reshape(x.shape[0], h, w, -1).float()
