"""The checks a config section runs on its own values in ``__post_init__``, where they are declared.

Each raises :class:`~tristage.errors.ConfigError` with one line that names the key, the value and what
is allowed (``key 'optim.lr': must be > 0, got -1.0``); ``load_config`` adds the file.
Every number must also be finite: ``nan`` and ``inf`` pass no range.  A value OmegaConf still holds as
``???`` (a mandatory key not given yet, while the schema is built) is left to OmegaConf, which names it
when the config is resolved.

This module imports nothing but the error classes, so every config module (``data/`` included) may use it.
"""

from __future__ import annotations

import math
from collections.abc import Collection

from tristage.errors import ConfigError

MISSING = "???"  # omegaconf.MISSING, without importing omegaconf here
SEED_MAX = 2**32 - 1  # numpy's (and so accelerate's set_seed) largest seed


def check_choice(key: str, value: object, choices: Collection[str]) -> None:
    """``value`` must be one of ``choices``."""
    if value != MISSING and value not in choices:
        raise ConfigError(f"key '{key}': {value!r} is not one of {', '.join(choices)}")


def positive(key: str, value: float) -> None:
    """``value > 0``."""
    _check(key, value, value > 0, "> 0")


def at_least(key: str, value: float, low: float) -> None:
    """``value >= low``."""
    _check(key, value, value >= low, f">= {low}")


def in_range(
    key: str, value: float, low: float, high: float, open_low: bool = False, open_high: bool = False
) -> None:
    """``low <= value <= high``; ``open_low`` / ``open_high`` exclude the end."""
    above = value > low if open_low else value >= low
    below = value < high if open_high else value <= high
    rule = f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    _check(key, value, above and below, rule)


def seed(key: str, value: int) -> None:
    """A seed numpy, torch and accelerate all take: ``0 <= value <= 2**32 - 1``."""
    in_range(key, value, 0, SEED_MAX)


def _check(key: str, value: float, ok: bool, rule: str) -> None:
    if not (ok and math.isfinite(value)):
        finite = "" if math.isnan(value) or math.isfinite(value) else " and finite"
        raise ConfigError(f"key '{key}': must be {rule}{finite}, got {value!r}")
