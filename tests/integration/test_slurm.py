"""configs/slurm/train.sbatch without SLURM: stub ``srun`` and ``scontrol`` on PATH record their calls.

The stub srun stands for a step whose launcher is pre-empted: it waits until the batch script forwards
SIGUSR1, then exits non-zero, as torchrun does when its workers were signalled.  SIGTERM (pre-emption,
scancel) and SIGUSR1 (the time-limit warning, --signal=B:USR1@N) to the batch script must each end in
``scontrol requeue JOBID`` unless the stage wrote final/COMPLETE.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "configs" / "slurm" / "train.sbatch"

SRUN = """#!/usr/bin/env bash
{ echo "srun $*"; echo "env NUM_PROCESSES=$NUM_PROCESSES MASTER_PORT=$MASTER_PORT"; } >> "$CALLS"
trap 'echo "srun got USR1" >> "$CALLS"; kill $sleeper; exit 143' USR1
trap 'echo "srun got TERM" >> "$CALLS"; kill $sleeper; exit 143' TERM
sleep 60 & sleeper=$!
wait $sleeper
"""
SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$CALLS"
[ "$1" = show ] && echo node-a && echo node-b
exit 0
"""

# One rerun: 1 CI run in 3 saw the stubbed batch script not finish within 60 s after its signal (root
# cause still open); a second failure in a row still fails.
pytestmark = pytest.mark.flaky(reruns=1)


def stubs(folder: Path) -> Path:
    folder.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def wait_for(path: Path, text: str, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while not (path.exists() and text in path.read_text()):
        assert time.time() < deadline, f"{text!r} never appeared in {path}"
        time.sleep(0.05)


def slurm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This environment without SLURM's or the GPUs' variables, the stubs first on PATH, one job."""
    path = f"{stubs(tmp_path / 'bin')}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CUDA_VISIBLE", "MASTER_"))}
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node-[a-b]"}
    calls = str(tmp_path / "calls.txt")
    return {**env, "PATH": path, "CALLS": calls, "SLURM_SUBMIT_DIR": str(ROOT), **slurm, **extra}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"STAGE": "stage9", "SLURM_GPUS_ON_NODE": "8"}, "STAGE=stage9 is not one of"),
        ({"STAGE": "stage2"}, "no GPU count (SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, CUDA_VISIBLE_DEVICES)"),
    ],
)
def test_bad_setup_is_one_line_before_any_step(tmp_path, env, message):
    job = subprocess.run(
        ["bash", str(SBATCH)], env=slurm_env(tmp_path, **env), capture_output=True, text=True
    )
    assert job.returncode == 2
    assert len(job.stderr.splitlines()) == 1 and job.stderr.startswith(f"train.sbatch: {message}")
    assert not (tmp_path / "calls.txt").exists()  # no srun, no scontrol


@pytest.mark.parametrize(
    ("sig", "finished", "gpu_env", "processes"),
    [
        (signal.SIGTERM, False, {"SLURM_GPUS_ON_NODE": "2"}, 4),
        (signal.SIGUSR1, False, {"SLURM_GPUS_PER_NODE": "h100:3"}, 6),
        (signal.SIGTERM, True, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, 8),
    ],
)
def test_a_stop_requeues_unless_final(tmp_path, sig, finished, gpu_env, processes):
    calls, run_dir = tmp_path / "calls.txt", tmp_path / "run"
    if finished:
        (run_dir / "final").mkdir(parents=True)
        (run_dir / "final" / "COMPLETE").write_text("")
    job = subprocess.Popen(
        ["bash", str(SBATCH), f"run.dir={run_dir}", "train.max_steps=5"],
        env=slurm_env(tmp_path, STAGE="stage2", **gpu_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(calls, "env NUM_PROCESSES")
        job.send_signal(sig)
        out, _ = job.communicate(timeout=60)
    finally:
        job.kill()
    log = calls.read_text()
    assert job.returncode == 0, out
    assert "srun got USR1" in log, "the stop was not forwarded to the step as SIGUSR1"
    assert f"env NUM_PROCESSES={processes} MASTER_PORT=14242" in log  # 2 nodes x GPUs; 10000 + 4242
    assert f"launch run.dir={run_dir} train.max_steps=5" in log  # the overrides reach the step
    assert ("scontrol requeue 4242" in log) is not finished, out
