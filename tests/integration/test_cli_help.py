"""`tristage --help` is instant (nothing heavy imported); every option of every subcommand has help text."""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys

from tristage.cli import build_parser

from ..conftest import tristage, user_folder

HEAVY = ("torch", "diffusers", "transformers", "accelerate")


def test_building_the_parser_imports_nothing_heavy():
    code = "import sys, tristage.cli as c\nc.build_parser()\n"
    code += "print([m for m in sys.argv[1:] if m in sys.modules])"
    out = subprocess.run(
        [sys.executable, "-c", code, *HEAVY], cwd=user_folder(), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_help_takes_well_under_a_second_of_cpu():
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(tristage("--help"), cwd=user_folder(), capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert out.returncode == 0 and b"usage: tristage" in out.stdout
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < 1.0, (
        f"tristage --help took {cpu:.2f} CPU seconds"
    )  # CPU time: a loaded machine can't skew it


def parsers(parser: argparse.ArgumentParser, name: str = "tristage"):
    """(command path, parser) for the top level and every subcommand, nested ones included."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from parsers(sub, f"{name} {sub_name}")


def test_every_option_has_help():
    missing = [
        f"{name} {action.option_strings or action.dest}"
        for name, parser in parsers(build_parser())
        for action in parser._actions
        if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) and not action.help
    ]
    unlisted = [
        f"{name} {choice.dest}"
        for name, parser in parsers(build_parser())
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for choice in action._choices_actions
        if not choice.help
    ]
    assert missing == [] and unlisted == []
    assert len(list(parsers(build_parser()))) >= 11  # the walk reached the subcommands
