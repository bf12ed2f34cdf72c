"""Exponential moving average of the weights (foreach, fp32 shadow), saved in every checkpoint, and the
whole EMA model that validation samples and ``final/`` saves (gathered from its shards under FSDP)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from tristage.train.diffusion.repa import without_projector
from tristage.train.training import fsdp


class EMA:
    """Shadow copy updated as shadow <- decay * shadow + (1 - decay) * param.

    As DiT's and PixArt-alpha's train.py: the shadow starts as a copy of the weights and blends at a
    constant ``decay`` every step. With ``warmup`` the decay ramps as min(decay, (1 + step) / (10 + step))
    instead, so that short runs (the demo) are not dominated by the initial weights.
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = False):
        self.decay, self.warmup = decay, warmup
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = [params[n].detach().float().clone() for n in self.names]
        self._model: torch.nn.Module | None = None  # the model _tracked belongs to
        self._tracked: list[torch.Tensor] = []

    def _params(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """The tracked parameters, in ``names`` order; looked up once per model (use under no_grad).

        The Parameter objects themselves are kept, so in-place loads and ``.data`` swaps stay visible."""
        if model is not self._model:
            params = dict(model.named_parameters())
            self._model, self._tracked = model, [params[n] for n in self.names]
        return self._tracked

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int, gate: torch.Tensor | None = None) -> None:
        """Blend the weights in; a 0-dim device ``gate`` (1 or 0) applies or skips it without a host sync."""
        decay = min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay
        current = [p.float() for p in self._params(model)]
        if gate is None:
            torch._foreach_lerp_(self.shadow, current, 1.0 - decay)
            return
        # foreach lerp takes its weight as a host scalar; a device weight needs sub, mul, add.
        delta = torch._foreach_sub(current, self.shadow)
        torch._foreach_mul_(delta, gate * (1.0 - decay))
        torch._foreach_add_(self.shadow, delta)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for param, value in zip(self._params(model), self.shadow):
            param.copy_(value.to(param.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        self.shadow = [state[n].float().clone().to(s.device) for n, s in zip(self.names, self.shadow)]


@contextmanager
def ema_weights(model: torch.nn.Module, ema: EMA):
    """The EMA weights in ``model`` (eval mode) for the duration; the raw weights after."""
    raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was_training = model.training
    ema.copy_to(model)
    model.eval()
    try:
        yield model
    finally:
        model.load_state_dict(raw)
        model.train(was_training)


@contextmanager
def whole_ema_model(model: torch.nn.Module, ema: EMA, is_main: bool, device: torch.device):
    """The EMA weights in a whole (unsharded) model on the main process (None elsewhere).

    Unsharded: ``model`` itself, EMA swapped in for the duration (and a REPA projector, which the EMA
    does not hold and inference never uses, detached: ``final/`` and the pipelines never see it).
    Sharded (FSDP): every rank takes part in gathering the EMA, one tensor at a time, into a plain copy
    on the main process (built from the model's config), so sampling and ``save_pretrained`` see
    ordinary tensors and no rank waits on a collective the others never enter."""
    if not fsdp.is_sharded(model):
        if not is_main:
            yield None
            return
        with without_projector(model), ema_weights(model, ema):
            yield model
        return
    weights = fsdp.gather_full(ema.state_dict(), is_main)
    yield fsdp.whole_copy(model, weights).to(device).eval() if is_main else None
