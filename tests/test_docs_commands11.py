"""README.md against the CLI, round 11: what a newcomer following the README literally needs to know of the
commands' defaults. No service runs here."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from pipeline.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _helps(parser: argparse.ArgumentParser) -> str:
    """Every help text of the parser and of its subcommands, nested ones included."""
    out = [parser.description or ""]
    for action in parser._actions:  # argparse keeps no public list of a parser's arguments
        out.append(action.help or "")
        if isinstance(action, argparse._SubParsersAction):
            out += [_helps(sub) for sub in action.choices.values()]
    return "\n".join(out)


def test_every_environment_variable_the_cli_reads_is_in_the_readme():
    """`hydravision cameras` reads $HYDRAVISION_API_URL when no --api is given (a user who exported it, or one who
    wondered why a command went to an API they had not named); the README named only the token's variable."""
    named = set(re.findall(r"\$(HYDRAVISION_[A-Z_]+)", _helps(build_parser())))
    assert {"HYDRAVISION_API_URL", "HYDRAVISION_API_TOKEN", "HYDRAVISION_REDIS_URL"} <= named
    assert sorted(v for v in named if v not in README) == []
