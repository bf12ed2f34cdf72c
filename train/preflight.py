"""Pre-flight checks: what a pass reads must exist before it loads anything.

A config section checks its own values where it is declared (``train/config.py``); this module checks
the world those values point at (files, object-store URLs, installed packages), once, on the command
line's way in. Each failure is one :class:`~tristage.errors.ConfigError` line naming the file and key.
"""

from __future__ import annotations

from pathlib import Path

from tristage.data import storage
from tristage.errors import ConfigError
from tristage.train.config import ATTENTION_BACKENDS, Config


def check_train_paths(cfg: Config, path: str, has_checkpoint: bool) -> None:
    """Paths a training run reads must exist (init_from only matters without a checkpoint), and the
    attention backend's package must be installed."""
    _check_attention_installed(cfg.model.attention_backend, path)
    if cfg.init_from is not None and not has_checkpoint:
        require_exists(path, "init_from", cfg.init_from)
        _require_model_folder(path, Path(cfg.init_from))
    require_exists(path, "data.cache_dir", cfg.data.cache_dir)


def _check_attention_installed(backend: str, path: str) -> None:
    """The package ``model.attention_backend`` needs, found (not imported: importing xformers is slow)."""
    import importlib.util

    package = ATTENTION_BACKENDS[backend]
    if package is not None and importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"{path}: key 'model.attention_backend': {backend} is not installed "
            f"(pip install 'tristage[{package}]'), or use sdpa"
        )


def _require_model_folder(cfg_path: str, init_from: Path) -> None:
    """A folder ``init_from`` must hold a model: config.json in it or in its transformer/."""
    if init_from.is_dir() and not any(
        (init_from / sub / "config.json").is_file() for sub in ("", "transformer")
    ):
        raise ConfigError(
            f"{cfg_path}: key 'init_from': {init_from} holds no model "
            "(no config.json in it or in its transformer/)"
        )


def check_cache_paths(cfg: Config, path: str) -> None:
    """Raw sources and local encoder folders must exist before the cache pass loads anything."""
    check_source_paths(cfg, path)
    for key in ("vae", "text_encoder", "tokenizer"):
        value = getattr(cfg.encoders, key)
        if value is not None and looks_local(value):
            require_exists(path, f"encoders.{key}", value)


def check_source_paths(cfg: Config, path: str, skip: str | None = None) -> None:
    """Every raw source path must match something (``skip``: a path written, not read, by this pass).
    Local paths, object-store URLs (``s3://``, ``gs://``) alike; a ``pipe:`` command is run only when read."""
    for i, pattern in enumerate(cfg.data.source.paths):
        if not storage.is_pipe(pattern) and not storage.glob(pattern):
            raise ConfigError(f"{path}: key 'data.source.paths[{i}]': matches nothing: {pattern}")
    if not cfg.data.source.paths:
        raise ConfigError(f"{path}: key 'data.source.paths': no source paths given")
    for i, pattern in enumerate(cfg.data.val_paths):
        if not storage.is_pipe(pattern) and not storage.glob(pattern):
            raise ConfigError(f"{path}: key 'data.val_paths[{i}]': matches nothing: {pattern}")
    for key in ("captions", "metadata", "synsets"):
        value = getattr(cfg.data.source, key)
        if value is not None and value != skip:
            require_exists(path, f"data.source.{key}", value)


def check_caption_paths(cfg: Config, path: str) -> None:
    """The caption pass needs an output path, raw images and (if local) the model folder.

    ``data.source.captions`` may name the output itself (the stage-2 config reads what this pass
    writes), so it need not exist yet.
    """
    if cfg.caption.output is None:
        raise ConfigError(f"{path}: key 'caption.output': set the caption JSONL to write")
    check_source_paths(cfg, path, skip=cfg.caption.output)
    if looks_local(cfg.caption.model):
        require_exists(path, "caption.model", cfg.caption.model)


def looks_local(name: str) -> bool:
    """Hub ids are "org/name"; anything absolute, relative-dotted or deeper is a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or Path(name).exists()


def require_exists(cfg_path: str, key: str, value: str | None) -> None:
    """One-line error when the path (or URL) behind ``key`` is missing."""
    if value is None or not storage.exists(value):
        raise ConfigError(f"{cfg_path}: key '{key}': path does not exist: {value}")
