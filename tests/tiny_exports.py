"""Tiny exported pipelines (random weights, the committed demo VAE) for the sample, eval and app tests."""

from __future__ import annotations

from pathlib import Path

import torch

from tristage.demo.encoders import demo_vae_path, write_demo_text_encoder
from tristage.train.config import load_config
from tristage.train.inference.export import export
from tristage.train.models.dit import build_dit
from tristage.train.models.sizes import SIZES

from .unit.test_pixart_interop import ROOT, SAMPLE, SCALE, finish_run, perturb, tiny_pixart

CLASSES = "n001 red circle\nn002 blue square, cube\nn003 green triangle\n"


def dit_export(root: Path) -> Path:
    """A DiTPipeline folder whose labels are "red circle", "blue square" / "cube", "green triangle"."""
    dit = perturb(build_dit(SIZES["tiny"], SAMPLE, 4, 8, num_classes=1000), seed=4)
    synsets = root / "synsets.txt"
    synsets.parent.mkdir(parents=True, exist_ok=True)
    synsets.write_text(CLASSES)
    cfg = load_config(
        ROOT / "demo/configs/stage1.yaml",
        [
            f"encoders.vae={demo_vae_path()}",
            f"data.source.synsets={synsets}",
            f"data.cache_dir={root / 'no_cache'}",
            f"run.dir={root / 'run'}",
        ],
    )
    finish_run(root / "run", dit, cfg)
    return export(root / "run", root / "export")


def pixart_export(root: Path) -> Path:
    """A PixArtAlphaPipeline folder with the demo T5 (64 wide) and a tiny random transformer."""
    tokenizer, text_encoder = write_demo_text_encoder(root / "encoders")
    torch.manual_seed(0)
    pixart = tiny_pixart(caption_channels=64, seed=6)
    cfg = load_config(
        ROOT / "demo/configs/stage3.yaml",
        [
            f"encoders.vae={demo_vae_path()}",
            f"encoders.tokenizer={tokenizer}",
            f"encoders.text_encoder={text_encoder}",
            f"data.cache_dir={root / 'no_cache'}",
            f"run.dir={root / 'run'}",
            f"model.sample_size={SAMPLE}",
            f"data.resolution={SAMPLE * 8}",  # the size the export records as trained
            f"model.interpolation_scale={SCALE}",
        ],
    )
    finish_run(root / "run", pixart, cfg)
    return export(root / "run", root / "export")
