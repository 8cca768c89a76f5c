"""What each command prints. A handler takes the command's config (and the parsed arguments for
the presentation flags: `--json`), calls the library, prints, and returns a report: a value with
`as_dict()` (what --json prints) and `summary()` (the text), the library's own or one of
embedder.cli.reports. The commands are registered in embedder.cli.table.

Imports of the library happen inside the handlers: the parser and a refused command must not
pay for torch.
"""

from __future__ import annotations

import json
import sys
from argparse import Namespace
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from embedder.cli.reports import (
    BuildableModelsReport,
    CacheInfoReport,
    CompactReport,
    CurateReport,
    DedupReport,
    EvaluateReport,
    ExportReport,
    IndexInfoReport,
    IndexReport,
    IndexUpdateReport,
    InspectReport,
    MapReport,
    MergeReport,
    ModelEntryReport,
    ModelsReport,
    PlotReport,
    PredictReport,
    ProbeReport,
    RemovalReport,
    Report,
    SamplesReport,
)
from embedder.names import display_path

if TYPE_CHECKING:  # the annotations only: the parser and a refused command must not pay for torch
    from embedder.cache.config import (
        CompactConfig,
        ExportVectorsConfig,
        ImportVectorsConfig,
        InfoConfig,
        MergeConfig,
    )
    from embedder.cache.vectors import VectorsReport
    from embedder.curate.config import CurateConfig
    from embedder.data.config import MakeSamplesConfig
    from embedder.extract.config import EmbedConfig, RayOptions
    from embedder.extract.local import EmbedReport
    from embedder.learn.config import EvaluateConfig, ExportConfig, FinetuneConfig, PredictConfig, ProbeConfig
    from embedder.learn.finetune.run import FinetuneReport
    from embedder.models.config import InspectConfig, ModelsConfig, StylizeConfig
    from embedder.models.stylize import StylizeReport
    from embedder.search.config import DedupConfig, IndexConfig, MapConfig, PlotConfig, SearchConfig, WatchConfig
    from embedder.search.query import Hit
    from embedder.search.watch import SyncReport
    from embedder.serve.config import ServeConfig


def print_json(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _as_json(args: Namespace) -> bool:
    return bool(getattr(args, "json", False))


R = TypeVar("R", bound=Report)


def show(report: R, args: Namespace) -> R:
    """Print a report as the presentation flags ask (--json: its dict; else its text), and return it."""
    print_json(report.as_dict()) if _as_json(args) else print(report.summary())
    return report


# ------------------------------------------------------------------------------- models


def models(config: ModelsConfig, args: Namespace) -> ModelsReport | BuildableModelsReport | ModelEntryReport:
    if config is not None and config.all:
        from embedder.models.registry import buildable_models

        return show(BuildableModelsReport(buildable_models(config.name), pattern=config.name), args)
    if config is not None and config.name:
        from embedder.models.registry import model_entry

        entry = model_entry(config.name)
        if config.card is not None:  # the entry is checked first: a wrong NAME costs no sample reading
            from embedder.extract.fidelity import model_card

            entry = {**entry, "card": model_card(config.name, config.card, weights=config.weights,
                                                 image_size=config.image_size,
                                                 calibration_images=config.calibration_images,
                                                 fidelity_images=config.fidelity_images,
                                                 progress=config.progress)}
        return show(ModelEntryReport(entry, name=config.name), args)
    from embedder.models.registry import registry_table

    return show(ModelsReport(registry_table()), args)


def inspect(config: InspectConfig, args: Namespace) -> InspectReport:
    from embedder.models.inspection import inspect_model

    ins = inspect_model(config.model, image_size=config.image_size, weights=config.weights)
    return show(InspectReport(ins, config.depth), args)


def stylize(config: StylizeConfig, args: Namespace) -> StylizeReport:
    from embedder.models.stylize import stylize as run

    return show(run(config), args)


# -------------------------------------------------------------------------------- cache


def embed(config: EmbedConfig, args: Namespace, ray_options: RayOptions | None = None) -> EmbedReport:
    """`args.lock`: the cache's write lock, taken before the config was even built."""
    lock, command = getattr(args, "lock", None), getattr(args, "command_line", None)
    _check_embed_paths(config)
    if getattr(args, "backend", "local") == "ray" or ray_options is not None:
        from embedder.extract.config import RayOptions
        from embedder.extract.ray import embed_ray
        from embedder.options import from_arguments

        ray_options = ray_options or from_arguments(RayOptions, args)
        report = embed_ray(config, ray_options, command=command, lock=lock)
    else:
        from embedder.extract.local import embed as run

        report = run(config, command=command, lock=lock)
    return show(report, args)


def _check_embed_paths(config: EmbedConfig | WatchConfig) -> None:
    """SOURCE and --out, checked before torch is imported (seconds): a typo is refused as fast as `info` answers."""
    import os

    from embedder.errors import SourceError
    from embedder.outputs import CACHE, claim

    if "{" not in config.source and not os.path.lexists(config.source):
        raise SourceError(f"SOURCE {config.source} does not exist. Pass an image folder, a .txt/.csv file list, "
                          "a table, a .tar shard, a folder of .tar shards or a pattern such as "
                          "shards/{00000..00099}.tar.")
    claim(config.out, CACHE)


def merge(config: MergeConfig, args: Namespace) -> MergeReport:
    from embedder.cache.shards import merge_cache

    rows = merge_cache(config.cache, config.out, overwrite=config.overwrite)
    report = MergeReport({"cache": config.cache, "out": config.out, "rows": rows})
    print(report.summary())  # no --json
    return report


def compact(config: CompactConfig, args: Namespace) -> CompactReport:
    from embedder.cache.compact import compact_cache

    return show(CompactReport(compact_cache(config.cache), cache=config.cache), args)


def watch(config: WatchConfig, args: Namespace) -> None:
    """Runs until Ctrl-C, printing each sync's report as it comes: nothing is left to return."""
    from embedder.outputs import INDEX, claim
    from embedder.search.watch import embed_config_of
    from embedder.search.watch import watch as run

    _check_embed_paths(config)
    if config.index is not None:  # the index folder is an output too (embedder.outputs)
        claim(config.index, INDEX, [config.out], config.overwrite, flag="--index")

    def on_sync(report: SyncReport, mode: object) -> None:
        if _as_json(args):
            print(json.dumps({**report.as_dict(), "events": mode}, default=str), flush=True)  # one line per sync
        else:
            print(report.summary(), flush=True)

    if not _as_json(args):
        print(f"watching {config.source} (Ctrl-C stops; the next watch or embed catches up)", flush=True)
    try:
        run(embed_config_of(config), config.index, quiet=config.settle, poll=config.poll, interval=config.interval,
            on_sync=on_sync)
    except KeyboardInterrupt:
        print("stopped: everything synced so far is kept; rerun to catch up.", file=sys.stderr)


def info(config: InfoConfig, args: Namespace) -> CacheInfoReport | IndexInfoReport:
    if (Path(config.cache) / "meta.json").is_file():
        from embedder.search.removal import describe_index

        return show(IndexInfoReport(describe_index(config.cache), index=config.cache), args)
    from embedder.cache.reader import describe

    doc = describe(config.cache, list_errors=config.errors)
    return show(CacheInfoReport(doc, cache=config.cache, listed_errors=config.errors), args)


def export_vectors(config: ExportVectorsConfig, args: Namespace) -> VectorsReport:
    from embedder.cache.vectors import export_vectors as run

    report = run(config.cache, config.out, config.format, layer=config.layer, rows_per_file=config.rows_per_file,
                 block_rows=config.block_rows, overwrite=config.overwrite, progress=config.progress,
                 metric=config.metric)
    return show(report, args)


def import_vectors(config: ImportVectorsConfig, args: Namespace) -> VectorsReport:
    from embedder.cache.vectors import import_vectors as run

    report = run(list(config.inputs), config.out, source=config.source, overwrite=config.overwrite,
                 block_rows=config.block_rows, progress=config.progress,
                 command=getattr(args, "command_line", "") or "")
    if not _as_json(args):
        for note in report.notes:
            print(f"note: {note}", file=sys.stderr)
    return show(report, args)


def make_samples(config: MakeSamplesConfig, args: Namespace) -> SamplesReport:
    from embedder.data.samples import make_samples as run

    report = SamplesReport(run(config.out, only=list(config.only) or None))
    print(report.summary())  # no --json
    return report


# -------------------------------------------------------------------------------- learn


def probe(config: ProbeConfig, args: Namespace) -> ProbeReport:
    from embedder.learn.train import run_probe

    return show(ProbeReport(run_probe(config)), args)


def evaluate(config: EvaluateConfig, args: Namespace) -> EvaluateReport:
    from embedder.learn.train import evaluate_probe

    return show(EvaluateReport(evaluate_probe(config.probe_dir, config.cache), cache=config.cache), args)


def export(config: ExportConfig, args: Namespace) -> ExportReport:
    from embedder.learn.export import export_probe

    path = export_probe(config.probe_dir, config.out, config.weights, overwrite=config.overwrite)
    standalone = path.with_suffix(".onnx")
    report = ExportReport({"out": str(path), "onnx": str(standalone) if standalone.is_file() else None,
                           "onnx_json": str(path.with_suffix(".json"))})
    print(report.summary())  # no --json
    return report


def finetune(config: FinetuneConfig, args: Namespace) -> FinetuneReport:
    from embedder.learn.finetune import finetune as run

    return show(run(config), args)


def expand_images(items: Sequence[str]) -> list[str]:
    """Files as given, folders as their image files (sorted, recursively). Refused at once, before any
    model is built, when none of them exists; a missing one among others becomes that image's error."""
    import os

    from embedder.data.sources import is_image_name
    from embedder.errors import SourceError

    paths = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            paths += sorted(str(q) for q in p.rglob("*") if q.is_file() and is_image_name(q.name))
        else:
            paths.append(str(item))
    if not paths:
        raise SourceError("No images given (files or folders of images).")
    if not any(os.path.lexists(p) for p in paths):
        raise SourceError(f"No such file: {paths[0]}" + (f" (nor any of the other {len(paths) - 1})"
                                                         if len(paths) > 1 else "") + ".")
    return paths


def _failed_part(errors: Sequence[object], what: str, total: int) -> None:
    """Exit non-zero when some of the inputs failed (they were printed with their reasons)."""
    from embedder.errors import PartialFailureError

    if errors:
        raise PartialFailureError(f"{len(errors)} of {total} {what} could not be read (reasons above); "
                                  "the others were answered.")


def predict(config: PredictConfig, args: Namespace) -> PredictReport:
    from embedder.errors import AllImagesFailedError
    from embedder.learn.predict import predict as run

    results = run(config.model, expand_images(config.images), top_k=config.top_k, batch_size=config.batch_size,
                  device=config.device, runtime=config.runtime)
    report = show(PredictReport(results), args)
    if all("error" in r for r in results):
        raise AllImagesFailedError("None of the images could be read.")
    _failed_part([r for r in results if "error" in r], "images", len(results))
    return report


# ------------------------------------------------------------------------------- search


def index(config: IndexConfig, args: Namespace) -> IndexReport | IndexUpdateReport | RemovalReport:
    if config.removing:
        from embedder.search.removal import remove_rows

        report = remove_rows(config.cache, config.remove, config.remove_from, config.prune_missing, config.progress)
        return show(RemovalReport(report, index=config.cache), args)
    if config.update and (Path(config.out) / "meta.json").is_file():
        from embedder.search.update import update_index

        report = update_index(config.cache, config.out, layer=config.layer, kind=config.kind,
                              memory_budget=config.memory_budget, seed=config.seed, progress=config.progress)
        return show(IndexUpdateReport(report, cache=config.cache, out=config.out), args)
    from embedder.search.build import build_index

    if config.update and not _as_json(args):
        print(f"no index at {config.out} yet: building one (later runs with --update add the new rows to it)")
    meta = build_index(config.cache, config.out, kind=config.kind, metric=config.metric,
                       memory_budget=config.memory_budget, target_recall=config.target_recall, seed=config.seed,
                       progress=config.progress, on_disk=config.on_disk, layer=config.layer,
                       overwrite=config.overwrite)
    if not _as_json(args):
        for note in meta["notes"]:
            print(f"embedder: {note}", file=sys.stderr)
    return show(IndexReport(meta, out=config.out), args)


def search(config: SearchConfig, args: Namespace) -> list[tuple[str | None, list[Hit]]]:
    from embedder.outputs import PICTURE, claim
    from embedder.search.query import SearchIndex

    # Everything a person can get wrong is checked before the index is opened and the model built.
    for items in (config.image, config.negative):
        if items:
            expand_images(items)
    if config.grid:
        claim(config.grid, PICTURE, [config.index], config.overwrite, flag="--grid")
    index = SearchIndex.open(config.index, weights_path=config.weights, runtime=config.runtime)
    _check_layer(index, config)
    queries, errors = _run_queries(index, config)
    if _as_json(args):
        for q, hits in queries:  # JSON lines: one query per line, streams well for batch mode
            sys.stdout.write(json.dumps({"query": q, "hits": [h.as_dict() for h in hits]}) + "\n")
        for q, reason in errors:
            sys.stdout.write(json.dumps({"query": q, "error": reason}) + "\n")
    else:
        for q, hits in queries:
            print(f"query: {display_path(q or config.vector)}")
            for h in hits:
                print(f"  {h.rank:>3}  {h.score:>8.4f}  {h.label or '-':<12} {display_path(h.path)}")
        for q, reason in errors:
            print(f"query: {display_path(q)}\n  ERROR {reason}")
    if config.grid:
        from embedder.search.plots import result_grid

        result_grid(queries[:10], lambda h: index.image_path(h.id), config.grid, inputs=[config.index],
                    overwrite=config.overwrite)
        if not _as_json(args):
            print(f"grid: {config.grid}")
    _failed_part(errors, "query images", len(queries) + len(errors))
    return queries


def _check_layer(index, config) -> None:
    from embedder.cache.reader import resolve_layer
    from embedder.errors import ConfigError

    # The cache's resolver, with the names the cache recorded (an index built before they were copied
    # into meta.json: None, the registry's aliases).
    meta = index.meta
    built_on = meta.get("layer") or meta["components"]["layer"]
    if config.layer is not None and resolve_layer(config.layer, [built_on], meta.get("layer_names"),
                                                  meta["components"].get("model", "")) != built_on:
        raise ConfigError(f"{config.index} indexes the layer {built_on!r}, not {config.layer!r}. Build an index of "
                          f"that layer with `embedder index CACHE.h5 --layer {config.layer} --out DIR`.")


def _run_queries(index, config):
    """[(query, hits)] and [(query, reason)]: the config's examples turned into one Query
    (embedder.search.ask) and answered there; the names are the CLI's own."""
    from embedder.errors import AllImagesFailedError
    from embedder.search.ask import Query, answer

    where = index.parse_filter(config.where)  # a bad filter, or range, is refused before any image is embedded
    if config.threshold is not None:
        _check_range_metric(index, config)
    one = (lambda value: () if value is None else (value,))
    names, positives, errors = _examples(index, config.image, one(config.path), one(config.row_id), config.vector,
                                         config.exclude_examples)
    negatives = []
    if config.combined:
        neg_names, negatives, neg_errors = _examples(index, config.negative, config.negative_path,
                                                     config.negative_id, find_rows=config.exclude_examples)
        errors += neg_errors
        if not positives:
            raise AllImagesFailedError("None of the positive examples could be read.")
        shown = " + ".join(n for n in names if n) or f"{len(names)} vectors"
        names = [shown + "".join(f" - {n}" for n in neg_names)]
    query = Query(tuple(positives), tuple(negatives), k=config.max_results if config.threshold is not None else config.k,
                  threshold=config.threshold, where=where, combine=config.combined, alpha=config.alpha,
                  beta=config.beta, exclude_examples=config.exclude_examples)
    return list(zip(names, answer(index, query))), errors


def _examples(index, images=(), paths=(), ids=(), vector=None, find_rows=False):
    """(names, [Example], errors) of examples given as images, cached paths, row ids or a .npy file,
    in that order; `find_rows`: an image file that is an indexed row knows it (to be left out)."""
    from embedder.search.ask import Example
    from embedder.search.queries import query_vectors, read_query_vectors, rows_of_files, rows_of_paths

    names, examples, errors = [], [], []
    if images:
        feats, ok, errors = index.embed_files(expand_images(images))
        for f, feat in zip(ok, feats):
            row = rows_of_files(index, [f])[:1] if find_rows else []
            examples.append(Example.of_vector(feat, row[0] if row else None))
        names = [str(f) for f in ok]
    ids = index.check_ids(rows_of_paths(index, paths) + [int(i) for i in ids])  # out of range, or removed
    names += [str(index.image_path(i)) for i in ids]
    examples += [Example.of_id(i) for i in ids]
    if vector is not None:
        loaded = query_vectors(read_query_vectors(vector), index.dim, index.metric)
        names += [None] * len(loaded)
        examples += [Example.of_vector(v) for v in loaded]
    return names, examples, errors


def _check_range_metric(index, config) -> None:
    from embedder.errors import ConfigError

    wanted = "cosine" if config.min_score is not None else "l2"
    if index.metric != wanted:
        flag = "--min-score" if index.metric == "cosine" else "--max-distance"
        raise ConfigError(f"{config.index} ranks by {index.metric}: give the range as {flag} "
                          f"({'a cosine similarity' if index.metric == 'cosine' else 'a squared L2 distance'}).")


def dedup(config: DedupConfig, args: Namespace) -> DedupReport:
    from embedder.cache.reader import FeatureCache
    from embedder.search.dedup import find_duplicates

    found = find_duplicates(config.cache, config.threshold, config.metric, against=config.against, kind=config.kind,
                            nprobe=config.nprobe, keep=config.keep, memory_budget=config.memory_budget,
                            layer=config.layer, progress=config.progress)
    with FeatureCache(config.cache) as c:
        paths = c.paths
    if config.against:
        with FeatureCache(config.against) as o:
            paths = paths + o.paths
    n = found.n_rows

    def entry(r: int) -> dict:
        return {"path": paths[r], "keep": None, **({"cache": "other" if r >= n else "cache"} if config.against else {})}

    doc = {"threshold": config.threshold, "metric": config.metric, "kind": found.kind, "pairs": found.pairs,
           "against": config.against, "keep": config.keep, "large_groups": found.large_groups, "groups": []}
    for g, keep in zip(found.groups, found.keep):
        doc["groups"].append([{**entry(r), "keep": r in keep} for r in g])
    return show(DedupReport(doc, cache=config.cache), args)


def curate(config: CurateConfig, args: Namespace) -> CurateReport:
    from embedder.curate.run import run_curate

    return show(CurateReport(run_curate(config)), args)


def plot(config: PlotConfig, args: Namespace) -> PlotReport:
    from embedder.search.plots import plot_space

    out = config.out or str(Path(config.cache).with_suffix(f".{config.method}.png"))
    path = plot_space(config.cache, out, method=config.method, max_points=config.max_points, seed=config.seed,
                      layer=config.layer, overwrite=config.overwrite, progress=config.progress)
    report = {"out": str(path), "cache": config.cache, "method": config.method, "seed": config.seed}
    return show(PlotReport(report), args)


def map_index(config: MapConfig, args: Namespace) -> MapReport:
    from embedder.search.maps import compute_map

    report = compute_map(config.index, method=config.method, seed=config.seed, fit_rows=config.fit_rows,
                         progress=config.progress, scores=config.scores)
    return show(MapReport(report, index=config.index), args)


# -------------------------------------------------------------------------------- serve


def _check_port(host: str, port: int) -> None:
    """Bind the address once before anything is announced: a port in use is one line (exit 1), not
    "serving ..." followed by uvicorn's own error."""
    import errno
    import socket

    from embedder.errors import EmbedderError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as exc:
            reason = {errno.EADDRINUSE: "is in use by another program", errno.EACCES: "needs more privileges",
                      errno.EADDRNOTAVAIL: "is not an address of this machine"}.get(exc.errno, f"failed: {exc}")
            error = EmbedderError(f"binding {host} port {port} {reason}: pass another --port or --host.")
            error.exit_code = 1  # the machine's state, like the other OS errors
            raise error from None


def serve(config: ServeConfig, args: Namespace) -> None:
    """Runs until stopped: nothing is left to return."""
    from embedder.serve.app import allowed_hosts_for, create_app, run

    _check_port(config.host, config.port)
    hosts = allowed_hosts_for(config.host, list(config.allowed_host))
    app = create_app(config.index, max_upload_bytes=config.max_upload_bytes, default_k=config.k,
                     weights_path=config.weights, allowed_hosts=hosts, max_pixels=config.max_upload_pixels,
                     decode_slots=config.decode_slots, runtime=config.runtime)
    where = f"[{config.host}]" if ":" in config.host else config.host
    print(f"serving {config.index} on http://{where}:{config.port}/  (answering Host: {', '.join(hosts)}; "
          "API spec: /openapi.json)", flush=True)
    run(app, host=config.host, port=config.port, limits=config.server_limits)
