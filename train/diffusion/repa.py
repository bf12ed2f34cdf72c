"""REPA: representation alignment of an early block with a frozen vision encoder (``objective.repa``).

Yu et al., "Representation Alignment for Generation: Training Diffusion Transformers Is Easier Than
You Think", ICLR 2025; official code https://github.com/sihyun-yu/REPA (``loss.py``, ``models/sit.py``):

* a projector, a 3-layer MLP with SiLU (hidden -> projector_dim -> projector_dim -> encoder width, xavier
  init), reads the tokens after block ``block`` (1-based: 8 of SiT-XL's 28);
* the loss is the negative cosine similarity of each projected token with the encoder's patch feature
  at that token, averaged over tokens, then over the batch (``loss.py`` sums the per-sample token means
  and divides by the batch; with one encoder that is this mean); it enters the total loss times
  ``weight`` (the paper's lambda 0.5).

The encoder (DINOv2-B at 224 px: 16 x 16 patch tokens, one per DiT token at 256 px) is frozen, so its
features are computed once, in the cache pass (``data/repa_features.py``), and the trainer never loads
it.  Where the encoder's grid differs from the DiT's, the features are resized to the DiT's token grid
(bilinear, per channel) before the comparison.

The projector is a training-only submodule of the transformer, ``repa_projector``: accelerate's DDP and
FSDP's root unit (``train/training/fsdp.py``) cover it with the model, AdamW and the checkpoints hold
it, so a resume restores it exactly.  It is left out of the EMA, of ``final/`` and so of exports and of
the next stage's ``init_from`` (:func:`without_projector`): inference never uses it, and a stage that
sets ``objective.repa`` starts its projector afresh (the handoff resets it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from tristage.train.diffusion.config import PROJECTOR, RepaConfig


class Projector(nn.Sequential):
    """REPA's projector (``models/sit.py`` build_mlp): Linear, SiLU, Linear, SiLU, Linear; xavier init."""

    def __init__(self, hidden: int, projector_dim: int, out: int):
        super().__init__(
            nn.Linear(hidden, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, out),
        )
        for layer in (self[0], self[2], self[4]):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)


def alignment_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample REPA loss (B,): minus the cosine similarity of (B, N, D) ``projected`` and ``target``
    tokens, averaged over the tokens.  Computed in at least float32."""
    dtype = torch.promote_types(projected.dtype, torch.float32)
    z_tilde = F.normalize(projected.to(dtype), dim=-1)
    z = F.normalize(target.to(dtype), dim=-1)
    return -(z * z_tilde).sum(dim=-1).mean(dim=-1)  # (B,)


def target_tokens(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Cached (B, h, w, D) encoder patch features -> (B, gh * gw, D) on the DiT's (gh, gw) token grid,
    resized (bilinear; antialiased when shrinking) where the grids differ.  Row-major, as the tokens."""
    if tuple(features.shape[1:3]) != tuple(grid):
        chw = features.permute(0, 3, 1, 2).float()  # (B, D, h, w)
        shrink = grid[0] < chw.shape[-2] or grid[1] < chw.shape[-1]
        chw = F.interpolate(chw, size=grid, mode="bilinear", align_corners=False, antialias=shrink)
        features = chw.permute(0, 2, 3, 1)  # (B, gh, gw, D)
    return features.flatten(1, 2)  # (B, N, D)


class RepaTap:
    """Projects the aligned block's output during a training forward (a forward hook on that block), for
    the objective to take; eval-mode forwards (validation, sampling) pass it by."""

    def __init__(self, model: nn.Module, block: int):
        self.projector: Projector = getattr(model, PROJECTOR)
        self.patch = model.config.patch_size
        self.projected: torch.Tensor | None = None
        model.transformer_blocks[block - 1].register_forward_hook(self._capture)

    def _capture(self, module, args, output: torch.Tensor) -> None:
        if module.training:
            self.projected = self.projector(output)  # (B, N or K, encoder width)

    def take(self) -> torch.Tensor:
        """The last training forward's projected tokens (each is taken once)."""
        if self.projected is None:
            raise RuntimeError("objective.repa: the aligned block did not run in training mode")
        projected, self.projected = self.projected, None
        return projected


def attach(model: nn.Module, cfg: RepaConfig | None, encoder_width: int) -> RepaTap | None:
    """Give ``model`` its projector and the tap on the aligned block (None: REPA off)."""
    if cfg is None:
        return None
    depth = len(model.transformer_blocks)
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    setattr(model, PROJECTOR, Projector(hidden, cfg.projector_dim, encoder_width))
    return RepaTap(model, cfg.block_for(depth))


@contextmanager
def without_projector(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with its REPA projector detached for the duration (its state dict, parameters and
    ``save_pretrained`` are the plain transformer's); a no-op without one."""
    projector = model._modules.pop(PROJECTOR, None)
    try:
        yield model
    finally:
        if projector is not None:
            model._modules[PROJECTOR] = projector
