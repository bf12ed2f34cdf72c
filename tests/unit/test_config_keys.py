"""No dead keys: every field declared in the typed config (nested sections included) is read by the code.

A field counts as read when some module of the package, other than the config modules themselves
(train/config.py, data/config.py, train/diffusion/config.py: where it is declared and checked), loads an
attribute of that name.  The check is by name, so a generic
name (``dir``, ``every``) can be satisfied by an unrelated read; a distinctive one cannot.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from tristage.train.config import Config

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ("train", "data", "demo", "bench")  # the folders tristage/__init__.py maps into the package
# Where keys are declared and checked: a read there does not count as a use.
CONFIG_MODULES = tuple(ROOT / p for p in ("train/config.py", "data/config.py", "train/diffusion/config.py"))


def declared(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of the leaf fields of a config dataclass, nested sections expanded."""
    keys = []
    for f in dataclasses.fields(cls):
        factory = f.default_factory
        default = factory() if factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys += declared(type(default), f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def attribute_reads() -> set[str]:
    """Every attribute name loaded (``x.name``) in the package's sources outside the config modules."""
    reads = set()
    for folder in PACKAGE:
        for path in (ROOT / folder).rglob("*.py"):
            if path in CONFIG_MODULES:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                    reads.add(node.attr)
    return reads


def unread(cls: type) -> list[str]:
    reads = attribute_reads()
    return [key for key in declared(cls) if key.rsplit(".", 1)[-1] not in reads]


def test_every_config_key_is_read():
    assert unread(Config) == [], "declared in the config but read nowhere (use them or remove them)"


@dataclasses.dataclass
class _Inner:
    a_key_nothing_reads: int = 0  # the kind of key the test above must catch


@dataclasses.dataclass
class _Outer:
    objective: _Inner = dataclasses.field(default_factory=_Inner)
    resume: str = "auto"  # read by the trainer


def test_the_check_finds_a_dead_nested_key():
    assert unread(_Outer) == ["objective.a_key_nothing_reads"]
