"""The one command table: each command registered once, with its help, its config type, its handler
and its report type (the handler's return annotation).

Three front ends are generated from it: the argparse command line (embedder.cli.main), the
pipeline TOML steps (embedder.cli.pipeline; a row with a `step` can be one) and the CLI reference
page (embedder.cli.reference).

A row names its config class and its handler as "module:name", as entry points do, and they are
imported when the command runs. So this table imports no other module of embedder.cli: building
the parser of one command pays for no other config module, and `run`, whose handler reads this
table for its steps, is a row like the others without an import circle.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from embedder.options import add_arguments


def load(ref: str) -> Any:
    """The object that "module:name" names (a config class, a handler)."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class PipelineStep:
    """How a command runs as a pipeline step. Its TOML keys are the config's fields."""

    describe: Callable[[Any], str]  # config -> the line printed before the step runs
    label: Callable[[Any], str] | None = None  # config -> its row name in the results table; None: not a row
    # Where a step's default differs from the command's. Kept so that pipelines written before
    # the options were declared once still do what they did (the search step showed 5 hits).
    defaults: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    handler: str | Callable  # "module:function", (config, args) -> report; the handler prints
    config_ref: str | None = None  # "module:Class": the config dataclass its flags and TOML keys come from
    json: str | None = None  # help of --json, when the command has it
    extra: Callable[[argparse.ArgumentParser], None] | None = None  # arguments that are not config fields
    step: PipelineStep | None = None  # also a pipeline step

    @property
    def config(self) -> Callable[[], type] | None:
        """A loader of the config class (None for a command without one): `command.config()`."""
        return None if self.config_ref is None else (lambda: load(self.config_ref))

    def function(self) -> Callable:
        return load(self.handler) if isinstance(self.handler, str) else self.handler

    def run(self, config: object, args: argparse.Namespace, *more: object) -> object:
        return self.function()(config, args, *more)

    def report_type(self) -> str:
        """The handler's declared return type, as written: the command's report. (Not evaluated: the
        library's report classes are imported for the annotations only, to keep torch out of the parser.)"""
        return str(inspect.signature(self.function()).return_annotation)


def _embed_extra(p: argparse.ArgumentParser) -> None:
    from embedder.extract.config import RayOptions

    p.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="ray: shard the listing over a Ray cluster's actor pool (pip install 'embedder[ray]')")
    add_arguments(p, RayOptions)


def _run_extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", help="the pipeline TOML file, e.g. pipelines/quickstart.toml")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _search_step(c) -> str:
    return (f"search {c.index} with {', '.join(c.image) or c.path or c.row_id or c.vector}"
            + (f" where {c.where}" if c.where else ""))


def _rows(*commands: Command) -> dict[str, Command]:
    table: dict[str, Command] = {}
    for command in commands:
        if command.name in table:
            raise ValueError(f"the command {command.name!r} is registered twice")
        table[command.name] = command
    return table


H = "embedder.cli.commands:"  # where the handlers are

COMMANDS: dict[str, Command] = _rows(
    Command("models", "list backbones, feature widths and offline weight availability (--all: every buildable "
            "name; NAME: one entry)", H + "models", "embedder.models.config:ModelsConfig",
            json="print the registry as JSON"),
    Command("inspect", "list a model's layers (graph nodes) with output shapes, default and head marked",
            H + "inspect", "embedder.models.config:InspectConfig", json="print as JSON"),
    Command("embed", "extract features of an image folder into an HDF5 cache (resumable)", H + "embed",
            "embedder.extract.config:EmbedConfig", json="print the run report as JSON", extra=_embed_extra,
            step=PipelineStep(lambda c: f"embed {c.source} with {c.space.model} -> {c.out}", label=lambda c: "")),
    Command("merge", "consolidate a sharded cache (from --backend ray) into one self-contained file", H + "merge",
            "embedder.cache.config:MergeConfig"),
    Command("compact", "rewrite a synced cache without its superseded and removed rows (atomic)", H + "compact",
            "embedder.cache.config:CompactConfig", json="print the report as JSON"),
    Command("probe", "train a linear probe (or a scikit-learn classifier) on a feature cache", H + "probe",
            "embedder.learn.config:ProbeConfig", json="print the report as JSON (includes val_accuracy)",
            step=PipelineStep(lambda c: f"{c.classifier} on {c.cache}", label=lambda c: c.classifier)),
    Command("evaluate", "apply a saved probe or classifier to another cache", H + "evaluate",
            "embedder.learn.config:EvaluateConfig", json="print the result as JSON"),
    Command("export", "assemble backbone + trained linear probe into one image classifier", H + "export",
            "embedder.learn.config:ExportConfig"),
    Command("predict", "label images with an exported or fine-tuned classifier", H + "predict",
            "embedder.learn.config:PredictConfig", json="print the labels as JSON"),
    Command("finetune", "train the whole network (or a head on a frozen backbone) on images", H + "finetune",
            "embedder.learn.config:FinetuneConfig", json="print the report as JSON",
            step=PipelineStep(lambda c: f"{'fixed feature extractor' if c.freeze_backbone else 'fine-tune'} "
                                f"{c.space.model} on {c.source} -> {c.out}",
                      label=lambda c: "fixed feature extractor" if c.freeze_backbone else "fine-tune")),
    Command("stylize", "neural style transfer: repaint --content with the texture of --style (L-BFGS)",
            H + "stylize", "embedder.models.config:StylizeConfig", json="print the report as JSON"),
    Command("index", "build a FAISS similarity index from a feature cache, or remove rows from one", H + "index",
            "embedder.search.config:IndexConfig", json="print the index's metadata as JSON",
            step=PipelineStep(lambda c: f"index {c.cache} -> {c.out}")),
    Command("search", "query an index by image(s), cached path, row id or vector", H + "search",
            "embedder.search.config:SearchConfig", json="JSON lines: one object per query",
            step=PipelineStep(_search_step, defaults=(("k", 5),))),
    Command("dedup", "list near-duplicate groups of a cache (range search)", H + "dedup",
            "embedder.search.config:DedupConfig", json="print the groups as JSON"),
    Command("curate", "score every image for label mistakes, outliers, uniqueness, leaks and duplicates",
            H + "curate", "embedder.curate.config:CurateConfig", json="print the summary as JSON",
            step=PipelineStep(lambda c: f"curate {c.cache} -> {c.out}")),
    Command("plot", "2-D scatter of a cache coloured by label", H + "plot", "embedder.search.config:PlotConfig",
            json="print the report as JSON"),
    Command("map", "compute the 2-D map of an index that `serve` shows at /map (UMAP or PCA, stored as "
            "INDEX_DIR/map.h5)", H + "map_index", "embedder.search.config:MapConfig", json="print the report as JSON",
            step=PipelineStep(lambda c: f"{c.method} map of {c.index} -> {c.index}/map.h5")),
    Command("serve", "HTTP search service with a web page (FastAPI + uvicorn)", H + "serve",
            "embedder.serve.config:ServeConfig"),
    Command("watch", "keep a cache (and --index) in step with a folder as files arrive, change and go",
            H + "watch", "embedder.search.config:WatchConfig", json="print one JSON line per sync"),
    Command("info", "describe a feature cache or an index folder", H + "info", "embedder.cache.config:InfoConfig",
            json="print the description as JSON", step=PipelineStep(lambda c: f"describe {c.cache}")),
    Command("export-vectors", "write a cache's vectors and metadata as Parquet, or clip-retrieval's .npy layout",
            H + "export_vectors", "embedder.cache.config:ExportVectorsConfig", json="print the report as JSON"),
    Command("import-vectors", "build a cache from vectors embedded elsewhere (.npy + Parquet, or Parquet)",
            H + "import_vectors", "embedder.cache.config:ImportVectorsConfig", json="print the report as JSON"),
    Command("run", "run a declarative pipeline (TOML), e.g. pipelines/quickstart.toml", "embedder.cli.pipeline:run",
            extra=_run_extra),
    Command("make-samples", "write the sample datasets (from data shipped in packages)", H + "make_samples",
            "embedder.data.config:MakeSamplesConfig", step=PipelineStep(lambda c: f"make sample data in {c.out}")),
)
