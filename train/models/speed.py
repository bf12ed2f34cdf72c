"""Speed and memory options: attention backend, per-block checkpointing, per-block compile."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.utils.checkpoint
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn


def _use_sdpa(model: nn.Module) -> None:
    """PyTorch's fused scaled_dot_product_attention (diffusers' default processor)."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor2_0())


def _use_xformers(model: nn.Module) -> None:
    """xformers' memory-efficient attention; diffusers imports xformers only here, on request;
    the pre-flight ``train.preflight.check_train_paths`` has already found the package installed."""
    model.enable_xformers_memory_efficient_attention()


ATTENTION_PROCESSORS: dict[str, Callable[[nn.Module], None]] = {"sdpa": _use_sdpa, "xformers": _use_xformers}


def set_attention_backend(model: nn.Module, backend: str) -> None:
    """Put every diffusers ``Attention`` of ``model`` on ``backend`` (a key of ATTENTION_PROCESSORS)."""
    ATTENTION_PROCESSORS[backend](model)


def _checkpointed(forward: Callable, *args, **kwargs):
    """Run ``forward`` under non-reentrant activation checkpointing when gradients are being recorded."""
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def enable_checkpointing(model: nn.Module, blocks: int = -1) -> int:
    """Recompute the activations of the first ``blocks`` transformer blocks in backward (-1: all of them).

    diffusers' ``gradient_checkpointing`` flag is one switch for all of PixArt's blocks, so each chosen
    block's ``forward`` is wrapped instead -- one mechanism for both families; parameter names and
    state dicts are untouched. Returns how many blocks are checkpointed."""
    chosen = list(model.transformer_blocks)
    chosen = chosen if blocks < 0 else chosen[:blocks]
    for block in chosen:
        block.forward = functools.partial(_checkpointed, block.forward)
    return len(chosen)


def compile_blocks(model: nn.Module) -> None:
    """``torch.compile`` each transformer block in place (``nn.Module.compile``): one graph per block,
    reused by every block of the same shape, instead of one large graph for the whole model.
    Compilation happens lazily, on the first forward."""
    for block in model.transformer_blocks:
        block.compile()


def build_for_training(
    build: Callable[..., nn.Module], cfg, out_channels: int, compile: bool = False
) -> nn.Module:
    """A fresh model ``build(cfg, out_channels)`` (its family's builder, ``cfg`` a ModelConfig) with its
    attention backend, checkpointing and, with ``compile``, per-block ``torch.compile`` applied -- what
    the Trainer and ``bench train`` run."""
    model = build(cfg, out_channels)
    set_attention_backend(model, cfg.attention_backend)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model, cfg.checkpoint_blocks)
    if compile:
        compile_blocks(model)
    return model
