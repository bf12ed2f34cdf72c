"""Tracking: W&B offline run dirs, run id kept across a resume, TensorBoard, disabled, validation grids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tristage.demo.tiny_run import write_tiny_stage1
from tristage.train.config import load_config
from tristage.train.training.checkpoint_files import TrainState
from tristage.train.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """A tiny stage-1 world (cache, random VAE, config)."""
    return write_tiny_stage1(tmp_path_factory.mktemp("tracking"))


def run(setup: Path, run_dir: Path, *overrides: str) -> dict:
    base = [f"run.dir={run_dir}", "train.max_steps=2", "checkpoint.every=2", "train.log_every=1"]
    return Trainer(load_config(setup, [*base, *overrides])).train()


def wandb_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def saved_run_id(run_dir: Path, step: int) -> str:
    state = json.loads((run_dir / "checkpoints" / f"step_{step:07d}" / "trainer.json").read_text())
    return state["tracker_run_id"]


def test_offline_run_dir_and_resume_keeps_the_run_id(setup, tmp_path):
    run_dir = tmp_path / "run"
    run(setup, run_dir, "tracking.mode=offline")
    first = wandb_runs(run_dir)
    assert len(first) == 1 and (first[0] / f"run-{first[0].name.split('-')[-1]}.wandb").is_file()
    run_id = saved_run_id(run_dir, 2)
    assert first[0].name.endswith(f"-{run_id}")
    summary = run(setup, run_dir, "tracking.mode=offline", "train.max_steps=4")
    assert summary["steps"] == 4
    assert summary["export"].startswith("none")
    runs = wandb_runs(run_dir)
    assert len(runs) == 2, runs  # one offline dir per process start, both carrying the same id
    # W&B names the dir offline-run-<time>-<id>, adding "-N" when two starts share a second
    assert all(f"-{run_id}" in r.name for r in runs), runs
    assert saved_run_id(run_dir, 4) == run_id
    assert TrainState.__dataclass_fields__["tracker_run_id"]


def test_tensorboard_writes_events(setup, tmp_path):
    run_dir = tmp_path / "run"
    run(setup, run_dir, "tracking.mode=tensorboard")
    assert list(run_dir.rglob("events.out.tfevents.*"))
    assert not (run_dir / "wandb").exists()


def test_disabled_writes_no_tracker_files(setup, tmp_path):
    run_dir = tmp_path / "run"
    run(setup, run_dir, "tracking.mode=disabled")
    assert not (run_dir / "wandb").exists()
    assert not list(run_dir.rglob("events.out.tfevents.*"))
    assert (run_dir / "metrics.jsonl").is_file()  # the local metrics file is always written


def test_validation_grid_at_the_configured_step(setup, tmp_path):
    run_dir = tmp_path / "run"
    run(
        setup,
        run_dir,
        "tracking.mode=offline",
        "train.max_steps=3",
        "validation.every=2",
        "validation.class_labels=[0,5,9]",
        "validation.steps=2",
    )
    grids = sorted((run_dir / "validation").glob("*.png"))
    assert [g.name for g in grids] == ["step_0000002.png"]
    image = Image.open(grids[0])
    assert image.size == (3 * 64, 64)  # three classes at 64 px side by side
    media = list((run_dir / "wandb").rglob("media/images/validation/*.png"))
    assert media, "the grid was not logged as a W&B image"


def test_validation_never_when_every_is_0(setup, tmp_path):
    run_dir = tmp_path / "run"
    run(setup, run_dir, "tracking.mode=disabled", "validation.every=0", "validation.class_labels=[0]")
    assert not (run_dir / "validation").exists()


def pixart_validation_config(tmp_path: Path, *overrides: str):
    """Demo stage 3 with the tiny T5, validation on, and the prompts' features cached as the cache pass
    writes them (data/cache.py write_validation_prompts)."""
    from tristage.data.cache import Encoders, write_validation_prompts
    from tristage.demo.encoders import demo_vae_path, write_demo_text_encoder

    from ..conftest import ROOT

    tokenizer, text_encoder = write_demo_text_encoder(tmp_path / "encoders")
    base = [
        f"encoders.vae={demo_vae_path()}",
        f"encoders.tokenizer={tokenizer}",
        f"encoders.text_encoder={text_encoder}",
        f"run.dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.resolution=64",
        "model.sample_size=8",
        "validation.every=3",
        "validation.steps=2",
    ]
    cfg = load_config(
        ROOT / "demo/configs/stage3.yaml", [*base, "validation.prompts=[a red circle,a blue square]"]
    )
    (tmp_path / "cache").mkdir()
    encoders = Encoders.load(cfg.encoders, torch.device("cpu"))
    write_validation_prompts(cfg.validation.prompts, cfg.encoders, encoders, tmp_path / "cache")
    return load_config(ROOT / "demo/configs/stage3.yaml", [*base, *overrides])


def test_pixart_validation_grid_from_the_cached_prompt_features(tmp_path, monkeypatch):
    """Stages 2-3: the grid comes from a PixArtAlphaPipeline built in memory around the live model, with
    the prompts' T5 features the cache pass wrote: no text encoder is loaded during training."""
    import transformers
    from accelerate import Accelerator

    from tristage.train.training.ema import EMA
    from tristage.train.training.validation import Validator

    from .test_pixart_interop import tiny_pixart

    cfg = pixart_validation_config(tmp_path, "validation.prompts=[a red circle,a blue square]")
    monkeypatch.setattr(transformers.T5EncoderModel, "from_pretrained", None)  # any T5 load would fail
    model = tiny_pixart(caption_channels=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    accelerator = Accelerator(cpu=True)  # no trackers: the grid is only written
    validator = Validator(cfg)
    assert validator.maybe_run(2, accelerator, model, EMA(model, 0.9)) is None
    path = validator.maybe_run(3, accelerator, model, EMA(model, 0.9))
    assert path == tmp_path / "run" / "validation" / "step_0000003.png"
    assert Image.open(path).size == (2 * 64, 64)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # raw weights restored


def test_outdated_validation_prompts_fail_at_start(tmp_path):
    from tristage.data.features import CacheError
    from tristage.train.training.validation import Validator

    cfg = pixart_validation_config(tmp_path, "validation.prompts=[a green triangle]")  # cached: two others
    with pytest.raises(
        CacheError, match=r"validation_prompts.safetensors: holds other validation prompts; rerun"
    ):
        Validator(cfg)
    cfg.validation.prompts = ["a blue square"]  # one of those cached: its features are there
    Validator(cfg)
    (tmp_path / "cache" / "validation_prompts.safetensors").unlink()
    with pytest.raises(CacheError, match=r"validation_prompts.safetensors: missing; run `tristage cache`"):
        Validator(cfg)
