"""Typed options at the boundary: pipeline TOML tables and CLI values become config dataclasses here.

Every command's settings are one frozen dataclass (EmbedConfig, ProbeConfig, ...). This
module holds what they share: building one from a TOML table (unknown and missing keys
refused by name, relative paths taken from the pipeline's folder), and the value parsers.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from embedder.errors import ConfigError


def parse_size(text: str) -> int:
    """`512M`, `4G`, `2GiB`, `1024` -> bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, KeyError):
        raise ConfigError(f"Cannot read size {text!r}; write e.g. 512M or 4G.") from None


def config_from_table(cls, values: dict, base_dir: Path | None, what: str, path_keys: tuple[str, ...]):
    """A config dataclass from a pipeline TOML table: unknown keys and missing required keys are
    refused by name; `path_keys` (and a weights file) are resolved against `base_dir`."""
    fields = dataclasses.fields(cls)
    known = {f.name for f in fields}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"Unknown {what} setting(s) {unknown}. Known: {sorted(known)}.")
    values = dict(values)
    if base_dir is not None:
        for key in path_keys:
            if values.get(key) is not None:
                values[key] = str(_resolve(values[key], base_dir))
        weights = str(values.get("weights", "DEFAULT"))
        if "weights" in values and weights.upper() != "DEFAULT" and weights.lower() not in ("none", "random"):
            values["weights"] = str(_resolve(weights, base_dir))
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in values]
    if missing:
        raise ConfigError(f"The {what} step needs {', '.join(missing)}.")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"Bad {what} settings: {exc}") from exc


def _resolve(value: str, base_dir: Path) -> Path:
    p = Path(os.path.expanduser(str(value)))
    return p if p.is_absolute() else base_dir / p


def positive(cfg, *names: str, optional: bool = False) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is None and optional:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}.")
