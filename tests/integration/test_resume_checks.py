"""Resume checks what it resumes (issue 40 item 4), through the command line.

A run dir saved with another model is refused in one line naming each key with both values, before any
weight loads, and nothing in the run dir changes.  A run saved at global batch 8 (2 processes x 4) and
resumed on 1 process with the same config goes on at global batch 4: one warning line, the lr that
``optim.auto_lr`` gives global batch 4, every sample of the epoch exactly once (the loader's own test:
``tests/unit/test_resume_batch.py``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from tristage.demo.tiny_run import write_tiny_stage1
from tristage.train.config import load_config
from tristage.train.training import checkpoint_files as ckpt

from ..conftest import run_cli, run_cli_2proc

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    return write_tiny_stage1(tmp_path_factory.mktemp("resume_checks"))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_a_changed_model_is_one_line_and_the_run_dir_is_untouched(setup, tmp_path):
    run_dir = tmp_path / "run"
    first = run_cli("train", str(setup), f"run.dir={run_dir}", "train.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir / "final" / ckpt.MARKER).unlink()  # not finished: the next call resumes
    (run_dir / "checkpoints" / f"{ckpt.TMP_PREFIX}0000009").mkdir()  # a crashed save's leftover stays too
    before = snapshot(run_dir)
    changed = run_cli("train", str(setup), f"run.dir={run_dir}", "train.max_steps=4", "model.size=demo")
    assert changed.returncode == 2
    (line,) = [line for line in changed.stderr.splitlines() if line.startswith("tristage ")]
    assert line == (
        f"tristage train: error: {ckpt.step_dir(run_dir / 'checkpoints', 2)} was saved with another model "
        "(model.size 'tiny' -> 'demo': checkpoint -> config); to resume it, set those keys back; to start "
        "a new architecture from its weights, use init_from in a new run.dir"
    )
    assert "size mismatch" not in changed.stderr and "Traceback" not in changed.stderr
    assert snapshot(run_dir) == before


def test_runtime_only_model_keys_may_change_at_resume(setup, tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli("train", str(setup), f"run.dir={run_dir}", "train.max_steps=2").returncode == 0
    (run_dir / "final" / ckpt.MARKER).unlink()
    again = run_cli(
        "train", str(setup), f"run.dir={run_dir}", "train.max_steps=4", "model.gradient_checkpointing=true"
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr


def test_saved_at_global_batch_8_on_2_processes_resumed_at_4_on_one(setup, tmp_path):
    run_dir = tmp_path / "run"
    common = ["train", str(setup), f"run.dir={run_dir}", "data.batch_size=4", "optim.auto_lr=true"]
    common += ["train.log_every=1", "checkpoint.every=2", "tracking.mode=disabled"]
    two = run_cli_2proc(*common, "train.max_steps=4", timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    os.remove(run_dir / "final" / ckpt.MARKER)
    one = run_cli(*common, "train.max_steps=6")
    assert one.returncode == 0, one.stderr[-3000:]
    lr = load_config(setup).optim.lr
    (warning,) = [line for line in one.stderr.splitlines() if line.startswith("resuming at global batch")]
    assert warning == (
        "resuming at global batch 4 (1 processes x data.batch_size 4 x train.grad_accum 1); the checkpoint "
        f"ran at global batch 8: lr now {lr * math.sqrt(4 / 256):.4g} (optim.auto_lr: optim.lr x sqrt(global "
        "batch / 256)); the data position is kept"
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["samples_seen"] for r in rows] == [8, 16, 24, 32, 36, 40]
    warmup = load_config(setup).optim.warmup_steps  # the lr after step k: base x (k + 1) / warmup
    assert rows[3]["lr"] == pytest.approx(lr * math.sqrt(8 / 256) * 5 / warmup, rel=1e-6)
    assert rows[4]["lr"] == pytest.approx(lr * math.sqrt(4 / 256) * 6 / warmup, rel=1e-6)
    state = ckpt.read_state(ckpt.step_dir(run_dir / "checkpoints", 6))
    assert state.loader["global_batch"] == 4 and state.loader["skip"] == {"64,64": 32}
    assert state.loader["next_index"] == 32 + 2  # the rest of epoch 0, numbered after its 32 samples
