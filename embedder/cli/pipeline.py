"""Declarative pipelines: a TOML file of steps run in order by `embedder run FILE`.

    [pipeline]
    name = "quickstart"
    base_dir = ".."        # relative paths in steps are taken from here (default: the file's folder)

    [[steps]]
    run = "make-samples"   # then the step's own settings, as on the command line
    out = "data"

    [[steps]]
    run = "embed"
    source = "data/digits"
    model = "efficientnet_lite0"
    out = "data/out/digits.h5"
    # backend = "ray"                                   # optional: sharded, on a Ray cluster
    # ray = { address = "auto", shard_size = 65536 }    # RayOptions (docs/SCALING.md)

Every step is validated before the first one runs, so a typo in step 5 fails in a second,
not after an hour of extraction.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import tomllib

from embedder.cli.table import COMMANDS, Command
from embedder.errors import ConfigError
from embedder.options import from_table

# The commands that can be steps: the rows of the command table with a `step`.
STEP_KINDS: dict[str, Command] = {name: command for name, command in COMMANDS.items() if command.step is not None}


@dataclass
class Step:
    kind: str
    describe: str
    execute: Callable[[], object]
    label: str = ""  # row name in the closing results table (steps that report an accuracy)
    config: object = None  # the step's validated config


def _step(kind: str, values: dict, base: Path, progress: bool, pipeline: Path) -> Step:
    command = STEP_KINDS[kind]
    spec = command.step
    values = dict(spec.defaults) | dict(values)
    label = values.pop("label", "") if spec.label is not None else ""
    more = (_ray_options(values),) if kind == "embed" else ()
    config = from_table(command.config(), values, base_dir=base, what=kind)
    if hasattr(config, "progress"):  # `embedder run --quiet` sets it for every step
        config = replace(config, progress=progress)
    args = argparse.Namespace(json=False, command_line=f"embedder run {pipeline}")
    return Step(kind, spec.describe(config), lambda: command.run(config, args, *more),
                label or (spec.label(config) if spec.label is not None else ""), config)


def _ray_options(values: dict):
    """The embed step's `backend = "ray"` and `ray = {...}` (RayOptions) keys; popped from `values`."""
    from embedder.extract.config import RayOptions

    backend = values.pop("backend", "local")
    table = values.pop("ray", {})
    if backend == "ray":
        if not isinstance(table, dict):
            raise ConfigError("embed step: `ray` must be a table, e.g. ray = { shard_size = 65536 }.")
        return from_table(RayOptions, table, base_dir=None, what="ray")
    if backend != "local" or table:
        raise ConfigError(f"embed step: backend must be 'local' or 'ray' (with a `ray` table), got {backend!r}.")
    return None


def load_pipeline(path: str | Path, progress: bool = True) -> tuple[str, list[Step]]:
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"No pipeline file at {path}. See pipelines/ for examples.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    head = doc.get("pipeline", {})
    base = (path.parent / head.get("base_dir", ".")).resolve()
    steps = []
    for n, table in enumerate(doc.get("steps", []), start=1):
        values = dict(table)
        kind = values.pop("run", None)
        if kind not in STEP_KINDS:
            raise ConfigError(f"{path}: step {n} has run = {kind!r}; known steps: {', '.join(STEP_KINDS)}.")
        try:
            steps.append(_step(kind, values, base, progress, path))
        except ConfigError as exc:
            raise ConfigError(f"{path}: step {n} ({kind}): {exc}") from None
    if not steps:
        raise ConfigError(f"{path} has no [[steps]].")
    return head.get("name", path.stem), steps


def run(_config: None, args: argparse.Namespace) -> list[object]:
    """The `run` command: the reports of the pipeline's steps, in order."""
    return run_pipeline(args.pipeline, progress=not args.quiet)


def run_pipeline(path: str | Path, progress: bool = True) -> list[object]:
    name, steps = load_pipeline(path, progress)
    results = []
    t0 = time.perf_counter()
    for n, step in enumerate(steps, start=1):
        print(f"\n[{name} {n}/{len(steps)}] {step.describe}", flush=True)
        results.append(step.execute())
    print(f"\n[{name}] done: {len(steps)} steps in {time.perf_counter() - t0:.1f} s")
    table = results_table(steps, results)
    if table:
        print(table)
    return results


def results_table(steps: list[Step], results: list[object]) -> str:
    """One row per training step: accuracy (test if there is a test split, else validation) and wall time."""
    rows = []
    for step, result in zip(steps, results):
        if not step.label:
            continue
        doc = result.as_dict()
        test, val = doc.get("test_accuracy"), doc.get("val_accuracy")
        rows.append((step.label, test, val, doc.get("wall_s", 0.0)))
    if not rows:
        return ""

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    lines = [f"\n{'method':<34}{'test acc':>10}{'val acc':>10}{'wall time':>12}"]
    lines += [f"{label:<34}{pct(t):>10}{pct(v):>10}{w:>11.1f}s" for label, t, v, w in rows]
    return "\n".join(lines)
