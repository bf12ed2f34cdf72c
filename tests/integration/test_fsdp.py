"""FSDP (``train.parallelism: fsdp``) with 2 CPU processes (gloo): it trains like DDP at the same global
batch, its checkpoints are sharded (DCP), a SIGKILLed run resumes bit-identically, and a 2-process run
resumes on 1 process."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from tristage.demo.tiny_run import write_tiny_stage1
from tristage.train.config import ConfigError, load_config
from tristage.train.inference.export import export
from tristage.train.training import checkpoint_files as ckpt
from tristage.train.training import dcp

from ..checkpoints import read_full, verify
from ..conftest import newest_step, run_cli, run_cli_2proc, start_2proc

STEPS, EVERY = 6, 2
CLIP = 0.05  # optim.grad_clip: below most of these steps' gradient norms, so the sharded clip is exercised
TIMEOUT = 240  # seconds per 2-process run: a hang fails the test instead of blocking the suite


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    return write_tiny_stage1(tmp_path_factory.mktemp("fsdp"))


def overrides(run_dir: Path, parallelism: str, batch: int = 4) -> list[str]:
    return [
        f"run.dir={run_dir}",
        f"train.parallelism={parallelism}",
        f"data.batch_size={batch}",
        f"train.max_steps={STEPS}",
        f"optim.grad_clip={CLIP}",
        "train.log_every=1",
        f"checkpoint.every={EVERY}",
        f"checkpoint.keep_last={STEPS}",
        "tracking.mode=disabled",
        f"validation.every={STEPS}",  # the FSDP path gathers the EMA for it; DDP samples in place
        "validation.steps=2",
    ]


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory) -> dict[str, Path]:
    """The same stage under DDP and FSDP, 2 processes x batch 4 each."""
    root = tmp_path_factory.mktemp("runs")
    for parallelism in ("ddp", "fsdp"):
        result = run_cli_2proc(
            "train", str(setup), *overrides(root / parallelism, parallelism), timeout=TIMEOUT
        )
        assert result.returncode == 0, result.stderr[-3000:]
    return {p: root / p for p in ("ddp", "fsdp")}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "transformer" / "diffusion_pytorch_model.safetensors")


def last(run_dir: Path) -> Path:
    return ckpt.step_dir(run_dir / "checkpoints", STEPS)


def test_fsdp_trains_like_ddp_and_writes_sharded_checkpoints(runs, tmp_path):
    logs = {
        p: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for p, d in runs.items()
    }
    for key in ("loss", "loss_mse", "loss_vlb", "grad_norm"):
        got = torch.tensor([m[key] for m in logs["fsdp"]], dtype=torch.float64)
        want = torch.tensor([m[key] for m in logs["ddp"]], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=key)
    assert [m["samples_seen"] for m in logs["fsdp"]] == [8 * s for s in range(1, STEPS + 1)]
    assert sum(m["grad_norm"] > CLIP for m in logs["ddp"]) >= 2  # clipping did act
    ddp, fsdp = final_weights(runs["ddp"]), final_weights(runs["fsdp"])
    assert ddp.keys() == fsdp.keys()
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-5, atol=1e-7, msg=f"final/{k}")
    raw = read_full(last(runs["fsdp"]), "model")
    start = load_file(ckpt.step_dir(runs["ddp"] / "checkpoints", EVERY) / "model.safetensors")
    want = load_file(last(runs["ddp"]) / "model.safetensors")
    assert any(not torch.equal(want[k], start[k]) for k in want)  # the steps did move the weights
    for k in want:
        torch.testing.assert_close(raw[k], want[k], rtol=1e-5, atol=1e-7, msg=f"model/{k}")
    assert (runs["fsdp"] / "validation" / f"step_{STEPS:07d}.png").is_file()
    assert (export(runs["fsdp"], tmp_path / "export") / "model_index.json").is_file()


def test_fsdp_checkpoint_holds_each_rank_s_shards_only(runs, tmp_path):
    """Weights, AdamW moments and EMA: every multi-row tensor is split across both ranks' files."""
    path = last(runs["fsdp"])
    assert not (path / "model.safetensors").exists() and not (path / "optimizer.pt").exists()
    metadata = FileSystemReader(path / dcp.FOLDER).read_metadata()
    files: dict[str, set[str]] = {}
    for index, item in metadata.storage_data.items():
        files.setdefault(index.fqn, set()).add(item.relative_path)
    rows = {k: m.size[0] for k, m in metadata.state_dict_metadata.items() if getattr(m, "size", ())}
    for prefix in ("model.", "ema.", "optim.state."):
        split = [k for k in rows if k.startswith(prefix) and rows[k] > 1]
        assert split and all(len(files[k]) == 2 for k in split), prefix
    verify(path)
    path = Path(shutil.copytree(path, tmp_path / path.name))  # the other tests read the original
    shard = next(p for p in (path / dcp.FOLDER).glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ckpt.CheckpointError, match="truncated shard file"):
        verify(path)


def launch_2proc(config: Path, run_dir: Path) -> subprocess.Popen:
    """``run_cli_2proc``, started in the background."""
    args = ["train", str(config), *overrides(run_dir, "fsdp")]
    return start_2proc(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL both ranks and the launcher at once, as a lost node would (torchrun starts the ranks in
    sessions of their own, so killing the launcher's process group would not reach them)."""
    family = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    for member in family:
        member.send_signal(signal.SIGKILL)
    psutil.wait_procs(family, timeout=30)
    proc.wait(timeout=30)


def kill_after_checkpoint(proc: subprocess.Popen, run_dir: Path, step: int) -> int:
    """SIGKILL the run (``kill_all``) once its checkpoint ``step`` is complete, a moment into the next
    step; returns the newest complete checkpoint's step."""
    deadline = time.time() + TIMEOUT
    while newest_step(run_dir) < step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.05)  # into the next step: a longer wait let a fast machine reach the last save (6 of 6)
    assert proc.poll() is None, "the run ended before it could be killed"
    kill_all(proc)
    return newest_step(run_dir)


def test_fsdp_run_killed_and_resumed_is_bit_identical(runs, setup, tmp_path):
    run_dir = tmp_path / "killed"
    killed_at = kill_after_checkpoint(launch_2proc(setup, run_dir), run_dir, EVERY)
    assert EVERY <= killed_at < STEPS and not (run_dir / "final").exists()
    result = run_cli_2proc("train", str(setup), *overrides(run_dir, "fsdp"), timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {killed_at}" in result.stderr
    for entry in ("model", "ema"):
        got, want = read_full(last(run_dir), entry), read_full(last(runs["fsdp"]), entry)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), entry
    got, want = final_weights(run_dir), final_weights(runs["fsdp"])
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_two_process_fsdp_run_resumes_on_one_process(runs, setup, tmp_path):
    run_dir, middle = tmp_path / "one", ckpt.step_dir(runs["fsdp"] / "checkpoints", 4)
    args = [*overrides(run_dir, "fsdp", batch=8), f"resume={middle}"]
    result = run_cli("train", str(setup), *args, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {middle} at step 4" in result.stderr
    assert ckpt.read_state(last(run_dir)).samples == STEPS * 8
    got, want = final_weights(run_dir), final_weights(runs["fsdp"])
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7, msg=f"final/{k}")


def test_parallelism_is_checked_where_it_is_declared(setup):
    result = run_cli("train", str(setup), "run.dir=unused", "train.parallelism=zero3")
    assert result.returncode == 2
    assert "key 'train.parallelism': 'zero3' is not one of ddp, fsdp, fsdp_grad_op" in result.stderr
    with pytest.raises(ConfigError, match="fp16 is not supported with FSDP"):
        load_config(setup, ["run.dir=unused", "train.parallelism=fsdp", "train.mixed_precision=fp16"])
