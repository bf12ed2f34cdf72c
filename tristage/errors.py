"""The errors a user can cause, one class per domain under one base.

``tristage`` prints a :class:`TristageError` as one line and exits 2: bad input, named by its file, key,
shard or bucket.  Every other exception is a bug in tristage (or in a library below it) and keeps its
traceback (exit 1).  Each domain module raises its own class and re-exports it, so callers keep
importing ``ConfigError`` from ``tristage.train.config``, ``CacheError`` from ``tristage.data.features``.

This module imports nothing, so every layer (``data/`` included) may use it.
"""

from __future__ import annotations


class TristageError(Exception):
    """A problem with the user's input or environment; the message is one line that names where."""


class ConfigError(TristageError, ValueError):
    """A bad configuration value: the message names the key and the file."""


class SourceError(TristageError, ValueError):
    """Raw data that cannot be read as the configured source (a path, a shard, a captions file)."""


class CacheError(TristageError, ValueError):
    """A feature cache that is missing, stale, damaged or built from another config."""


class CheckpointError(TristageError, ValueError):
    """A checkpoint or ``init_from`` weights that cannot be used (damaged, incomplete, another model)."""


class CaptionError(TristageError, ValueError):
    """The caption pass cannot run as configured (its model, its output, its settings)."""


class SampleError(TristageError, ValueError):
    """``tristage sample`` input that cannot be used (a pipeline folder, a prompt, a value)."""


class EvalError(TristageError, ValueError):
    """``tristage eval`` input that cannot be used (samples, reference statistics, an extractor)."""


class AppError(TristageError, ValueError):
    """``tristage app`` input that cannot be used (a pipeline folder, a port, a style)."""


class StorageError(TristageError, OSError):
    """A folder or bucket that refuses what a run must write there (read-only, full, no permission)."""


class RunLockError(TristageError):
    """Another live run owns the run directory (or cache unit) this one would write."""
