"""What the sample metrics measure images with: an image model for FID, a CLIP for the CLIP score.

* ``validation.fid_feature_extractor``: any transformers image model, through ``AutoModel`` /
  ``AutoImageProcessor.from_pretrained`` (a folder or hub id).  Its pooled output is the feature: DINOv2's
  normalised CLS token (FD-DINOv2, Stein et al. 2023, "Exposing flaws of generative model evaluation
  metrics", arXiv:2306.04675), or a CLIP's projected image embedding.
* ``validation.clip_model``: a CLIP folder or hub id for torchmetrics' ``CLIPScore``
  (``evaluate.clip_metric``).
* Any other name in ``validation.metrics`` is an image scorer found by name (``scorers.py``, the entry
  point group ``tristage.image_scorers``): the demo registers its adherence classifier as ``adherence``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tristage.errors import ConfigError
from tristage.train.preflight import looks_local

BUILT_IN = ("clip_score", "fid")  # validation.metrics names computed here; others are image scorers


class ImageFeatures(torch.nn.Module):
    """(B, 3, H, W) uint8 images -> (B, D) features of a transformers image model."""

    def __init__(self, name_or_path: str):
        super().__init__()
        from transformers import AutoImageProcessor, AutoModel

        require_model("validation.fid_feature_extractor", name_or_path)
        try:
            self.processor = AutoImageProcessor.from_pretrained(name_or_path)
            self.model = AutoModel.from_pretrained(name_or_path).eval().requires_grad_(False)
        except (OSError, ValueError) as err:  # not found, not a model folder, no hub access
            reason = str(err).splitlines()[0]
            raise ConfigError(
                f"key 'validation.fid_feature_extractor': cannot load {name_or_path}: {reason}"
            ) from None

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        pixels = self.processor(images=list(images.cpu()), return_tensors="pt").pixel_values.to(device)
        if hasattr(self.model, "get_image_features"):  # a CLIP: its projected image embedding
            out = self.model.get_image_features(pixel_values=pixels)
            return (out if isinstance(out, torch.Tensor) else out.pooler_output).float()
        out = self.model(pixel_values=pixels)
        pooled = out.pooler_output if out.pooler_output is not None else out.last_hidden_state[:, 0]
        return pooled.flatten(1).float()  # (B, D)


def clip_scorer(name_or_path: str):
    """torchmetrics' ``CLIPScore`` around ``validation.clip_model``, loaded now (a start-up check)."""
    from tristage.train.inference.evaluate import clip_metric

    require_model("validation.clip_model", name_or_path)
    try:
        return clip_metric(name_or_path, check_local=False)
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0]
        raise ConfigError(f"key 'validation.clip_model': cannot load {name_or_path}: {reason}") from None


def require_model(key: str, name_or_path: str) -> None:
    """A local path that is not there is named as such (a hub id is left to ``from_pretrained``)."""
    if looks_local(name_or_path) and not Path(name_or_path).exists():
        raise ConfigError(f"key '{key}': path does not exist: {name_or_path}")
