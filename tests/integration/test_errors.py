"""One error base: a ``TristageError`` is one line and exit 2; anything else is a bug and keeps its
traceback (exit 1), even a ``KeyError``, which once passed for a mistake in the user's config."""

from __future__ import annotations

import os

import pytest

from tristage.demo.tiny_run import write_tiny_stage1

from ..conftest import ROOT, one_thread_env, run_cli

FAULTS = str(ROOT / "tests" / "faults")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_stage1(tmp_path_factory.mktemp("errors"))


def test_a_key_error_inside_the_trainer_is_a_bug_with_its_traceback(setup, tmp_path):
    path = f"{FAULTS}:{os.environ.get('PYTHONPATH', '')}"
    env = one_thread_env(PYTHONPATH=path, TRISTAGE_TEST_FAULT="rank=0,key_error_step=2")
    result = run_cli("train", str(setup), f"run.dir={tmp_path / 'run'}", "train.max_steps=4", env=env)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "KeyError: 'injected bug'"
    assert "tristage train: error:" not in result.stderr


def test_a_user_error_is_one_line_and_exit_2(setup, tmp_path):
    result = run_cli("train", str(setup), f"run.dir={tmp_path / 'run'}", "optim.lrr=1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"tristage train: error: {setup} (command-line override): key 'optim.lrr': "
        "Key 'lrr' not in 'OptimConfig'. Did you mean: 'lr'?"
    ]


def _files(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=-1", "key 'optim.lr': must be > 0, got -1.0"),  # was a 24-line optimizer traceback
        ("train.max_steps=-5", "key 'train.max_steps': must be >= 1, got -5"),  # was a COMPLETE final/
        ("data.batch_size=0", "key 'data.batch_size': must be >= 1, got 0"),  # was blamed on the cache
    ],
)
def test_a_value_out_of_range_is_one_line_and_nothing_is_written(setup, tmp_path, override, message):
    """Refused when the config loads, before any run folder, tracker or checkpoint exists."""
    cache = setup.parent / "cache"
    before = _files(cache)
    result = run_cli("train", str(setup), f"run.dir={tmp_path / 'run'}", override)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"tristage train: error: {setup} (command-line override): {message}"
    ]
    assert not (tmp_path / "run").exists() and _files(cache) == before
