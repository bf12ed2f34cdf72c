"""The cache pass across processes: a 2-process pass (gloo, ``accelerate launch``) writes the same
features as a 1-process pass, each shard by its one owner; a SIGKILLed pass resumes to every sample
exactly once and leaves no temporary files behind.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from tristage.demo import synthetic
from tristage.demo.encoders import write_encoders
from tristage.train.config import load_config
from tristage.train.training.stage_cache import cache_stage

from ..conftest import ROOT, one_thread_env, run_cli_2proc, tristage, user_folder

IMAGES, PER_SHARD = 20, 2  # 10 units: several per rank, and room to kill a pass part-way
CONFIG = ROOT / "demo" / "configs" / "stage2.yaml"  # VAE + T5: both encoders run in every process


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[dict]:
    """Raw SA-style shards, a tiny random VAE, the demo T5, and a clean 1-process reference cache."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses run with OMP_NUM_THREADS=1: same kernels, same bits
    root = tmp_path_factory.mktemp("cache_dist")
    encoders = write_encoders(root, vae_channels=(8, 8, 8, 8))
    raw = synthetic.write_stage2(root / "raw", IMAGES, size=64, per_shard=PER_SHARD)
    common = [
        f"data.source.paths=[{raw}/sa_*.tar]",
        f"data.source.captions={raw / 'llava_captions.jsonl'}",
        f"encoders.vae={encoders['vae']}",
        f"encoders.text_encoder={encoders['text_encoder']}",
        f"encoders.tokenizer={encoders['tokenizer']}",
        "encoders.batch_size=3",  # a full and a partial encoder batch in some units
    ]

    def overrides(name: str) -> list[str]:
        return [f"run.dir={root / name / 'run'}", f"data.cache_dir={root / name / 'cache'}", *common]

    reference = root / "one" / "cache"
    cache_stage(load_config(CONFIG, overrides("one")), Accelerator())
    yield {"root": root, "overrides": overrides, "reference": reference, "common": common}
    torch.set_num_threads(threads)


def members(cache_dir: Path) -> dict[str, bytes]:
    """Every member of every feature shard, by name; a name twice is an error."""
    out: dict[str, bytes] = {}
    for shard in sorted(cache_dir.glob("features-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                assert m.name not in out, f"{m.name} in two shards"
                out[m.name] = tar.extractfile(m).read()
    return out


def keys(cache_dir: Path) -> Counter:
    """Multiset of sample keys over all shards."""
    found: Counter = Counter()
    for shard in sorted(cache_dir.glob("features-*.tar")):
        with tarfile.open(shard) as tar:
            found.update(
                json.loads(tar.extractfile(m).read())["key"] for m in tar if m.name.endswith(".json")
            )
    return found


def cache_cmd(world: dict, name: str) -> list[str]:
    return tristage("cache", str(CONFIG), *world["overrides"](name))


def test_two_processes_write_what_one_writes(world):
    two = run_cli_2proc("cache", str(CONFIG), *world["overrides"]("two"), timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    cache_dir = world["root"] / "two" / "cache"
    reference = world["reference"]
    assert keys(reference) == Counter(f"sa_{i + 1}" for i in range(IMAGES))
    assert members(cache_dir) == members(reference)  # same keys, bit-identical features and metadata
    markers = sorted(cache_dir.glob("features-*.done.json"))
    assert len(markers) == IMAGES // PER_SHARD
    for i, marker in enumerate(markers):
        assert json.loads(marker.read_text())["rank"] == i % 2, marker.name  # each shard by its one owner
    assert {json.loads(m.read_text())["rank"] for m in reference.glob("*.done.json")} == {0}
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest == json.loads((reference / "manifest.json").read_text())
    assert (cache_dir / "null_caption.safetensors").read_bytes() == (
        reference / "null_caption.safetensors"
    ).read_bytes()
    assert "20 samples in 10 shards; skipped nothing" in two.stderr  # rank 0 only: printed once
    assert two.stderr.count("images/s") == 1
    assert "img/s" in two.stderr and "shard" in two.stderr  # rank 0's bar: shards, ETA, images/s


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the pass ended before it could be killed: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the pass"
        time.sleep(0.002)


def test_killed_pass_resumes_every_sample_exactly_once(world):
    cache_dir = world["root"] / "killed" / "cache"
    cmd = cache_cmd(world, "killed")
    proc = subprocess.Popen(cmd, cwd=user_folder(), env=one_thread_env(), stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: any(cache_dir.glob("*.done.json")), proc)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    done = sorted(cache_dir.glob("*.done.json"))
    assert 0 < len(done) < IMAGES // PER_SHARD, "killed after the first shard, before the last"
    assert not (cache_dir / "manifest.json").exists()
    # A kill lands mid-shard nearly always; plant a dead writer's leftover for a pending unit so
    # the clean-up is checked on every run, not only when the kill's timing leaves one.
    (cache_dir / f"features-{IMAGES // PER_SHARD - 1:05d}.tar.tmp-999999").write_bytes(b"half a shard")
    before = {p.name: p.read_bytes() for p in done}
    manifest = cache_stage(load_config(CONFIG, world["overrides"]("killed")), Accelerator())
    assert keys(cache_dir) == keys(world["reference"])  # every sample exactly once
    assert members(cache_dir) == members(world["reference"])
    assert manifest["samples"] == IMAGES
    assert not list(cache_dir.glob("*.tmp-*"))
    assert {p.name: p.read_bytes() for p in done} == before  # finished shards were not redone


def test_summary_counts_skips_by_reason(world, tmp_path, caplog):
    """Rank 0's closing line: samples, skipped items by reason, the report path, images/s."""
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(good, format="JPEG")
    members = {"sa_1.jpg": good.getvalue(), "sa_2.jpg": b"not a jpeg", "sa_3.jpg": good.getvalue()}
    with tarfile.open(tmp_path / "sa_0.tar", "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    captions = tmp_path / "captions.jsonl"
    captions.write_text(
        "".join(json.dumps({"id": f"sa_{i}", "caption": "a red square"}) + "\n" for i in (1, 2))
    )
    cache_dir = tmp_path / "cache"
    overrides = [*world["common"], f"run.dir={tmp_path / 'run'}", f"data.cache_dir={cache_dir}"]
    overrides += [f"data.source.paths=[{tmp_path / 'sa_0.tar'}]", f"data.source.captions={captions}"]
    with caplog.at_level(logging.INFO, logger="tristage.data.cache"):
        manifest = cache_stage(load_config(CONFIG, overrides), Accelerator())
    assert manifest["samples"] == 1
    (line,) = [r.getMessage() for r in caplog.records if r.name == "tristage.data.cache"]
    assert line.startswith(
        "cache: 1 samples in 1 shards; skipped missing_caption=1, undecodable_image=1 "
        f"(report: {cache_dir / 'skipped.json'}); 2 images read in "
    )
    assert line.endswith(" images/s")
    assert json.loads((cache_dir / "skipped.json").read_text())["counts"] == {
        "missing_caption": 1,
        "undecodable_image": 1,
    }
