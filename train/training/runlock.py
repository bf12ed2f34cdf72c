"""One run per run directory: rank 0 holds ``run.dir/tristage.lock`` for the whole run.

The lock (``tristage/locks.py``: host, PID, start time, a heartbeat) is taken before the run writes
anything.  A second run on the same folder -- a second terminal, or a requeued SLURM job that starts
while the old one is still saving -- stops with one line naming the holder, on every rank: rank 0 alone
looks, and tells the others with one broadcast, so no rank goes on alone.  A lock whose holder is gone
is taken over with one warning line: at once when its PID is dead on this machine; after its heartbeat
has been silent for ``run.lock_timeout`` seconds when it ran on another machine (a requeued job on
another node waits that long at most).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from tristage.disks import is_refused, storage_error
from tristage.errors import RunLockError, StorageError
from tristage.locks import Lock, acquire_or_watch, held_by_message, lock_for

LOCK_FILE = "tristage.lock"


def lock_path(run_dir: str) -> str:
    return f"{str(run_dir).rstrip('/')}/{LOCK_FILE}"


@contextmanager
def owning(accelerator: Accelerator, run_dir: str, timeout: float) -> Iterator[None]:
    """Hold ``run_dir``'s lock (rank 0) for the body; every rank raises if another live run holds it."""
    lock, refusal = None, None
    if accelerator.is_main_process:
        lock = lock_for(lock_path(run_dir), timeout, f"run.dir {run_dir}")
        refusal = _take(lock, run_dir)
    if accelerator.num_processes > 1:
        refusal = broadcast_object_list([refusal])[0]  # every rank learns rank 0's answer
    if refusal is not None:
        kind, message = refusal
        raise (StorageError if kind == "storage" else RunLockError)(message)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _take(lock: Lock, run_dir: str) -> tuple[str, str] | None:
    """None when this process now holds the lock, else (kind, the one line) to raise on every rank."""
    try:
        held = acquire_or_watch(lock)
    except OSError as err:  # a read-only, forbidden or full run.dir
        if not is_refused(err):
            raise
        return "storage", f"run.dir: {storage_error(run_dir, err)}"
    if held is None:
        return None
    return "lock", held_by_message(f"run.dir {run_dir}", lock_path(run_dir), *held)
