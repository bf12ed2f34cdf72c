"""Issue 36, items 2-3: the demo's stage-1 data through a real S3 protocol server.

moto's standalone server (``ThreadedMotoServer``) listens on 127.0.0.1 for this module.  The
endpoint and the credentials reach s3fs the standard AWS way -- ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` or the AWS credentials file -- and tristage is given
no setting of its own.  Every command runs as users run it: the ``tristage`` console script, from a
folder outside the checkout.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load as st_load
from safetensors.torch import load_file

from tristage.demo import synthetic
from tristage.demo.captioner import write_captioner
from tristage.demo.encoders import demo_vae_path
from tristage.train.config import load_config
from tristage.train.training.remote_run import working_dir
from tristage.train.training.stage_cache import cache_stage
from tristage.train.training.trainer import Trainer

from ..conftest import ROOT, env_2proc, finish, one_thread_env, run_cli, start_2proc

pytestmark = pytest.mark.usefixtures("one_thread")
moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

STAGE1 = ROOT / "demo" / "configs" / "stage1.yaml"
BUCKET = "tristage-test"
UNITS, PER_UNIT, STEPS = 4, 4, 6
FAULTS = str(ROOT / "tests" / "faults")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A loopback S3 server, a bucket, and the AWS environment pointing at it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log in the test output
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    home = tmp_path_factory.mktemp("aws")
    aws = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "tristage-test",
        "AWS_SECRET_ACCESS_KEY": "tristage-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookup off this machine
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials"),
        "AWS_CONFIG_FILE": str(home / "config"),
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in aws.items():
            mp.setenv(key, value)
        fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
        fs.mkdir(BUCKET)
        yield SimpleNamespace(fs=fs, url=f"s3://{BUCKET}", home=home, aws=aws)
    server.stop()


def overrides(raw: str, cache_dir: str, run_dir: str, *extra: str) -> list[str]:
    """The demo stage-1 config on ``raw`` (a folder or URL), a short CPU run."""
    return [
        f"run.dir={run_dir}",
        f"data.cache_dir={cache_dir}",
        f"data.source.paths=[{raw}/imagenet-*.tar]",
        f"data.source.synsets={raw}/synsets.txt",
        f"encoders.vae={demo_vae_path()}",
        "data.batch_size=4",
        "data.shuffle_buffer=8",
        f"train.max_steps={STEPS}",
        "train.log_every=1",
        "validation.every=0",
        "validation.loss_every=0",
        "validation.metrics_every=0",
        f"checkpoint.every={STEPS // 2}",
        "checkpoint.keep_last=2",
        "tracking.mode=disabled",
        *extra,
    ]


def cli(*args: str, env: dict | None = None):
    done = run_cli(*args, env=env or one_thread_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(metrics: str) -> list[float]:
    return [json.loads(line)["loss"] for line in metrics.splitlines()]


@pytest.fixture(scope="module")
def local(s3, tmp_path_factory):
    """The demo's stage-1 world on local disk, uploaded to the bucket; its local cache and 6-step run."""
    root = tmp_path_factory.mktemp("s3world")
    raw = synthetic.write_stage1(root / "raw", UNITS * PER_UNIT, size=64, per_shard=PER_UNIT)
    s3.fs.put(f"{raw}/", f"{BUCKET}/raw/", recursive=True)
    # In this process (one thread, as the console-script runs): the reference costs no start-ups.
    cfg = load_config(STAGE1, overrides(str(raw), str(root / "cache"), str(root / "run")))
    cache_stage(cfg, Accelerator())
    Trainer(cfg).train()
    return SimpleNamespace(
        root=root,
        raw=raw,
        manifest=json.loads((root / "cache" / "manifest.json").read_text()),
        losses=losses((root / "run" / "metrics.jsonl").read_text()),
        step=root / "run" / "checkpoints" / f"step_{STEPS:07d}",
    )


def test_caption_cache_and_train_on_s3_equal_local(s3, local, tmp_path):
    """Caption, cache and train with ``data.source.paths``, the captions, ``data.cache_dir`` and
    ``run.dir`` on s3://: the manifest and the losses equal the local run's, and a run resumed on a
    fresh machine from the s3:// checkpoint ends bit-identical to the uninterrupted local one."""
    raw, cache_dir, run_dir = f"{s3.url}/raw", f"{s3.url}/cache", f"{s3.url}/run"
    captioner = write_captioner(tmp_path / "tiny_llava")
    captions = f"{s3.url}/captions/stage1.jsonl"
    caption = [
        "data.source.kind=wds",  # the stage-1 tars read as captioned webdataset: the VLM writes captions
        f"caption.output={captions}",
        f"caption.model={captioner}",
        "caption.max_new_tokens=4",
        "caption.batch_size=4",
    ]
    cli("caption", str(STAGE1), *overrides(raw, cache_dir, run_dir, *caption))
    lines = s3.fs.cat(captions).decode().splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == [f"{i:08d}" for i in range(UNITS * PER_UNIT)]
    assert json.loads(s3.fs.cat(f"{BUCKET}/captions/stage1.manifest.json"))["captions"] == len(lines)

    args = overrides(
        raw, cache_dir, run_dir, "data.remote_cache_gb=6.5e-5", f"data.remote_cache_dir={tmp_path}"
    )
    cli("cache", str(STAGE1), *args)
    assert json.loads(s3.fs.cat(f"{BUCKET}/cache/manifest.json")) == local.manifest  # no path in it

    half = cli("train", str(STAGE1), *args, f"train.max_steps={STEPS // 2}")
    assert "stopped_by=None" in half.stderr
    first = losses(s3.fs.cat(f"{BUCKET}/run/metrics.jsonl").decode())
    assert s3.fs.exists(f"{BUCKET}/run/checkpoints/step_{STEPS // 2:07d}/COMPLETE")
    shutil.rmtree(working_dir(run_dir))  # another machine: nothing local but the config
    cli("train", str(STAGE1), *args)
    every = losses(s3.fs.cat(f"{BUCKET}/run/metrics.jsonl").decode())  # the metrics go on where they were
    assert every[: STEPS // 2] == first and every == local.losses  # all 6 equal the local run's, exactly
    step = f"{BUCKET}/run/checkpoints/step_{STEPS:07d}"
    assert s3.fs.exists(f"{step}/COMPLETE")
    for name in ("model.safetensors", "ema.safetensors"):
        ours, theirs = st_load(s3.fs.cat(f"{step}/{name}")), load_file(local.step / name)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert s3.fs.exists(f"{BUCKET}/run/final/COMPLETE")


def test_sigkill_during_a_remote_cache_pass_then_rerun_gives_the_same_manifest(s3, local, tmp_path):
    """Two processes share the units; rank 1 is SIGKILLed while it closes its second shard (written
    locally, not yet uploaded).  The rerun encodes what is missing; the manifest equals the local one."""
    cache_dir = f"{s3.url}/killed"
    args = overrides(f"{s3.url}/raw", cache_dir, str(tmp_path / "run"))
    env = env_2proc(
        PYTHONPATH=f"{FAULTS}:{os.environ.get('PYTHONPATH', '')}", TRISTAGE_TEST_FAULT="rank=1,kill_in_unit=2"
    )
    killed = finish(start_2proc("cache", str(STAGE1), *args, env=env), timeout=300)
    assert killed.returncode != 0
    done = s3.fs.glob(f"{BUCKET}/killed/*.done.json")
    assert 0 < len(done) < UNITS and not s3.fs.exists(f"{BUCKET}/killed/manifest.json")
    cli("cache", str(STAGE1), *args)
    assert json.loads(s3.fs.cat(f"{BUCKET}/killed/manifest.json")) == local.manifest
    assert len(s3.fs.glob(f"{BUCKET}/killed/features-*.tar")) == UNITS


def test_credentials_from_the_aws_files_and_one_line_naming_the_bucket(s3, local, tmp_path, monkeypatch):
    """The AWS credentials file works alone (on a local cache uploaded as it is: complete, nothing to
    encode); a wrong key, or none, is one line naming the bucket."""
    import moto.settings

    s3.fs.put(f"{local.root / 'cache'}/", f"{BUCKET}/uploaded/", recursive=True)  # a local cache, copied up
    args = overrides(f"{s3.url}/raw", f"{s3.url}/uploaded", str(tmp_path / "run"))
    bare = {
        k: v for k, v in one_thread_env().items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    }
    (s3.home / "credentials").write_text(
        "[default]\naws_access_key_id = tristage-test\naws_secret_access_key = tristage-test-secret\n"
    )
    try:
        assert "is complete" in cli("cache", str(STAGE1), *args, env=bare).stderr
        (s3.home / "credentials").unlink()
        missing = run_cli("cache", str(STAGE1), *args, env=bare)
        monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server checks keys
        wrong = run_cli("cache", str(STAGE1), *args, env={**one_thread_env(), "AWS_ACCESS_KEY_ID": "wrong"})
    finally:
        (s3.home / "credentials").unlink(missing_ok=True)
    hint = (
        "check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the AWS config "
        "files for s3://)"
    )
    assert (missing.returncode, missing.stderr.strip().splitlines()) == (
        2,
        [
            f"tristage cache: error: {s3.url}: access denied (NoCredentialsError: Unable to locate "
            f"credentials); {hint}"
        ],
    )
    assert (wrong.returncode, wrong.stderr.strip().splitlines()) == (
        2,
        [
            f"tristage cache: error: {s3.url}: access denied (PermissionError: The AWS Access Key Id you "
            f"provided does not exist in our records.); {hint}"
        ],
    )


def test_two_processes_train_from_s3_and_warn_once_for_a_removed_unit(s3, local, tmp_path):
    """A local cache uploaded as it is, its source on s3:// less one tar: two processes read the remote
    shards through their own read-ahead copies, one warning names the removed unit, both train."""
    for name in ["synsets.txt", *(f"imagenet-{i:05d}.tar" for i in range(UNITS) if i != 2)]:
        s3.fs.copy(f"{BUCKET}/raw/{name}", f"{BUCKET}/less/{name}")
    s3.fs.put(f"{local.root / 'cache'}/", f"{BUCKET}/shared/", recursive=True)
    args = overrides(
        f"{s3.url}/less", f"{s3.url}/shared", str(tmp_path / "run"), "data.batch_size=2", "train.max_steps=2"
    )
    done = finish(
        start_2proc("train", str(STAGE1), *args, f"data.remote_cache_dir={tmp_path / 'copies'}"), 600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = f"{s3.url}/shared/manifest.json: 1 cached unit is no longer in the source; training on the other 3"
    assert done.stderr.count(line) == 1
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
