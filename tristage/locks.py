"""One owner per run directory and per cache / caption unit: a lock file with a heartbeat.

A lock is a small JSON file (host, PID, start time, a random token) created atomically with ``link``
(exclusive on local disks and NFS alike: the file appears whole or not at all), and kept alive by a
heartbeat: its mtime, touched every ``timeout / 4`` seconds by a thread of the holder.  A lock whose
holder is gone is taken over with one warning line:

- on the same machine (hostname, boot and PID namespace equal) when its PID no longer runs, or runs
  a process started at another time (a reused PID) -- at once;
- on another machine, whose PIDs mean nothing here (a requeued SLURM job on another node, a shared
  filesystem), when its heartbeat is older than ``timeout`` (``run.lock_timeout``).  The clocks of the
  two machines must agree to well within that.

:class:`LocalLock` is the implementation for folders on a filesystem; :func:`lock_for` picks the
implementation for a location, so an object-store one can be added beside it.  fcntl/flock locks are
not used: they vanish with the process that held them (good) but are not honoured by every shared
filesystem (Lustre and NFS without a lock manager), and a dead holder's host cannot be named.

This module imports only the standard library, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger("tristage")


def _read_first_line(path: str) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def machine_id() -> str:
    """This boot of this machine and its PID namespace: where a lock's PID can be checked."""
    boot = _read_first_line("/proc/sys/kernel/random/boot_id") or "?"
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{boot}/{namespace}"


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), None if unknown."""
    stat = _read_first_line(f"/proc/{pid}/stat")
    if stat is None:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after the command in parentheses


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: written into the lock file."""

    host: str  # hostname
    machine: str  # machine_id(): boot id and PID namespace
    pid: int
    pid_start: int | None  # process_start(pid) when it took the lock
    started: float  # time.time() when it took the lock
    token: str  # random: tells this holder from a later one with the same PID
    job: str | None = None  # SLURM_JOB_ID, if any

    @classmethod
    def me(cls) -> Holder:
        return cls(
            host=socket.gethostname(),
            machine=machine_id(),
            pid=os.getpid(),
            pid_start=process_start(os.getpid()),
            started=time.time(),
            token=uuid.uuid4().hex,
            job=os.environ.get("SLURM_JOB_ID"),
        )

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        job = f", SLURM job {self.job}" if self.job else ""
        return f"host {self.host}, PID {self.pid}{job}, started {when}"

    def gone_here(self) -> str | None:
        """Why this holder is certainly gone, judged on its own machine (None: alive, or not ours)."""
        if self.machine != machine_id() or self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return "no such process"
        except PermissionError:  # alive, another user's
            return None
        start = process_start(self.pid)
        if self.pid_start is not None and start is not None and start != self.pid_start:
            return "its PID now belongs to another process"
        return None


UNKNOWN = Holder("unknown", "?", 0, None, 0.0, "?")  # a lock file that cannot be read


class Lock(Protocol):
    """What a run or a pass needs of a lock, wherever its folder lives."""

    def try_acquire(self) -> tuple[Holder, float] | None:
        """Take the lock (taking over a dead holder's); else the live holder and its heartbeat age."""

    def release(self) -> None:
        """Give the lock up (only if this process still holds it)."""


class LocalLock:
    """A lock file on a local or shared filesystem, with a heartbeat thread while it is held."""

    def __init__(self, path: Path, timeout: float, what: str):
        self.path, self.timeout, self.what = Path(path), float(timeout), what
        self.me: Holder | None = None  # set while this process holds the lock
        self._stop = threading.Event()  # ends the heartbeat thread
        self._thread: threading.Thread | None = None

    # -- taking it ---------------------------------------------------------------------------------
    def try_acquire(self) -> tuple[Holder, float] | None:
        for _ in range(3):  # a takeover races another one at most twice before one of them wins
            if self._create():
                self._start_heartbeat()
                return None
            found = self._holder()
            if found is None:  # released (or taken aside) since: try again
                continue
            holder, age = found
            why = holder.gone_here() or self._silent(age)
            if why is None:
                return holder, age
            self._take_over(holder, why)
        return self._holder() or (UNKNOWN, 0.0)

    def _create(self) -> bool:
        """Write the holder file whole beside the lock, then ``link`` it into place (atomic, exclusive).
        A folder that refuses the write raises its ``OSError`` (the caller names the folder)."""
        me = Holder.me()
        tmp = self.path.with_name(f".{self.path.name}.{me.token}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(asdict(me)))
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                pass
            won = os.stat(tmp).st_nlink == 2  # the NFS-safe test: the link exists, whatever link() said
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self.me = me if won else None
        return won

    def _holder(self) -> tuple[Holder, float] | None:
        """The lock file's holder and its heartbeat age in seconds; None when there is no lock file."""
        try:
            stat = self.path.stat()
            holder = Holder(**json.loads(self.path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):  # damaged or half-written: judged by its age alone
            holder = UNKNOWN
        return holder, max(0.0, time.time() - stat.st_mtime)

    def _silent(self, age: float) -> str | None:
        if age > self.timeout:
            return f"no heartbeat for {age:.0f} s (run.lock_timeout {self.timeout:g} s)"
        return None

    def _take_over(self, holder: Holder, why: str) -> None:
        """Move the dead holder's file aside (one process wins the rename) and check it was that one."""
        aside = self.path.with_name(f".{self.path.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = self._read(aside)
        if moved is not None and moved.token != holder.token:  # a live lock replaced it meanwhile: undo
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        else:
            log.warning(
                "%s: taking over the lock of a run that is gone (%s: %s)", self.what, holder.describe(), why
            )
        with contextlib.suppress(OSError):
            aside.unlink()

    @staticmethod
    def _read(path: Path) -> Holder | None:
        try:
            return Holder(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    # -- holding it ------------------------------------------------------------------------------
    def _start_heartbeat(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat {self.path.name}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        """Touch the lock file every ``timeout / 4`` s; stop (one line) if it is no longer ours."""
        while not self._stop.wait(max(self.timeout / 4, 0.2)):
            owner = self._read(self.path)
            if owner is None or owner.token != self.me.token:
                taker = owner.describe() if owner is not None else "nobody (the file is gone)"
                log.warning("%s: this process lost its lock %s; now held by %s", self.what, self.path, taker)
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        if self.me is None:
            return
        self._stop.set()
        self._thread.join(timeout=10)
        owner = self._read(self.path)
        if owner is not None and owner.token == self.me.token:
            with contextlib.suppress(OSError):
                self.path.unlink()
        self.me = None


class NoLock:
    """For locations with no lock implementation yet: nothing is detected (one warning line)."""

    def __init__(self, location: str, what: str):
        log.warning("%s: %s cannot be locked yet; two runs on it would not notice each other", what, location)

    def try_acquire(self) -> tuple[Holder, float] | None:
        return None

    def release(self) -> None:
        return None


def lock_for(location: str | Path, timeout: float, what: str) -> Lock:
    """The lock for a file path (:class:`LocalLock`); an object-store URL (``s3://...``) has none yet."""
    if "://" in str(location):
        return NoLock(str(location), what)
    return LocalLock(Path(location), timeout, what)


def held_by_message(what: str, path: Path | str, holder: Holder, age: float) -> str:
    """The one line for a lock another live process holds."""
    return (
        f"{what} is in use by another run ({holder.describe()}; heartbeat {age:.0f} s ago); "
        f"stop that run first (its lock file: {path})"
    )


def here(holder: Holder) -> bool:
    """Whether ``holder`` ran on this machine (so its PID was checked)."""
    return holder.machine == machine_id() and holder.host == socket.gethostname()


def acquire_or_watch(lock: Lock, poll: float = 1.0) -> tuple[Holder, float] | None:
    """Take ``lock``, or return its live holder.  A holder on another machine is alive or not only by its
    heartbeat, so it is watched: a heartbeat that moves (or a new holder) is alive; one that only ages
    is taken over once older than the lock's timeout.  So a requeued job on another node waits out the
    killed job's heartbeat (at most ``run.lock_timeout``) instead of failing."""
    held = lock.try_acquire()
    while held is not None and not here(held[0]):
        time.sleep(poll)
        again = lock.try_acquire()
        if again is None or again[0].token != held[0].token or again[1] < held[1]:
            return again
        held = again
    return held
