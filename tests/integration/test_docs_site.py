"""The documentation commands as a maintainer and CI run them: ``mkdocs build --strict`` (the venv's
executable, from a folder outside the checkout) and ``scripts/gen_config_docs.py --check``, which reads the
typed config without importing it (no torch)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..conftest import ROOT


def test_mkdocs_build_strict(tmp_path):
    result = subprocess.run(
        [str(Path(sys.executable).parent / "mkdocs"), "build", "--strict"]
        + ["--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        cwd=tmp_path,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # Material's banner about its successor
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "configuration" / "index.html").is_file()


def test_generator_reads_the_config_without_importing_it(tmp_path):
    """The page is generated from the source with ast: neither torch nor the config modules load."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import runpy, sys\n"
        "sys.argv = sys.argv[1:]  # the script and --check\n"
        "try:\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as stop:\n"
        "    assert stop.code == 0, stop.code\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tristage', 'omegaconf')))\n"
    )
    script = ROOT / "scripts" / "gen_config_docs.py"
    result = subprocess.run(
        [sys.executable, str(probe), str(script), "--check"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
