"""The install can't collide: our imports live under ``tristage.*``, so a user's own ``data/``, ``train.py``
or ``bench.py`` in the working folder never shadows them (the console script and ``python -m``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tristage.demo.tiny_run import write_tiny_stage1

from ..conftest import one_thread_env

SHADOWS = {
    "data/__init__.py": 'raise ImportError("the user\'s own data package was imported")\n',
    "train.py": 'raise ImportError("the user\'s own train.py was imported")\n',
    "bench.py": 'raise ImportError("the user\'s own bench.py was imported")\n',
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    return write_tiny_stage1(tmp_path_factory.mktemp("layout"))


def user_folder(root: Path) -> Path:
    for name, text in SHADOWS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("entry", ["console_script", "python_m"])
def test_train_from_a_folder_with_its_own_data_train_and_bench(setup, tmp_path, entry):
    """``tristage train`` (the console script and ``python -m``) on a demo config, run from a folder that
    holds a ``data/`` package, ``train.py`` and ``bench.py`` of its own."""
    cwd = user_folder(tmp_path / "user_project")
    command = {
        "console_script": [str(Path(sys.executable).parent / "tristage")],
        "python_m": [sys.executable, "-m", "tristage"],
    }[entry]
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [*command, "train", str(setup), f"run.dir={run_dir}", "train.max_steps=2", "checkpoint.every=2"],
        cwd=cwd,
        env=one_thread_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "the user's own" not in result.stderr
    assert (run_dir / "final" / "transformer").is_dir()
