"""The documentation stays true: the site builds with ``mkdocs build --strict`` (no broken link or anchor,
no page left out of the nav), the configuration page is what the typed config generates, the README is a
front page of at most 300 lines whose links resolve, and the app's style table is the app's."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tristage.train.inference.app import STYLES

from .conftest import ROOT

README_MAX_LINES = 300


def gen_config_docs():
    """``scripts/gen_config_docs.py`` as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def mkdocs_build(folder: Path, site: Path) -> subprocess.CompletedProcess:
    """The venv's ``mkdocs build --strict`` of ``folder/mkdocs.yml`` into ``site``, from a temp folder."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "mkdocs"), "build", "--strict"]
        + ["--config-file", str(folder / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=site.parent,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # Material's banner about its successor
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_mkdocs_build_strict(tmp_path):
    result = mkdocs_build(ROOT, tmp_path / "site")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "configuration" / "index.html").is_file()


@pytest.mark.parametrize(
    ("page", "text", "named"),
    [
        ("orphan.md", "# Orphan\n", "orphan.md"),  # a page missing from the nav
        ("index.md", "[x](scaling.md#no-such-heading)\n", "no-such-heading"),  # a broken anchor
        ("index.md", "[x](no-such-page.md)\n", "no-such-page.md"),  # a broken link
    ],
)
def test_mkdocs_strict_fails_on_a_broken_site(tmp_path, page, text, named):
    """The same build on a copy of the site with one defect added."""
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with open(tmp_path / "docs" / page, "a") as fh:
        fh.write(text)
    result = mkdocs_build(tmp_path, tmp_path / "site")
    assert result.returncode != 0
    assert named in result.stderr


def test_configuration_page_is_current():
    generated = gen_config_docs().render()
    page = ROOT / "docs" / "configuration.md"
    assert page.read_text() == generated, (
        "docs/configuration.md is stale: run `python scripts/gen_config_docs.py` and commit the page"
    )


def test_configuration_page_has_every_key_of_the_typed_config():
    """Every leaf key the loader knows (walked through the real dataclasses) has its row, with its default."""
    from dataclasses import MISSING, fields, is_dataclass

    from tristage.train.config import Config

    def leaves(cls, prefix=""):
        for f in fields(cls):
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            if is_dataclass(default):
                yield from leaves(type(default), f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", default

    rows = {row.key: row for section in gen_config_docs().sections() for row in section.keys}
    keys = dict(leaves(Config))
    assert sorted(rows) == sorted(keys)
    assert rows["train.grad_accum"].default == "`1`" and keys["train.grad_accum"] == 1
    assert rows["optim.betas"].default == "`[0.9, 0.999]`"
    assert rows["run.dir"].default == "*required*"
    assert rows["caption.prompt"].default.startswith('`"Describe this image')
    assert rows["objective.timestep_shift"].meaning.startswith("Training timesteps drawn as")


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


def test_a_key_without_a_meaning_fails_the_generator(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "config.py").write_text(
        "from dataclasses import dataclass\n\n\n@dataclass\nclass Inner:\n"
        "    lr: float = 1e-4  # the learning rate\n    steps: int = 10\n\n\n"
        "@dataclass\nclass Config:\n    inner: Inner  # a section\n"
    )
    gen = gen_config_docs()
    with pytest.raises(gen.DocError, match=r"train/config.py:7: key 'inner.steps' has no meaning"):
        gen.render(tmp_path)


def test_readme_is_a_front_page_whose_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    for heading in ("## Set-up: two commands", "## Train on your cluster", "## Where things live"):
        assert heading in readme
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    local = [link.split("#")[0] for link in links if not link.startswith(("http://", "https://"))]
    assert "docs/configuration.md" in local and "docs/demo_stage3_samples.png" in local
    missing = [link for link in local if not (ROOT / link).exists()]
    assert missing == [], f"README links to missing files: {missing}"


def test_docs_style_table_is_the_apps():
    page = (ROOT / "docs" / "inference.md").read_text()
    table = page[page.index("| Style |") :].strip().splitlines()[2:]
    rows = {}
    for line in table:
        name, template, negative = (cell.strip() for cell in line.strip("|").split("|"))
        rows[name] = (template.strip("`"), "" if negative == "--" else negative)
    assert rows == STYLES
