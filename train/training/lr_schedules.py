"""``optim.lr_schedule``: the learning-rate factor of each optimizer step (torch ``LambdaLR``).

Both schedules warm up linearly over ``optim.warmup_steps``; "constant" then holds (PixArt),
"cosine" decays to 0 at ``train.max_steps``.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def _constant(step: int, warmup: int, total: int) -> float:
    return min(1.0, (step + 1) / warmup)


def _cosine(step: int, warmup: int, total: int) -> float:
    progress = min(1.0, max(0, step + 1 - warmup) / max(1, total - warmup))
    return _constant(step, warmup, total) * 0.5 * (1.0 + math.cos(math.pi * progress))


# optim.lr_schedule (its choices: train/config.py LR_SCHEDULES) -> lr factor of (step, warm-up, max steps)
FACTORS: dict[str, Callable[[int, int, int], float]] = {"constant": _constant, "cosine": _cosine}


def lr_lambda(name: str, warmup_steps: int, max_steps: int) -> Callable[[int], float]:
    """The ``LambdaLR`` factor of schedule ``name``."""
    schedule, warmup = FACTORS[name], max(1, warmup_steps)
    return lambda step: schedule(step, warmup, max_steps)
