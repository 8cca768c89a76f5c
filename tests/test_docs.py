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


def test_the_readme_python_block_runs_as_written(tmp_path):
    """The README's dozen lines of API run as they are (in a fresh folder, on the shipped digits)."""
    import re
    import subprocess
    import sys

    from tests.conftest import env_with_repo

    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.DOTALL).group(1)
    proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env_with_repo(), capture_output=True,
                          text=True, check=False, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accuracy" in proc.stdout and "(3, 1280) [(2, 'file not found')]" in proc.stdout
    assert "3/0003.png 7/0007.png" in proc.stdout  # each file's own cached row comes first


def test_the_readme_stays_short_and_its_links_resolve():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 220
    import re

    for target in re.findall(r"\]\(((?:docs|data)/[^)#]+)", readme):
        assert (REPO / target).is_file(), target
