"""``tristage bench resume --trials N``: SIGKILL a run at random points, resume, compare bit for bit.

One reference run goes uninterrupted.  Each trial runs the same stage, kills
it with SIGKILL at >= 3 random moments (some land mid-step, some mid-save),
resumes each time with ``resume: auto``, and finally compares ``final/`` (EMA
weights) and the last checkpoint's raw weights and EMA with the reference,
byte for byte.  The last line printed is ``{"trials": N, "identical": M}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from tristage.demo.tiny_run import EVERY, STEPS, write_tiny_stage1


def train_cmd(config: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "tristage", "train", str(config), f"run.dir={run_dir}"]


def env() -> dict[str, str]:
    """Same numerics in every process: one thread, offline."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}


def newest_step(run_dir: Path) -> int:
    steps = [
        int(p.name.split("_")[1])
        for p in (run_dir / "checkpoints").glob("step_*")
        if (p / "COMPLETE").exists()
    ]
    return max(steps, default=-1)


def run_with_kill(config: Path, run_dir: Path, after_step: int, rng: random.Random) -> bool:
    """Start the run; SIGKILL it once a checkpoint >= after_step exists (plus a random delay).

    Returns True if the kill landed (False if the run finished first)."""
    proc = subprocess.Popen(
        train_cmd(config, run_dir), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    while proc.poll() is None and newest_step(run_dir) < after_step:
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.4))
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def run_to_end(config: Path, run_dir: Path) -> None:
    result = subprocess.run(train_cmd(config, run_dir), env=env(), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"run in {run_dir} failed: {result.stderr[-2000:]}")


def fingerprint_weights(run_dir: Path) -> list[bytes]:
    """Raw bytes of final/ EMA weights and of the last checkpoint's weights and EMA."""
    final = sorted((run_dir / "final" / "transformer").glob("*.safetensors"))
    last = run_dir / "checkpoints" / f"step_{STEPS:07d}"
    tensors = [load_file(f) for f in final] + [
        load_file(last / "model.safetensors"),
        load_file(last / "ema.safetensors"),
    ]
    return [b"".join(t[k].numpy().tobytes() for k in sorted(t)) for t in tensors]


def trial(config: Path, root: Path, reference: list[bytes], rng: random.Random, kills: int) -> bool:
    run_dir = root / f"trial_{rng.randrange(1 << 30):09d}"
    points = sorted(rng.sample(range(0, STEPS - EVERY), kills))
    for point in points:
        run_with_kill(config, run_dir, point, rng)
    run_to_end(config, run_dir)
    return fingerprint_weights(run_dir) == reference


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="tristage bench resume", description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="kill-and-resume runs to compare")
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs per trial (>= 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        config = write_tiny_stage1(root)
        run_to_end(config, root / "ref")
        reference = fingerprint_weights(root / "ref")
        rng = random.Random(args.seed)
        identical = sum(trial(config, root, reference, rng, args.kills) for _ in range(args.trials))
    result = {"trials": args.trials, "identical": identical}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
