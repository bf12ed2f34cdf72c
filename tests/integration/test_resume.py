"""Fault tolerance: exact resume, SIGTERM, damaged checkpoints, init_from vs resume, NaN guard, I/O errors."""

from __future__ import annotations

import datetime
import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tristage.bench import resume as bench_resume
from tristage.cli import main as cli_main
from tristage.data.features import CacheError
from tristage.demo.tiny_run import write_tiny_stage1
from tristage.train.config import load_config
from tristage.train.training import checkpoint_files as ckpt
from tristage.train.training.trainer import Trainer

from ..conftest import newest_step, one_thread_env, run_cli, run_cli_2proc, tristage, user_folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """A tiny stage-1 world with its cache and a config file (shared by the tests here)."""
    return write_tiny_stage1(tmp_path_factory.mktemp("resume"))


def cfg_for(config: Path, run_dir: Path, *overrides: str):
    return load_config(config, [f"run.dir={run_dir}", *overrides])


def test_killed_runs_resume_bit_identical(setup, tmp_path):
    result = bench_resume.main(["--trials", "1", "--kills", "3", "--workdir", str(tmp_path)])
    assert result == {"trials": 1, "identical": 1}


def test_sigterm_saves_and_exits_0_then_resume_continues(setup, tmp_path):
    run_dir = tmp_path / "run"
    cmd = tristage("train", str(setup), f"run.dir={run_dir}", "train.max_steps=100000")
    proc = subprocess.Popen(cmd, cwd=user_folder(), env=one_thread_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while newest_step(run_dir) < 2 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    saved = newest_step(run_dir)
    assert saved >= 2 and not (run_dir / "final").exists()
    result = run_cli("train", str(setup), f"run.dir={run_dir}", f"train.max_steps={saved + 2}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resumed from {run_dir / 'checkpoints'}" in result.stderr
    assert (run_dir / "final" / "COMPLETE").exists()
    assert newest_step(run_dir) == saved + 2


def tracker_steps(run_dir: Path) -> list[int]:
    """The steps of every ``loss`` row the TensorBoard tracker holds, over all its event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        steps += [e.step for e in acc.Scalars("loss")] if "loss" in acc.Tags()["scalars"] else []
    return sorted(steps)


def test_truncated_newest_checkpoint_demoted_once(setup, tmp_path, caplog):
    """Issue 17: truncated newest model.safetensors, then resume -- demoted, one line, no duplicates."""
    run_dir, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    log = ["train.log_every=1", "tracking.mode=tensorboard"]
    Trainer(cfg_for(setup, run_dir, "train.max_steps=6", "checkpoint.keep_last=2", *log)).train()
    shutil.rmtree(run_dir / "final")
    weights = ckpt.step_dir(root, 6) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    # `tristage train` in this process: the CLI's own checkpoint look-up, then the Trainer's
    assert cli_main(["train", str(setup), f"run.dir={run_dir}", "train.max_steps=8", *log]) == 0
    lines = [r.getMessage() for r in caplog.records if "demoted damaged" in r.getMessage()]
    assert lines == [
        f"demoted damaged checkpoint step_0000006 to step_0000006.damaged: {weights}: unreadable "
        "(Error while deserializing header: incomplete metadata, file not fully covered)"
    ]
    assert f"resumed from {ckpt.step_dir(root, 4)} at step 4" in caplog.text
    assert not (root / "step_0000006.damaged" / ckpt.MARKER).exists()
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [8, 6]  # keep_last counts good ones
    assert (run_dir / "final" / ckpt.MARKER).exists()
    rows = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 9)) and tracker_steps(run_dir) == list(range(1, 9))


class Evil:
    """A pickle that runs a shell command when loaded without ``weights_only``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_malicious_rng_pickle_falls_back(setup, tmp_path, caplog):
    """Issue 17: a malicious pickle in rng_rank0.pt -- refused, demoted, the previous one resumed."""
    run_dir, root, ran = tmp_path / "run", tmp_path / "run" / "checkpoints", tmp_path / "it_ran"
    Trainer(cfg_for(setup, run_dir, "train.max_steps=4")).train()
    shutil.rmtree(run_dir / "final")
    torch.save({"torch": torch.get_rng_state(), "x": Evil(ran)}, ckpt.step_dir(root, 4) / "rng_rank0.pt")
    assert cli_main(["train", str(setup), f"run.dir={run_dir}", "train.max_steps=6"]) == 0
    assert not ran.exists()
    lines = [r.getMessage() for r in caplog.records if "demoted damaged" in r.getMessage()]
    assert lines == [
        f"demoted damaged checkpoint step_0000004 to step_0000004.damaged: "
        f"{ckpt.step_dir(root, 4) / 'rng_rank0.pt'}: unreadable (UnpicklingError)"
    ]
    assert f"resumed from {ckpt.step_dir(root, 2)} at step 2" in caplog.text
    assert ckpt.read_state(ckpt.step_dir(root, 6)).step == 6 and (run_dir / "final" / ckpt.MARKER).exists()


def test_resume_reads_each_checkpoint_file_once(setup, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    Trainer(cfg_for(setup, run_dir, "train.max_steps=2")).train()
    reads: list[str] = []
    real_load_file, real_torch_load = ckpt.load_file, torch.load

    def counted_load_file(path, *args, **kwargs):
        reads.append(Path(path).name)
        return real_load_file(path, *args, **kwargs)

    def counted_torch_load(path, *args, **kwargs):
        reads.append(Path(path).name)
        return real_torch_load(path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "load_file", counted_load_file)
    monkeypatch.setattr(torch, "load", counted_torch_load)
    trainer = Trainer(cfg_for(setup, run_dir, "train.max_steps=3"))
    trainer.train()
    assert trainer.state.step == 3
    assert sorted(reads) == ["ema.safetensors", "model.safetensors", "optimizer.pt", "rng_rank0.pt"]


def test_incomplete_checkpoint_never_chosen(setup, tmp_path):
    run_dir = tmp_path / "run"
    Trainer(cfg_for(setup, run_dir, "train.max_steps=4", "checkpoint.keep_last=3")).train()
    (ckpt.step_dir(run_dir / "checkpoints", 4) / ckpt.MARKER).unlink()
    assert ckpt.latest(run_dir / "checkpoints") == ckpt.step_dir(run_dir / "checkpoints", 2)


def test_init_from_ignored_when_checkpoint_exists(setup, tmp_path, caplog):
    donor = tmp_path / "donor"
    Trainer(cfg_for(setup, donor, "train.max_steps=2", "train.seed=5")).train()
    run_dir = tmp_path / "run"
    Trainer(cfg_for(setup, run_dir, "train.max_steps=2")).train()
    before = load_file(ckpt.step_dir(run_dir / "checkpoints", 2) / "model.safetensors")
    trainer = Trainer(cfg_for(setup, run_dir, "train.max_steps=2", f"init_from={donor / 'final'}"))
    trainer.train()
    assert "init_from=" in caplog.text and "is ignored" in caplog.text
    after = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_nan_guard_skips_update_then_stops(setup, tmp_path):
    trainer = Trainer(cfg_for(setup, tmp_path / "run", "train.max_steps=20", "train.max_nonfinite=3"))
    real_loss = trainer.objective.loss

    def poisoned(*args, **kwargs):
        loss, metrics = real_loss(*args, **kwargs)
        return loss * float("nan"), metrics

    trainer.objective.loss = poisoned
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(FloatingPointError, match="consecutive non-finite steps"):
        trainer.train()
    assert trainer.state.nonfinite_skips == 3
    assert all(torch.equal(start[k], v) for k, v in trainer.model.state_dict().items())
    assert ckpt.latest(tmp_path / "run" / "checkpoints") is not None


def test_unknown_checkpoint_format_refused(setup, tmp_path):
    run_dir = tmp_path / "run"
    Trainer(cfg_for(setup, run_dir, "train.max_steps=2")).train()
    step = ckpt.step_dir(run_dir / "checkpoints", 2)
    state = json.loads((step / "trainer.json").read_text())
    (step / "trainer.json").write_text(json.dumps({**state, "format": "someone-else-v9"}))
    with pytest.raises(ckpt.CheckpointError, match="unknown checkpoint format"):
        ckpt.verify(step)
    result = run_cli("train", str(setup), f"run.dir={tmp_path / 'other'}", f"resume={step}")
    assert result.returncode == 2 and "unknown checkpoint format" in result.stderr
    assert "Traceback" not in result.stderr


def test_pickled_optimizer_state_is_refused(setup, tmp_path):
    run_dir = tmp_path / "run"
    Trainer(cfg_for(setup, run_dir, "train.max_steps=2")).train()
    step = ckpt.step_dir(run_dir / "checkpoints", 2)
    torch.save(
        {"state": {}, "param_groups": [], "evil": datetime.datetime(2020, 1, 1)}, step / "optimizer.pt"
    )
    with pytest.raises(ckpt.CheckpointError, match="optimizer.pt"):
        ckpt.verify(step)


def full_disk_at(monkeypatch, step: int, name: str) -> None:
    """From the save at ``step``, ``name`` in the checkpoint being assembled is /dev/full: the real
    writer (torch.save, json) gets ENOSPC from the kernel."""
    real = ckpt.tmp_dir

    def tmp_with_full_file(root: Path, at: int) -> Path:
        tmp = real(root, at)
        if at >= step:
            tmp.mkdir(parents=True, exist_ok=True)
            (tmp / name).unlink(missing_ok=True)
            (tmp / name).symlink_to("/dev/full")
        return tmp

    monkeypatch.setattr(ckpt, "tmp_dir", tmp_with_full_file)


@pytest.mark.parametrize(("policy", "name"), [("raise", "rng_rank0.pt"), ("continue", "trainer.json")])
def test_checkpoint_on_full_disk(setup, tmp_path, monkeypatch, caplog, policy, name):
    """Issue 17: a checkpoint on a full disk -- checkpoint.on_error applies, one line, no temp left."""
    run_dir, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    (root / ".tmp-step_0000099").mkdir()  # a save a crash cut short: removed at the next start
    full_disk_at(monkeypatch, 4, name)
    trainer = Trainer(cfg_for(setup, run_dir, "train.max_steps=6", f"checkpoint.on_error={policy}"))
    line = (
        rf"checkpoint at step 4 failed on rank 0 \(here: CheckpointWriteError: "
        rf"{root / '.tmp-step_0000004' / name}: write failed \(.+\); [\d.]+ MiB free there\); "
        r"earlier checkpoints are intact"
    )
    if policy == "raise":
        with pytest.raises(ckpt.CheckpointError, match=line) as err:
            trainer.train()
        assert "\n" not in str(err.value)
        assert ckpt.latest(root) == ckpt.step_dir(root, 2)
    else:
        trainer.train()
        assert re.search(line + r"; continuing \(checkpoint.on_error=continue\)", caplog.text)
        assert (run_dir / "final" / "COMPLETE").exists() and ckpt.latest(root) == ckpt.step_dir(root, 2)
    ckpt.verify(ckpt.step_dir(root, 2))
    assert not list(root.glob(".tmp-*"))


def tmpfs(path: Path, size: int) -> None:
    path.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()[:80]!r})")


def test_checkpoint_on_a_real_full_tmpfs(setup, tmp_path, caplog):
    """Issue 17: the checkpoint folder on a tmpfs that fills up -- safetensors' own writer fails."""
    probe = tmp_path / "probe"
    Trainer(cfg_for(setup, probe, "train.max_steps=2", "checkpoint.every=2")).train()
    size = sum(f.stat().st_size for f in ckpt.step_dir(probe / "checkpoints", 2).iterdir())
    run_dir, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    tmpfs(root, size + size // 8)  # room for one checkpoint and the next one's RNG files
    try:
        cfg = cfg_for(
            setup, run_dir, "train.max_steps=4", "checkpoint.on_error=continue", "checkpoint.keep_last=2"
        )
        Trainer(cfg).train()
        assert re.search(
            r"checkpoint at step 4 failed on rank 0 \(here: .*model\.safetensors: write failed .*MiB free",
            caplog.text,
        )
        assert ckpt.latest(root) == ckpt.step_dir(root, 2) and not list(root.glob(".tmp-*"))
        assert (run_dir / "final" / "COMPLETE").exists()
    finally:
        subprocess.run(["umount", str(root)], check=False)


def test_two_process_run_resumes_on_one(setup, tmp_path):
    """Saved with 2 CPU processes (gloo), resumed with 1 at the same global batch."""
    run_dir = tmp_path / "run"
    two = run_cli_2proc(
        "train", str(setup), f"run.dir={run_dir}", "data.batch_size=4", "train.max_steps=4", timeout=300
    )
    assert two.returncode == 0, two.stderr[-3000:]
    shutil.rmtree(run_dir / "final")
    one = run_cli("train", str(setup), f"run.dir={run_dir}", "data.batch_size=8", "train.max_steps=6")
    assert one.returncode == 0, one.stderr[-3000:]
    assert "resumed from" in one.stderr and "step 4" in one.stderr
    state = ckpt.read_state(ckpt.step_dir(run_dir / "checkpoints", 6))
    assert state.samples == 6 * 8


def test_damaged_cache_stops_before_any_update(setup, tmp_path):
    """Issue 17: flipped bytes in cached tensors -- the run stops at the batch, before the update."""
    from ..unit.test_cache_features import flip_tensor_bytes

    run_dir, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    Trainer(cfg_for(setup, run_dir, "train.max_steps=2")).train()
    shutil.rmtree(run_dir / "final")
    cache = Path(shutil.copytree(load_config(setup).data.cache_dir, tmp_path / "cache"))
    for shard in cache.glob("features-*.tar"):
        flip_tensor_bytes(shard)
    trainer = Trainer(cfg_for(setup, run_dir, "train.max_steps=4", f"data.cache_dir={cache}"))
    with pytest.raises(
        CacheError, match=r"features-0000\d\.tar: damaged cached sample '\w+' \(fails its checksum"
    ):
        trainer.train()
    assert trainer.state.step == 2  # resumed, and no update made from the damaged batch
    assert ckpt.latest(root) == ckpt.step_dir(root, 2) and not (run_dir / "final").exists()
    skip = Path(shutil.copytree(load_config(setup).data.cache_dir, tmp_path / "skip"))
    for shard in skip.glob("features-*.tar"):
        flip_tensor_bytes(shard, every=3)
    overrides = ("train.max_steps=4", f"data.cache_dir={skip}", "data.on_damaged=skip")
    summary = Trainer(cfg_for(setup, run_dir, *overrides)).train()
    assert summary["finished"] and summary["damaged_skipped"] > 0


def test_damaged_rank1_rng_file_two_processes_agree(setup, tmp_path):
    """Issue 17 on 2 processes: the fault is in rank 1's RNG file; both ranks verify every rank's
    files, so both fall back to the same checkpoint, one line says so, and the run finishes."""
    run_dir, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    Trainer(cfg_for(setup, run_dir, "train.max_steps=4", "data.batch_size=8")).train()
    shutil.rmtree(run_dir / "final")
    for step in (2, 4):  # as a 2-process run would have left them: one RNG pair per rank
        for ext in ("json", "pt"):
            shutil.copy(
                ckpt.step_dir(root, step) / f"rng_rank0.{ext}", ckpt.step_dir(root, step) / f"rng_rank1.{ext}"
            )
    torch.save(
        {"torch": torch.get_rng_state(), "x": Evil(tmp_path / "ran")}, ckpt.step_dir(root, 4) / "rng_rank1.pt"
    )
    two = run_cli_2proc(
        "train", str(setup), f"run.dir={run_dir}", "data.batch_size=4", "train.max_steps=6", timeout=300
    )
    assert two.returncode == 0 and "Traceback" not in two.stderr, two.stderr[-3000:]
    assert len([line for line in two.stderr.splitlines() if "demoted damaged checkpoint" in line]) == 1
    assert "rng_rank1.pt: unreadable (UnpicklingError)" in two.stderr
    assert (
        f"resumed from {ckpt.step_dir(root, 2)} at step 2" in two.stderr and not (tmp_path / "ran").exists()
    )
    assert ckpt.latest(root) == ckpt.step_dir(root, 6) and (root / "step_0000004.damaged").is_dir()


def test_damaged_sample_on_one_rank_stops_both_in_one_line(setup, tmp_path):
    """Issue 17 on 2 processes: only the rank whose slice holds the damaged sample meets it; both ranks
    stop at that step, before any update, each with one line -- no hang, no traceback, no new checkpoint."""
    from ..unit.test_cache_features import flip_tensor_bytes

    run_dir, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    Trainer(cfg_for(setup, run_dir, "train.max_steps=2", "data.batch_size=8")).train()
    shutil.rmtree(run_dir / "final")
    cache = Path(shutil.copytree(load_config(setup).data.cache_dir, tmp_path / "cache"))
    (shard,) = sorted(cache.glob("features-*.tar"))[:1]
    flip_tensor_bytes(shard, every=10_000)  # one sample: the shard's first
    two = run_cli_2proc(
        "train",
        str(setup),
        f"run.dir={run_dir}",
        f"data.cache_dir={cache}",
        "data.batch_size=4",
        "train.max_steps=40",
        "checkpoint.every=1",
        timeout=300,
    )
    lines = two.stderr.splitlines()
    named = [line for line in lines if re.search(r"damaged cached sample '\w+' \(fails its checksum", line)]
    other = [line for line in lines if "a damaged cached sample on another rank" in line]
    ours = re.findall(r'File ".*/(?:train|data)/[a-z_/]+\.py"', two.stderr)  # the launcher reports its own
    assert two.returncode != 0 and not ours, two.stderr[-3000:]
    assert len(named) == 1 and len(other) == 1, two.stderr[-3000:]
    stopped = ckpt.read_state(ckpt.latest(root)).step  # every step saved: the last one before the damage
    assert 2 <= stopped < 40 and not (run_dir / "final").exists()
    assert not list(root.glob(f"{ckpt.TMP_PREFIX}*")) and not list(root.glob("*.damaged"))
