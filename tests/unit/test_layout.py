"""The layout holds (issue 16, a layout that shows the architecture): the install can't collide (our
imports live under ``tristage.*``, so a user's own ``data/``, ``train.py`` or ``bench.py`` in the working
folder never shadows them, item 7), no module imports upward (item 2), and the module map is true."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_module_map_names_every_module():
    """The module map (docs/layout.md, "Where things live") stays true: every module of the role folders
    and every script is named in it, and every file it names exists."""
    import re

    page = (ROOT / "docs" / "layout.md").read_text()
    named = set(re.findall(r"`(?:[a-z_]+/)*([a-z_]+\.py)`", page))
    modules = {
        p.name
        for folder in ("train", "data", "demo", "bench", "scripts", "tristage")
        for p in (ROOT / folder).rglob("*.py")
        if p.name != "__init__.py" and "assets" not in p.parts
    }
    assert sorted(modules - named) == [], "modules missing from the map in docs/layout.md"
    assert sorted(named - modules - {"__init__.py"}) == [], "docs/layout.md names files that don't exist"


def imported_modules(path: Path, package: str) -> set[str]:
    """Every module ``path`` (in ``package``) imports, at the top or inside a function: ``import a.b``,
    ``from a import b`` (both ``a`` and ``a.b``), relative imports, and ``import_module("a.b")``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith("import_module"):
            names.update(a.value for a in node.args if isinstance(a, ast.Constant))
    return names


def upward_imports(folder: Path, package: str, forbidden: str) -> list[str]:
    """``file imports module`` for each import of ``forbidden`` (or below it) by a module under ``folder``."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        inner = ".".join([package, *path.relative_to(folder).parent.parts])
        for name in sorted(imported_modules(path, inner)):
            if name == forbidden or name.startswith(forbidden + "."):
                found.append(f"{path.relative_to(folder.parent)} imports {name}")
    return found


def test_no_module_imports_upward():
    """``data/`` imports nothing from ``train/``; models import nothing from training; ``train/`` nothing
    from the demo (it registers its scorer by name instead: ``train/inference/scorers.py``)."""
    assert upward_imports(ROOT / "data", "tristage.data", "tristage.train") == []
    assert upward_imports(ROOT / "train/models", "tristage.train.models", "tristage.train.training") == []
    assert upward_imports(ROOT / "train", "tristage.train", "tristage.demo") == []
    assert upward_imports(ROOT / "train", "tristage.train", "tristage.bench") == []


# Imports run one way (issue 39 item 3): a module imports its own layer or the ones below it.
LAYERS = (
    ("the CLI", ("tristage.cli", "tristage.__main__")),
    ("demo / bench", ("tristage.demo", "tristage.bench")),
    ("training / inference", ("tristage.train.training", "tristage.train.inference")),
    (
        "models / diffusion / conversion",
        ("tristage.train.models", "tristage.train.diffusion", "tristage.train.conversion")
        + ("tristage.train.families", "tristage.train.config"),
    ),
    ("data", ("tristage.data",)),
    ("base", ("tristage.errors", "tristage.files")),
)


def layer_of(module: str) -> int | None:
    """The index in LAYERS of the longest prefix ``module`` falls under (None: a bare package name)."""
    hits = [
        (len(prefix), i)
        for i, (_, prefixes) in enumerate(LAYERS)
        for prefix in prefixes
        if module == prefix or module.startswith(prefix + ".")
    ]
    return max(hits)[1] if hits else None


def module_name(path: Path, root: Path) -> str:
    """``tristage.train.training.ema`` for ``train/training/ema.py`` (the package maps the folders)."""
    parts = path.relative_to(root).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join(parts if parts[0] == "tristage" else ("tristage", *parts))


def arrows_up(root: Path) -> list[str]:
    """``a (layer) -> b (layer)`` for each import of a higher layer, over every package folder."""
    found = []
    for folder in ("tristage", "train", "data", "demo", "bench"):
        for path in sorted((root / folder).rglob("*.py")) if (root / folder).is_dir() else []:
            name = module_name(path, root)
            package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
            mine = layer_of(name)
            for imported in sorted(imported_modules(path, package)):
                theirs = layer_of(imported)
                if None not in (mine, theirs) and theirs < mine:
                    found.append(f"{name} ({LAYERS[mine][0]}) -> {imported} ({LAYERS[theirs][0]})")
    return found


def test_imports_run_one_way():
    """The CLI, then the demo and benchmarks, then training / inference, then models / diffusion /
    conversion (with the config and the family specs), then data, then the error classes."""
    assert arrows_up(ROOT) == []


@pytest.mark.parametrize(
    ("path", "line", "caught"),
    [
        ("train/inference/evaluate.py", "from tristage.demo import adherence", True),
        ("train/training/trainer.py", "def f():\n    from tristage.demo.run import run_demo", True),
        ("train/config.py", "from tristage.train.training.fsdp import PARALLELISMS", True),
        ("train/families.py", "from tristage.train.inference import export", True),
        ("train/conversion/init_from.py", "from ..training import ema", True),
        ("data/cache.py", "import tristage.train.config", True),
        ("data/cache.py", "from tristage.files import atomic_write", False),
        ("demo/run.py", "from tristage.train.training.trainer import run_train", False),
        ("tristage/cli.py", "from tristage.demo.run import run_demo", False),
        ("train/training/trainer.py", "from tristage.train.inference import grid", False),
    ],
)
def test_the_layer_check_sees_an_arrow_up(tmp_path, path, line, caught):
    (tmp_path / path).parent.mkdir(parents=True)
    (tmp_path / path).write_text(line + "\n")
    assert bool(arrows_up(tmp_path)) is caught, arrows_up(tmp_path)


@pytest.mark.parametrize(
    ("line", "caught"),
    [
        ("import tristage.train.training.ema", True),
        ("from tristage.train.training.ema import EMA", True),
        ("from tristage.train import training", True),
        ("from ..training import ema", True),  # relative, from train/models/
        ("def f():\n    from tristage.train.training import ema", True),  # lazy
        ("importlib.import_module('tristage.train.training.ema')", True),
        ("from tristage.train.models import dit", False),
        ("from . import dit", False),
    ],
)
def test_the_import_check_sees_every_form(tmp_path, line, caught):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.py").write_text(line + "\n")
    found = upward_imports(tmp_path / "models", "tristage.train.models", "tristage.train.training")
    assert bool(found) is caught, found


def _constants(node: ast.expr) -> set:
    """The constant(s) ``node`` is: ``"dit"``, or the items of ``("dit", "pixart")``."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return {item.value for item in items if isinstance(item, ast.Constant)}


def family_branches(path: Path, names: set[str]) -> list[str]:
    """``file:line`` of every comparison or ``case`` on a family name (``x == "dit"``, ``"pixart" in x``,
    ``cfg.model.family != y``, ``case "dit":``): code should ask the family's spec instead."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            named = any(_constants(s) & names for s in sides)
            family = any(ast.unparse(s).split(".")[-1] == "family" for s in sides)
            if named or family:
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.match_case) and isinstance(node.pattern, ast.MatchValue):
            if getattr(node.pattern.value, "value", None) in names:
                found.append(f"{path.name}:{node.pattern.lineno}: case {ast.unparse(node.pattern)}")
    return found


def test_no_branch_on_a_family_name():
    """Model-family dispatch has one key: ``train/families.py`` FAMILIES (issue 16 item 5)."""
    from tristage.train.families import FAMILIES

    found = [
        hit
        for folder in ("train", "data")
        for p in sorted((ROOT / folder).rglob("*.py"))
        for hit in family_branches(p, set(FAMILIES))
    ]
    assert found == []


@pytest.mark.parametrize(
    ("code", "caught"),
    [
        ('if cfg.model.family == "dit":\n    pass', True),
        ('x = a if self.cfg.model.family != "pixart" else b', True),
        ('if "dit" == name:\n    pass', True),
        ('ok = kind in ("dit", "x")', True),
        ('ok = family in ("dit", "pixart")', True),
        ('match name:\n    case "pixart":\n        pass', True),
        ('FAMILIES = {"dit": 1, "pixart": 2}\nspec = family_of("dit")', False),
        ("if family.needs_text:\n    pass", False),
    ],
)
def test_the_branch_check_sees_every_form(tmp_path, code, caught):
    (tmp_path / "m.py").write_text(code + "\n")
    assert bool(family_branches(tmp_path / "m.py", {"dit", "pixart"})) is caught


def pipeline_constructions(path: Path) -> list[str]:
    """``file:line`` of every direct construction of a diffusers pipeline (``DiTPipeline(...)``)."""
    return [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1].endswith("Pipeline")
    ]


def test_export_and_validation_share_one_pipeline_builder():
    """Only ``train/models/pipelines.py`` builds a pipeline from parts: export and validation both
    take it from the family's spec, so a grid shows the model a user loads."""
    from tristage.train.families import FAMILIES

    found = [
        hit
        for folder in ("train", "data")
        for p in (ROOT / folder).rglob("*.py")
        for hit in pipeline_constructions(p)
    ]
    assert found and {hit.split(":")[0] for hit in found} == {"train/models/pipelines.py"}
    assert {spec.pipeline.__module__ for spec in FAMILIES.values()} == {"tristage.train.models.pipelines"}


MAX_FUNCTION_LINES = 40  # issue 16: "no function runs past ~40 lines"
LONG_FUNCTIONS_ALLOWED = {"demo/assets/train_demo_vae.py::main"}  # the one-off VAE training script


def long_functions(paths, root: Path = ROOT) -> list[str]:
    """``file::name (N lines)`` for every function or method over MAX_FUNCTION_LINES, docstring included."""
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(root).as_posix()}::{node.name} ({lines} lines)")
    return found


def test_functions_stay_short():
    folders = [ROOT / name for name in ("train", "data", "demo", "bench", "tristage")]
    found = long_functions(p for folder in folders for p in sorted(folder.rglob("*.py")))
    assert [f for f in found if f.rsplit(" (", 1)[0] not in LONG_FUNCTIONS_ALLOWED] == []


def test_the_length_check_counts_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "probe.py").write_text(f"def f():\n{body}\n\n\ndef g():\n    return 1\n")
    found = long_functions([tmp_path / "probe.py"], tmp_path)
    assert found == [f"probe.py::f ({MAX_FUNCTION_LINES + 1} lines)"]


def test_the_cli_catches_only_tristage_errors():
    """One error base (issue 39 item 1): the CLI turns ``TristageError`` into one line and exit 2, and
    catches nothing else, so a bug's ``KeyError`` or ``FileNotFoundError`` keeps its traceback."""
    tree = ast.parse((ROOT / "tristage" / "cli.py").read_text())
    caught = [ast.unparse(node.type) for node in ast.walk(tree) if isinstance(node, ast.ExceptHandler)]
    assert caught == ["TristageError"]


def test_every_error_class_derives_from_the_one_base():
    """Every ``*Error`` class the package defines is a ``TristageError``: a user's mistake in any domain
    reaches the CLI's one handler."""
    import importlib
    import inspect

    from tristage.errors import TristageError

    strays = []
    for folder in ("train", "data", "demo", "bench", "tristage"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "assets" in path.parts or path.name in ("__init__.py", "__main__.py"):  # __main__ runs
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts if parts[0] == "tristage" else ("tristage", *parts))
            module = importlib.import_module(name)
            strays += [
                f"{name}.{cls.__name__}"
                for cls in vars(module).values()
                if inspect.isclass(cls) and cls.__module__ == name and cls.__name__.endswith("Error")
                and not issubclass(cls, TristageError)
            ]
    assert strays == []
