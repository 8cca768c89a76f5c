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
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import tomllib

from embedder.cli import commands
from embedder.errors import ConfigError
from embedder.options import from_table


@dataclass
class Step:
    kind: str
    describe: str
    execute: Callable[[], object]
    label: str = ""  # row name in the closing results table (steps that report an accuracy)
    config: object = None  # the step's validated config


@dataclass(frozen=True)
class StepKind:
    """A step is a command: the same config (its TOML keys are the config's fields) and the same handler."""

    config: str  # "module:Class"
    handler: Callable
    describe: Callable[[object], str]
    labelled: bool = False  # takes `label` (a row of the results table)
    # Where a step's default differs from the command's. Kept so that pipelines written before
    # the options were declared once still do what they did (the search step showed 5 hits).
    defaults: tuple[tuple[str, object], ...] = ()

    def config_class(self) -> type:
        module, name = self.config.split(":")
        return getattr(importlib.import_module(module), name)


STEP_KINDS: dict[str, StepKind] = {
    "make-samples": StepKind("embedder.data.config:MakeSamplesConfig", commands.make_samples,
                             lambda c: f"make sample data in {c.out}"),
    "embed": StepKind("embedder.extract.config:EmbedConfig", commands.embed,
                      lambda c: f"embed {c.source} with {c.model} -> {c.out}", labelled=True),
    "info": StepKind("embedder.cache.config:InfoConfig", commands.info, lambda c: f"describe {c.cache}"),
    "probe": StepKind("embedder.learn.config:ProbeConfig", commands.probe,
                      lambda c: f"{c.classifier} on {c.cache}", labelled=True),
    "finetune": StepKind("embedder.learn.config:FinetuneConfig", commands.finetune,
                         lambda c: f"{'fixed feature extractor' if c.freeze_backbone else 'fine-tune'} {c.model} on "
                                   f"{c.source} -> {c.out}", labelled=True),
    "index": StepKind("embedder.search.config:IndexConfig", commands.index, lambda c: f"index {c.cache} -> {c.out}"),
    "curate": StepKind("embedder.curate.config:CurateConfig", commands.curate,
                       lambda c: f"curate {c.cache} -> {c.out}"),
    "map": StepKind("embedder.search.config:MapConfig", commands.map_index,
                    lambda c: f"{c.method} map of {c.index} -> {c.index}/map.h5"),
    "search": StepKind("embedder.search.config:SearchConfig", commands.search,
                       lambda c: f"search {c.index} with {', '.join(c.image) or c.path or c.row_id or c.vector}"
                                 + (f" where {c.where}" if c.where else ""),
                       defaults=(("k", 5),)),
}


def _step(kind: str, values: dict, base: Path, progress: bool, pipeline: Path) -> Step:
    step_kind = STEP_KINDS[kind]
    values = dict(step_kind.defaults) | dict(values)
    label = values.pop("label", "") if step_kind.labelled else ""
    ray = _ray_options(values) if kind == "embed" else None
    cls = step_kind.config_class()
    config = from_table(cls, values, base_dir=base, what=kind)
    if hasattr(config, "progress"):  # `embedder run --quiet` sets it for every step
        config = replace(config, progress=progress)
    args = argparse.Namespace(json=False, command_line=f"embedder run {pipeline}")
    execute = (lambda: step_kind.handler(config, args, ray)) if kind == "embed" else (
        lambda: step_kind.handler(config, args))
    if kind == "finetune" and not label:
        label = "fixed feature extractor" if config.freeze_backbone else "fine-tune"
    if kind == "probe" and not label:
        label = config.classifier
    return Step(kind, step_kind.describe(config), execute, label, config)


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
        doc = result if isinstance(result, dict) else result.as_dict()
        test, val = doc.get("test_accuracy"), doc.get("val_accuracy")
        rows.append((step.label, test, val, doc.get("wall_s", 0.0)))
    if not rows:
        return ""

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    lines = [f"\n{'method':<34}{'test acc':>10}{'val acc':>10}{'wall time':>12}"]
    lines += [f"{label:<34}{pct(t):>10}{pct(v):>10}{w:>11.1f}s" for label, t, v, w in rows]
    return "\n".join(lines)
