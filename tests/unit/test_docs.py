"""The documentation stays true: the site builds in strict mode (no broken link or anchor, no page left
out of the nav), the configuration page is what the typed config generates, the README is a front page
of at most 300 lines whose links resolve, and the app's style table is the app's.  In-process (mkdocs'
own build function); tests/integration/test_docs_site.py runs the ``mkdocs build --strict`` command."""

from __future__ import annotations

import importlib.util
import logging
import re
import shutil
import sys
from pathlib import Path

import pytest

from tristage.train.inference.app import STYLES

from ..conftest import ROOT

README_MAX_LINES = 300


def gen_config_docs():
    """``scripts/gen_config_docs.py`` as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def strict_build(folder: Path, site: Path, caplog) -> str | None:
    """mkdocs' build of ``folder/mkdocs.yml`` into ``site`` with ``--strict``; None, or why it aborted
    with the warnings it logged."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config
    from mkdocs.exceptions import Abort

    with caplog.at_level(logging.WARNING, logger="mkdocs"):
        try:
            build(load_config(str(folder / "mkdocs.yml"), strict=True, site_dir=str(site)))
        except Abort as stop:
            return "\n".join([str(stop), *(r.getMessage() for r in caplog.records)])
    return None


def test_site_builds_strict(tmp_path, caplog):
    assert strict_build(ROOT, tmp_path / "site", caplog) is None
    assert (tmp_path / "site" / "configuration" / "index.html").is_file()


DEFECTS = [  # (page, text appended, what the failure must name)
    ("orphan.md", "# Orphan\n", "orphan.md"),  # a page missing from the nav
    ("index.md", "[x](scaling.md#no-such-heading)\n", "no-such-heading"),  # a broken anchor
    ("index.md", "[x](no-such-page.md)\n", "no-such-page.md"),  # a broken link
]


def test_strict_build_fails_on_a_broken_site(tmp_path, caplog):
    """The same build on a copy of the site with three defects added: each is named."""
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    for page, text, _ in DEFECTS:
        with open(tmp_path / "docs" / page, "a") as fh:
            fh.write(text)
    failure = strict_build(tmp_path, tmp_path / "site", caplog)
    assert failure is not None and "Aborted with 3 warnings in strict mode" in failure
    for _, _, named in DEFECTS:
        assert named in failure


def test_configuration_page_is_current():
    generated = gen_config_docs().render()
    page = ROOT / "docs" / "configuration.md"
    assert page.read_text() == generated, (
        "docs/configuration.md is stale: run `python scripts/gen_config_docs.py` and commit the page"
    )


def test_configuration_page_has_every_key_of_the_typed_config():
    """Every leaf key the loader knows (walked through the real dataclasses) has its row, with its default."""
    import typing
    from dataclasses import MISSING, fields, is_dataclass

    from tristage.train.config import Config

    def optional_section(cls, name):
        """``X | None`` where X is a config dataclass (an optional section, null: off), else None."""
        args = typing.get_args(typing.get_type_hints(cls)[name])
        sections = [a for a in args if is_dataclass(a)]
        return sections[0] if type(None) in args and sections else None

    def leaves(cls, prefix=""):
        for f in fields(cls):
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            if is_dataclass(default):
                yield from leaves(type(default), f"{prefix}{f.name}.")
                continue
            yield f"{prefix}{f.name}", default
            if (section := optional_section(cls, f.name)) is not None:
                yield from leaves(section, f"{prefix}{f.name}.")

    rows = {row.key: row for section in gen_config_docs().sections() for row in section.keys}
    keys = dict(leaves(Config))
    assert sorted(rows) == sorted(keys)
    assert rows["train.grad_accum"].default == "`1`" and keys["train.grad_accum"] == 1
    assert rows["optim.betas"].default == "`[0.9, 0.999]`"
    assert rows["run.dir"].default == "*required*"
    assert rows["caption.prompt"].default.startswith('`"Describe this image')
    assert rows["objective.timestep_shift"].meaning.startswith("Training timesteps drawn as")


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


# A code span that is a path in one of the repository's folders must exist there.
REPO_PATH = re.compile(r"(?:train|data|demo|bench|tests|scripts|configs|docs|tristage)/[a-z0-9_./-]*")
NOT_FILES = {"bench/wheels/": "git-ignored, filled by hand", "train/step": "a W&B metric's name"}


def test_paths_named_in_the_docs_exist():
    """A module renamed or a test moved shows up as a stale path here, not in a reader's shell."""
    stale = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        spans = re.findall(r"`([^`\n]+)`", page.read_text())
        named = [s for s in spans if REPO_PATH.fullmatch(s) and s not in NOT_FILES]
        stale += [f"{page.name}: {s}" for s in named if not (ROOT / s).exists()]
    assert stale == []
    assert REPO_PATH.fullmatch("train/training/fsdp.py") and not REPO_PATH.fullmatch("configs/<stage>.yaml")


NOT_KEYS = {"model.generate"}  # transformers' method, named in the captioning pages


def test_config_keys_named_in_the_docs_exist():
    """Every ``section.key`` (or ``section.key=value`` / ``section.key: value``) in a code span of the README
    or a hand-written page is a key, or a group of keys, of the typed config."""
    sections = gen_config_docs().sections()
    keys = {row.key for section in sections for row in section.keys}
    groups = {".".join(k.split(".")[:i]) for k in keys for i in range(1, k.count(".") + 1)}
    names = "|".join(s.name for s in sections if s.name)
    key_span = re.compile(rf"((?:{names})\.[a-z_][a-z0-9_.]*)(?:\s*[:=].*)?")
    unknown = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for span in re.findall(r"`([^`\n]+)`", page.read_text()):
            match = key_span.fullmatch(span)
            key = match.group(1) if match else None
            if key and key not in keys | groups | NOT_KEYS and not re.search(r"\.(py|yaml|sbatch)$", key):
                unknown.append(f"{page.name}: {span}")
    assert unknown == []
    assert key_span.fullmatch("train.grad_accum: 2") and "data.source" in groups


def test_docs_style_table_is_the_apps():
    page = (ROOT / "docs" / "inference.md").read_text()
    table = page[page.index("| Style |") :].strip().splitlines()[2:]
    rows = {}
    for line in table:
        name, template, negative = (cell.strip() for cell in line.strip("|").split("|"))
        rows[name] = (template.strip("`"), "" if negative == "--" else negative)
    assert rows == STYLES
