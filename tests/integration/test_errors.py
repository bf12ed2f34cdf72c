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
