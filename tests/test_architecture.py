"""The architecture as a test: imports run one way, no module imports itself back, no private
name crosses a module, and only the CLI prints.

The layers contract lives in pyproject.toml (`[tool.importlinter]`); this runs it, so a
change that makes a lower subpackage import a higher one fails the suite. Inside a subpackage
the layers contract says nothing, so the circles between its modules are found here, on
grimp's graph (the one import-linter checks), which counts the imports inside functions and
under `if TYPE_CHECKING:` too: moving an import there does not break a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
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



def import_circles(graph: grimp.ImportGraph) -> list[set[str]]:
    """Every set of two or more modules that import each other, directly or through others (a strongly
    connected component): a module's circle is what it imports that also imports it, itself included."""
    circles: list[set[str]] = []
    for module in sorted(graph.modules):
        if any(module in c for c in circles):
            continue
        circle = graph.find_upstream_modules(module) & graph.find_downstream_modules(module)
        if circle:
            circles.append({module, *circle})
    return circles


def _describe(graph: grimp.ImportGraph, circle: set[str]) -> str:
    lines = []
    for importer in sorted(circle):
        for imported in sorted(graph.find_modules_directly_imported_by(importer) & circle):
            for d in graph.get_import_details(importer=importer, imported=imported):
                lines.append(f"  {importer}:{d['line_number']} {d['line_contents']}")
    return "\n".join(lines)


def test_no_import_circles():
    graph = grimp.build_graph("embedder", cache_dir=None)
    circles = import_circles(graph)
    assert not circles, "modules that import each other (move what they share into a module below both):\n" + (
        "\n".join(f"{sorted(c)}:\n{_describe(graph, c)}" for c in circles))


def test_the_circle_finder_finds_circles(tmp_path, monkeypatch):
    # A package on disk, read by grimp as the real one is: an import inside a function and one under
    # TYPE_CHECKING close circles like any other; a circle through three modules is one circle, and a
    # module that only imports (or is only imported) is in none.
    files = {
        "a.py": "from circ import b\n",
        "b.py": "def f():\n    from circ import c\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from circ import a\n",
        "d.py": "from circ import a, e\n",
        "e.py": "",
    }
    (tmp_path / "circ").mkdir()
    for name, text in {"__init__.py": "", **files}.items():
        (tmp_path / "circ" / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = grimp.build_graph("circ", cache_dir=None)
    assert import_circles(graph) == [{"circ.a", "circ.b", "circ.c"}]
    graph.remove_import(importer="circ.c", imported="circ.a")
    assert import_circles(graph) == []


def private_imports(path: Path, module: str) -> list[str]:
    """Where `path` (the module named `module`) imports another module's private name (`_x`, not `__x__`),
    or reads one off a module it imported. A private module (`embedder._version`) is its package's: any
    module inside that package may import it."""

    def private(name: str) -> bool:
        return name.startswith("_") and not name.endswith("__")

    def crosses(target: str) -> bool:
        parts = target.split(".")
        return any(private(p) and not (module + ".").startswith(".".join(parts[:i]) + ".") for i, p in enumerate(parts))

    tree = ast.parse(path.read_text())
    found, modules = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("embedder"):
            for alias in node.names:
                if crosses(f"{node.module}.{alias.name}"):
                    found.append(f"{path}:{node.lineno} from {node.module} import {alias.name}")
                modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("embedder"):
                    if crosses(alias.name):
                        found.append(f"{path}:{node.lineno} import {alias.name}")
                    modules[alias.asname or alias.name.split(".")[0]] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and private(node.attr)):
            found.append(f"{path}:{node.lineno} {node.value.id}.{node.attr}")
    return found


def test_no_private_name_crosses_a_module():
    offenders = []
    for path in sorted((REPO / "embedder").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        offenders += private_imports(path, module)
    assert not offenders, "make what is shared public, in the module where it fits:\n" + "\n".join(offenders)


def test_the_private_import_finder_finds_them(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from embedder.models.weights import _read, public\nfrom embedder._version import __version__\n"
                    "from embedder.models import backbone\nimport embedder.data._hidden\n"
                    "def f():\n    from embedder.learn.train import _run\n    return backbone._maps, backbone.maps\n")
    found = [line.split(" ", 1)[1] for line in private_imports(path, "embedder.search.query")]
    assert found == ["from embedder.models.weights import _read", "import embedder.data._hidden",
                     "from embedder.learn.train import _run", "backbone._maps"]
    # Inside the private module's package the import is that package's own business.
    assert private_imports(path, "embedder.data.rows") == [
        f"{path}:1 from embedder.models.weights import _read", f"{path}:6 from embedder.learn.train import _run",
        f"{path}:7 backbone._maps"]
