"""Command line: parse -> typed config -> library call -> exit code.

Each command is one row of the command table (embedder.cli.table.COMMANDS): its help, the config
dataclass its flags come from (embedder.options builds them from the fields' declarations) and
the handler that calls the library, prints and returns the report. A command's own presentation
flag (`--json`) is the only argument added here.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import warnings

from embedder.cli.failures import explain, show_notice
from embedder.cli.table import COMMANDS, Command
from embedder.options import add_arguments, from_arguments

__all__ = ["COMMANDS", "Command", "build_parser", "main"]

EPILOG = "Docs: docs/ (the site: make docs-serve), docs/reference/cli.md for every flag."
EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE: what the shell reports for a Unix tool whose reader left


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `only`, the arguments of that one command (the others list their help)."""
    from embedder._version import __version__

    parser = argparse.ArgumentParser(
        prog="embedder", description="Frozen pretrained CNN features, extracted once into an HDF5 cache.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"embedder {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: EMBEDDER_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help, epilog=EPILOG)
        if only is not None and name != only:
            continue
        if command.config is not None:
            add_arguments(p, command.config())
        if command.extra is not None:
            command.extra(p)
        if command.json:
            p.add_argument("--json", action="store_true", help=command.json)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    name = next((a for a in argv if a in COMMANDS), None)  # build only what this command needs
    parser = build_parser(only=name)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _unrecognized(parser, args.command, unknown)
    args.command_line = shlex.join(["embedder", *argv])  # what a cache records, to say how to resume it
    debug = args.debug or os.environ.get("EMBEDDER_DEBUG", "") not in ("", "0")
    warnings.showwarning = show_notice
    try:
        _dispatch(args)
        return 0
    except KeyboardInterrupt:
        print("embedder: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _closed_pipe()
    except Exception as exc:  # the one place that turns any failure into one line
        if debug:
            raise
        message, code = explain(exc)
        print(f"embedder: error: {message}", file=sys.stderr)
        if getattr(exc, "unclean", False):
            # HDF5 does not recover from a write that failed midway: its exit handler would try
            # to flush the broken file again and can crash the interpreter. Everything embedder
            # wrote is complete or gone (temporary files are removed), so leave without it.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code


def _unrecognized(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> None:
    """argparse's usage error (exit 2) for flags the command does not have, with the closest it has."""
    from embedder.errors import did_you_mean

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    flags = [o for action in sub._actions for o in action.option_strings]
    first = next((u for u in unknown if u.startswith("-")), unknown[0]).split("=")[0]
    sub.error(f"unrecognized arguments: {' '.join(unknown)}.{did_you_mean(first, flags)}")


def _closed_pipe() -> int:
    """The reader of stdout went away (`embedder dedup ... | head -1`): end quietly, as a Unix tool
    killed by SIGPIPE does (exit 128 + 13), with stdout pointed at /dev/null so that the interpreter's
    own flush at exit finds nowhere to fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_CLOSED_PIPE


def _dispatch(args: argparse.Namespace) -> object:
    command = COMMANDS[args.command]
    if args.command == "embed":
        from embedder.atomic import WriteLock

        # The lock first, before torch is even imported (seconds): a second run into the same
        # cache is refused at once, with the running one's pid.
        with WriteLock(args.out) as lock:
            args.lock = lock
            return command.run(from_arguments(command.config(), args), args)
    config = from_arguments(command.config(), args) if command.config is not None else None
    return command.run(config, args)


if __name__ == "__main__":
    sys.exit(main())
