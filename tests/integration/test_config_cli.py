"""`tristage train|cache` with a bad config, from the console script: one line naming key and file, exit 2."""

from __future__ import annotations

import pytest

from ..conftest import ROOT


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "demo/configs/stage1.yaml", "optim.lrr=1"], "optim.lrr"),
        (["train", "demo/configs/stage1.yaml", "train.seed=x"], "train.seed"),
        (["train", "demo/configs/stage2.yaml", "init_from=/does/not/exist"], "init_from"),
        (["cache", "demo/configs/stage1.yaml", "data.source.paths=[/nope/*.tar]"], "data.source.paths"),
        (["train", "configs/missing.yaml"], "missing.yaml"),
    ],
)
def test_cli_bad_config_exit_2_one_line(cli, tmp_path, args, needle):
    args = [args[0], str(ROOT / args[1]), *args[2:]]  # the command runs from a folder outside the checkout
    result = cli(*args, f"run.dir={tmp_path / 'run'}") if "missing" not in args[1] else cli(*args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert needle in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing was started
