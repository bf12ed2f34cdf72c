"""Config schema: every shipped YAML loads; bad input is one line naming key and file, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from tristage.cli import main
from tristage.train.config import Config, ConfigError, load_config, save_config

from ..conftest import ROOT

DEMO_CONFIGS = sorted((ROOT / "demo" / "configs").glob("*.yaml"))  # shipped in the package
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml")) + DEMO_CONFIGS
TRAINING_CONFIGS = [p for p in CONFIGS if "accelerate" not in p.parts]


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"stage1_imagenet.yaml", "stage2_sam_llava.yaml", "stage3_aesthetic.yaml"} <= names
    assert [p.name for p in DEMO_CONFIGS] == ["stage1.yaml", "stage2.yaml", "stage3.yaml"]


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_loads(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.run.dir and cfg.train.max_steps > 0
    assert cfg.init_from is None or isinstance(cfg.init_from, str)


def test_full_demo_takes_its_steps_from_the_demo_configs():
    """`tristage demo` overrides no step count; each config draws its one grid at its last step."""
    from tristage.demo.run import FAST, FULL

    assert FULL.steps is None and FAST.steps is not None
    for n in (1, 2, 3):
        cfg = load_config(ROOT / "demo" / "configs" / f"stage{n}.yaml")
        assert cfg.validation.every == cfg.train.max_steps


def test_paper_settings_in_real_configs():
    """Stage 1 from scratch = DiT's train.py; stages 2-3 = PixArt-alpha's configs (docs/recipe.md)."""
    stage1 = load_config(ROOT / "configs/stage1_imagenet.yaml")
    assert (stage1.optim.lr, stage1.optim.weight_decay, stage1.optim.grad_clip) == (1e-4, 0.0, None)
    assert not stage1.optim.auto_lr and stage1.optim.warmup_steps == 0
    for name in ("stage1_imagenet", "stage2_sam_llava", "stage3_aesthetic"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert cfg.model.size == "XL/2"
        assert cfg.train.ema_decay == pytest.approx(0.9999) and not cfg.train.ema_warmup
        assert cfg.objective.learn_sigma and cfg.objective.num_timesteps == 1000
        if name != "stage1_imagenet":
            assert cfg.optim.lr == pytest.approx(2e-5) and cfg.optim.eps == pytest.approx(1e-10)
            assert cfg.optim.weight_decay == pytest.approx(3e-2) and cfg.optim.auto_lr
            assert cfg.optim.grad_clip == pytest.approx(0.01)
            assert cfg.model.interpolation_scale == max(cfg.model.sample_size // 64, 1)  # lewei_scale
    assert load_config(ROOT / "configs/stage1_imagenet.yaml").train.max_steps == 300_000
    assert load_config(ROOT / "configs/stage2_sam_llava.yaml").train.max_steps == 150_000


def test_overrides_and_roundtrip(tmp_path):
    cfg = load_config(
        ROOT / "demo/configs/stage1.yaml", ["train.max_steps=7", "run.dir=/x/y", "train.seed=3"]
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
        load_config(ROOT / "demo/configs/stage1.yaml", [override])
    assert key in str(err.value) and "stage1.yaml" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.null_caption=zeros", "key 'data.null_caption': 'zeros' is not one of t5_empty, buffer"),
        ("data.on_damaged=ignore", "key 'data.on_damaged': 'ignore' is not one of stop, skip"),
        ("encoders.feature_dtype=fp8", "key 'encoders.feature_dtype': 'fp8' is not one of bfloat16, float16"),
        ("encoders.text_feature_dtype=int4", "key 'encoders.text_feature_dtype': 'int4' is not one of"),
    ],
)
def test_data_choices_are_checked_where_declared(override, message):
    """data/config.py checks its own choices: any command's config load refuses a bad one."""
    path = ROOT / "demo/configs/stage1.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    text = str(err.value)
    assert text.startswith(f"{path} (command-line override): {message}") and "\n" not in text


def test_encoder_dtype_choices_are_the_ones_the_cache_pass_knows():
    from tristage.data.cache import DTYPES
    from tristage.data.config import FEATURE_DTYPES, TEXT_FEATURE_DTYPES
    from tristage.data.text_codec import TEXT_CODECS

    assert FEATURE_DTYPES == tuple(DTYPES) and TEXT_FEATURE_DTYPES == tuple(TEXT_CODECS)


def test_every_choice_list_is_the_one_its_component_keys_its_table_by():
    """The config declares each choice list beside its key; the component's table has the same names."""
    from tristage.data.config import SOURCE_KINDS
    from tristage.data.sources import SOURCES
    from tristage.train import config
    from tristage.train.conversion.keymap import WEIGHTS_CHOICES
    from tristage.train.diffusion import objective
    from tristage.train.diffusion.config import BETA_SCHEDULES, MIN_SNR_PREDICTIONS, PREDICTIONS
    from tristage.train.families import FAMILIES
    from tristage.train.training import fsdp, lr_schedules, nonfinite, tracking

    assert tuple(SOURCES) == SOURCE_KINDS and tuple(FAMILIES) == config.MODEL_FAMILIES
    assert tuple(objective.TARGET_COEFFICIENTS) == PREDICTIONS
    assert tuple(objective.BETA_SCHEDULE_FNS) == BETA_SCHEDULES
    assert tuple(objective.MIN_SNR_DENOMINATOR) == MIN_SNR_PREDICTIONS
    assert tuple(lr_schedules.FACTORS) == config.LR_SCHEDULES
    assert tuple(nonfinite.GUARDS) == config.NONFINITE_CHECKS
    assert tuple(tracking.MODES) == config.TRACKING_MODES
    assert tuple(WEIGHTS_CHOICES) == config.INIT_FROM_WEIGHTS
    assert tuple(fsdp.RESHARD_AFTER_FORWARD) == config.SHARDED_PARALLELISMS
    assert set(config.SHARDED_PARALLELISMS) < set(config.PARALLELISMS)


def test_unknown_key_in_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "demo/configs/stage1.yaml").read_text() + "\nextra_section: {a: 1}\n")
    with pytest.raises(ConfigError, match="extra_section"):
        load_config(bad)


BASE = (ROOT / "demo/configs/stage1.yaml").read_text()
TRAIN_LINE = next(i for i, line in enumerate(BASE.splitlines(), 1) if "max_steps: 2000" in line)


@pytest.mark.parametrize(
    "text, needles",
    [
        ("run: {dir: x\nmodel: [1, 2\n", ["bad.yaml:2:", "invalid YAML"]),  # syntax error
        ("- run\n- model\n", ["bad.yaml:", "top level must be a mapping", "list"]),
        ("42\n", ["bad.yaml:", "top level must be a mapping", "single value"]),
        (BASE + "\ntrain: {seed: 1}\n", ["bad.yaml:", "duplicate key train"]),
        (BASE.replace("  size: demo", "  size: demo\n  sizes: 3"), ["bad.yaml:9:", "model.sizes"]),
        (BASE.replace("max_steps: 2000", "max_steps: many"), [f"bad.yaml:{TRAIN_LINE}:", "train.max_steps"]),
    ],
    ids=["syntax", "list", "scalar", "duplicate", "unknown-key", "wrong-type"],
)
def test_bad_yaml_is_one_line_naming_file_and_line(capsys, tmp_path, text, needles):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "\n" not in str(err.value)
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    assert main(["train", str(bad)]) == 2  # the CLI: exit 2, the one line on stderr, no traceback
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert needles[0] in line


def test_init_from_folder_without_a_model_is_one_line(capsys, tmp_path):
    empty = tmp_path / "final"
    (empty / "transformer").mkdir(parents=True)
    args = [
        "train",
        str(ROOT / "demo/configs/stage2.yaml"),
        f"init_from={empty}",
        f"run.dir={tmp_path / 'run'}",
    ]
    assert main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "init_from" in line and str(empty) in line and "holds no model" in line
    assert not (tmp_path / "run").exists()


def test_a_bad_value_is_named_where_it_was_set(tmp_path):
    """The file when the YAML set it, the command line when an override did."""
    path = tmp_path / "stage.yaml"
    path.write_text((ROOT / "demo/configs/stage1.yaml").read_text().replace("lr: 1.0e-3", "lr: -1.0"))
    with pytest.raises(ConfigError) as in_file:
        load_config(path)
    assert str(in_file.value) == f"{path}: key 'optim.lr': must be > 0, got -1.0"
    with pytest.raises(ConfigError) as on_line:
        load_config(ROOT / "demo/configs/stage1.yaml", ["optim.lr=-2"])
    assert str(on_line.value) == (
        f"{ROOT / 'demo/configs/stage1.yaml'} (command-line override): key 'optim.lr': must be > 0, got -2.0"
    )
