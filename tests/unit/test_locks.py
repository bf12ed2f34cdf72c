"""Lock files with a heartbeat (``tristage/locks.py``): one holder, and a dead holder's lock taken over
-- at once on this machine (dead or reused PID), after ``timeout`` silent seconds from another one."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from tristage.locks import Holder, LocalLock, acquire_or_watch, lock_for


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def plant(path: Path, holder: Holder, age: float = 0.0) -> None:
    """A lock file as another process left it, its heartbeat ``age`` seconds old."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(holder)))
    then = time.time() - age
    os.utime(path, (then, then))


def elsewhere() -> Holder:
    return replace(Holder.me(), host="node-a", machine="other-boot/1", pid=4242, job="777")


def test_one_holder_then_the_next(tmp_path):
    path = tmp_path / "x.lock"
    first, second = LocalLock(path, 60, "run.dir x"), LocalLock(path, 60, "run.dir x")
    assert first.try_acquire() is None
    holder, age = second.try_acquire()
    assert holder.pid == os.getpid() and holder.token == first.me.token and age < 5
    first.release()
    assert not path.exists()
    assert second.try_acquire() is None
    second.release()


def test_a_dead_pid_on_this_machine_is_taken_over_at_once(tmp_path, caplog):
    path = tmp_path / "x.lock"
    plant(path, replace(Holder.me(), pid=dead_pid()))
    lock = LocalLock(path, 3600, "run.dir x")
    with caplog.at_level(logging.WARNING, logger="tristage"):
        assert lock.try_acquire() is None
    assert "run.dir x: taking over the lock of a run that is gone (host " in caplog.text
    assert ": no such process)" in caplog.text
    assert json.loads(path.read_text())["token"] == lock.me.token
    lock.release()


def test_a_reused_pid_is_taken_over(tmp_path, caplog):
    """The PID runs, but a process started at another time: the holder is gone."""
    path = tmp_path / "x.lock"
    me = Holder.me()
    plant(path, replace(me, pid_start=me.pid_start - 1))
    with caplog.at_level(logging.WARNING, logger="tristage"):
        assert LocalLock(path, 3600, "x").try_acquire() is None
    assert "its PID now belongs to another process" in caplog.text


def test_another_machine_counts_only_its_heartbeat(tmp_path, caplog):
    path = tmp_path / "x.lock"
    plant(path, elsewhere(), age=5)  # within the timeout: alive, whatever its PID is here
    holder, age = LocalLock(path, 60, "x").try_acquire()
    assert holder.host == "node-a" and 4 < age < 60
    plant(path, elsewhere(), age=120)  # silent for longer than the timeout: gone
    with caplog.at_level(logging.WARNING, logger="tristage"):
        lock = LocalLock(path, 60, "run.dir x")
        assert lock.try_acquire() is None
    assert "(host node-a, PID 4242, SLURM job 777, started " in caplog.text
    assert ": no heartbeat for 120 s (run.lock_timeout 60 s))" in caplog.text
    lock.release()


def test_a_requeued_job_waits_out_a_killed_jobs_heartbeat(tmp_path, caplog):
    """Another node's job was killed a moment ago: its heartbeat is fresh but no longer moves."""
    path = tmp_path / "x.lock"
    plant(path, elsewhere(), age=0)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="tristage"):
        assert acquire_or_watch(LocalLock(path, 2, "x"), poll=0.1) is None
    assert 2 <= time.monotonic() - start < 20
    assert "no heartbeat for 2 s" in caplog.text


def test_a_beating_holder_on_another_machine_is_alive(tmp_path):
    path = tmp_path / "x.lock"
    plant(path, elsewhere(), age=1)
    holder_lock = LocalLock(path, 2, "x")  # plays the other machine's heartbeat thread
    holder_lock.me = Holder(**json.loads(path.read_text()))
    holder_lock._start_heartbeat()
    try:
        held = acquire_or_watch(LocalLock(path, 2, "x"), poll=0.1)
    finally:
        holder_lock._stop.set()
    assert held is not None and held[0].host == "node-a"


def test_the_heartbeat_moves_and_a_lost_lock_is_one_line(tmp_path, caplog):
    path = tmp_path / "x.lock"
    lock = LocalLock(path, 0.4, "run.dir x")  # beats every 0.1 s
    assert lock.try_acquire() is None
    os.utime(path, (0, 0))
    time.sleep(0.5)
    assert time.time() - path.stat().st_mtime < 1
    plant(path, elsewhere())  # someone took it over
    with caplog.at_level(logging.WARNING, logger="tristage"):
        time.sleep(0.5)
    assert (
        "run.dir x: this process lost its lock " in caplog.text and "now held by host node-a" in caplog.text
    )
    lock.release()
    assert path.exists()  # not ours to delete


def test_a_damaged_lock_file_is_judged_by_its_age(tmp_path):
    path = tmp_path / "x.lock"
    path.write_text("{half")
    assert LocalLock(path, 60, "x").try_acquire()[0].host == "unknown"
    os.utime(path, (0, 0))
    assert LocalLock(path, 60, "x").try_acquire() is None


def test_a_folder_that_refuses_the_lock_file_raises_its_os_error(tmp_path):
    """The caller names the folder (train/training/runlock.py, data/unit_work.py); no temp file stays."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError):
        LocalLock(blocker / "x.lock", 60, "run.dir x").try_acquire()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_object_store_locations_have_no_lock_yet(caplog):
    with caplog.at_level(logging.WARNING, logger="tristage"):
        lock = lock_for("s3://bucket/run/tristage.lock", 60, "run.dir s3://bucket/run")
    assert lock.try_acquire() is None
    assert "cannot be locked yet" in caplog.text
