"""Cluster-correct training: gradient accumulation, and stops that every rank agrees on.

Gradient accumulation: K micro-batches of B train like one batch of K x B, on 1 process and on 2.
Stops: a signal to one rank, ``train.max_time`` with skewed start-up, a checkpoint write failure on
one rank (``checkpoint.on_error`` continue and raise) -- 2 CPU processes (gloo) through ``accelerate
launch``, each with a bounded timeout, a complete checkpoint, the same exit on every rank, and a
resume that continues.  Faults are injected on one rank by ``tests/faults/sitecustomize.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tristage.demo.tiny_run import write_tiny_stage1
from tristage.train.config import load_config
from tristage.train.training import checkpoint_files as ckpt
from tristage.train.training.trainer import Trainer

from ..checkpoints import verify
from ..conftest import ROOT, descendants, env_2proc, finish, newest_step, run_cli_2proc, start_2proc

STEPS = 4  # optimizer steps of the grad-accum runs
LAUNCH_TIMEOUT = 240  # s; a hang fails the test instead of blocking the suite
FAULTS = str(ROOT / "tests" / "faults")

# One rerun: the max_time test's launch sometimes never exited.  Caught under py-spy: one rank had
# exited and the other hung in ~ProcessGroupGloo, freeing the DDP wrapper after end_training; the
# Trainer now frees it on every rank before (Trainer._release_wrappers).  The rerun stays as a net; a
# second hang in a row still fails, with every process's stacks in the message (conftest.finish).
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.flaky(reruns=1)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """One tiny stage-1 world (cache, random VAE, config) for every test here."""
    return write_tiny_stage1(tmp_path_factory.mktemp("cluster"))


def base(run_dir: Path, *overrides: str) -> list[str]:
    return [f"run.dir={run_dir}", "train.log_every=1", "tracking.mode=disabled", *overrides]


def train(setup: Path, run_dir: Path, *overrides: str) -> Trainer:
    trainer = Trainer(load_config(setup, base(run_dir, *overrides)))
    trainer.train()
    return trainer


def accum_run(setup: Path, run_dir: Path, batch: int, k: int) -> Trainer:
    every = [f"train.max_steps={STEPS}", "checkpoint.every=1", f"checkpoint.keep_last={STEPS}"]
    return train(setup, run_dir, f"data.batch_size={batch}", f"train.grad_accum={k}", *every)


@pytest.fixture(scope="module")
def big_batch(setup, tmp_path_factory) -> Path:
    """The reference: 1 process, K=1, batch 8."""
    run_dir = tmp_path_factory.mktemp("k1") / "run"
    accum_run(setup, run_dir, 8, 1)
    return run_dir


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def max_deltas(run_dir: Path, reference: Path) -> dict[str, float]:
    """max |delta| of the logged losses and of the last checkpoint's weights and EMA."""
    ours, theirs = metrics(run_dir), metrics(reference)
    assert [m["step"] for m in ours] == [m["step"] for m in theirs] == list(range(1, STEPS + 1))
    assert [m["samples_seen"] for m in ours] == [m["samples_seen"] for m in theirs]
    assert [m["lr"] for m in ours] == [m["lr"] for m in theirs]
    deltas = {"loss": max(abs(a["loss"] - b["loss"]) for a, b in zip(ours, theirs))}
    last, first = f"checkpoints/step_{STEPS:07d}", "checkpoints/step_0000001"
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(run_dir / last / name), load_file(reference / last / name)
        start = load_file(reference / first / name)
        assert a.keys() == b.keys() and any(not torch.equal(b[k], start[k]) for k in b)  # weights moved
        deltas[name] = max(float((a[k] - b[k]).abs().max()) for k in a)
    return deltas


def test_grad_accum_4_of_2_equals_one_batch_of_8_and_resumes_exactly(setup, big_batch, tmp_path):
    run_dir = tmp_path / "k4"
    trainer = accum_run(setup, run_dir, 2, 4)
    assert trainer.global_batch == 8 and trainer.state.samples == STEPS * 8
    deltas = max_deltas(run_dir, big_batch)
    print(f"K=4 x 2 vs K=1 x 8: max |delta| {deltas}")
    assert deltas["loss"] < 1e-5 and deltas["model.safetensors"] < 1e-5 and deltas["ema.safetensors"] < 1e-5
    # resume at step 2: bit-identical to the uninterrupted K=4 run
    resumed = tmp_path / "resumed" / "checkpoints"
    shutil.copytree(run_dir / "checkpoints" / "step_0000002", resumed / "step_0000002")
    accum_run(setup, resumed.parent, 2, 4)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(d / f"step_{STEPS:07d}" / name) for d in (resumed, run_dir / "checkpoints"))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_two_processes_grad_accum_2_of_2_equal_one_batch_of_8(setup, big_batch, tmp_path):
    run_dir = tmp_path / "two"
    every = [f"train.max_steps={STEPS}", "checkpoint.every=1", f"checkpoint.keep_last={STEPS}"]
    two = run_cli_2proc(
        "train", str(setup), *base(run_dir, "data.batch_size=2", "train.grad_accum=2", *every), timeout=300
    )
    assert two.returncode == 0, two.stderr[-3000:]
    deltas = max_deltas(run_dir, big_batch)
    print(f"2 procs x K=2 x 2 vs 1 proc x 8: max |delta| {deltas}")
    assert deltas["loss"] < 1e-5 and deltas["model.safetensors"] < 1e-5 and deltas["ema.safetensors"] < 1e-5


# -- stops every rank agrees on -------------------------------------------------------------------------


def rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of ``rank`` among the launch's processes (torchrun sets RANK in each one's environment)."""
    for pid in descendants(launcher_pid):
        with contextlib.suppress(OSError):  # gone
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
    return None


def two_proc_args(setup: Path, run_dir: Path, *overrides: str) -> list[str]:
    return ["train", str(setup), *base(run_dir, "data.batch_size=4", *overrides)]


def resumes_and_continues(setup: Path, run_dir: Path, saved: int) -> None:
    """One process at the same global batch picks up the agreed checkpoint and finishes."""
    shutil.rmtree(run_dir / "final", ignore_errors=True)
    trainer = train(setup, run_dir, "data.batch_size=8", f"train.max_steps={saved + 2}")
    assert trainer.state.step == saved + 2 and trainer.state.samples == (saved + 2) * 8
    assert (run_dir / "final" / ckpt.MARKER).is_file()


def assert_agreed_checkpoint(run_dir: Path, step: int) -> None:
    """Complete, written by both ranks, no temp dir left."""
    path = ckpt.step_dir(run_dir / "checkpoints", step)
    assert verify(path).step == step
    assert (path / "rng_rank0.pt").is_file() and (path / "rng_rank1.pt").is_file()
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def fault_env(fault: str) -> dict[str, str]:
    """The launch's environment with ``tests/faults/sitecustomize.py`` injecting ``fault``."""
    return env_2proc(PYTHONPATH=f"{FAULTS}:{os.environ.get('PYTHONPATH', '')}", TRISTAGE_TEST_FAULT=fault)


def stopped_together(done, setup: Path, run_dir: Path, reason: str) -> None:
    """Exit 0, stopped for ``reason`` with a checkpoint both ranks wrote, and a resume continues."""
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"stopped_by={reason}" in done.stderr
    saved = newest_step(run_dir)
    assert saved >= 1 and not (run_dir / "final").exists()
    assert_agreed_checkpoint(run_dir, saved)
    resumes_and_continues(setup, run_dir, saved)


def test_sigusr1_to_rank_1_only_stops_both_after_the_same_step(setup, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_2proc(*two_proc_args(setup, run_dir, "train.max_steps=100000", "checkpoint.every=100000"))
    deadline = time.time() + LAUNCH_TIMEOUT
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").is_file() and len(metrics(run_dir)) >= 2:
            break
        time.sleep(0.1)
    pid = rank_pid(proc.pid, 1)
    assert pid is not None, "rank 1 not found"
    os.kill(pid, signal.SIGUSR1)
    stopped_together(finish(proc, LAUNCH_TIMEOUT), setup, run_dir, "stop request")


def test_max_time_is_agreed_despite_skewed_start_up(setup, tmp_path):
    """Rank 1's start-up takes 4 s longer than rank 0's; the 3 s budget still ends on one step."""
    run_dir = tmp_path / "run"
    args = two_proc_args(
        setup, run_dir, "train.max_steps=100000", "checkpoint.every=100000", "train.max_time=3"
    )
    done = finish(start_2proc(*args, env=fault_env("rank=1,delay_start=4")), LAUNCH_TIMEOUT)
    stopped_together(done, setup, run_dir, "max_time")


@pytest.mark.parametrize("policy", ["continue", "raise"])
def test_write_failure_on_rank_1_is_every_ranks_decision(setup, tmp_path, policy):
    """Rank 1 cannot write its files at step 4 (ENOSPC): both skip that save and go on, or both raise."""
    run_dir = tmp_path / "run"
    args = two_proc_args(
        setup, run_dir, "train.max_steps=6", "checkpoint.every=2", f"checkpoint.on_error={policy}"
    )
    done = finish(start_2proc(*args, env=fault_env("rank=1,fail_save_step=4")), LAUNCH_TIMEOUT)
    failed = "checkpoint at step 4 failed on rank 1"
    assert f"{failed} (here: OSError: [Errno 28] No space left on device (injected)" in done.stderr, (
        done.stderr[-3000:]
    )
    assert not ckpt.step_dir(run_dir / "checkpoints", 4).exists()
    if policy == "continue":
        assert done.returncode == 0, done.stderr[-3000:]
        assert "continuing (checkpoint.on_error=continue)" in done.stderr
        assert (run_dir / "final" / ckpt.MARKER).is_file()
        saved = 6
    else:
        assert done.returncode != 0
        # the same one-line error from both ranks (torchrun then stops the launch with exit 1)
        assert done.stderr.count(f"tristage train: error: {failed}") == 2, done.stderr[-3000:]
        assert newest_step(run_dir) == 2 and not (run_dir / "final").exists()
        saved = 2
    assert_agreed_checkpoint(run_dir, saved)
    resumes_and_continues(setup, run_dir, saved)
