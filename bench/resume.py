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

STEPS = 24  # optimizer steps of the benchmark stage
EVERY = 2  # checkpoint interval


def write_setup(root: Path) -> Path:
    """A tiny stage-1 world: raw shards, a tiny random VAE, the cache, and a config file."""
    from accelerate import Accelerator
    from diffusers import AutoencoderKL

    from tristage.demo import synthetic
    from tristage.demo.run import CONFIGS
    from tristage.train.config import load_config, save_config
    from tristage.train.families import cache_stage

    raw = synthetic.write_stage1(root / "raw", n=18 * 12, per_shard=72)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8,
        latent_channels=4,
    )
    vae.save_pretrained(root / "vae")
    overrides = [
        f"run.dir={root / 'ref'}",
        f"data.cache_dir={root / 'cache'}",
        f"data.source.paths=[{raw}/imagenet-*.tar]",
        f"data.source.synsets={raw / 'synsets.txt'}",
        f"encoders.vae={root / 'vae'}",
        "model.size=tiny",
        "model.sample_size=8",  # 64 px / this VAE's factor 8
        "data.batch_size=8",
        "data.shuffle_buffer=32",
        f"train.max_steps={STEPS}",
        "train.log_every=4",
        f"checkpoint.every={EVERY}",
        "checkpoint.keep_last=2",
        "tracking.mode=disabled",
    ]
    cfg = load_config(CONFIGS / "stage1.yaml", overrides)
    cache_stage(cfg, Accelerator(cpu=True))
    save_config(cfg, root / "stage.yaml")
    return root / "stage.yaml"


def train_cmd(config: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "tristage.train.cli", "train", str(config), f"run.dir={run_dir}"]


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
        config = write_setup(root)
        run_to_end(config, root / "ref")
        reference = fingerprint_weights(root / "ref")
        rng = random.Random(args.seed)
        identical = sum(trial(config, root, reference, rng, args.kills) for _ in range(args.trials))
    result = {"trials": args.trials, "identical": identical}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
