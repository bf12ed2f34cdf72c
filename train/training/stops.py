"""Stops every rank agrees on.

A run stops early for a stop request (SIGTERM or SIGUSR1, e.g. a SLURM pre-emption, or Ctrl-C's
SIGINT, delivered to any one rank or to all: ``tristage/stopping.py``), for the ``train.max_time``
budget, or after ``train.max_nonfinite`` consecutive non-finite steps.  Each rank only knows its own
reasons, and a rank that stops alone leaves the others waiting in the next collective.  So the reasons
are reduced across ranks at every step boundary -- one all-reduce (max) of a three-int host tensor, the
stop request's flag being the signal's number -- and every rank stops after the same step, saves with
the others and exits the same way (``tristage train`` exits 130 after Ctrl-C, 0 after SIGTERM/SIGUSR1).

The flags are host values, so they go over a gloo group (the default group when it is gloo already,
as on CPU; else one created at start-up): the reduction never waits for the accelerator's queue, and
the sync-free NaN guard (``train.nonfinite_check: log``) stays sync-free.

``train.max_time`` is measured from one start that every rank agrees on: the first barrier after
every rank's start-up (resume, tracker start-up, which runs on rank 0 only), so a rank whose start-up
took longer does not see a different budget.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from accelerate import Accelerator

from tristage.data.features import CacheError
from tristage.stopping import StopRequests, exit_status

NONFINITE = "non-finite"  # the one stop that is an error (FloatingPointError after the save)
REASONS = (NONFINITE, "stop request", "max_time")  # the flags tensor's order, and the precedence


class Stops:
    """This rank's stop reasons, and the agreed decision at each step boundary."""

    def __init__(self, accelerator: Accelerator, max_time: float | None):
        self.accelerator, self.max_time = accelerator, max_time
        self.requests = StopRequests(announce=accelerator.is_main_process)  # this rank's stop signals
        self.signum = 0  # the agreed stop signal (the highest number any rank received; 0: none)
        self.nonfinite: str | None = None  # why the NaN guard wants to stop (the error message)
        self.started: float | None = None  # monotonic time of the agreed start
        self.group = _host_group()

    def install_handlers(self) -> None:
        """SIGTERM / SIGUSR1 (SLURM pre-emption) and Ctrl-C: finish the step, save with the other ranks,
        exit (:meth:`exit_status`); :meth:`restore_handlers` when the run is over."""
        self.requests.install()

    def restore_handlers(self) -> None:
        self.requests.restore()

    def exit_status(self) -> int:
        """130 after an agreed Ctrl-C, else 0 (``tristage/stopping.py``)."""
        return exit_status(self.signum) if self.signum else 0

    def start_clock(self) -> None:
        """The agreed start of ``train.max_time``: when the last rank is through its start-up."""
        self.accelerator.wait_for_everyone()
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def agreed(self) -> str | None:
        """The first reason any rank has to stop now, the same on every rank; None to go on."""
        out_of_time = self.max_time is not None and self.elapsed() > self.max_time
        signum = self.requests.signum  # the flag is the signal's number: every rank agrees on one
        flags = torch.tensor([self.nonfinite is not None, signum, out_of_time], dtype=torch.int32)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        self.signum = int(flags[1])
        reasons = [reason for reason, flag in zip(REASONS, flags.tolist()) if flag]
        return reasons[0] if reasons else None

    def agree_batches_ok(self, error: CacheError | None) -> None:
        """A damaged cached sample met by any rank stops every rank here, before any update uses it: the
        rank that met it raises its own line (shard and key), the others one line pointing at it.  One
        int all-reduce per step, before the forward; nothing on a single process."""
        if not (dist.is_available() and dist.is_initialized()):
            if error is not None:
                raise error
            return
        flag = torch.tensor([error is not None], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if flag.item():
            dist.barrier(group=self.group)  # not torn down right after the all-reduce (gloo; see save)
            raise error or CacheError(
                f"rank {dist.get_rank()}: stopped with the other ranks: a damaged cached sample on another "
                "rank (its line names the shard and key); no update used it"
            )


def _host_group():
    """A process group that reduces CPU tensors: the default one if it is gloo, else a new gloo group
    (collective: every rank builds its Stops at the same point of start-up)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")
