"""Online evaluation on 2 CPU processes (gloo, ``accelerate launch``): ``val/loss`` is the same number on 1
and 2 processes (DDP; FSDP with gradient accumulation) and after a resume; the ranks share the sample
metrics (no rank idle while another generates); the held-out split does not depend on the processes of
the cache pass; ``checkpoint.keep_best``; a missing extractor is one line at start-up."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tristage.data.cache_format import shard_samples
from tristage.data.val_split import val_dir
from tristage.demo.tiny_run import write_tiny_stage1
from tristage.train.config import load_config
from tristage.train.training import checkpoint_files as ckpt

from ..conftest import run_cli, run_cli_2proc
from ..tiny_extractors import tiny_clip, tiny_dinov2

STEPS, EVERY = 4, 2
TIMEOUT = 300  # seconds per 2-process run: a hang fails the test instead of blocking the suite
REL = 1e-5  # fp32 reduction tolerance between layouts (the weights themselves agree to ~1e-6)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluation")
    config = write_tiny_stage1(root, ("data.val_fraction=0.1",))
    return {"config": config, "dino": tiny_dinov2(root / "dino"), "clip": tiny_clip(root / "clip")}


def overrides(run_dir: Path, batch: int, *extra: str) -> list[str]:
    return [
        f"run.dir={run_dir}",
        f"data.batch_size={batch}",
        f"train.max_steps={STEPS}",
        f"validation.loss_every={EVERY}",
        "train.log_every=2",
        f"checkpoint.every={EVERY}",
        f"checkpoint.keep_last={STEPS}",
        "tracking.mode=disabled",
        *extra,
    ]


def val_rows(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    found = [r for r in rows if "val/loss" in r]
    assert len({r["step"] for r in found}) == len(found), "a val/loss row is logged twice"
    return {r["step"]: r for r in found}


def assert_same_val_loss(got: dict[int, dict], want: dict[int, dict], rel: float) -> None:
    assert sorted(got) == sorted(want) == list(range(EVERY, STEPS + 1, EVERY))
    for step, row in want.items():
        keys = [k for k in row if k.startswith("val/loss")]
        assert len(keys) == 3 + 8  # loss, mse, vlb and 8 timesteps
        for key in keys:
            assert got[step][key] == pytest.approx(row[key], rel=rel), (step, key)


@pytest.fixture(scope="module")
def one(setup, tmp_path_factory) -> Path:
    """The reference: 1 process, batch 8."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    result = run_cli("train", str(setup["config"]), *overrides(run_dir, 8))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_val_loss_is_the_same_on_one_and_two_processes(setup, one, tmp_path):
    result = run_cli_2proc("train", str(setup["config"]), *overrides(tmp_path / "two", 4), timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_val_loss(val_rows(tmp_path / "two"), val_rows(one), REL)
    assert val_rows(one)[4]["val/loss"] != val_rows(one)[2]["val/loss"]  # training moved the EMA weights


def test_val_loss_is_the_same_after_a_resume_and_the_best_is_recorded(setup, one, tmp_path):
    run_dir = tmp_path / "resumed"
    first = run_cli("train", str(setup["config"]), *overrides(run_dir, 8), "train.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_cli("train", str(setup["config"]), *overrides(run_dir, 8))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "at step 2" in again.stderr
    got, want = val_rows(run_dir), val_rows(one)
    assert strip_seconds(got) == strip_seconds(want)  # resume is exact: the same values, bit for bit
    record = json.loads((run_dir / "final" / "training.json").read_text())
    best_step = min(want, key=lambda s: want[s]["val/loss"])
    assert record["best_val_step"] == best_step and record["best_val_loss"] == want[best_step]["val/loss"]
    assert record["val_loss"] == want[STEPS]["val/loss"] and record["steps"] == STEPS


def strip_seconds(rows: dict[int, dict]) -> dict[int, dict]:
    return {
        s: {k: v for k, v in r.items() if k not in ("val/seconds", "val/cpu_seconds")}
        for s, r in rows.items()
    }


def test_ranks_share_the_sample_metrics_under_fsdp(setup, one, tmp_path):
    """FSDP, gradient accumulation 2 x batch 2 per process (the same global batch of 8): val/loss as on 1
    process, and each rank generates half of the metrics' images at the same time as the other."""
    run_dir = tmp_path / "fsdp"
    metrics = [
        "train.parallelism=fsdp",
        "train.grad_accum=2",
        f"validation.metrics_every={STEPS}",
        "validation.metrics=[fid,clip_score,adherence]",
        "validation.metrics_class_labels=[0,1,2,3,4,5]",
        "validation.metrics_per_prompt=2",
        "validation.steps=4",
        f"validation.fid_feature_extractor={setup['dino']}",
        f"validation.clip_model={setup['clip']}",
        "checkpoint.keep_best=true",
        "checkpoint.keep_last=1",
    ]
    result = run_cli_2proc("train", str(setup["config"]), *overrides(run_dir, 2, *metrics), timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_val_loss(val_rows(run_dir), val_rows(one), REL)
    record = json.loads((run_dir / "eval" / f"step_{STEPS:07d}.json").read_text())
    ranks = record["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and [r["images"] for r in ranks] == [6, 6]
    assert max(r["start"] for r in ranks) < min(r["end"] for r in ranks)  # both generated at once
    values = val_rows(run_dir)[STEPS]
    assert values["val/images"] == 12 and values["val/fid"] >= 0
    assert 0 <= values["val/clip_score"] <= 100 and 0 <= values["val/adherence"] <= 1
    assert (run_dir / "eval" / "fid_reference.npz").is_file()
    best = json.loads((run_dir / "final" / "training.json").read_text())["best_val_step"]
    assert ckpt.read_state(run_dir / "checkpoints" / ckpt.BEST).step == best
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_")] == [
        f"step_{STEPS:07d}"
    ]  # keep_last 1: the rotation left the best alone


def keys_of(folder: Path) -> list[str]:
    return sorted(m["__key__"] for s in folder.glob("features-*.tar") for m in shard_samples(str(s)))


def test_the_split_does_not_depend_on_the_cache_pass_s_processes(setup, tmp_path):
    cfg = load_config(setup["config"])
    result = run_cli_2proc(
        "cache", str(setup["config"]), f"data.cache_dir={tmp_path / 'cache'}", timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ours, theirs = Path(cfg.data.cache_dir), tmp_path / "cache"
    assert keys_of(val_dir(theirs)) == keys_of(val_dir(ours)) and keys_of(theirs) == keys_of(ours)


def test_a_missing_extractor_is_one_line_at_start_up_and_loses_nothing(setup, one, tmp_path):
    run_dir = Path(shutil.copytree(one, tmp_path / "run"))
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*")}
    metrics_before = (run_dir / "metrics.jsonl").read_text()
    missing = tmp_path / "no-such-model"
    bad = [
        "validation.metrics_every=2",
        "validation.metrics=[fid]",
        "validation.metrics_class_labels=[0,1]",
        f"validation.fid_feature_extractor={missing}",
    ]
    result = run_cli("train", str(setup["config"]), *overrides(run_dir, 8, "train.max_steps=6", *bad))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == (
        "tristage train: error: demo_stage1 config: key 'validation.fid_feature_extractor': "
        f"path does not exist: {missing}"
    )
    assert "Traceback" not in result.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*")} == before
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before
