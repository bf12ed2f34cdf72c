"""Shared fixtures: everything offline, tiny, CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tristage.bench import resume as bench_resume

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``tristage ARGS`` as a user would (a fresh interpreter)."""
    return subprocess.run(
        [sys.executable, "-m", "tristage.train.cli", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_cli_2proc(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``tristage ARGS`` under ``accelerate launch`` with 2 CPU processes (gloo), one thread each."""
    config = ROOT / "configs/accelerate/cpu_2proc.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    return subprocess.run(
        [*launch, "-m", "tristage.train.cli", *args],
        cwd=ROOT,
        env={**bench_resume.env(), "ACCELERATE_USE_CPU": "true"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: on a shared 2-core machine thread hand-offs cost more than the maths (5x here).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cli():
    return run_cli
