"""Command line: parse -> typed config -> library call -> exit code.

Each command is one row of COMMANDS: its help, the config dataclass its flags come from
(embedder.options builds them from the fields' declarations) and the handler in
embedder.cli.commands that calls the library and prints. A command's own presentation
flags (`--json`) and the embed command's backend choice are the only arguments declared here.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from embedder.cli import commands
from embedder.cli.failures import explain, show_notice
from embedder.options import add_arguments, from_arguments

EPILOG = "Docs: docs/ (the site: make docs-serve), docs/reference/cli.md for every flag."
EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE: what the shell reports for a Unix tool whose reader left


def _cfg(module: str, name: str) -> Callable[[], type]:
    """A config class, imported when its command's parser is built (config modules are light)."""
    def load():
        import importlib

        return getattr(importlib.import_module(module), name)

    return load


@dataclass(frozen=True)
class Command:
    help: str
    run: Callable[[object, argparse.Namespace], object]  # (config, args) -> report; prints
    config: Callable[[], type] | None = None
    json: str | None = None  # help of --json, when the command has it
    extra: Callable[[argparse.ArgumentParser], None] | None = None  # arguments that are not config fields


def _embed_extra(p: argparse.ArgumentParser) -> None:
    from embedder.extract.config import RayOptions

    p.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="ray: shard the listing over a Ray cluster's actor pool (pip install 'embedder[ray]')")
    add_arguments(p, RayOptions)


def _run_extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", help="the pipeline TOML file, e.g. pipelines/quickstart.toml")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


COMMANDS: dict[str, Command] = {
    "models": Command("list backbones, feature widths and offline weight availability (--all: every buildable "
                      "name; NAME: one entry)", commands.models, _cfg("embedder.models.config", "ModelsConfig"),
                      json="print the registry as JSON"),
    "inspect": Command("list a model's layers (graph nodes) with output shapes, default and head marked",
                       commands.inspect, _cfg("embedder.models.config", "InspectConfig"), json="print as JSON"),
    "embed": Command("extract features of an image folder into an HDF5 cache (resumable)", commands.embed,
                     _cfg("embedder.extract.config", "EmbedConfig"), json="print the run report as JSON",
                     extra=_embed_extra),
    "merge": Command("consolidate a sharded cache (from --backend ray) into one self-contained file", commands.merge,
                     _cfg("embedder.cache.config", "MergeConfig")),
    "compact": Command("rewrite a synced cache without its superseded and removed rows (atomic)", commands.compact,
                       _cfg("embedder.cache.config", "CompactConfig"), json="print the report as JSON"),
    "probe": Command("train a linear probe (or a scikit-learn classifier) on a feature cache", commands.probe,
                     _cfg("embedder.learn.config", "ProbeConfig"),
                     json="print the report as JSON (includes val_accuracy)"),
    "evaluate": Command("apply a saved probe or classifier to another cache", commands.evaluate,
                        _cfg("embedder.learn.config", "EvaluateConfig"), json="print the result as JSON"),
    "export": Command("assemble backbone + trained linear probe into one image classifier", commands.export,
                      _cfg("embedder.learn.config", "ExportConfig")),
    "predict": Command("label images with an exported or fine-tuned classifier", commands.predict,
                       _cfg("embedder.learn.config", "PredictConfig"), json="print the labels as JSON"),
    "finetune": Command("train the whole network (or a head on a frozen backbone) on images", commands.finetune,
                        _cfg("embedder.learn.config", "FinetuneConfig"), json="print the report as JSON"),
    "stylize": Command("neural style transfer: repaint --content with the texture of --style (L-BFGS)",
                       commands.stylize, _cfg("embedder.models.config", "StylizeConfig"),
                       json="print the report as JSON"),
    "index": Command("build a FAISS similarity index from a feature cache, or remove rows from one", commands.index,
                     _cfg("embedder.search.config", "IndexConfig"), json="print the index's metadata as JSON"),
    "search": Command("query an index by image(s), cached path, row id or vector", commands.search,
                      _cfg("embedder.search.config", "SearchConfig"), json="JSON lines: one object per query"),
    "dedup": Command("list near-duplicate groups of a cache (range search)", commands.dedup,
                     _cfg("embedder.search.config", "DedupConfig"), json="print the groups as JSON"),
    "curate": Command("score every image for label mistakes, outliers, uniqueness, leaks and duplicates",
                      commands.curate, _cfg("embedder.curate.config", "CurateConfig"),
                      json="print the summary as JSON"),
    "plot": Command("2-D scatter of a cache coloured by label", commands.plot,
                    _cfg("embedder.search.config", "PlotConfig"), json="print the report as JSON"),
    "map": Command("compute the 2-D map of an index that `serve` shows at /map (UMAP or PCA, stored as "
                   "INDEX_DIR/map.h5)", commands.map_index, _cfg("embedder.search.config", "MapConfig"),
                   json="print the report as JSON"),
    "serve": Command("HTTP search service with a web page (FastAPI + uvicorn)", commands.serve,
                     _cfg("embedder.serve.config", "ServeConfig")),
    "watch": Command("keep a cache (and --index) in step with a folder as files arrive, change and go",
                     commands.watch, _cfg("embedder.search.config", "WatchConfig"),
                     json="print one JSON line per sync"),
    "info": Command("describe a feature cache or an index folder", commands.info, _cfg("embedder.cache.config", "InfoConfig"),
                    json="print the description as JSON"),
    "export-vectors": Command("write a cache's vectors and metadata as Parquet, or clip-retrieval's .npy layout",
                              commands.export_vectors, _cfg("embedder.cache.config", "ExportVectorsConfig"),
                              json="print the report as JSON"),
    "import-vectors": Command("build a cache from vectors embedded elsewhere (.npy + Parquet, or Parquet)",
                              commands.import_vectors, _cfg("embedder.cache.config", "ImportVectorsConfig"),
                              json="print the report as JSON"),
    "run": Command("run a declarative pipeline (TOML), e.g. pipelines/quickstart.toml", commands.run,
                   extra=_run_extra),
    "make-samples": Command("write the sample datasets (from data shipped in packages)", commands.make_samples,
                            _cfg("embedder.data.config", "MakeSamplesConfig")),
}


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
