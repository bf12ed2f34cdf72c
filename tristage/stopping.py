"""Stop requests from signals, the same for every long command (``train``, ``cache``, ``caption``, ``demo``).

SIGTERM and SIGUSR1 (a scheduler's pre-emption or time-limit warning) and SIGINT (Ctrl-C) ask a command
to stop at its next safe point -- after the training step in flight, with a checkpoint; after the cache
or caption unit in flight, complete -- instead of dying where it stands.  Ctrl-C counts its presses:

1. the first is a stop request, like SIGTERM;
2. the second is refused with one line (``saving; press Ctrl-C again to abort without saving``), and
   puts SIGINT back to the kernel's default action;
3. so the third ends the process at once, even inside a long C call (a collective, a file write),
   without saving.  What it leaves is what a crash leaves: the next run removes the temp files and
   takes over the lock of the dead process.

A process started with SIGINT ignored (``cmd &`` in a non-interactive shell, ``nohup``) keeps ignoring
it, as Python itself does.

Exit status.  ``tristage train`` and ``tristage demo`` exit 130 after Ctrl-C (the shell's convention for
SIGINT, so a script that runs stages in sequence, ``launch.sh all``, stops there; it is also what
``accelerate launch`` exits with after it forwarded a Ctrl-C to its ranks) and 0 after SIGTERM or
SIGUSR1 (a planned stop: the job is requeued and resumes).  ``tristage cache`` and ``caption`` exit
128 + the signal's number after any stop (130, 143, 138): their output is incomplete, and a script must
not go on to train on it.

This module imports only the standard library, so every layer (``data/`` included) may use it.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

log = logging.getLogger("tristage")

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # every stop request


def exit_status(signum: int) -> int:
    """The command's exit status after a stop by ``signum``: 130 for Ctrl-C, 0 for SIGTERM / SIGUSR1."""
    return 128 + signum if signum == signal.SIGINT else 0


class Stopped(Exception):
    """A pass stopped at a safe point on request, before its output was complete; the CLI prints its one
    line (if any) and exits 128 + the signal's number (not an error: what was done is kept, and a rerun
    continues)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_status = 128 + signum


class StopRequests:
    """This process's stop signals: :attr:`signum` is the first one received (0: none yet).

    ``busy`` is what the command does after a stop request and ``abort`` what an abort gives up, for the
    second Ctrl-C's line (``saving; press Ctrl-C again to abort without saving``); ``announce``: the first
    Ctrl-C prints one line saying the stop is under way (rank 0 only: a launch of N ranks prints one)."""

    def __init__(self, busy: str = "saving", abort: str = "without saving", announce: bool = True):
        self.busy, self.abort, self.announce = busy, abort, announce
        self.signum = 0
        self.presses = 0  # Ctrl-C presses so far
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def install(self) -> StopRequests:
        """Handle the stop signals (a SIGINT ignored since start-up stays ignored)."""
        for sig in SIGNALS:
            if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
                continue
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """The handlers from before :meth:`install` (the command is over)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> StopRequests:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if signum != signal.SIGINT:
            self.signum = self.signum or signum
            return
        self.presses += 1
        if self.presses == 1:
            self.signum = self.signum or signum
            if self.announce:
                log.warning("Ctrl-C: stopping at the next safe point (%s first)", self.busy)
        elif self.presses == 2:
            log.warning("%s; press Ctrl-C again to abort %s", self.busy, self.abort)
            # The default action ends the process on the next press even inside a C call, where a
            # Python handler would only run once the call returns.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
