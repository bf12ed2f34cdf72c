"""Ctrl-C is a stop request (issue 40 item 1): ``tristage train`` finishes the step, saves a checkpoint
every rank agrees on, prints one line and exits 130; a second Ctrl-C while it saves is refused with one
line; a third aborts.  On 2 processes under ``accelerate launch``: SIGINT to the launcher's process
group and to every rank at once (a terminal's Ctrl-C), and to one rank only.  ``tristage cache`` finishes
its unit in flight.  The demo's Ctrl-C is in ``test_demo_stop.py``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tristage.demo.tiny_run import write_tiny_stage1
from tristage.train.training import checkpoint_files as ckpt

from ..conftest import (
    env_2proc,
    finish,
    newest_step,
    one_thread_env,
    run_cli,
    start_2proc,
    tristage,
    user_folder,
)
from .test_cache_distributed import CONFIG, IMAGES, PER_SHARD, members, world  # noqa: F401 (fixture)
from .test_cluster import FAULTS, assert_agreed_checkpoint, rank_pid
from .test_disks import captioning  # noqa: F401 (fixture)

TIMEOUT = 240  # s; a hang fails the test instead of blocking the suite

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    return write_tiny_stage1(tmp_path_factory.mktemp("ctrl_c"))


def args(setup: Path, run_dir: Path, *overrides: str) -> list[str]:
    base = [f"run.dir={run_dir}", "train.max_steps=100000", "train.log_every=1", "checkpoint.every=100000"]
    return ["train", str(setup), *base, "tracking.mode=disabled", *overrides]


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def wait_until(predicate, proc: subprocess.Popen, what: str) -> None:
    deadline = time.time() + TIMEOUT
    while not predicate():
        assert proc.poll() is None, f"ended before {what}: {proc.communicate()[1][-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def start(setup: Path, run_dir: Path, fault: str = "", *overrides: str) -> subprocess.Popen:
    env = one_thread_env(PYTHONPATH=FAULTS, TRISTAGE_TEST_FAULT=fault) if fault else one_thread_env()
    cmd = tristage(*args(setup, run_dir, *overrides))
    return subprocess.Popen(
        cmd, cwd=user_folder(), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def summary(stderr: str) -> dict[str, str]:
    (line,) = [line for line in stderr.splitlines() if line.startswith("summary: ")]
    return dict(part.split("=", 1) for part in line.removeprefix("summary: ").split(", "))


def saving(run_dir: Path) -> bool:
    return any((run_dir / "checkpoints").glob(f"{ckpt.TMP_PREFIX}*"))


def test_ctrl_c_saves_the_step_and_exits_130_then_resume_continues(setup, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(setup, run_dir)
    wait_until(lambda: logged_steps(run_dir) >= 2, proc, "step 2")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "Ctrl-C: stopping at the next safe point (saving first)" in err
    stopped = summary(err)
    assert stopped["stopped_by"] == "stop request (SIGINT)" and stopped["exit_status"] == "130"
    step = int(stopped["steps"])
    assert newest_step(run_dir) == step >= 2 and not (run_dir / "final").exists()  # the step it stopped at
    assert not (run_dir / "tristage.lock").exists()
    resumed = run_cli(*args(setup, run_dir, f"train.max_steps={step + 2}"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpt.step_dir(run_dir / 'checkpoints', step)} at step {step}" in resumed.stderr
    rows = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, step + 3))


def test_a_second_ctrl_c_while_saving_is_refused_with_one_line(setup, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(setup, run_dir, "rank=0,slow_save=3")  # each save takes 3 s: time to press again
    wait_until(lambda: logged_steps(run_dir) >= 1, proc, "step 1")
    proc.send_signal(signal.SIGINT)
    wait_until(lambda: saving(run_dir), proc, "the save")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, err[-3000:]
    assert err.count("saving; press Ctrl-C again to abort without saving") == 1
    step = int(summary(err)["steps"])
    assert newest_step(run_dir) == step and not saving(run_dir)  # the save completed


def test_a_third_ctrl_c_aborts_and_the_rerun_recovers(setup, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(setup, run_dir, "rank=0,slow_save=30")
    wait_until(lambda: logged_steps(run_dir) >= 1, proc, "step 1")
    proc.send_signal(signal.SIGINT)
    wait_until(lambda: saving(run_dir), proc, "the save")
    proc.send_signal(signal.SIGINT)
    time.sleep(1)  # the second press's handler has run (it restores the default action)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGINT, err[-3000:]  # killed by the signal: no save
    assert newest_step(run_dir) == -1 and saving(run_dir) and (run_dir / "tristage.lock").exists()
    rerun = run_cli(*args(setup, run_dir, "train.max_steps=2"))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (
        f"taking over the lock of a run that is gone (host {os.uname().nodename}, PID {proc.pid}, "
        in rerun.stderr
    )
    assert ": no such process)" in rerun.stderr
    assert not saving(run_dir) and (run_dir / "final" / ckpt.MARKER).is_file()


def stopped_together_130(done: subprocess.CompletedProcess, run_dir: Path, launcher: int) -> None:
    """Both ranks stopped after the same step with a checkpoint both wrote, and exit 130."""
    assert done.returncode == launcher, done.stderr[-3000:]
    assert done.stderr.count("stopped_by=stop request (SIGINT)") == 1  # rank 0's summary line
    assert "KeyboardInterrupt" not in done.stderr
    saved = newest_step(run_dir)
    assert saved >= 1 and saved == int(summary(done.stderr)["steps"])
    assert_agreed_checkpoint(run_dir, saved)
    assert not (run_dir / "final").exists() and not (run_dir / "tristage.lock").exists()


def test_ctrl_c_in_a_terminal_reaches_the_launcher_and_every_rank(setup, tmp_path):
    """A terminal sends SIGINT to its foreground process group: here the launcher's (torchrun starts the
    ranks in sessions of their own, and forwards the signal to them), plus every rank directly, as a
    launcher that keeps its ranks in the terminal's group would.  The launcher waits for the ranks' save
    and exits with their status, 130."""
    run_dir = tmp_path / "run"
    proc = start_2proc(*args(setup, run_dir, "data.batch_size=4"), env=env_2proc(), start_new_session=True)
    wait_until(lambda: logged_steps(run_dir) >= 2, proc, "step 2")
    ranks = [rank_pid(proc.pid, r) for r in (0, 1)]
    os.killpg(proc.pid, signal.SIGINT)
    for pid in ranks:
        os.kill(pid, signal.SIGINT)
    stopped_together_130(finish(proc, TIMEOUT), run_dir, launcher=130)


def test_ctrl_c_to_rank_1_only_stops_both_ranks_after_the_same_step(setup, tmp_path):
    """Both ranks save the same step and exit 130; torchrun, which was not signalled itself, reports
    the non-zero exit of its ranks as a failure (exit 1)."""
    run_dir = tmp_path / "run"
    proc = start_2proc(*args(setup, run_dir, "data.batch_size=4"))
    wait_until(lambda: logged_steps(run_dir) >= 2, proc, "step 2")
    os.kill(rank_pid(proc.pid, 1), signal.SIGINT)
    done = finish(proc, TIMEOUT)
    stopped_together_130(done, run_dir, launcher=1)
    assert "exitcode  : 130" in done.stderr  # both ranks' status, in torchrun's report


def test_ctrl_c_in_the_cache_pass_finishes_the_unit_in_flight_then_the_rerun_completes(request):
    """One process: Ctrl-C while a unit is encoded; that unit is finished, the pass stops (exit 130)."""
    shared = request.getfixturevalue("world")
    cache_dir = shared["root"] / "ctrl_c" / "cache"
    env = one_thread_env(PYTHONPATH=FAULTS, TRISTAGE_TEST_FAULT="rank=0,slow_unit=1")
    cmd = tristage("cache", str(CONFIG), *shared["overrides"]("ctrl_c"))
    proc = subprocess.Popen(cmd, cwd=user_folder(), env=env, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: any(cache_dir.glob("*.lock")), proc, "the first unit")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, err[-3000:]
    done = sorted(cache_dir.glob("*.done.json"))
    lines = [line for line in err.splitlines() if line.startswith("tristage cache")]
    assert lines == [
        f"tristage cache: stopped on request with {len(done)} of {IMAGES // PER_SHARD} units done, each "
        "complete; rerun to continue"
    ]
    assert 1 <= len(done) < IMAGES // PER_SHARD and not (cache_dir / "manifest.json").exists()
    assert not list(cache_dir.glob("*.tmp-*")) and not list(cache_dir.glob("*.lock"))
    again = run_cli("cache", str(CONFIG), *shared["overrides"]("ctrl_c"), env=one_thread_env())
    assert again.returncode == 0, again.stderr[-3000:]
    assert members(cache_dir) == members(shared["reference"])


def test_ctrl_c_to_rank_1_of_a_cache_pass_stops_both_after_their_units(request):
    shared = request.getfixturevalue("world")
    cache_dir = shared["root"] / "ctrl_c_2" / "cache"
    env = env_2proc(PYTHONPATH=FAULTS, TRISTAGE_TEST_FAULT="rank=1,slow_unit=1")
    proc = start_2proc("cache", str(CONFIG), *shared["overrides"]("ctrl_c_2"), env=env)
    wait_until(lambda: any(cache_dir.glob("*.done.json")), proc, "the first unit")
    os.kill(rank_pid(proc.pid, 1), signal.SIGINT)
    done = finish(proc, TIMEOUT)
    assert "exitcode  : 130" in done.stderr, done.stderr[-3000:]  # the ranks' status, in torchrun's report
    assert done.stderr.count("tristage cache: stopped on request with ") == 1  # rank 0's line
    assert not (cache_dir / "manifest.json").exists() and not list(cache_dir.glob("*.tmp-*"))
    assert len(list(cache_dir.glob("*.done.json"))) < IMAGES // PER_SHARD
    again = run_cli("cache", str(CONFIG), *shared["overrides"]("ctrl_c_2"), env=one_thread_env())
    assert again.returncode == 0, again.stderr[-3000:]
    assert members(cache_dir) == members(shared["reference"])


def test_ctrl_c_in_the_caption_pass_finishes_the_unit_in_flight(request, tmp_path):
    world_of_captions = request.getfixturevalue("captioning")
    output = tmp_path / "captions.jsonl"
    env = one_thread_env(PYTHONPATH=FAULTS, TRISTAGE_TEST_FAULT="rank=0,slow_caption_unit=1")
    cmd = tristage(*world_of_captions["args"](output))
    proc = subprocess.Popen(cmd, cwd=user_folder(), env=env, stderr=subprocess.PIPE, text=True)
    parts = Path(f"{output}.parts")
    wait_until(lambda: any(parts.glob("*.lock")), proc, "the first unit")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, err[-3000:]
    done = sorted(parts.glob("*.done.json"))
    lines = [line for line in err.splitlines() if line.startswith("tristage caption")]
    assert lines == [
        f"tristage caption: stopped on request with {len(done)} of 4 units done, each complete; "
        "rerun to continue"
    ]
    assert 1 <= len(done) < 4 and not output.exists() and not list(parts.glob("*.tmp-*"))
    again = run_cli(*world_of_captions["args"](output))
    assert again.returncode == 0, again.stderr[-3000:]
    assert output.read_text() == world_of_captions["reference"].read_text()
