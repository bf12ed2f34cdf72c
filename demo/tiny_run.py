"""A seconds-long stage-1 run on the demo world: a tiny random VAE, a tiny DiT, 216 images.

``tristage bench resume`` kills and resumes it; the test suite trains it wherever a real run is needed
(resume, stops, FSDP, tracking).  It is written like a user's run: raw shards, ``tristage cache``'s
pass over them, and a resolved config file that ``tristage train CONFIG`` reads.
"""

from __future__ import annotations

from pathlib import Path

STEPS = 24  # optimizer steps of the tiny stage
EVERY = 2  # its checkpoint interval


def tiny_vae(folder: Path) -> Path:
    """A random 4-level ``AutoencoderKL`` (factor 8, 4 latent channels), saved for ``from_pretrained``."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8,
        latent_channels=4,
    )
    vae.save_pretrained(folder)
    return folder


def write_tiny_stage1(root: Path, extra: tuple[str, ...] = ()) -> Path:
    """Raw shards, the VAE, the cache and ``root/stage.yaml`` (run.dir ``root/ref``); returns the config.
    ``extra``: more config overrides (e.g. ``data.val_fraction=0.1``, a held-out split)."""
    from accelerate import Accelerator

    from tristage.demo import synthetic
    from tristage.demo.run import CONFIGS
    from tristage.train.config import load_config, save_config
    from tristage.train.training.stage_cache import cache_stage

    raw = synthetic.write_stage1(root / "raw", n=18 * 12, per_shard=72)
    overrides = [
        f"run.dir={root / 'ref'}",
        f"data.cache_dir={root / 'cache'}",
        f"data.source.paths=[{raw}/imagenet-*.tar]",
        f"data.source.synsets={raw / 'synsets.txt'}",
        f"encoders.vae={tiny_vae(root / 'vae')}",
        "model.size=tiny",
        "model.sample_size=8",  # 64 px / this VAE's factor 8
        "data.batch_size=8",
        "data.shuffle_buffer=32",
        f"train.max_steps={STEPS}",
        "train.log_every=4",
        f"checkpoint.every={EVERY}",
        "checkpoint.keep_last=2",
        "tracking.mode=disabled",
        "validation.loss_every=0",  # the demo's evaluation needs its held-out split; `extra` may ask for one
        "validation.metrics_every=0",
        *extra,
    ]
    cfg = load_config(CONFIGS / "stage1.yaml", overrides)
    cache_stage(cfg, Accelerator(cpu=True))
    save_config(cfg, root / "stage.yaml")
    return root / "stage.yaml"
