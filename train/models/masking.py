"""Token masking: train on a share of each image's patch tokens, so a step costs a share of the FLOPs.

* **random** (MaskDiT: Zheng et al., "Fast Training of Diffusion Models with Masked Transformers", TMLR
  2024, https://github.com/Anima-Lab/MaskDiT): a random ``ratio`` of every image's tokens leaves the
  sequence right after the patch embedding; the transformer runs on the rest.
* **deferred** (MicroDiT: Sehwag et al., "Stretching Each Dollar", CVPR 2025, arXiv:2407.15811): a
  patch-mixer sees every token before the drop, so the kept tokens carry some of the dropped ones'
  content.  MicroDiT's mixer is a separate small transformer that stays in the model at inference; here
  the mixer is the model's own first ``mixer_blocks`` transformer blocks, so the exported model (and
  sampling) is the plain PixArt / DiT one.

How, without forking diffusers: the model keeps its own forward, and three hooks reshape its sequence.

* a forward pre-hook on the transformer takes the ``keep_tokens`` keyword, (B, K) token indices, out of
  the call (``model(x_t, timestep=t, keep_tokens=index, ...)``);
* a forward hook on the patch embedding (random) or on the last mixer block (deferred) gathers the kept
  tokens: the position embedding is added before, so each kept token keeps its own position;
* a forward hook on the final per-token linear scatters its (B, K, p*p*C) output back into the full
  (B, N, p*p*C) grid, zeros at dropped tokens, so the model's own unpatchify returns (B, C, H, W).

The objective takes the loss on the kept tokens only (``Objective.loss(kept=...)``).  Without
``keep_tokens`` every hook passes its input through: validation, sampling and export see the plain model.
Which tokens are kept is drawn per global batch from the loader's per-batch seed, then sliced to this
process's rows (:func:`draw_kept`): the same draw on any number of processes, and on a resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tristage.data.features import NoiseDraw
from tristage.train.config import MaskConfig

# An LCG step (Knuth's MMIX constants) turns the loader's per-batch seed into the mask's, a stream of its
# own: the latent and noise draws (data/features.py sample_latents) use the seed itself.
_MUL, _ADD = 6364136223846793005, 1442695040888963407


@dataclass(frozen=True)
class KeptTokens:
    """The tokens each image of a batch keeps: indices into the (h, w) token grid, row-major."""

    index: torch.Tensor  # (B, K) int64, ascending
    grid: tuple[int, int]  # (h, w) tokens of the full image
    patch: int  # latent pixels per token side

    def gather(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, K, D): the kept rows."""
        return tokens.gather(1, self.index[..., None].expand(-1, -1, tokens.shape[-1]))

    def pixels(self) -> torch.Tensor:
        """(B, 1, H, W) bool latent-pixel mask, True where the pixel's token is kept."""
        (h, w), p = self.grid, self.patch
        tokens = torch.zeros(self.index.shape[0], h * w, dtype=torch.bool, device=self.index.device)
        tokens.scatter_(1, self.index, True)  # (B, N)
        grid = tokens.view(-1, 1, h, w)
        return grid.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)  # (B, 1, H, W)


def kept_count(tokens: int, ratio: float) -> int:
    """Tokens kept of ``tokens`` at ``ratio`` dropped (at least one)."""
    return max(1, round(tokens * (1.0 - ratio)))


def draw_kept(
    draw: NoiseDraw, grid: tuple[int, int], patch: int, ratio: float, device: torch.device
) -> KeptTokens:
    """The kept tokens of this process's rows of a global batch (MaskDiT: the lowest of uniform scores).

    Drawn for the whole global batch from the batch's own seed, then sliced like the latents' noise, so
    the draw does not depend on the process count and a resumed run repeats it."""
    n = grid[0] * grid[1]
    g = torch.Generator(device).manual_seed((draw.seed * _MUL + _ADD) % 2**63)
    scores = torch.rand(draw.global_batch, n, generator=g, device=device)[draw.lo : draw.hi]  # (b, N)
    if draw.skipped:  # rows dropped as damaged: the same draws as without them, less those rows
        scores = scores[[i for i in range(draw.hi - draw.lo) if i not in draw.skipped]]
    index = scores.argsort(dim=1)[:, : kept_count(n, ratio)].sort(dim=1).values  # (b, K)
    return KeptTokens(index, grid, patch)


class TokenMasking:
    """The hooks that run a transformer on its kept tokens (see the module docstring)."""

    def __init__(self, model: nn.Module, gather_after: nn.Module, head: nn.Module):
        self.keep: torch.Tensor | None = None  # (B, K) during a masked forward, else None
        self.tokens = 0  # N of the current forward, seen at the gather
        model.register_forward_pre_hook(self._take, with_kwargs=True)
        model.register_forward_hook(self._clear, always_call=True)
        gather_after.register_forward_hook(self._gather)
        head.register_forward_hook(self._scatter)

    def _take(self, module, args, kwargs):
        self.keep = kwargs.pop("keep_tokens", None)
        return args, kwargs

    def _clear(self, module, args, output) -> None:
        self.keep = None

    def _gather(self, module, args, output: torch.Tensor) -> torch.Tensor | None:
        if self.keep is None:
            return None
        self.tokens = output.shape[1]  # (B, N, D)
        return output.gather(1, self._expanded(output.shape[-1]))  # (B, K, D)

    def _scatter(self, module, args, output: torch.Tensor) -> torch.Tensor | None:
        if self.keep is None:
            return None
        full = output.new_zeros(output.shape[0], self.tokens, output.shape[-1])  # (B, N, p*p*C)
        return full.scatter(1, self._expanded(output.shape[-1]), output)

    def _expanded(self, width: int) -> torch.Tensor:
        return self.keep[..., None].expand(-1, -1, width)  # (B, K, width)


def install(model: nn.Module, cfg: MaskConfig | None, head: str) -> TokenMasking | None:
    """Hook ``model`` for ``cfg`` (None: no masking, no hooks); ``head`` names its final per-token linear
    (the family's ``token_head``)."""
    if cfg is None:
        return None
    blocks = model.transformer_blocks
    gather_after = blocks[cfg.mixer_blocks - 1] if cfg.mode == "deferred" else model.pos_embed
    return TokenMasking(model, gather_after, getattr(model, head))
