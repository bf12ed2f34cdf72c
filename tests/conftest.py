"""Shared fixtures: everything offline, tiny, CPU."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tristage.train.training.checkpoint_files import MARKER, STEP_NAME

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


TRISTAGE = Path(sys.executable).parent / "tristage"  # the venv's console script, as users run it


@functools.cache
def user_folder() -> Path:
    """A working folder outside the checkout, so no test sees what ``python -m`` from the root would put
    on ``sys.path``: the installed package is all a command gets."""
    return Path(tempfile.mkdtemp(prefix="tristage-user-"))


def tristage(*args: str) -> list[str]:
    """The command line ``tristage ARGS`` through the installed executable."""
    return [str(TRISTAGE), *args]


def run_cli(
    *args: str, cwd: Path | None = None, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``tristage ARGS`` as a user would: the console script, from a folder outside the checkout."""
    return subprocess.run(
        tristage(*args), cwd=cwd or user_folder(), env=env, capture_output=True, text=True, timeout=timeout
    )


def launch_2proc(*args: str) -> list[str]:
    """``accelerate launch`` of the ``tristage`` executable with 2 CPU processes (gloo)."""
    config = ROOT / "configs/accelerate/cpu_2proc.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    return [*launch, *tristage(*args)]


def one_thread_env(**extra: str) -> dict[str, str]:
    """A launched process's environment: one thread (the same numerics in every process), offline."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def env_2proc(**extra: str) -> dict[str, str]:
    """The launched processes' environment: one thread each, offline, CPU."""
    return one_thread_env(ACCELERATE_USE_CPU="true", **extra)


def newest_step(run_dir: Path) -> int:
    """The newest checkpoint step whose marker is written (-1: none), read while a run may rotate them."""
    names = [p.name for p in (run_dir / "checkpoints").glob("step_*") if (p / MARKER).exists()]
    return max((int(n.split("_")[1]) for n in names if STEP_NAME.fullmatch(n)), default=-1)


def start_2proc(*args: str, env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    """Start ``tristage ARGS`` on 2 processes (see :func:`finish`), from a folder outside the checkout."""
    streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return subprocess.Popen(
        launch_2proc(*args), cwd=user_folder(), env=env or env_2proc(), text=True, **streams
    )


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts each rank in a session of its own)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # not a process, or gone
            continue
        children.setdefault(ppid, []).append(int(proc.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def stack_dumps(pids: list[int]) -> str:
    """Every process's Python stacks (``py-spy dump``, from the dev extra), to show where a hang sits."""
    if shutil.which("py-spy") is None:
        return "(py-spy not installed: no stacks)"
    dumps = []
    for pid in pids:
        command = ["py-spy", "dump", "--pid", str(pid)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        dumps.append(f"--- pid {pid}\n{done.stdout or done.stderr}")
    return "\n".join(dumps)


def finish(proc: subprocess.Popen, timeout: int) -> subprocess.CompletedProcess:
    """Wait for a launch; past ``timeout`` (a hang) kill the launcher and every rank, and fail."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pids = [*descendants(proc.pid), proc.pid]
        stacks = stack_dumps(pids)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"no exit within {timeout} s (a hang?): {err[-3000:]}\n{stacks}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_cli_2proc(
    *args: str, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``tristage ARGS`` under ``accelerate launch`` with 2 CPU processes (gloo), one thread each."""
    return finish(start_2proc(*args, env=env), timeout)


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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in ``tests/integration/`` starts processes, so it is ``slow``: the quick command
    ``./test.sh -m "not slow"`` runs ``tests/unit/`` only (less the unit tests marked slow themselves)."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.slow)
