"""Issue 36, item 1: a cache keyed by what the data is, not where it sits.

The demo's stage-1 data (four ImageNet-style tars) is cached once; each test copies it, changes the
source the way users do (another spelling, a moved folder, another mount point, a unit added, one
rewritten, one removed, a cache of the previous format) and checks what ``tristage cache`` and
``tristage train`` then do, with the exact line each prints.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import xxhash
from accelerate import Accelerator

from tristage.cli import main as cli_main
from tristage.data.cache_format import FORMAT
from tristage.data.features import FeatureLoader
from tristage.data.fingerprint import fingerprint
from tristage.demo import synthetic
from tristage.demo.encoders import demo_vae_path
from tristage.train.config import load_config
from tristage.train.families import feature_encoders
from tristage.train.training.stage_cache import cache_stage

from ..conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")
STAGE1 = ROOT / "demo" / "configs" / "stage1.yaml"
UNITS, PER_UNIT = 4, 4


def overrides(raw: str, cache_dir: Path, run_dir: Path) -> list[str]:
    """The demo stage-1 config on ``raw`` (a folder spelling), a short CPU run."""
    return [
        f"run.dir={run_dir}",
        f"data.cache_dir={cache_dir}",
        f"data.source.paths=[{raw}/imagenet-*.tar]",
        f"data.source.synsets={raw}/synsets.txt",
        f"encoders.vae={demo_vae_path()}",
        "data.batch_size=4",
        "data.shuffle_buffer=8",
        "train.max_steps=2",
        "train.log_every=1",
        "validation.every=0",
        "validation.loss_every=0",
        "validation.metrics_every=0",
        "checkpoint.every=1000",
        "tracking.mode=disabled",
    ]


def config(raw: str, cache_dir: Path, run_dir: Path | None = None):
    return load_config(STAGE1, overrides(raw, cache_dir, run_dir or cache_dir.parent / "run"))


def cache(raw: str, cache_dir: Path, rebuild: bool = False) -> dict:
    return cache_stage(config(raw, cache_dir), Accelerator(), rebuild=rebuild)


def stamps(cache_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("features-*")}


def rewritten(before: dict[str, int], cache_dir: Path) -> set[str]:
    return {name for name, t in stamps(cache_dir).items() if before.get(name) != t}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """``raw/`` (four tars of the demo's stage-1 world), ``spare/`` (a fifth) and ``cache/`` of the four."""
    root = tmp_path_factory.mktemp("identity")
    every = synthetic.write_stage1(root / "every", (UNITS + 1) * PER_UNIT, size=64, per_shard=PER_UNIT)
    (root / "raw").mkdir()
    for name in [f"imagenet-{i:05d}.tar" for i in range(UNITS)] + ["synsets.txt"]:
        shutil.copy(every / name, root / "raw" / name)
    (root / "spare").mkdir()
    shutil.copy(every / f"imagenet-{UNITS:05d}.tar", root / "spare")
    cache(str(root / "raw"), root / "cache")
    return root


@pytest.fixture
def world(built, tmp_path) -> Path:
    """A private copy of the raw data and its cache (modification times kept)."""
    for name in ("raw", "spare", "cache"):
        shutil.copytree(built / name, tmp_path / name)
    return tmp_path


def train(raw: str, world: Path, capsys) -> tuple[int, list[str]]:
    """``tristage train`` (in this process, like the console script's main): exit code, stderr lines."""
    capsys.readouterr()
    code = cli_main(["train", str(STAGE1), *overrides(raw, world / "cache", world / "run")])
    return code, [line for line in capsys.readouterr().err.splitlines() if "error:" in line]


def test_same_files_under_other_spellings_use_the_cache_as_is(world, monkeypatch, caplog):
    """A moved folder, named relative or absolute, and another mount point (a symlinked root): one
    fingerprint, no re-encode, and the trainer takes every unit."""
    caplog.set_level(logging.INFO)
    cache_dir, before = world / "cache", stamps(world / "cache")
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    monkeypatch.chdir(world)
    (world / "raw").rename(world / "moved")
    (world / "mnt").mkdir()
    (world / "mnt" / "data").symlink_to(world / "moved")
    spellings = ["moved", str(world / "moved"), "mnt/data", str(world / "mnt" / "data")]
    caplog.clear()
    for raw in spellings:
        cfg = config(raw, cache_dir)
        expected = fingerprint(cfg.data, feature_encoders(cfg))
        assert expected == manifest["fingerprint"]
        assert cache(raw, cache_dir) == manifest
        assert len(FeatureLoader(cache_dir, spec(), expected, data=cfg.data).shards) == UNITS
    assert rewritten(before, cache_dir) == set()
    complete = f"cache: {cache_dir} is complete ({UNITS * PER_UNIT} samples), nothing to encode"
    assert caplog.messages.count(complete) == len(spellings)


def spec():
    from tristage.data.features import LoaderSpec

    return LoaderSpec(
        4, grad_accum=1, rank=0, world=1, seed=0, shuffle_buffer=8, cond_dropout=0.0, null_label=1000
    )


def test_added_unit_stops_training_then_cache_encodes_only_it(world, capsys, caplog):
    raw, cache_dir = str(world / "raw"), world / "cache"
    shutil.copy(world / "spare" / f"imagenet-{UNITS:05d}.tar", world / "raw")
    code, errors = train(raw, world, capsys)
    assert (code, errors) == (
        2,
        [
            f"tristage train: error: {cache_dir}/manifest.json: the cache lacks 1 of the source's "
            f"{UNITS + 1} units (imagenet-{UNITS:05d}.tar); run `tristage cache CONFIG` to encode them"
        ],
    )
    assert not (world / "run" / "checkpoints").exists()  # stopped before step 1
    before = stamps(cache_dir)
    manifest = cache(raw, cache_dir)
    assert rewritten(before, cache_dir) == {f"features-{UNITS:05d}.tar", f"features-{UNITS:05d}.done.json"}
    assert manifest["samples"] == (UNITS + 1) * PER_UNIT
    assert manifest["shards"][-1]["unit"] == f"imagenet-{UNITS:05d}.tar"


def test_changed_unit_is_refused_by_train_and_reencoded_by_cache(world, capsys, caplog):
    caplog.set_level(logging.WARNING)
    raw, cache_dir = str(world / "raw"), world / "cache"
    tar = world / "raw" / "imagenet-00001.tar"
    old = tar.stat().st_size
    shutil.copy(world / "spare" / f"imagenet-{UNITS:05d}.tar", tar)  # other images under the same name
    new = tar.stat().st_size
    change = (
        f"imagenet-00001.tar: {old} -> {new} bytes"
        if old != new
        else "imagenet-00001.tar: same size, other content"
    )
    code, errors = train(raw, world, capsys)
    assert (code, errors) == (
        2,
        [
            f"tristage train: error: {cache_dir}/manifest.json: 1 cached unit no longer matches its raw "
            f"source ({change}); run `tristage cache CONFIG` to re-encode them"
        ],
    )
    before = stamps(cache_dir)
    caplog.clear()
    cache(raw, cache_dir)
    assert caplog.messages[0] == (
        "cache: re-encoding features-00001.tar (imagenet-00001.tar): its raw input changed since it was "
        f"cached ({change})"
    )
    assert rewritten(before, cache_dir) == {"features-00001.tar", "features-00001.done.json"}


def test_removed_unit_warns_once_and_trains_on_the_rest(world, caplog):
    caplog.set_level(logging.WARNING)
    raw, cache_dir = str(world / "raw"), world / "cache"
    (world / "raw" / "imagenet-00002.tar").unlink()
    code = cli_main(["train", str(STAGE1), *overrides(raw, cache_dir, world / "run")])
    line = (
        f"{cache_dir}/manifest.json: 1 cached unit is no longer in the source; "
        f"training on the other {UNITS - 1}"
    )
    assert code == 0 and caplog.messages.count(line) == 1, caplog.text[-2000:]
    steps = [json.loads(x)["step"] for x in (world / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    cfg = config(raw, cache_dir)
    loader = FeatureLoader(cache_dir, spec(), data=cfg.data)
    assert [Path(s).name for s in loader.shards] == [
        "features-00000.tar",
        "features-00001.tar",
        "features-00003.tar",
    ]


def downgrade_to_v2(cache_dir: Path, raw: Path) -> None:
    """Rewrite the folder's records exactly as tristage-features-v2 wrote them: the fingerprint with the
    source's paths, markers naming raw files by path with (size, mtime_ns, whole-file xxh3-64)."""
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    cfg = config(str(raw), cache_dir)
    from dataclasses import asdict

    fp = {
        **manifest["fingerprint"],
        "cache_format": "tristage-features-v2",
        "source": repr(sorted(asdict(cfg.data.source).items())),
    }
    for i, shard in enumerate(manifest["shards"]):
        marker = cache_dir / shard["file"].replace(".tar", ".done.json")
        done = {k: v for k, v in json.loads(marker.read_text()).items() if k not in ("unit", "input")}
        tar = raw / f"imagenet-{i:05d}.tar"
        st = os.stat(tar)
        done.update(
            fingerprint=fp,
            source={str(tar): [st.st_size, st.st_mtime_ns, xxhash.xxh3_64_hexdigest(tar.read_bytes())]},
        )
        marker.write_text(json.dumps(done))
        del shard["unit"], shard["input"]
    (cache_dir / "manifest.json").write_text(json.dumps({**manifest, "fingerprint": fp}, indent=1))


def test_previous_format_is_named_by_train_and_upgraded_in_place_by_cache(world, capsys, caplog):
    caplog.set_level(logging.WARNING)
    raw, cache_dir = world / "raw", world / "cache"
    downgrade_to_v2(cache_dir, raw)
    code, errors = train(str(raw), world, capsys)
    assert (code, errors) == (
        2,
        [
            f"tristage train: error: {cache_dir}/manifest.json: cache in the previous format "
            "(tristage-features-v2: raw files recorded by path); run `tristage cache CONFIG` once to upgrade "
            "it in place (nothing is re-encoded)"
        ],
    )
    before = stamps(cache_dir)
    caplog.clear()
    manifest = cache(str(raw), cache_dir)
    assert (
        caplog.messages[0]
        == f"cache: upgraded {UNITS} shard records of {cache_dir} to {FORMAT} (no re-encode)"
    )
    assert {n for n in rewritten(before, cache_dir) if n.endswith(".tar")} == set()  # no shard re-encoded
    assert manifest["fingerprint"]["cache_format"] == FORMAT and manifest["samples"] == UNITS * PER_UNIT
    assert [s["unit"] for s in manifest["shards"]] == [f"imagenet-{i:05d}.tar" for i in range(UNITS)]


def test_previous_format_with_a_changed_raw_file_is_one_line_then_rebuild(world, capsys):
    raw, cache_dir = world / "raw", world / "cache"
    downgrade_to_v2(cache_dir, raw)
    shutil.copy(world / "spare" / f"imagenet-{UNITS:05d}.tar", raw / "imagenet-00003.tar")
    capsys.readouterr()
    assert cli_main(["cache", str(STAGE1), *overrides(str(raw), cache_dir, world / "run")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"tristage cache: error: {cache_dir}/features-00003.done.json: cannot upgrade this cache of the "
        f"previous format: {raw}/imagenet-00003.tar changed since; run the upgrade where the raw files sit "
        "at their recorded paths, or rerun `tristage cache CONFIG --rebuild` to re-encode such units"
    )
    before = stamps(cache_dir)
    manifest = cache(str(raw), cache_dir, rebuild=True)
    assert {n for n in rewritten(before, cache_dir) if n.endswith(".tar")} == {"features-00003.tar"}
    assert manifest["samples"] == UNITS * PER_UNIT


def test_pipe_units_are_known_by_their_command(world, caplog):
    """webdataset's ``pipe:`` sources (braces expanded): one unit per command, named by it; the trainer
    takes them as recorded (a command's output is not looked at before it is read)."""
    caplog.set_level(logging.WARNING)
    raw = world / "raw"
    command = f"pipe:cat {raw}/imagenet-{{00000..{UNITS - 1:05d}}}.tar"
    cfg = load_config(
        STAGE1,
        [*overrides(str(raw), world / "piped", world / "run"), f"data.source.paths=[{command!r}]"],
    )
    manifest = cache_stage(cfg, Accelerator())
    assert manifest["samples"] == UNITS * PER_UNIT
    assert [s["unit"] for s in manifest["shards"]] == [
        f"pipe:cat {raw}/imagenet-{i:05d}.tar" for i in range(UNITS)
    ]
    assert len(FeatureLoader(world / "piped", spec(), data=cfg.data).shards) == UNITS


def test_names_that_collide_across_roots_and_folder_kinds_on_urls_are_one_line(tmp_path):
    from tristage.data.config import SourceConfig
    from tristage.data.sources import SourceError, open_source

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.tar").write_bytes(b"")
    paths = [f"{tmp_path}/a/*.tar", f"{tmp_path}/b/*.tar"]
    with pytest.raises(SourceError) as err:
        open_source(SourceConfig(kind="imagenet_wds", paths=paths))
    assert str(err.value) == (
        f"data.source.paths: {tmp_path}/a/x.tar and {tmp_path}/b/x.tar share the name 'x.tar' within their "
        "roots; give the files distinct names"
    )
    with pytest.raises(SourceError) as err:
        open_source(SourceConfig(kind="imagenet_folders", paths=["s3://bucket/train"]))
    assert str(err.value) == (
        "data.source.paths[0]: imagenet_folders reads local folders, not s3://bucket/train; on object "
        "storage use webdataset tars (imagenet_wds, sam_llava, wds, aesthetic_wds)"
    )
