"""The null caption caption dropout trains with (``data.null_caption``), and where it is kept.

* ``t5_empty`` -- T5("") from the feature cache, as diffusers' PixArt pipeline uses for its default
  negative prompt: an exported pipeline then samples with exactly the null the model was trained on.
* ``buffer`` -- the official PixArt-alpha null: a fixed random (tokens, caption_channels) buffer
  (PixArt_blocks.py ``CaptionEmbedder.y_embedding``, drawn N(0, 1) / sqrt(channels) and never trained).
  A dropped caption of L tokens becomes rows 0..L-1 of the buffer under the caption's own mask, as the
  official ``token_drop`` + mask does. It comes from the ``init_from`` source when that has one (an
  official ``.pth``, or a ``final/`` of a stage that trained with it), else it is drawn from
  ``train.seed``; it is kept in ``run.dir`` (resume) and in ``final/`` (the next stage, export).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tristage.errors import ConfigError

BUFFER_FILE = "null_caption_buffer.safetensors"
_KEY = "y_embedding"  # the official name


def draw_buffer(tokens: int, channels: int, seed: int) -> torch.Tensor:
    """A fresh buffer the official way: N(0, 1) / sqrt(channels), (tokens, channels) float32."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, channels, generator=g) / channels**0.5


def load_buffer(folder: Path) -> torch.Tensor | None:
    path = Path(folder) / BUFFER_FILE
    return load_file(path)[_KEY] if path.is_file() else None


def save_buffer(buffer: torch.Tensor, folder: Path) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    save_file({_KEY: buffer.detach().float().cpu().contiguous()}, Path(folder) / BUFFER_FILE)


def resolve_buffer(
    run_dir: Path, source: torch.Tensor | None, tokens: int, channels: int, seed: int
) -> torch.Tensor:
    """The run's buffer: the one it already keeps (a resumed run), else the source's, else a fresh one.

    It must cover ``tokens`` (``encoders.max_tokens``) rows of ``channels`` (``model.caption_channels``)."""
    buffer = load_buffer(run_dir)
    buffer = buffer if buffer is not None else source
    buffer = buffer if buffer is not None else draw_buffer(tokens, channels, seed)
    if buffer.ndim != 2 or buffer.shape[0] < tokens or buffer.shape[1] != channels:
        raise ConfigError(
            f"data.null_caption: buffer: the null-caption buffer has shape {tuple(buffer.shape)}, but this "
            f"run needs at least {tokens} tokens (encoders.max_tokens) of {channels} channels"
        )
    return buffer.float()
