"""One command table: argparse, the pipeline steps and the reference page come from it, every
handler is typed and returns a report, and the CLI's modules import one way (no circle)."""

from __future__ import annotations

import argparse
import inspect

import pytest

from embedder.cli.main import build_parser
from embedder.cli.pipeline import STEP_KINDS
from embedder.cli.reference import render
from embedder.cli.table import COMMANDS, Command, PipelineStep, _rows


def test_the_parser_the_pipeline_and_the_reference_list_the_tables_commands_in_its_order():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == list(COMMANDS)
    assert list(STEP_KINDS) == [name for name, command in COMMANDS.items() if command.step is not None]
    assert all(STEP_KINDS[name] is COMMANDS[name] for name in STEP_KINDS)
    page = render()
    positions = [page.index(f"\n## {name}\n") for name in COMMANDS]
    assert positions == sorted(positions)
    for name in COMMANDS:  # the page says which commands are steps, from the same rows
        section = page[page.index(f"\n## {name}\n"):].split("\n## ")[1]
        assert (f'`run = "{name}"`' in section) == (name in STEP_KINDS), name


def test_a_command_is_registered_once():
    row = Command("info", "describe", "embedder.cli.commands:info")
    with pytest.raises(ValueError, match="'info' is registered twice"):
        _rows(row, row)
    assert PipelineStep(lambda c: "x").label is None  # not a row of the results table unless it says so


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_handler_is_typed_and_declares_its_report(name):
    command = COMMANDS[name]
    signature = inspect.signature(command.function())
    params = list(signature.parameters.values())
    assert [p.name for p in params[:2]] in (["config", "args"], ["_config", "args"]), name
    assert all(p.annotation is not inspect.Parameter.empty for p in params), name
    assert signature.return_annotation is not inspect.Signature.empty, name
    assert command.report_type() == str(signature.return_annotation)
    config = command.config() if command.config is not None else None
    if config is not None:  # the annotation names the config class the row registers
        assert params[0].annotation == config.__name__, name


def test_the_reports_that_the_cli_formats_print_their_dict_with_json(capsys):
    from embedder.cli.commands import show
    from embedder.cli.reports import CompactReport, DocReport, EvaluateReport

    report = show(CompactReport({"status": "compact", "rows": 3}, cache="c.h5"), argparse.Namespace(json=False))
    assert capsys.readouterr().out == "c.h5 has no superseded or removed rows (3 rows). Nothing to do.\n"
    assert show(report, argparse.Namespace(json=True)) is report
    assert capsys.readouterr().out == '{\n  "status": "compact",\n  "rows": 3\n}\n'
    evaluated = EvaluateReport({"rows": 4, "accuracy": None}, cache="d.h5")
    assert evaluated.summary() == "d.h5: 4 rows, accuracy -" and isinstance(evaluated, DocReport)


def test_the_cli_modules_import_one_way():
    """No circle among the CLI's modules: the `run` command is a row whose handler (in the pipeline
    module, which reads the table) the table names rather than imports."""
    import grimp

    graph = grimp.build_graph("embedder")
    modules = sorted(m for m in graph.modules if m.startswith("embedder.cli."))
    for a in modules:
        for b in modules:
            if a < b and graph.chain_exists(a, b) and graph.chain_exists(b, a):
                pytest.fail(f"{a} and {b} import each other: {graph.find_shortest_chain(a, b)} and back")
    assert not graph.direct_import_exists(importer="embedder.cli.commands", imported="embedder.cli.pipeline")
    assert not graph.direct_import_exists(importer="embedder.cli.table", imported="embedder.cli.commands")
