"""Settings of `make-samples`, declared once (embedder.options)."""

from __future__ import annotations

from dataclasses import dataclass

from embedder.errors import ConfigError
from embedder.options import option

SAMPLES = ("digits", "lfw_subset", "photos")


@dataclass(frozen=True)
class MakeSamplesConfig:
    out: str = option("data", positional=True, path=True, metavar="OUT", help="folder to write into")
    only: tuple[str, ...] = option((), nargs="*", metavar="NAME", help="subset of: " + " ".join(SAMPLES))

    def __post_init__(self):
        unknown = sorted(set(self.only) - set(SAMPLES))
        if unknown:
            raise ConfigError(f"Unknown sample(s) {unknown}; choose from {', '.join(SAMPLES)}.")
