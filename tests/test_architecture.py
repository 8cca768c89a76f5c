"""The architecture as a test: imports run one way, and only the CLI prints.

The layers contract lives in pyproject.toml (`[tool.importlinter]`); this runs it, so a
change that makes a lower subpackage import a higher one fails the suite.
"""

from __future__ import annotations

import ast

from importlinter import cli as importlinter_cli

from tests.conftest import REPO


def test_import_linter_contracts_are_kept(monkeypatch):
    monkeypatch.chdir(REPO)  # the contracts are read from pyproject.toml here
    assert importlinter_cli.lint_imports(no_cache=True) == importlinter_cli.EXIT_STATUS_SUCCESS


def test_only_the_cli_prints_or_reads_argv():
    offenders = []
    for path in sorted((REPO / "embedder").rglob("*.py")):
        if "cli" in path.relative_to(REPO / "embedder").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} print()")
            if isinstance(node, ast.Attribute) and node.attr == "argv" and getattr(node.value, "id", "") == "sys":
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} sys.argv")
    assert not offenders, "library code must return reports and raise, not print:\n" + "\n".join(offenders)


def test_curate_sits_between_learn_search_and_serve():
    # curate reads caches and uses the probe (learn) and faiss (search); the service may show its scores.
    import tomllib

    layers = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    assert layers.index("embedder.serve") < layers.index("embedder.curate") < layers.index(
        "embedder.learn | embedder.search")
