"""Fault tolerance: exact resume, SIGTERM, damaged checkpoints, init_from vs resume, NaN guard, I/O errors."""

from __future__ import annotations

import datetime
import errno
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tristage.bench import resume as bench_resume
from tristage.train.config import load_config
from tristage.train.training import checkpoint as ckpt
from tristage.train.training.trainer import Trainer

from .conftest import ROOT, run_cli, run_cli_2proc


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """A tiny stage-1 world with its cache and a config file (shared by the tests here)."""
    return bench_resume.write_setup(tmp_path_factory.mktemp("resume"))


def cfg_for(config: Path, run_dir: Path, *overrides: str):
    return load_config(config, [f"run.dir={run_dir}", *overrides])


def test_killed_runs_resume_bit_identical(setup, tmp_path):
    result = bench_resume.main(["--trials", "1", "--kills", "3", "--workdir", str(tmp_path)])
    assert result == {"trials": 1, "identical": 1}


def test_sigterm_saves_and_exits_0_then_resume_continues(setup, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "tristage.train.cli",
        "train",
        str(setup),
        f"run.dir={run_dir}",
        "train.max_steps=100000",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=bench_resume.env(), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while bench_resume.newest_step(run_dir) < 2 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    saved = bench_resume.newest_step(run_dir)
    assert saved >= 2 and not (run_dir / "final").exists()
    result = run_cli("train", str(setup), f"run.dir={run_dir}", f"train.max_steps={saved + 2}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resumed from {run_dir / 'checkpoints'}" in result.stderr
    assert (run_dir / "final" / "COMPLETE").exists()
    assert bench_resume.newest_step(run_dir) == saved + 2


def test_truncated_newest_checkpoint_falls_back(setup, tmp_path, caplog):
    run_dir = tmp_path / "run"
    Trainer(cfg_for(setup, run_dir, "train.max_steps=6", "checkpoint.keep_last=3")).train()
    newest = ckpt.step_dir(run_dir / "checkpoints", 6)
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert ckpt.latest(run_dir / "checkpoints") == ckpt.step_dir(run_dir / "checkpoints", 4)
    assert "falling back past damaged checkpoint" in caplog.text
    trainer = Trainer(cfg_for(setup, run_dir, "train.max_steps=6"))
    trainer.train()
    assert trainer.state.step == 6


def test_resume_reads_each_checkpoint_file_once(setup, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    Trainer(cfg_for(setup, run_dir, "train.max_steps=2")).train()
    reads: list[str] = []
    real_load_file, real_torch_load = ckpt.load_file, torch.load

    def counted_load_file(path, *args, **kwargs):
        reads.append(Path(path).name)
        return real_load_file(path, *args, **kwargs)

    def counted_torch_load(path, *args, **kwargs):
        reads.append(Path(path).name)
        return real_torch_load(path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "load_file", counted_load_file)
    monkeypatch.setattr(torch, "load", counted_torch_load)
    trainer = Trainer(cfg_for(setup, run_dir, "train.max_steps=3"))
    trainer.train()
    assert trainer.state.step == 3
    assert sorted(reads) == ["ema.safetensors", "model.safetensors", "optimizer.pt", "rng_rank0.pt"]


def test_incomplete_checkpoint_never_chosen(setup, tmp_path):
    run_dir = tmp_path / "run"
    Trainer(cfg_for(setup, run_dir, "train.max_steps=4", "checkpoint.keep_last=3")).train()
    (ckpt.step_dir(run_dir / "checkpoints", 4) / ckpt.MARKER).unlink()
    assert ckpt.latest(run_dir / "checkpoints") == ckpt.step_dir(run_dir / "checkpoints", 2)


def test_init_from_ignored_when_checkpoint_exists(setup, tmp_path, caplog):
    donor = tmp_path / "donor"
    Trainer(cfg_for(setup, donor, "train.max_steps=2", "train.seed=5")).train()
    run_dir = tmp_path / "run"
    Trainer(cfg_for(setup, run_dir, "train.max_steps=2")).train()
    before = load_file(ckpt.step_dir(run_dir / "checkpoints", 2) / "model.safetensors")
    trainer = Trainer(cfg_for(setup, run_dir, "train.max_steps=2", f"init_from={donor / 'final'}"))
    trainer.train()
    assert "init_from=" in caplog.text and "is ignored" in caplog.text
    after = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_nan_guard_skips_update_then_stops(setup, tmp_path):
    trainer = Trainer(cfg_for(setup, tmp_path / "run", "train.max_steps=20", "train.max_nonfinite=3"))
    real_loss = trainer.objective.loss

    def poisoned(*args, **kwargs):
        loss, metrics = real_loss(*args, **kwargs)
        return loss * float("nan"), metrics

    trainer.objective.loss = poisoned
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(FloatingPointError, match="consecutive non-finite steps"):
        trainer.train()
    assert trainer.state.nonfinite_skips == 3
    assert all(torch.equal(start[k], v) for k, v in trainer.model.state_dict().items())
    assert ckpt.latest(tmp_path / "run" / "checkpoints") is not None


def test_unknown_checkpoint_format_refused(setup, tmp_path):
    run_dir = tmp_path / "run"
    Trainer(cfg_for(setup, run_dir, "train.max_steps=2")).train()
    step = ckpt.step_dir(run_dir / "checkpoints", 2)
    state = json.loads((step / "trainer.json").read_text())
    (step / "trainer.json").write_text(json.dumps({**state, "format": "someone-else-v9"}))
    with pytest.raises(ckpt.CheckpointError, match="unknown checkpoint format"):
        ckpt.verify(step)
    result = run_cli("train", str(setup), f"run.dir={tmp_path / 'other'}", f"resume={step}")
    assert result.returncode == 2 and "unknown checkpoint format" in result.stderr
    assert "Traceback" not in result.stderr


def test_pickled_optimizer_state_is_refused(setup, tmp_path):
    run_dir = tmp_path / "run"
    Trainer(cfg_for(setup, run_dir, "train.max_steps=2")).train()
    step = ckpt.step_dir(run_dir / "checkpoints", 2)
    torch.save(
        {"state": {}, "param_groups": [], "evil": datetime.datetime(2020, 1, 1)}, step / "optimizer.pt"
    )
    with pytest.raises(ckpt.CheckpointError, match="optimizer.pt"):
        ckpt.verify(step)


@pytest.mark.parametrize("policy", ["raise", "continue"])
def test_write_failure_keeps_previous_checkpoint(setup, tmp_path, monkeypatch, policy):
    run_dir = tmp_path / "run"
    real = ckpt.write_main_files
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "write_main_files", failing)
    trainer = Trainer(cfg_for(setup, run_dir, "train.max_steps=6", f"checkpoint.on_error={policy}"))
    if policy == "raise":
        with pytest.raises(ckpt.CheckpointError, match="No space left"):
            trainer.train()
        assert ckpt.latest(run_dir / "checkpoints") == ckpt.step_dir(run_dir / "checkpoints", 2)
    else:
        trainer.train()
        assert (run_dir / "final" / "COMPLETE").exists()
    ckpt.verify(ckpt.step_dir(run_dir / "checkpoints", 2))
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_two_process_run_resumes_on_one(setup, tmp_path):
    """Saved with 2 CPU processes (gloo), resumed with 1 at the same global batch."""
    run_dir = tmp_path / "run"
    two = run_cli_2proc(
        "train", str(setup), f"run.dir={run_dir}", "data.batch_size=4", "train.max_steps=4", timeout=300
    )
    assert two.returncode == 0, two.stderr[-3000:]
    shutil.rmtree(run_dir / "final")
    one = run_cli("train", str(setup), f"run.dir={run_dir}", "data.batch_size=8", "train.max_steps=6")
    assert one.returncode == 0, one.stderr[-3000:]
    assert "resumed from" in one.stderr and "step 4" in one.stderr
    state = ckpt.read_state(ckpt.step_dir(run_dir / "checkpoints", 6))
    assert state.samples == 6 * 8
