"""The command-line reference page, generated from the one command table (embedder.cli.table.COMMANDS)
and the option declarations (embedder.options): no flag is described by hand in two places.

    python -m embedder.cli.reference > docs/reference/cli.md

`tests/test_docs.py` fails when the committed page differs from what this prints.
"""

from __future__ import annotations

import argparse
import sys

from embedder.cli.main import EPILOG, build_parser
from embedder.cli.table import COMMANDS, Command
from embedder.options import specs

HEADER = """# Command-line reference

Generated from the option declarations by `python -m embedder.cli.reference` (`make docs-reference`);
a test keeps it equal to the code. Every command also prints this with `--help`.
Exit codes and the output policy are the same for every command: see [Exit codes](exit-codes.md).

The **TOML key** column is the key of the setting in a [pipeline](../how-to/pipelines.md) step
(`embedder run FILE.toml`), for the commands that can be steps; it is the flag's name in snake_case.
"""


def render() -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = [HEADER]
    parts.append("| command | what it does |\n|---|---|")
    parts += [f"| [`{name}`](#{name}) | {_cell(COMMANDS[name].help)} |" for name in COMMANDS]
    for name, command in COMMANDS.items():
        parts.append(_command(name, command, sub.choices[name]))
    parts.append(f"\n---\n{EPILOG}\n")
    return "\n".join(parts)


def _command(name: str, command: Command, parser: argparse.ArgumentParser) -> str:
    keys = _toml_keys(command) if command.step is not None else {}
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    positional = " ".join(_metavar(a) for a in actions if not a.option_strings)
    lines = [f"\n## {name}\n", f"`embedder {name} {positional} [options]`".replace("  ", " ") + "\n", command.help + ".\n"]
    if command.step is not None:
        lines.append(f"Also a pipeline step: `run = \"{name}\"`.\n")
    lines.append("| argument | default | TOML key | meaning |\n|---|---|---|---|")
    for a in actions:
        lines.append(f"| {_flags(a)} | {_default(a, command)} | {keys.get(a.dest, '-')} | {_cell(_help(a))} |")
    return "\n".join(lines)


def _toml_keys(command: Command) -> dict[str, str]:
    return {s.name: f"`{s.key}`" for s in specs(command.config()) if s.option.toml} if command.config else {}


def _metavar(a: argparse.Action) -> str:
    name = a.metavar or a.dest.upper()
    return f"[{name}]" if a.nargs in ("?", "*") else f"{name}..." if a.nargs == "+" else name


def _flags(a: argparse.Action) -> str:
    if not a.option_strings:
        return f"`{_metavar(a)}`"
    value = "" if a.nargs == 0 else f" {a.metavar or (('{' + ','.join(map(str, a.choices)) + '}') if a.choices else a.dest.upper())}"
    return ", ".join(f"`{o}{value}`" for o in a.option_strings)


def _default(a: argparse.Action, command: Command) -> str:
    if command.config is None:
        return "" if a.default in (None, False) else f"`{a.default}`"
    field = next((s.field for s in specs(command.config()) if s.name == a.dest), None)
    if field is None:
        return "" if a.default in (None, False) else f"`{a.default}`"
    if field.default is field.default_factory:  # required
        return "required" if a.option_strings else ""
    value = field.default
    return "" if value in (None, (), False) else f"`{value}`"


def _help(a: argparse.Action) -> str:
    text = (a.help or "").replace("%%", "%")
    return text.split(" (default: ")[0] if "(default: " in text and text.endswith(")") else text


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


if __name__ == "__main__":
    sys.stdout.write(render())
