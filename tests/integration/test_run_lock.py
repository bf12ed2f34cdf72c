"""One owner per run directory and per cache unit (issue 40 item 2), through the command line.

A second ``tristage train`` on a run dir in use stops with one line naming the holder and leaves the
first run alone; on 2 processes every rank stops, and nothing is written.  A lock whose holder is gone
is taken over with one warning line: a dead PID here at once; another node's (a requeued SLURM job
that starts elsewhere) once its heartbeat has been silent for ``run.lock_timeout``.  Two ``tristage
cache`` passes into one folder share the units: each encodes a disjoint subset, and the cache equals
one pass's.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from tristage.demo.tiny_run import write_tiny_stage1
from tristage.locks import Holder
from tristage.train.training import checkpoint_files as ckpt

from ..conftest import finish, one_thread_env, run_cli, start_2proc, tristage, user_folder
from .test_cache_distributed import CONFIG, IMAGES, PER_SHARD, members, world  # noqa: F401 (fixture)
from .test_cluster import FAULTS

TIMEOUT = 240

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    return write_tiny_stage1(tmp_path_factory.mktemp("run_lock"))


def train_args(setup: Path, run_dir: Path, *overrides: str) -> list[str]:
    base = [f"run.dir={run_dir}", "train.log_every=1", "tracking.mode=disabled", "checkpoint.every=2"]
    return ["train", str(setup), *base, *overrides]


def lines_of(stderr: str) -> list[str]:
    """stderr without progress bars and library chatter: the lines tristage itself printed."""
    return [line for line in stderr.splitlines() if line.startswith(("tristage ", "run.dir ", "summary"))]


def test_a_second_run_on_the_same_dir_stops_in_one_line_and_the_first_goes_on(setup, tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        tristage(*train_args(setup, run_dir, "train.max_steps=100000")),
        cwd=user_folder(),
        env=one_thread_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + TIMEOUT
    while not (run_dir / "metrics.jsonl").is_file():
        assert first.poll() is None and time.time() < deadline, "the first run never started"
        time.sleep(0.1)
    second = run_cli(*train_args(setup, run_dir, "train.max_steps=4"))
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=TIMEOUT)
    assert second.returncode == 2
    holder = (
        rf"host {re.escape(Holder.me().host)}, PID {first.pid}, started [\d-]+ [\d:]+; heartbeat \d+ s ago"
    )
    (line,) = lines_of(second.stderr)
    assert re.fullmatch(
        rf"tristage train: error: run\.dir {re.escape(str(run_dir))} is in use by another run \({holder}\); "
        rf"stop that run first \(its lock file: {re.escape(str(run_dir / 'tristage.lock'))}\)",
        line,
    ), line
    assert first.returncode == 0, err[-3000:]
    steps = [json.loads(row)["step"] for row in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # every row once: the second run wrote nothing
    assert not (run_dir / "tristage.lock").exists()


def test_two_processes_both_stop_when_the_dir_is_held(setup, tmp_path):
    """Only rank 0 looks at the lock; both ranks stop, with the same line, and nothing is written."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / "tristage.lock"
    lock.write_text(json.dumps(asdict(Holder.me())))  # this (live) test process holds it
    done = finish(start_2proc(*train_args(setup, run_dir, "data.batch_size=4", "train.max_steps=2")), TIMEOUT)
    assert done.returncode != 0
    line = f"tristage train: error: run.dir {run_dir} is in use by another run (host "
    assert done.stderr.count(line) == 2, done.stderr[-3000:]  # one per rank
    assert sorted(p.name for p in run_dir.iterdir()) == ["tristage.lock"]


def test_a_dead_local_holder_is_taken_over_with_one_warning(setup, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ghost = subprocess.Popen(["true"])
    ghost.wait()
    (run_dir / "tristage.lock").write_text(json.dumps(asdict(replace(Holder.me(), pid=ghost.pid))))
    done = run_cli(*train_args(setup, run_dir, "train.max_steps=2"))
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if "taking over" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"run.dir {run_dir}: taking over the lock of a run")
    assert warnings[0].endswith(": no such process)")
    assert (run_dir / "final" / ckpt.MARKER).is_file() and not (run_dir / "tristage.lock").exists()


def test_a_requeued_job_on_another_node_waits_out_the_old_heartbeat(setup, tmp_path):
    """SLURM requeue: the killed job ran on node-a and its lock was touched a moment ago.  The new job,
    elsewhere, cannot check node-a's PIDs: it watches the heartbeat, which never moves again, and takes
    the lock over once it has been silent for run.lock_timeout."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    killed = replace(Holder.me(), host="node-a", machine="another-boot/1", pid=31337, job="4242")
    (run_dir / "tristage.lock").write_text(json.dumps(asdict(killed)))
    start = time.monotonic()
    done = run_cli(*train_args(setup, run_dir, "train.max_steps=2", "run.lock_timeout=4"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - start > 4
    (warning,) = [line for line in done.stderr.splitlines() if "taking over" in line]
    assert "(host node-a, PID 31337, SLURM job 4242, started " in warning
    assert re.search(r": no heartbeat for \d+ s \(run\.lock_timeout 4 s\)\)$", warning), warning


def test_two_cache_passes_into_one_folder_share_the_units(request):
    """Started together, each pass encodes a disjoint subset of the units; together, one pass's cache."""
    shared = request.getfixturevalue("world")
    cache_dir = shared["root"] / "shared" / "cache"
    env = one_thread_env(PYTHONPATH=FAULTS, TRISTAGE_TEST_FAULT="rank=0,slow_unit=0.5")  # units overlap
    cmd = tristage("cache", str(CONFIG), *shared["overrides"]("shared"))
    passes = [
        subprocess.Popen(cmd, cwd=user_folder(), env=env, stderr=subprocess.PIPE, text=True) for _ in "ab"
    ]
    errors = [p.communicate(timeout=TIMEOUT)[1] for p in passes]
    assert [p.returncode for p in passes] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    writers = Counter(json.loads(m.read_text())["pid"] for m in cache_dir.glob("*.done.json"))
    assert set(writers) == {p.pid for p in passes}, writers  # both passes encoded units
    assert sum(writers.values()) == IMAGES // PER_SHARD
    read = [int(re.search(r"; (\d+) images read in", e).group(1)) for e in errors]
    assert sum(read) == IMAGES  # no unit encoded twice
    assert members(cache_dir) == members(shared["reference"])
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest == json.loads((shared["reference"] / "manifest.json").read_text())
    assert not list(cache_dir.glob("*.lock")) and not list(cache_dir.glob("*.tmp-*"))
