"""Every value is checked where it is declared (issue 40 item 3, issue 39 item 2): each numeric key of the
schema has a range that loading enforces (that loading imports no torch: tests/integration/test_cli_help.py).

The walk below finds the numeric keys itself, from the dataclasses' type hints, so a key added later
without a bound fails :func:`test_every_numeric_key_has_a_bound`.
"""

from __future__ import annotations

import dataclasses
import types
import typing

import pytest

from tristage.train.config import Config, ConfigError, load_config

from ..conftest import ROOT

CONFIG = ROOT / "demo" / "configs" / "stage1.yaml"


def _default(f: dataclasses.Field) -> object:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _number_type(hint: object) -> tuple[type | None, bool]:
    """(int or float, whether a list of them) for a numeric hint (``float | None``, ``list[int]``)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    if typing.get_origin(hint) is list:
        return _number_type(typing.get_args(hint)[0])[0], True
    return (hint if hint in (int, float) else None), False


def numeric_keys(cls: type, prefix: str = "") -> list[tuple[str, type, bool]]:
    """(dotted key, int or float, is a list) of every numeric leaf of a config dataclass, recursively."""
    hints, found = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        default = _default(f)
        if dataclasses.is_dataclass(default):
            found += numeric_keys(type(default), f"{prefix}{f.name}.")
            continue
        kind, is_list = _number_type(hints[f.name])
        if kind is not None:
            found.append((f"{prefix}{f.name}", kind, is_list))
    return found


KEYS = numeric_keys(Config)


def _refused(key: str, value: str) -> str:
    """The one-line error of loading the demo's stage-1 config with ``key=value``."""
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, ["run.dir=unused", f"{key}={value}"])
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{CONFIG} (command-line override): "), message
    return message


def test_the_walk_reaches_every_section():
    names = {key for key, _, _ in KEYS}
    for key in ("optim.lr", "train.max_steps", "data.batch_size", "data.source.min_aesthetic"):
        assert key in names
    for key in ("objective.beta_start", "encoders.max_tokens", "caption.top_p", "validation.class_labels"):
        assert key in names
    assert ("optim.betas", float, True) in KEYS and ("model.interpolation_scale", float, False) in KEYS
    assert len(KEYS) >= 45, len(KEYS)


@pytest.mark.parametrize(("key", "kind", "is_list"), KEYS, ids=[k for k, _, _ in KEYS])
def test_every_numeric_key_has_a_bound(key: str, kind: type, is_list: bool):
    """A value far below any sensible range is refused, by name; floats also refuse nan."""
    probes = [str(-(2**40)) if kind is int else "-1e30"] + (["nan"] if kind is float else [])
    for probe in probes:
        value = f"[{probe},{probe}]" if is_list else probe
        message = _refused(key, value)
        assert f"key '{key}" in message, message  # 'optim.betas[0]' names its item
        assert "must be" in message, message


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=-1", "key 'optim.lr': must be > 0, got -1.0"),
        ("train.max_steps=-5", "key 'train.max_steps': must be >= 1, got -5"),
        ("data.batch_size=0", "key 'data.batch_size': must be >= 1, got 0"),
        ("data.cond_dropout=1.5", "key 'data.cond_dropout': must be in [0.0, 1.0], got 1.5"),
        ("train.ema_decay=1.1", "key 'train.ema_decay': must be in [0.0, 1.0], got 1.1"),
        ("optim.betas=[0.9,1.0]", "key 'optim.betas[1]': must be in [0.0, 1.0), got 1.0"),
        ("optim.betas=[0.9]", "key 'optim.betas': must be [beta1, beta2], got [0.9]"),
        ("optim.lr=inf", "key 'optim.lr': must be > 0 and finite, got inf"),
        ("train.seed=4294967296", "key 'train.seed': must be in [0, 4294967295], got 4294967296"),
        ("validation.class_labels=[1000]", "key 'validation.class_labels[0]': must be in [0, 999], got 1000"),
        ("model.size=XL/3", "key 'model.size': 'XL/3' is not one of XL/2, L/2, B/2"),
        ("model.family=unet", "key 'model.family': 'unet' is not one of dit, pixart"),
        ("tracking.mode=cloud", "key 'tracking.mode': 'cloud' is not one of offline, online"),
        ("data.source.kind=laion", "key 'data.source.kind': 'laion' is not one of imagenet_wds"),
        ("objective.beta_end=1e-5", "key 'objective.beta_end': must be in [0.0001, 1.0), got 1e-05"),
    ],
)
def test_a_bad_value_is_one_line_naming_key_value_and_range(override: str, message: str):
    key, value = override.split("=", 1)
    assert _refused(key, value).startswith(f"{CONFIG} (command-line override): {message}")


def test_the_defaults_are_in_range():
    """Building the schema runs every section's checks on its defaults (the shipped YAMLs load in
    test_config.py)."""
    cfg = Config()
    assert cfg.train.max_steps == 300_000 and cfg.objective.num_timesteps == 1000
