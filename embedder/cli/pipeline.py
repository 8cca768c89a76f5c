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

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tomllib

from embedder.errors import ConfigError


@dataclass
class Step:
    kind: str
    describe: str
    execute: Callable[[], object]
    label: str = ""  # row name in the closing results table (steps that report an accuracy)


def _make_samples_step(values: dict, base: Path, progress: bool) -> Step:
    from embedder.data.samples import SAMPLES, make_samples

    _only_keys(values, {"out", "only"}, "make-samples")
    out = base / values.get("out", "data")
    only = values.get("only")
    if only is not None and (not isinstance(only, list) or set(only) - set(SAMPLES)):
        raise ConfigError(f"make-samples: `only` must be a list drawn from {list(SAMPLES)}, got {only!r}.")
    return Step("make-samples", f"make sample data in {out}", lambda: print(make_samples(out, only=only).summary()))


def _embed_step(values: dict, base: Path, progress: bool) -> Step:
    from embedder.extract.config import EmbedConfig

    values = dict(values)
    label = values.pop("label", "")
    backend = values.pop("backend", "local")
    ray_table = values.pop("ray", {})  # e.g. ray = { address = "auto", shard_size = 65536 }
    config = EmbedConfig.from_mapping({"progress": progress, **values}, base_dir=base)
    options = None
    if backend == "ray":
        import dataclasses

        from embedder.extract.ray import RayOptions

        known = {f.name for f in dataclasses.fields(RayOptions)}
        unknown = sorted(set(ray_table) - known)
        if unknown or not isinstance(ray_table, dict):
            raise ConfigError(f"Unknown ray setting(s) {unknown} in the embed step. Known: {sorted(known)}.")
        options = RayOptions(**ray_table)
    elif backend != "local" or ray_table:
        raise ConfigError(f"embed step: backend must be 'local' or 'ray' (with a `ray` table), got {backend!r}.")

    def execute():
        command = f"embedder run (embed step: {config.source} -> {config.out})"
        if options is not None:
            from embedder.extract.ray import embed_ray

            report = embed_ray(config, options, command=command)
        else:
            from embedder.extract.core import embed

            report = embed(config, command=command)
        print(report.summary())
        return report

    return Step("embed", f"embed {config.source} with {config.model} -> {config.out}", execute, label)


def _finetune_step(values: dict, base: Path, progress: bool) -> Step:
    from embedder.learn.finetune import FinetuneConfig

    values = dict(values)
    label = values.pop("label", "")
    config = FinetuneConfig.from_mapping({"progress": progress, **values}, base_dir=base)

    def execute():
        from embedder.learn.finetune import finetune

        report = finetune(config)
        print(report.summary())
        return report

    mode = "fixed feature extractor" if config.freeze_backbone else "fine-tune"
    return Step("finetune", f"{mode} {config.model} on {config.source} -> {config.out}", execute, label or mode)


def _info_step(values: dict, base: Path, progress: bool) -> Step:
    from embedder.cli.commands import info

    _only_keys(values, {"cache", "errors"}, "info")
    if "cache" not in values:
        raise ConfigError("The info step needs `cache`.")
    cache = base / values["cache"]
    return Step("info", f"describe {cache}", lambda: info(str(cache), list_errors=bool(values.get("errors"))))


def _probe_step(values: dict, base: Path, progress: bool) -> Step:
    from embedder.learn.train import ProbeConfig

    values = dict(values)
    label = values.pop("label", "")
    config = ProbeConfig.from_mapping(values, base_dir=base)

    def execute():
        from embedder.learn.metrics import format_table
        from embedder.learn.train import run_probe

        report = run_probe(config)
        print(format_table(report))
        return report

    return Step("probe", f"{config.classifier} on {config.cache}", execute, label or config.classifier)


def _index_step(values: dict, base: Path, progress: bool) -> Step:
    from embedder.cli.commands import index_command

    _only_keys(values, {"cache", "out", "kind", "metric", "memory_budget", "target_recall", "seed", "on_disk",
                        "layer"}, "index")
    missing = [k for k in ("cache", "out") if k not in values]
    if missing:
        raise ConfigError(f"The index step needs {', '.join(missing)}.")
    cache, out = base / values["cache"], base / values["out"]
    return Step("index", f"index {cache} -> {out}", lambda: index_command(
        str(cache), str(out), values.get("kind", "auto"), values.get("metric", "cosine"),
        values.get("memory_budget"), float(values.get("target_recall", 0.95)), int(values.get("seed", 0)),
        progress, False, on_disk=bool(values.get("on_disk", False)), layer=values.get("layer")))


def _search_step(values: dict, base: Path, progress: bool) -> Step:
    from embedder.cli.commands import search_command

    _only_keys(values, {"index", "image", "k", "grid"}, "search")
    if "index" not in values or "image" not in values:
        raise ConfigError("The search step needs `index` and `image` (a file, folder, or list of them).")
    images = values["image"] if isinstance(values["image"], list) else [values["image"]]
    images = [str(base / i) for i in images]
    grid = str(base / values["grid"]) if values.get("grid") else None
    index = str(base / values["index"])
    return Step("search", f"search {index} with {', '.join(images)}", lambda: search_command(
        index, images, None, None, None, int(values.get("k", 5)), False, grid, None))


STEP_KINDS: dict[str, Callable[[dict, Path, bool], Step]] = {
    "make-samples": _make_samples_step,
    "embed": _embed_step,
    "info": _info_step,
    "probe": _probe_step,
    "finetune": _finetune_step,
    "index": _index_step,
    "search": _search_step,
}


def _only_keys(values: dict, allowed: set[str], kind: str) -> None:
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ConfigError(f"{kind} step: unknown setting(s) {unknown}; allowed: {sorted(allowed)}.")


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
            steps.append(STEP_KINDS[kind](values, base, progress))
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
