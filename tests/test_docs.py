"""The generated documentation pages stay equal to what the code generates."""

from __future__ import annotations

from embedder.cli.main import COMMANDS
from embedder.cli.reference import render
from tests.conftest import REPO


def test_the_cli_reference_page_is_current():
    """A flag added, renamed or re-documented without `make docs-reference` fails here."""
    committed = (REPO / "docs" / "reference" / "cli.md").read_text()
    assert committed == render(), "docs/reference/cli.md is stale: run `make docs-reference`"


def test_the_cli_reference_documents_every_command_and_flag():
    from embedder.cli.main import build_parser

    page = render()
    for name in COMMANDS:
        assert f"\n## {name}\n" in page
        sub = build_parser(only=name)._subparsers._group_actions[0].choices[name]
        for action in sub._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in page, (name, flag)
