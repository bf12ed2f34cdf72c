"""The product as installed: a built wheel in a fresh venv that cannot see the checkout, run from a folder
outside it, and the prepared GPU run's ``--dry-run``.

The fresh venv borrows the dependencies (torch, diffusers, ...) of the test venv through a ``.pth`` line,
because installing them again would fetch gigabytes; tristage itself comes only from the wheel.  Python
reads ``.pth`` files in site-packages only, so the test venv's editable-install hook is not run there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from ..conftest import ROOT, user_folder

pytestmark = pytest.mark.slow
SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "demo_out")


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600):
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd}: {done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """``pip wheel`` of a copy of the checkout, installed with ``--no-deps`` into a new venv."""
    root = tmp_path_factory.mktemp("wheel")
    source = shutil.copytree(ROOT, root / "source", ignore=SKIP)  # the build writes build/ and egg-info
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(root / "dist"), str(source)], root)
    (wheel,) = (root / "dist").glob("tristage-*.whl")
    venv.EnvBuilder(with_pip=True).create(root / "venv")
    python = root / "venv" / "bin" / "python"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root)
    Path(purelib.stdout.strip(), "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"])
    run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], root)
    return root / "venv"


def installed_env(venv_dir: Path) -> dict[str, str]:
    """What a user's shell has: the venv's bin first, nothing of the checkout on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PATH": f"{venv_dir / 'bin'}:{env['PATH']}", "OMP_NUM_THREADS": "1"}


def test_the_wheel_holds_tristage_and_not_the_checkout(wheel_venv):
    code = "import tristage, tristage.demo.run as r; print(tristage.__file__); print(r.CONFIGS)"
    out = run([str(wheel_venv / "bin" / "python"), "-c", code], user_folder(), installed_env(wheel_venv))
    package, configs = out.stdout.split()
    assert package.startswith(str(wheel_venv)) and configs.startswith(str(wheel_venv))
    assert not package.startswith(str(ROOT)) and (Path(configs) / "stage1.yaml").is_file()


def test_help_bench_and_demo_from_the_wheel(wheel_venv, tmp_path):
    """``tristage --help``, a tiny ``tristage bench train`` (its JSON line) and ``tristage demo --fast``
    (both exports), through the wheel's console script, from a folder outside the checkout."""
    exe, env = str(wheel_venv / "bin" / "tristage"), installed_env(wheel_venv)
    assert "usage: tristage" in run([exe, "--help"], tmp_path, env).stdout
    bench = "--size tiny --steps 2 --repeats 1 --resolution 64 --window 2 --batch 2".split()
    figures = json.loads(run([exe, "bench", "train", *bench], tmp_path, env).stdout.strip().splitlines()[-1])
    assert figures["img_per_s"] > 0 and figures["steps"] == 2
    run([exe, "demo", "--fast", "--out", str(tmp_path / "demo")], tmp_path, env)
    assert (tmp_path / "demo" / "export" / "model_index.json").is_file()
    assert (tmp_path / "demo" / "stage1" / "export" / "model_index.json").is_file()


def test_gpu_sh_dry_run_prints_every_figure(tmp_path):
    """``bench/gpu.sh --dry-run``: every figure of the prepared GPU run, tiny, on the CPU; no error line."""
    env = {**os.environ, "PYTHON": sys.executable, "LOGS": str(tmp_path)}
    out = run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run"], tmp_path, env, timeout=900)
    figures = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    names = [f.get("figure") for f in figures]
    assert names == ["device", "ddp_256", "ddp_512", "fsdp_256_20steps", "ddp_256_compile", "ddp_512_compile"]
    assert [f for f in figures if "error" in f] == []
    assert all(f["img_per_s"] > 0 for f in figures[1:] if "img_per_s" in f)
