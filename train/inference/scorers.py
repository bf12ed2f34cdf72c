"""Scorers: named measures of what a pipeline generates, found by name so training never imports them.

A scorer is a callable ``(pipeline, per_prompt, seed) -> report`` (a JSON-able dict): it samples from a
loaded diffusers pipeline (an export, or one built around a live model) and judges the images.  Scorers
register as Python entry points in the group ``tristage.scorers`` (``pyproject.toml``
``[project.entry-points."tristage.scorers"]``): the demo's ``adherence``
(``tristage.demo.adherence:score_pipeline``) is one, and another package can add its own the same way.
The name is what ``tristage eval --scorer`` takes, and what a run's config can name; the lookup is the
only link, so ``train/`` never imports ``demo/`` (imports run one way, ``tests/unit/test_layout.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from tristage.errors import EvalError

GROUP = "tristage.scorers"  # the entry-point group scorers register in
Scorer = Callable[[Any, int, int], dict]  # (diffusers pipeline, samples per prompt, seed) -> report


def scorer_names() -> list[str]:
    """The names of every installed scorer."""
    return sorted(ep.name for ep in entry_points(group=GROUP))


def load_scorer(name: str) -> Scorer:
    """The scorer registered as ``name``; an unknown name is one line listing the installed ones."""
    found = entry_points(group=GROUP, name=name)
    if not found:
        known = ", ".join(scorer_names()) or "none"
        raise EvalError(f"no scorer named {name!r} (entry points {GROUP}); installed: {known}")
    return next(iter(found)).load()
