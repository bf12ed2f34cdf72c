"""Config schema: every shipped YAML loads; bad input is one line naming key and file, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from tristage.train.config import Config, ConfigError, load_config, save_config

from .conftest import ROOT

CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
TRAINING_CONFIGS = [p for p in CONFIGS if "accelerate" not in p.parts]


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"stage1_imagenet.yaml", "stage2_sam_llava.yaml", "stage3_aesthetic.yaml"} <= names
    assert len([p for p in CONFIGS if p.parent.name == "demo"]) == 3


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_loads(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.run.dir and cfg.train.max_steps > 0
    assert cfg.init_from is None or isinstance(cfg.init_from, str)


def test_paper_settings_in_real_configs():
    for name in ("stage1_imagenet", "stage2_sam_llava", "stage3_aesthetic"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert cfg.model.size == "XL/2"
        assert cfg.optim.lr == pytest.approx(2e-5)
        assert cfg.optim.weight_decay == pytest.approx(3e-2)
        assert cfg.optim.grad_clip == pytest.approx(0.01)
        assert cfg.train.ema_decay == pytest.approx(0.9999)
        assert cfg.objective.learn_sigma and cfg.objective.num_timesteps == 1000
    assert load_config(ROOT / "configs/stage1_imagenet.yaml").train.max_steps == 300_000
    assert load_config(ROOT / "configs/stage2_sam_llava.yaml").train.max_steps == 150_000


def test_overrides_and_roundtrip(tmp_path):
    cfg = load_config(
        ROOT / "configs/demo/stage1.yaml", ["train.max_steps=7", "run.dir=/x/y", "train.seed=3"]
    )
    assert (cfg.train.max_steps, cfg.run.dir, cfg.train.seed) == (7, "/x/y", 3)
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg


@pytest.mark.parametrize(
    "override, key",
    [("model.bogus=1", "model.bogus"), ("train.max_steps=abc", "train.max_steps"), ("nope=1", "nope")],
)
def test_bad_override_names_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/demo/stage1.yaml", [override])
    assert key in str(err.value) and "stage1.yaml" in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_in_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "configs/demo/stage1.yaml").read_text() + "\nextra_section: {a: 1}\n")
    with pytest.raises(ConfigError, match="extra_section"):
        load_config(bad)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "configs/demo/stage1.yaml", "optim.lrr=1"], "optim.lrr"),
        (["train", "configs/demo/stage1.yaml", "train.seed=x"], "train.seed"),
        (["train", "configs/demo/stage2.yaml", "init_from=/does/not/exist"], "init_from"),
        (["cache", "configs/demo/stage1.yaml", "data.source.paths=[/nope/*.tar]"], "data.source.paths"),
        (["train", "configs/missing.yaml"], "missing.yaml"),
    ],
)
def test_cli_bad_config_exit_2_one_line(cli, tmp_path, args, needle):
    result = cli(*args, f"run.dir={tmp_path / 'run'}") if "missing" not in args[1] else cli(*args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert needle in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing was started
