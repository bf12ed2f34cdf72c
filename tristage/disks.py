"""Folders that refuse writes, in one line: checked before any heavy work, and named when a disk fills.

``check_writable`` creates the folder if needed and a file in it, so a read-only mount, a folder
without write permission or a full disk is one :class:`~tristage.errors.StorageError` before a model or
an encoder is loaded (permission bits alone would not do: root ignores them, and a read-only mount
refuses root too).  ``refused`` turns the ``OSError`` of a write that failed midway into one such line
naming the folder and the space left.

This module imports only the standard library (and ``tristage.errors``), so every layer may use it.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from tristage.errors import StorageError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left; quota exceeded
NOT_ALLOWED = (errno.EROFS, errno.EACCES, errno.EPERM)  # read-only filesystem; no permission


def check_writable(folder: str | Path, where: str) -> None:
    """``folder`` exists (created if needed) and takes a new file; else one line naming ``where`` (the
    config key, with its file).  An object-store URL is left to its own client."""
    if "://" in str(folder):
        return
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".tristage-write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise StorageError(f"{where}: {path} is not writable ({err.strerror})") from None


def free_bytes(path: str | Path) -> int:
    """Free space on the filesystem holding ``path`` (its nearest existing parent)."""
    for parent in (Path(path), *Path(path).parents):
        if parent.exists():
            return shutil.disk_usage(parent).free
    return 0


def size_text(size: float) -> str:
    """``512 B``, ``3.1 KiB``, ``12.3 MiB``, ``1.2 GiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size:.0f} B"


def is_refused(err: OSError) -> bool:
    """Whether a failed write means the folder itself refuses: full, read-only or not allowed."""
    return err.errno in DISK_FULL or err.errno in NOT_ALLOWED


def storage_error(folder: str | Path, err: OSError, needed: str = "") -> StorageError:
    """The one line for a write ``folder`` refused: why, the space left and, if known, still needed."""
    if err.errno in DISK_FULL:
        more = f"; {needed}" if needed else ""
        return StorageError(f"{folder}: disk full ({size_text(free_bytes(folder))} free{more})")
    return StorageError(f"{folder}: not writable ({err.strerror})")
