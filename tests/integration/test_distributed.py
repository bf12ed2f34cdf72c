"""Data parallelism: 2 CPU processes (gloo, through `accelerate launch`) train exactly like 1 process
with the same global batch -- same logged loss, same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tristage.demo.tiny_run import write_tiny_stage1

from ..conftest import run_cli, run_cli_2proc

STEPS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    return write_tiny_stage1(tmp_path_factory.mktemp("ddp"))


def overrides(run_dir: Path, batch: int) -> list[str]:
    return [
        f"run.dir={run_dir}",
        f"data.batch_size={batch}",
        f"train.max_steps={STEPS}",
        "train.log_every=1",
        "checkpoint.every=1",
        f"checkpoint.keep_last={STEPS}",
        "tracking.mode=disabled",
    ]


def test_two_processes_match_one_with_the_same_global_batch(setup, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    single = run_cli("train", str(setup), *overrides(one, 8))
    assert single.returncode == 0, single.stderr[-3000:]
    double = run_cli_2proc("train", str(setup), *overrides(two, 4))
    assert double.returncode == 0, double.stderr[-3000:]

    logs = {
        run: [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two)
    }
    assert [m["step"] for m in logs[one]] == [m["step"] for m in logs[two]] == list(range(1, STEPS + 1))
    assert [m["samples_seen"] for m in logs[two]] == [8 * s for s in range(1, STEPS + 1)]
    for key in ("loss", "loss_mse", "loss_vlb", "grad_norm"):
        got = torch.tensor([m[key] for m in logs[two]], dtype=torch.float64)
        want = torch.tensor([m[key] for m in logs[one]], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=key)

    first, last = "checkpoints/step_0000001", f"checkpoints/step_{STEPS:07d}"
    for weights in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(one / last / weights), load_file(two / last / weights)
        assert a.keys() == b.keys()
        start = load_file(one / first / weights)
        assert any(not torch.equal(a[k], start[k]) for k in a)  # the steps did move the weights
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=f"{weights}:{k}")
