"""Files that a crash leaves whole or absent, never half-written.

A file is written beside its place under a temporary name (``NAME.tmp-PID``), flushed to the disk
(``fsync``), then renamed over its place: a POSIX rename within one folder is atomic, so a reader sees
the old file or the new one.  A process killed mid-write leaves only its ``.tmp-PID`` file, which the
next pass over that output deletes (:func:`remove_tmp`).  Whole checkpoint folders follow the same
rule with a folder rename (``train/training/checkpoint_files.py``).

This module imports nothing from tristage, so every layer (``data/`` included) may use it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

TMP_MARK = ".tmp-"  # between a file's name and the writer's PID in its temporary name


def tmp_path(path: Path) -> Path:
    """Where this process writes ``path`` before it is published."""
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


def fsync_file(path: Path) -> None:
    """Flush ``path``'s bytes to the disk."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def publish(tmp: Path, path: Path) -> None:
    """Flush the finished ``tmp`` and rename it over ``path`` (atomic)."""
    fsync_file(tmp)
    os.replace(tmp, path)


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` whole or not at all."""
    tmp = tmp_path(path)
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    publish(tmp, path)


def remove_tmp(paths: Iterable[Path]) -> int:
    """Delete the temporary files a killed writer left for ``paths``; how many there were."""
    stale = [tmp for path in paths for tmp in path.parent.glob(f"{path.name}{TMP_MARK}*")]
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return len(stale)
