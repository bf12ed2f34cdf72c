"""Fault injection for the multi-process tests (tests/test_cluster.py), on one rank only.

Python's ``site`` module imports ``sitecustomize`` at interpreter start-up from the first folder on
``sys.path`` that has one; the tests put this folder on ``PYTHONPATH`` of the processes they launch
and say what to inject in ``TRISTAGE_TEST_FAULT``, e.g. ``rank=1,delay_start=3`` (that rank's
tracker start-up takes 3 s longer) or ``rank=1,fail_save_step=4`` (that rank's checkpoint files
cannot be written at step 4: ENOSPC) or ``rank=0,key_error_step=2`` (a bug: a ``KeyError``
inside step 2).  ``slow_save=S`` makes each of that rank's checkpoints take S seconds longer (a
Ctrl-C can then land while it saves), ``slow_unit=S`` each cache unit it encodes and
``slow_caption_unit=S`` each caption unit.  The real functions run otherwise; the launcher process (no
``RANK``) and the other ranks are untouched.
"""

from __future__ import annotations

import errno
import os
import time


def _parse(spec: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in spec.split(",") if item)


def _slow(module: str, name: str, seconds: float) -> None:
    """``module.name`` takes ``seconds`` longer on every call (looked up by name when called)."""
    import importlib

    owner = importlib.import_module(module)
    real = getattr(owner, name)

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)

    setattr(owner, name, slow)


# fault -> the function it slows down: tracker start-up (delay_start), every checkpoint (slow_save: its
# temp folder exists meanwhile), every cache unit (slow_unit: two passes then overlap), every caption unit
SLOWED = {
    "delay_start": ("tristage.train.training.tracking", "start"),
    "slow_save": ("tristage.train.training.checkpoint_files", "write_rank_files"),
    "slow_unit": ("tristage.data.cache", "cache_unit"),
    "slow_caption_unit": ("tristage.data.caption", "caption_unit"),
}


def _fail_save(step: int) -> None:
    from tristage.train.training import checkpoint_files

    real = checkpoint_files.write_rank_files

    def failing(tmp, rank):
        if tmp.name.endswith(f"step_{step:07d}"):
            raise OSError(errno.ENOSPC, "No space left on device (injected)", str(tmp))
        return real(tmp, rank)

    checkpoint_files.write_rank_files = failing


def _bug_in_step(step: int) -> None:
    """An internal bug: a ``KeyError`` raised inside the trainer's step ``step`` (1-based)."""
    from tristage.train.training.trainer import Trainer

    real = Trainer._step

    def buggy(self, *args, **kwargs):
        if self.state.step + 1 == step:
            raise KeyError("injected bug")
        return real(self, *args, **kwargs)

    Trainer._step = buggy


def _kill_in_unit(n: int) -> None:
    """SIGKILL this rank while it closes its n-th cache unit (the shard written, not yet moved into place)."""
    import signal

    from tristage.data import cache

    real, closed = cache.ShardWriter.close, [0]

    def close(self, *args, **kwargs):
        closed[0] += 1
        if closed[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, *args, **kwargs)

    cache.ShardWriter.close = close


_fault = _parse(os.environ.get("TRISTAGE_TEST_FAULT", ""))
if _fault and os.environ.get("RANK", "0") == _fault["rank"]:  # a plain (1-process) run is rank 0
    if "fail_save_step" in _fault:
        _fail_save(int(_fault["fail_save_step"]))
    if "key_error_step" in _fault:
        _bug_in_step(int(_fault["key_error_step"]))
    if "kill_in_unit" in _fault:
        _kill_in_unit(int(_fault["kill_in_unit"]))
    for fault, (module, name) in SLOWED.items():
        if fault in _fault:
            _slow(module, name, float(_fault[fault]))
