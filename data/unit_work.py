"""Working through a pass's units (cache and caption): one owner per unit, agreed stops, full disks.

Every unit has a lock file beside its output (``tristage/locks.py``).  A process takes the next unit
that is neither done nor locked -- its own share first (unit ``i`` is rank ``i % world``'s, so the ranks
of one pass do not contend), then any other -- so two passes started into one folder share the work
instead of both doing it, and a unit whose owner died is taken over.  A unit's temp files are removed
only by the process that holds its lock, before it writes the unit again.

After each unit the ranks agree (one all-reduce of three ints) on whether any of them got a stop
request (``tristage/stopping.py``: the unit in flight is finished first), failed, or still has work --
a unit to do, or one that another live pass holds, which is waited for.  So no rank goes on alone, or
waits alone at a barrier, and every rank ends the same way.  A write the disk refuses (full,
read-only) is one line naming the folder, the space left and, once some units are done, about how
much more the units left need; the unit's temp files are removed, and a rerun continues.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tristage.data.sources import Unit
from tristage.disks import is_refused, size_text, storage_error
from tristage.errors import TristageError
from tristage.locks import LocalLock
from tristage.stopping import Stopped, StopRequests

log = logging.getLogger(__name__)
WAIT_S = 1.0  # between looks at units another pass holds


@dataclass
class UnitPass:
    """What a pass does with each of its units, and where."""

    name: str  # the command: "cache", "caption"
    folder: Path  # where the units' files go (named when the disk refuses)
    lock_path: Callable[[Unit], Path]  # the unit's lock file
    done: Callable[[Unit], bool]  # its completeness marker exists
    run: Callable[[Unit], int]  # writes the unit (its lock held); returns the images read
    outputs: Callable[[Unit], list[Path]]  # a done unit's files (for the space estimate)
    remove_tmp: Callable[[Unit], object]  # deletes the unit's temp files (its lock held)
    lock_timeout: float  # run.lock_timeout


class OtherRankFailed(TristageError):
    """Another rank of this pass failed; its own line (or traceback) says why."""


def work_through(units: list[Unit], work: UnitPass, accelerator, stop: StopRequests) -> int:
    """Every unit done, by this pass or another; returns the images this process read."""
    rank, world = accelerator.process_index, accelerator.num_processes
    remaining = [u for u in units if u.index % world == rank] + [u for u in units if u.index % world != rank]
    images = 0
    while True:
        claimed, waiting, error = None, False, None
        try:  # every rank must reach the agreement below, whatever happens here
            claimed, waiting = (None, False) if stop.requested else claim(remaining, work)
            if claimed is not None:
                images += run_unit(claimed[0], work, units)
                remaining.remove(claimed[0])
        except Exception as err:
            error = refused_line(err, work, units)
        finally:
            if claimed is not None:
                claimed[1].release()
        signum, failed, busy = agree(accelerator, stop.signum, error is not None, claimed or waiting)
        if failed:
            raise error or OtherRankFailed(f"rank {rank}: stopped with the other ranks: another rank failed")
        if signum:
            raise Stopped(stopped_line(work, units, accelerator), signum)
        if not busy:
            return images
        if claimed is None:
            time.sleep(WAIT_S)


def claim(remaining: list[Unit], work: UnitPass) -> tuple[tuple[Unit, LocalLock] | None, bool]:
    """(the next unit this process now holds with its lock, or None; whether another pass holds some)."""
    waiting = False
    for unit in list(remaining):
        if work.done(unit):
            remaining.remove(unit)
            continue
        lock = LocalLock(work.lock_path(unit), work.lock_timeout, f"{work.name} unit {unit.index}")
        if lock.try_acquire() is not None:
            waiting = True  # a live owner: done (or taken over) later
            continue
        if work.done(unit):  # finished by its previous owner between the look and the lock
            lock.release()
            remaining.remove(unit)
            continue
        return (unit, lock), waiting
    return None, waiting


def run_unit(unit: Unit, work: UnitPass, units: list[Unit]) -> int:
    """One unit, from a clean start; after a failed write its temp files are removed."""
    work.remove_tmp(unit)  # a dead owner's leftovers (only the lock holder may remove them)
    try:
        return work.run(unit)
    except BaseException:
        work.remove_tmp(unit)
        raise


def refused_line(err: Exception, work: UnitPass, units: list[Unit]) -> Exception:
    """A write the folder refused (full, read-only) as one line naming it; any other error as it is."""
    if isinstance(err, OSError) and is_refused(err):
        return storage_error(work.folder, err, still_needed(work, units))
    return err


def still_needed(work: UnitPass, units: list[Unit]) -> str:
    """About how much the units not done need, from the average of the done ones (if any)."""
    done = [u for u in units if work.done(u)]
    if not done:
        return "no unit is done yet, so the space a unit needs is not known"
    per_unit = sum(p.stat().st_size for u in done for p in work.outputs(u) if p.exists()) / len(done)
    left = len(units) - len(done)
    need, kept = size_text(per_unit * left), len(done)
    return f"about {need} more needed for the {left} units left; the {kept} done are kept: free space, rerun"


def agree(accelerator, signum: int, failed: bool, busy: object) -> tuple[int, bool, bool]:
    """Every rank's (stop signal, failure, work left), reduced with max: the same answer on every rank."""
    flags = torch.tensor([signum, int(failed), int(bool(busy))], device=accelerator.device)
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="max")
    signum, failed, busy = (int(v) for v in flags.tolist())
    return signum, bool(failed), bool(busy)


def stopped_line(work: UnitPass, units: list[Unit], accelerator) -> str:
    """Rank 0's one line after a stop (the others print none: "")."""
    if not accelerator.is_main_process:
        return ""
    done = sum(work.done(u) for u in units)
    return f"stopped on request with {done} of {len(units)} units done, each complete; rerun to continue"
