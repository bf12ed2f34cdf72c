"""The held-out validation split (``data.val_*``) and the validation loss on it, in one process: the split
is chosen by a key hash, cached apart with the same format and fingerprint and never in the training
shards; validation reads it in a fixed order; the loss does not depend on the batch size."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from tristage.data.cache_format import CacheError, shard_samples, tar_members
from tristage.data.fingerprint import fingerprint
from tristage.data.sources import Skips, open_source
from tristage.data.val_split import ValSplit, held_out, key_hash, split_data, val_dir
from tristage.demo import synthetic
from tristage.demo.run import CONFIGS
from tristage.demo.tiny_run import tiny_vae, write_tiny_stage1
from tristage.train.config import ConfigError, load_config
from tristage.train.diffusion.objective import Objective
from tristage.train.families import family_of, feature_encoders
from tristage.train.training.evaluation import ValLoss, fixed_timesteps
from tristage.train.training.stage_cache import cache_stage

pytestmark = pytest.mark.usefixtures("one_thread")
FRACTION = 0.1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The tiny stage 1 (216 images in 3 tars) cached with a held-out tenth: its config file."""
    return write_tiny_stage1(tmp_path_factory.mktemp("split"), (f"data.val_fraction={FRACTION}",))


def shard_keys(folder: Path) -> list[str]:
    return [
        m["__key__"] for shard in sorted(folder.glob("features-*.tar")) for m in shard_samples(str(shard))
    ]


def raw_keys(cfg) -> list[str]:
    source = open_source(cfg.data.source)
    return [item.key for unit in source.units() for item in source.read(unit, Skips())]


def test_held_out_is_a_property_of_the_key_alone():
    keys = [f"sa_{i}" for i in range(20000)]
    chosen = {k for k in keys if held_out(k, FRACTION)}
    assert 0.09 < len(chosen) / len(keys) < 0.11
    assert chosen == {k for k in reversed(keys) if held_out(k, FRACTION)}  # no order, no count
    assert {k for k in keys if held_out(k, FRACTION / 2)} < chosen  # a smaller share holds out a subset


def test_the_cache_pass_keeps_the_split_out_of_the_training_shards(tiny):
    cfg = load_config(tiny)
    cache = Path(cfg.data.cache_dir)
    train, val, raw = shard_keys(cache), shard_keys(val_dir(cache)), raw_keys(cfg)
    assert len(set(raw)) == len(raw) == 216 and len(train) == len(set(train))
    assert set(val) == {k for k in raw if held_out(k, FRACTION)} and 10 < len(val) < 40
    assert set(train) == set(raw) - set(val)
    manifests = [json.loads((folder / "manifest.json").read_text()) for folder in (cache, val_dir(cache))]
    assert (
        manifests[0]["fingerprint"]
        == manifests[1]["fingerprint"]
        == fingerprint(cfg.data, feature_encoders(cfg))
    )
    assert manifests[0]["fingerprint"]["val_fraction"] == str(FRACTION)
    assert [m["samples"] for m in manifests] == [len(train), len(val)]
    assert "val_fraction" not in fingerprint(replace(cfg.data, val_fraction=0.0), feature_encoders(cfg))


def test_a_cache_of_another_split_is_refused(tiny):
    from tristage.train.training.trainer import Trainer

    cfg = load_config(tiny, ["data.val_fraction=0.2", "tracking.mode=disabled"])
    with pytest.raises(
        CacheError, match=r"manifest.json: cache fingerprint disagrees with the config on 'val_fraction'"
    ):
        Trainer(cfg)


def test_validation_reads_the_lowest_hashes_in_bucket_order(tiny):
    cfg = load_config(tiny, ["data.val_max_samples=5"])
    split = ValSplit(cfg.data, fingerprint(split_data(cfg.data), feature_encoders(cfg)))
    held = sorted(shard_keys(val_dir(cfg.data.cache_dir)), key=key_hash)
    assert [s.key for s in split.samples] == held[:5]  # one bucket here: hash order
    batch = split.batch(split.samples[:3])
    assert batch["mean"].shape == (3, 4, 8, 8) and batch["labels"].tolist() == [
        s.meta["label"] for s in split.samples[:3]
    ]


def test_a_damaged_held_out_sample_is_named(tiny, tmp_path):
    cfg = load_config(tiny)
    copy = tmp_path / "cache"
    shutil.copytree(cfg.data.cache_dir, copy)
    shard = sorted(val_dir(copy).glob("features-*.tar"))[0]
    data = bytearray(shard.read_bytes())
    members = tar_members(memoryview(bytes(data)), str(shard))
    offset, size = next((o, n) for name, o, n in members if name.endswith(".feat.safetensors"))
    data[offset + size - 4] ^= 0xFF  # in the last tensor's bytes: the payload still parses
    shard.write_bytes(bytes(data))
    split = ValSplit(replace(cfg.data, cache_dir=str(copy)), None)
    with pytest.raises(
        CacheError, match=r"features-00000.tar: damaged cached sample '.*' \(fails its checksum"
    ):
        split.batch(split.samples)


def val_loss(cfg, model: torch.nn.Module) -> dict[str, float]:
    family = family_of(cfg.model.family)
    return ValLoss(cfg, Accelerator(cpu=True), Objective(cfg.objective), family).run(model)


def test_val_loss_does_not_depend_on_the_batch_size(tiny):
    cfg = load_config(tiny)
    torch.manual_seed(0)
    model = family_of(cfg.model.family).build(cfg.model, 2 * cfg.model.in_channels).eval()
    eight, three = (val_loss(load_config(tiny, [f"data.batch_size={b}"]), model) for b in (8, 3))
    assert eight.keys() == three.keys()
    assert list(eight)[:3] == ["val/loss", "val/loss_mse", "val/loss_vlb"]
    assert [k for k in eight if "_t" in k] == [
        f"val/loss_t{t}" for t in (62, 187, 312, 437, 562, 687, 812, 937)
    ]
    for key in eight:
        assert three[key] == pytest.approx(eight[key], rel=1e-6), key
    assert eight["val/loss"] == pytest.approx(sum(v for k, v in eight.items() if "_t" in k) / 8, rel=1e-12)
    assert eight["val/loss_vlb"] > 0  # learned sigma: the VLB term is in
    other = val_loss(load_config(tiny, ["validation.loss_seed=1"]), model)
    assert other["val/loss"] != eight["val/loss"]  # the noise is the seed's


def test_fixed_timesteps_are_the_midpoints_of_equal_bins():
    cfg = load_config(
        Path(synthetic.__file__).parent / "configs" / "stage1.yaml", ["objective.timestep_shift=3"]
    )
    assert fixed_timesteps(cfg.objective, 8).tolist() == [62, 187, 312, 437, 562, 687, 812, 937]
    assert fixed_timesteps(cfg.objective, 1).tolist() == [500]


def test_val_paths_cache_the_source_s_own_split(tmp_path):
    """data.val_paths: another set of tars of the same kind, cached into val/; the training shards are the
    same as without it."""
    raw = synthetic.write_stage1(tmp_path / "raw", n=36, per_shard=36)
    held = synthetic.write_stage1(tmp_path / "held", n=18, seed=5, per_shard=18)
    cfg = load_config(
        CONFIGS / "stage1.yaml",
        [
            f"run.dir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"data.source.paths=[{raw}/imagenet-*.tar]",
            f"data.source.synsets={raw / 'synsets.txt'}",
            f"data.val_paths=[{held}/imagenet-*.tar]",
            f"encoders.vae={tiny_vae(tmp_path / 'vae')}",
        ],
    )
    cache_stage(cfg, Accelerator(cpu=True))
    cache = Path(cfg.data.cache_dir)
    assert len(shard_keys(cache)) == 36 and len(shard_keys(val_dir(cache))) == 18
    expected = fingerprint(split_data(cfg.data), feature_encoders(cfg))
    assert len(ValSplit(cfg.data, expected)) == 18


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.val_fraction=1.5", "key 'data.val_fraction': must be in [0.0, 1.0), got 1.5"),
        ("data.val_max_samples=0", "key 'data.val_max_samples': must be >= 1, got 0"),
        ("data.val_paths=[x]", "key 'data.val_paths': the validation split is either the source's own paths"),
        ("validation.loss_timesteps=0", "key 'validation.loss_timesteps': must be >= 1, got 0"),
        ("validation.loss_every=-1", "key 'validation.loss_every': must be >= 0, got -1"),
        ("validation.metrics=[]", "key 'validation.metrics': name the metrics to compute"),
        ("validation.metrics=[fid]", "key 'validation.fid_feature_extractor': the fid metric needs it"),
    ],
)
def test_bad_evaluation_settings_are_one_line(tiny, override, message):
    extra = ["data.val_fraction=0.1"] if "val_paths" in override else ["validation.metrics_every=5"]
    with pytest.raises(ConfigError) as err:
        load_config(tiny, [*extra, override])
    assert message in str(err.value) and str(tiny) in str(err.value) and "\n" not in str(err.value)
