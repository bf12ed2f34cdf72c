"""Messages that point to the right place (issue 40 item 7): a bad JSONL line is named by its own
number, a blank ``sample --prompt`` is refused unless ``--unconditional``, and ``launch.sh`` names an
unknown target and prints only its usage.  Each through the command line, as a user runs it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tristage.demo import synthetic
from tristage.demo.encoders import write_demo_text_encoder
from tristage.demo.run import CONFIGS

from ..conftest import ROOT, run_cli
from ..tiny_exports import dit_export, pixart_export

pytestmark = pytest.mark.usefixtures("one_thread")


def captions_with_bad_line(path: Path, lines: int, bad: int) -> Path:
    rows = [json.dumps({"id": f"sa_{n}", "caption": f"caption {n}"}) for n in range(1, lines + 1)]
    rows[bad - 1] = f'{{"id": "sa_{bad}", "caption": "cut off'  # an unterminated string
    path.write_text("\n".join(rows) + "\n")
    return path


def test_a_malformed_captions_line_960_is_named_line_960(tmp_path):
    raw = synthetic.write_stage2(tmp_path / "raw", 8)
    captions = captions_with_bad_line(tmp_path / "captions.jsonl", 1000, 960)
    enc = tmp_path / "encoders"
    write_demo_text_encoder(enc)
    cache = tmp_path / "cache"
    result = run_cli(
        "cache",
        str(CONFIGS / "stage2.yaml"),
        f"data.source.paths=[{raw}/sa_*.tar]",
        f"data.source.captions={captions}",
        f"data.cache_dir={cache}",
        f"encoders.vae={ROOT / 'demo/assets/demo_vae'}",
        f"encoders.text_encoder={enc / 'text_encoder'}",
        f"encoders.tokenizer={enc / 'tokenizer'}",
        f"run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"tristage cache: error: {captions}:960: unreadable caption line "
        "(not valid JSON: Unterminated string starting at: column 29)"
    ]
    assert not list(cache.glob("features-*"))  # nothing encoded from a half-read caption file


def test_a_captions_line_without_an_id_is_named(tmp_path):
    from tristage.data.sources import load_captions
    from tristage.errors import SourceError

    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a", "caption": "x"}\n\n{"caption": "no id"}\n')
    with pytest.raises(SourceError, match=r"c\.jsonl:3: unreadable caption line \(no 'id' field\)$"):
        load_captions(str(path))


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    return {"dit": dit_export(root / "dit"), "pixart": pixart_export(root / "pixart")}


@pytest.mark.parametrize("prompt", ["", "   "])
def test_a_blank_prompt_is_one_line_and_writes_nothing(exports, tmp_path, prompt):
    out = tmp_path / "out"
    result = run_cli(
        "sample",
        str(exports["pixart"]),
        "--prompt",
        "a red circle",
        "--prompt",
        prompt,
        "--steps",
        "2",
        "--out",
        str(out),
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "tristage sample: error: --prompt number 2 is empty; give text, or --unconditional to sample "
        "without a prompt"
    ]
    assert not out.exists()


@pytest.mark.parametrize("blank", [[], ["--prompt", ""], ["--prompt", "   "]])
def test_unconditional_samples_the_empty_prompt(exports, tmp_path, blank):
    """--unconditional adds the empty prompt once; a blank --prompt beside it is that prompt, not an error."""
    out = tmp_path / "out"
    args = ["--prompt", "a red circle", *blank, "--unconditional", "--steps", "2", "--out", str(out)]
    result = run_cli("sample", str(exports["pixart"]), *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in out.glob("*.png")) == ["000_00.png", "001_00.png"]
    assert json.loads((out / "settings.json").read_text())["unconditional"] is True
    dit = run_cli("sample", str(exports["dit"]), "--unconditional", "--steps", "2", "--out", str(out / "d"))
    assert dit.returncode == 2
    assert dit.stderr.strip().splitlines() == [
        "tristage sample: error: --unconditional needs a text pipeline (PixArt); a DiT export samples "
        "class labels"
    ]


def launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "launch.sh"), *args], capture_output=True, text=True, timeout=60)


def test_launch_sh_names_an_unknown_target_and_prints_only_its_usage():
    result = launch("stage9")
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == "launch.sh: unknown target 'stage9' (one of demo, stage1, stage2, stage3, all)"
    assert lines[1] == "usage:"
    assert lines[2:] == [
        "  ./launch.sh demo [OUT_DIR]                     the offline demo (single process)",
        "  ./launch.sh stage1|stage2|stage3 [ACCEL_ARGS...] [-- key=value ...]",
        "  ./launch.sh all [ACCEL_ARGS...] [-- key=value ...]",
        "  ./launch.sh stage2 --caption [ACCEL_ARGS...] [-- key=value ...]   (or CAPTION=1 ./launch.sh ...)",
    ]
    assert launch().stderr.splitlines() == lines[1:]  # no target: the usage alone, exit 2
    assert launch("--help").returncode == 0
