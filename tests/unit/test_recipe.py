"""Recipe fidelity: docs/recipe.md's table is what ships, named commands exist, the official EMA."""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from tristage.cli import build_parser
from tristage.train.config import load_config
from tristage.train.training.ema import EMA

from ..conftest import ROOT

STAGES = {"1": "stage1_imagenet.yaml", "2": "stage2_sam_llava.yaml", "3": "stage3_aesthetic.yaml"}


def recipe_rows() -> list[tuple[str, list[str], object]]:
    """(key, stages, tristage value) of every row between docs/recipe.md's recipe-table markers."""
    text = (ROOT / "docs" / "recipe.md").read_text()
    table = text.split("<!-- recipe-table -->")[1].split("<!-- /recipe-table -->")[0]
    rows = []
    for line in table.strip().splitlines()[2:]:  # header and separator
        key, stages, value = (cell.strip() for cell in line.strip("|").split("|")[:3])
        rows.append(
            (key.strip("`"), [s.strip() for s in stages.split(",")], yaml.safe_load(value.strip("`")))
        )
    return rows


def config_value(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_recipe_table_matches_the_shipped_configs():
    rows = recipe_rows()
    assert len(rows) > 25
    configs = {n: load_config(ROOT / "configs" / name) for n, name in STAGES.items()}
    for key, stages, value in rows:
        for stage in stages:
            shipped = config_value(configs[stage], key)
            assert shipped == pytest.approx(value) if isinstance(value, float) else shipped == value, (
                f"docs/recipe.md recipe table says {key} = {value!r} for stage {stage}, "
                f"configs/{STAGES[stage]} has {shipped!r}"
            )
    covered = {(key, stage) for key, stages, _ in rows for stage in stages}
    for key in ("optim.lr", "optim.eps", "optim.grad_clip", "optim.auto_lr", "train.ema_decay"):
        assert all((key, stage) in covered for stage in STAGES), key  # every stage has a row


def test_recipe_table_check_can_fail():
    """The comparison above sees a changed value (the table is parsed, not skipped)."""
    stage2 = load_config(ROOT / "configs" / STAGES["2"], ["optim.eps=1e-8"])
    (value,) = [v for k, s, v in recipe_rows() if k == "optim.eps" and "2" in s]
    assert config_value(stage2, "optim.eps") != pytest.approx(value)


def named_commands() -> set[tuple[str, ...]]:
    """Every ``tristage WORD [WORD]`` named in the README, a docs page or a shipped config (the stage
    configs and the demo's)."""
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "configs").rglob("*.yaml")]
    texts = [p.read_text() for p in files + sorted((ROOT / "demo" / "configs").glob("*.yaml"))]
    found = set()
    for text in texts:
        for match in re.finditer(r"`tristage ([a-z][a-z0-9-]*)(?: ([a-z][a-z0-9-]*))?", text):
            found.add(tuple(word for word in match.groups() if word))
    return found


def test_every_named_command_exists():
    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices  # argparse keeps them here
    named = named_commands()
    assert ("convert", "dit-to-pixart") in named and len(named) > 5
    for words in named:
        assert words[0] in subcommands, f"`tristage {' '.join(words)}` is named but does not exist"
        nested = subcommands[words[0]]._subparsers
        if nested is not None and len(words) > 1:
            choices = nested._group_actions[0].choices
            assert words[1] in choices, f"`tristage {' '.join(words)}` is named but does not exist"
    assert ("convert", "dit-load") not in named


def test_ema_is_a_constant_rate_from_an_initial_copy_with_warmup_as_an_option():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    official, warm = EMA(model, 0.9), EMA(model, 0.9, warmup=True)
    assert official.shadow[0].item() == 0.0  # the initial copy
    with torch.no_grad():
        model.weight.fill_(1.0)
    official.update(model, step=0)
    warm.update(model, step=0)
    assert official.shadow[0].item() == pytest.approx(0.1)  # 1 - decay, from step 0 on
    assert warm.shadow[0].item() == pytest.approx(0.9)  # decay min(0.9, 1/10) at step 0
