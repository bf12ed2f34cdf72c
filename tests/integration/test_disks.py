"""Disks that refuse (issue 40 item 5), through the command line.

Read-only folders are real read-only bind mounts, and full disks real tmpfs mounts filled with a filler
file: the tests run as root, which ignores permission bits, so ``chmod`` would test nothing; a mount
refuses root too, and ``mount`` is what a machine without root privileges lacks (the tests skip there).
A missing write permission is tested as the unprivileged user ``nobody`` (``setpriv``).

- ``run.dir``, ``data.cache_dir`` and ``caption.output`` that refuse writes are one line, before any
  model or encoder loads;
- a disk that fills during the cache or caption pass is one line naming the folder, the space left and
  (once units are done) about how much more the rest needs; no temp file stays; after space is freed
  the rerun continues and ends with what one uninterrupted pass writes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tristage.demo import synthetic
from tristage.demo.captioner import write_captioner
from tristage.demo.tiny_run import write_tiny_stage1

from ..conftest import TRISTAGE, one_thread_env, run_cli
from .test_cache_distributed import CONFIG, IMAGES, PER_SHARD, members, world  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
PAGE = 4096  # tmpfs counts whole pages


def mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here ({done.stderr.strip()[:80]!r})")


@contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """``path`` as an empty read-only bind mount."""
    path.mkdir(parents=True)
    mount("--bind", str(path), str(path))
    try:
        mount("-o", "remount,ro,bind", str(path))
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


@contextmanager
def nearly_full(path: Path, free: int) -> Iterator[Path]:
    """A tmpfs at ``path`` with about ``free`` bytes left beside a filler file (delete it to free space)."""
    path.mkdir(parents=True)
    size = 8 << 20
    mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        filler = path / "filler"
        filler.write_bytes(b"\0" * (shutil.disk_usage(path).free - free))
        yield filler
    finally:
        subprocess.run(["umount", str(path)], check=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    return write_tiny_stage1(tmp_path_factory.mktemp("disks"))


@pytest.fixture(scope="module")
def captioning(tmp_path_factory) -> dict:
    """Raw SA-style tars and the tiny LLaVA (demo/captioner.py) for `tristage caption`."""
    root = tmp_path_factory.mktemp("caption_disk")
    raw = synthetic.write_stage2(root / "raw", 8, size=64, per_shard=2)
    (raw / "llava_captions.jsonl").unlink()
    model = write_captioner(root / "tiny_llava")

    def args(output: Path) -> list[str]:
        return [
            "caption",
            str(CONFIG),
            f"data.source.paths=[{raw}/sa_*.tar]",
            f"data.source.captions={output}",
            f"caption.output={output}",
            f"caption.model={model}",
            "caption.max_new_tokens=4",
            "caption.batch_size=2",
            f"run.dir={root / 'run'}",
        ]

    reference = root / "one" / "captions.jsonl"
    done = run_cli(*args(reference))
    assert done.returncode == 0, done.stderr[-3000:]
    return {"args": args, "reference": reference}


def one_line(stderr: str) -> str:
    """The one error line; no traceback anywhere (not even one Python prints while collecting garbage)."""
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("tristage ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def test_a_read_only_run_dir_is_one_line(setup, tmp_path):
    with read_only(tmp_path / "ro") as ro:
        done = run_cli("train", str(setup), f"run.dir={ro / 'run'}", "train.max_steps=2")
    assert done.returncode == 2
    assert one_line(done.stderr) == (
        f"tristage train: error: {setup}: key 'run.dir': {ro / 'run'} is not writable (Read-only file system)"
    )


def test_a_read_only_cache_dir_is_one_line(setup, tmp_path):
    with read_only(tmp_path / "ro") as ro:
        done = run_cli("cache", str(setup), f"data.cache_dir={ro / 'cache'}")
    assert done.returncode == 2
    assert one_line(done.stderr) == (
        f"tristage cache: error: data.cache_dir: {ro / 'cache'} is not writable (Read-only file system)"
    )


def test_a_read_only_caption_output_is_one_line_before_the_model_loads(captioning, tmp_path):
    with read_only(tmp_path / "ro") as ro:
        done = run_cli(*captioning["args"](ro / "captions.jsonl"))
    assert done.returncode == 2
    assert one_line(done.stderr) == (
        f"tristage caption: error: caption.output: {ro / 'captions.jsonl.parts'} is not writable "
        "(Read-only file system)"
    )
    assert "Loading" not in done.stderr  # no model weights were read


def test_a_run_dir_without_write_permission_is_one_line(setup):
    """As the unprivileged user ``nobody``, in a folder that belongs to root (mode 755)."""
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv")
    shared = Path(tempfile.mkdtemp(prefix="tristage-nobody-"))  # pytest's own folders are root-only
    try:
        shared.chmod(0o755)
        config = Path(shutil.copy(setup, shared / "stage.yaml"))
        (shared / "theirs").mkdir()
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(TRISTAGE), "train"]
        args = [str(config), f"data.cache_dir={shared}", f"run.dir={shared / 'theirs' / 'run'}"]
        env = one_thread_env(HOME=str(shared), XDG_CACHE_HOME=str(shared / "nocache"))
        done = subprocess.run(
            [*command, *args], cwd=shared, env=env, capture_output=True, text=True, timeout=300
        )
    finally:
        shutil.rmtree(shared)
    assert done.returncode == 2, done.stderr[-3000:]
    assert one_line(done.stderr) == (
        f"tristage train: error: {config}: key 'run.dir': {shared / 'theirs' / 'run'} is not writable "
        "(Permission denied)"
    )


def unit_bytes(cache_dir: Path, pages: bool = True) -> int:
    """A unit's shard and done marker on disk (in whole tmpfs pages)."""
    files = [cache_dir / "features-00000.tar", cache_dir / "features-00000.done.json"]
    return sum(-(-f.stat().st_size // PAGE) * PAGE if pages else f.stat().st_size for f in files)


def test_a_disk_that_fills_during_the_cache_pass_is_one_line_and_the_rerun_continues(request, tmp_path):
    shared = request.getfixturevalue("world")
    per_unit = unit_bytes(shared["reference"])
    cache_dir = tmp_path / "disk" / "cache"
    overrides = [*shared["common"], f"run.dir={tmp_path / 'run'}", f"data.cache_dir={cache_dir}"]
    with nearly_full(tmp_path / "disk", 3 * per_unit + per_unit // 2 + 2 * PAGE) as filler:
        done = run_cli("cache", str(CONFIG), *overrides, env=one_thread_env())
        assert done.returncode == 2
        line = one_line(done.stderr)
        kept = {p.name: p.read_bytes() for p in cache_dir.glob("*.done.json")}
        assert 0 < len(kept) < IMAGES // PER_SHARD
        left, size = IMAGES // PER_SHARD - len(kept), r"[\d.]+ (B|KiB|MiB)"
        assert re.fullmatch(
            rf"tristage cache: error: {re.escape(str(cache_dir))}: disk full \({size} free; about {size} "
            rf"more needed for the {left} units left; the {len(kept)} done are kept: free space, rerun\)",
            line,
        ), line
        assert not list(cache_dir.glob("*.tmp-*")) and not list(cache_dir.glob("*.lock"))
        assert not (cache_dir / "manifest.json").exists()
        filler.unlink()  # space freed: the rerun continues
        again = run_cli("cache", str(CONFIG), *overrides, env=one_thread_env())
        assert again.returncode == 0, again.stderr[-3000:]
        assert members(cache_dir) == members(shared["reference"])
        assert {p.name: p.read_bytes() for p in cache_dir.glob("*.done.json") if p.name in kept} == kept


def test_a_disk_that_fills_during_the_caption_pass_is_one_line_and_the_rerun_continues(captioning, tmp_path):
    output = tmp_path / "disk" / "captions.jsonl"
    with nearly_full(tmp_path / "disk", 8 * PAGE) as filler:
        done = run_cli(*captioning["args"](output))
        assert done.returncode == 2
        line = one_line(done.stderr)
        assert line.startswith("tristage caption: error: ") and ": disk full (" in line, line
        parts = Path(f"{output}.parts")
        assert not list(parts.glob("*.tmp-*")) and not list(parts.glob("*.lock"))
        filler.unlink()
        again = run_cli(*captioning["args"](output))
        assert again.returncode == 0, again.stderr[-3000:]
        assert output.read_text() == captioning["reference"].read_text()
        manifest = json.loads(output.with_suffix(".manifest.json").read_text())
        assert (
            manifest["captions"]
            == json.loads(captioning["reference"].with_suffix(".manifest.json").read_text())["captions"]
        )
