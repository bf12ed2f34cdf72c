"""Tiny image models for the sample metrics (random weights, saved with ``save_pretrained`` and loaded back
through the ``from_pretrained`` path a hub id takes): a DINOv2 for FID features, a CLIP for the CLIP score."""

from __future__ import annotations

from pathlib import Path

import torch

from .unit.test_eval import tiny_clip

__all__ = ["tiny_clip", "tiny_dinov2"]


def tiny_dinov2(folder: Path) -> Path:
    """A random 2-layer DINOv2 at 32 px (patch 8) with its image processor, as a hub folder holds them."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    Dinov2Model(config).save_pretrained(folder)
    processor = BitImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    processor.save_pretrained(folder)
    return folder
