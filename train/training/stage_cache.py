"""A stage's feature cache: ``tristage cache`` builds it for one stage config, and the trainer checks
that the cache it reads was built for that config.

The stage decides what the cache holds: its ``data:`` section, the validation prompts (their T5
features are cached with the images, so validation never loads T5), and its family's encoders -- a
class-conditional family caches no T5 features whatever ``encoders:`` names (``families.feature_encoders``).
"""

from __future__ import annotations

from tristage.data.cache import run_cache
from tristage.data.fingerprint import fingerprint
from tristage.data.val_split import val_source_data
from tristage.train.config import Config
from tristage.train.families import feature_encoders, repa_features


def cached_prompts(cfg: Config) -> list[str]:
    """The prompts whose T5 features the cache pass stores: ``validation.prompts`` (the grids), then those
    of ``validation.metrics_prompts`` not among them (the sample metrics)."""
    v = cfg.validation
    return list(dict.fromkeys([*v.prompts, *v.metrics_prompts]))


def cache_stage(cfg: Config, accelerator, rebuild: bool = False) -> dict | None:
    """``tristage cache`` for one stage config: its data, its family's encoders (and the REPA encoder's
    features, with ``objective.repa``), its validation prompts;
    with ``data.val_paths`` first the source's own validation split, into ``CACHE/val/``."""
    encoders, timeout, repa = feature_encoders(cfg), cfg.run.lock_timeout, repa_features(cfg)
    if cfg.data.val_paths:
        run_cache(val_source_data(cfg.data), encoders, accelerator, (), rebuild, timeout, repa)
    return run_cache(cfg.data, encoders, accelerator, cached_prompts(cfg), rebuild, timeout, repa)


def expected_fingerprint(cfg: Config) -> dict[str, str]:
    """What the manifest of the stage's cache must hold (``data/fingerprint.py``)."""
    return fingerprint(cfg.data, feature_encoders(cfg), repa_features(cfg))
