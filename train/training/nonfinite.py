"""The NaN guard: a step whose loss or gradient norm is not finite changes nothing.

Two ways to apply it (``train.nonfinite_check``), both exact about *what* is skipped: the weights, the
AdamW moments and step count, and the EMA stay bit-for-bit as they were before the bad step.  They
differ in *when the host learns of it*:

* ``"step"`` (default): the flag is read on the host every step (one host sync per step).  The
  update is skipped by not calling it, each skip is logged at once, and the run saves and stops on
  exactly the ``train.max_nonfinite``-th consecutive bad step.
* ``"log"``: no per-step sync.  The flag stays on the device; AdamW runs fused and skips the whole
  update itself when its ``found_inf`` tensor is 1 (the mechanism ``torch.amp.GradScaler`` uses,
  including undoing the step count), and the EMA blends with weight ``finite * (1 - decay)``, which
  is 0 on a bad step.  The consecutive-skip counter and its running maximum are device tensors read
  on log steps (and when a checkpoint is saved): a run that hit ``max_nonfinite`` consecutive bad
  steps saves and stops on the next log step -- up to ``train.log_every - 1`` steps later, all of
  them skipped if they were bad too.

On a GPU the per-step sync stalls the kernel queue once per step (the host waits for the backward to
finish before it can queue the next forward); that costs most for small models and short steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Update = Callable[[torch.Tensor | None], None]  # the optimizer + EMA update; gets the 0/1 gate or None


@dataclass
class Report:
    """What the host knows after a poll."""

    skipped: int  # bad steps since the previous poll
    consecutive: int  # current run of consecutive bad steps
    worst: int  # longest run of consecutive bad steps since the previous poll


class SyncGuard:
    """``"step"``: read the flag every step, skip the update on the host."""

    fused_optimizer = False  # any AdamW implementation works

    def __init__(self, device: torch.device):
        self.consecutive, self.skipped, self.worst = 0, 0, 0

    def apply(self, finite: torch.Tensor, update: Update) -> None:
        if bool(finite):  # the one per-step host sync
            update(None)
            self.consecutive = 0
            return
        self.consecutive += 1
        self.skipped += 1
        self.worst = max(self.worst, self.consecutive)

    def poll(self, log_step: bool) -> Report | None:
        report = Report(self.skipped, self.consecutive, self.worst)
        self.skipped, self.worst = 0, self.consecutive
        return report

    def count(self) -> int:
        return self.consecutive

    def load(self, consecutive: int) -> None:
        self.consecutive = self.worst = consecutive


class DeviceGuard:
    """``"log"``: gate the update on the device; read the counters only on log steps."""

    fused_optimizer = True  # fused AdamW honours ``found_inf``; foreach AdamW refuses it

    def __init__(self, device: torch.device):
        self.zero = torch.zeros((), device=device)
        self.consecutive, self.skipped, self.worst = self.zero.clone(), self.zero.clone(), self.zero.clone()

    def apply(self, finite: torch.Tensor, update: Update) -> None:
        gate = finite.float()  # 1: apply, 0: skip
        update(gate)
        self.consecutive = (self.consecutive + 1) * (1 - gate)
        self.skipped = self.skipped + (1 - gate)
        self.worst = torch.maximum(self.worst, self.consecutive)

    def poll(self, log_step: bool) -> Report | None:
        if not log_step:
            return None
        skipped, consecutive, worst = (
            int(v) for v in torch.stack([self.skipped, self.consecutive, self.worst]).tolist()
        )
        self.skipped, self.worst = self.zero.clone(), self.consecutive.clone()
        return Report(skipped, consecutive, worst)

    def count(self) -> int:
        return int(self.consecutive)

    def load(self, consecutive: int) -> None:
        self.consecutive = torch.full_like(self.zero, consecutive)
        self.worst = self.consecutive.clone()


# train.nonfinite_check (its choices: train/config.py NONFINITE_CHECKS) -> the guard
GUARDS: dict[str, type[SyncGuard] | type[DeviceGuard]] = {"step": SyncGuard, "log": DeviceGuard}
