"""The command line: argparse built from the configs, the pipeline runner, everything that prints."""

from embedder.cli.main import main

__all__ = ["main"]
