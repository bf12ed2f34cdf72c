"""Exponential moving average of the weights (foreach, fp32 shadow), saved in every checkpoint."""

from __future__ import annotations

import torch


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
