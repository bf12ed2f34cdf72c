"""REPA and token masking in real runs: 2 CPU processes (gloo) under DDP and FSDP train alike, a SIGKILLed
FSDP run resumes bit-identically (projector, AdamW, EMA, the masks drawn), the projector stays out of
``final/`` and the export, and a bad key is one line naming it before anything is touched."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from tristage.demo.encoders import build_vision_encoder, save_vision_encoder
from tristage.demo.tiny_run import write_tiny_stage1
from tristage.train.config import load_config, save_config
from tristage.train.inference.export import export
from tristage.train.training import checkpoint_files as ckpt
from tristage.train.training.stage_cache import cache_stage

from ..checkpoints import read_full
from ..conftest import run_cli, run_cli_2proc, start_2proc
from .test_fsdp import kill_after_checkpoint

STEPS, EVERY = 6, 2
TIMEOUT = 240  # seconds per 2-process run: a hang fails the test instead of blocking the suite
OPTIONS = [  # REPA on block 1 of 2; deferred masking (block 1 is the mixer) for 4 of the 6 steps
    "objective.repa.encoder_resolution=48",  # a 6 x 6 encoder grid resized to the DiT's 4 x 4
    "objective.repa.projector_dim=32",
    "train.mask.ratio=0.5",
    "train.mask.until_step=4",
    "train.mask.mode=deferred",
    "train.mask.mixer_blocks=1",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """The tiny stage-1 world, a tiny DINOv2, and a config whose cache holds its REPA features."""
    root = tmp_path_factory.mktemp("cheaper")
    plain = write_tiny_stage1(root)
    encoder = build_vision_encoder(hidden=16, layers=2, patch=8, image_size=48)
    overrides = [f"objective.repa.encoder={save_vision_encoder(encoder, root / 'dino')}", *OPTIONS]
    cfg = load_config(plain, [f"data.cache_dir={root / 'cache_repa'}", *overrides])
    cache_stage(cfg, Accelerator(cpu=True))
    save_config(cfg, root / "cheaper.yaml")
    return root / "cheaper.yaml"


def overrides(run_dir: Path, parallelism: str) -> list[str]:
    return [
        f"run.dir={run_dir}",
        f"train.parallelism={parallelism}",
        "data.batch_size=4",
        f"train.max_steps={STEPS}",
        "train.log_every=1",
        f"checkpoint.every={EVERY}",
        f"checkpoint.keep_last={STEPS}",
        "tracking.mode=disabled",
        "validation.every=0",
    ]


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    for parallelism in ("ddp", "fsdp"):
        args = overrides(root / parallelism, parallelism)
        result = run_cli_2proc("train", str(setup), *args, timeout=TIMEOUT)
        assert result.returncode == 0, result.stderr[-3000:]
    return {p: root / p for p in ("ddp", "fsdp")}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "transformer" / "diffusion_pytorch_model.safetensors")


def test_repa_and_masking_train_alike_under_ddp_and_fsdp(runs, tmp_path):
    logs = {p: metrics(d) for p, d in runs.items()}
    for key in ("loss", "loss_mse", "loss_vlb", "repa_loss", "repa_cos", "grad_norm"):
        got = torch.tensor([m[key] for m in logs["fsdp"]], dtype=torch.float64)
        want = torch.tensor([m[key] for m in logs["ddp"]], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=key)
    cos = [m["repa_cos"] for m in logs["ddp"]]
    assert all(-1 <= c <= 1 for c in cos) and cos[-1] > cos[0]  # the projector learns to align
    projector = {
        k for k in load_file(ckpt.step_dir(runs["ddp"] / "checkpoints", STEPS) / "model.safetensors")
    }
    assert {k for k in projector if k.startswith("repa_projector.")} == {
        f"repa_projector.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")
    }
    assert any(
        k.startswith("repa_projector.")
        for k in read_full(ckpt.step_dir(runs["fsdp"] / "checkpoints", STEPS), "model")
    )
    for run_dir in runs.values():  # training-only: not in the EMA, final/ or the export
        assert not any(k.startswith("repa_projector.") for k in final_weights(run_dir))
    ema = load_file(ckpt.step_dir(runs["ddp"] / "checkpoints", STEPS) / "ema.safetensors")
    assert not any(k.startswith("repa_projector.") for k in ema)
    ddp, fsdp = final_weights(runs["ddp"]), final_weights(runs["fsdp"])
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-5, atol=1e-7, msg=f"final/{k}")
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(export(runs["fsdp"], tmp_path / "export"))
    assert pipe(class_labels=[0], num_inference_steps=2, output_type="np").images.shape == (1, 64, 64, 3)


def test_fsdp_run_killed_and_resumed_is_bit_identical(runs, setup, tmp_path):
    """Killed after its step-2 checkpoint (masked steps) and resumed: every weight, the projector's,
    AdamW's and the EMA's, ends bit-identical to the uninterrupted run's."""
    run_dir = tmp_path / "killed"
    killed_at = kill_after_checkpoint(launch_2proc_with(setup, run_dir), run_dir, EVERY)
    assert EVERY <= killed_at < STEPS and not (run_dir / "final").exists()
    result = run_cli_2proc("train", str(setup), *overrides(run_dir, "fsdp"), timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {killed_at}" in result.stderr
    last = ckpt.step_dir(run_dir / "checkpoints", STEPS)
    reference = ckpt.step_dir(runs["fsdp"] / "checkpoints", STEPS)
    for entry in ("model", "ema", "optim"):
        got, want = read_full(last, entry), read_full(reference, entry)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), entry
    got, want = final_weights(run_dir), final_weights(runs["fsdp"])
    assert all(torch.equal(got[k], want[k]) for k in want)
    resumed = {m["step"]: m for m in metrics(run_dir)}
    for m in metrics(runs["fsdp"]):  # the replayed steps drew the same masks: the same losses
        assert resumed[m["step"]]["loss"] == m["loss"] and resumed[m["step"]]["repa_loss"] == m["repa_loss"]


def launch_2proc_with(config: Path, run_dir: Path) -> subprocess.Popen:
    """The FSDP run of :func:`overrides`, started in the background."""
    args = ["train", str(config), *overrides(run_dir, "fsdp")]
    return start_2proc(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.mask.ratio=1.0", "key 'train.mask.ratio': must be in [0.0, 1.0), got 1.0"),
        ("objective.repa.block=3", "key 'objective.repa.block': 3 is past the model's depth 2; use 1 to 2"),
    ],
)
def test_bad_key_is_one_line_and_touches_nothing(setup, tmp_path, override, message):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "keep.txt").write_text("mine")
    result = run_cli("train", str(setup), f"run.dir={run_dir}", override)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(message) and str(setup) in lines[0], result.stderr
    assert sorted(p.name for p in run_dir.rglob("*")) == ["checkpoints", "keep.txt"]
