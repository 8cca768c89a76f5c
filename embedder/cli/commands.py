"""What each command prints. A handler takes the command's config (and the parsed arguments for
the presentation flags: `--json`), calls the library, prints, and returns the library's report.

Imports of the library happen inside the handlers: the parser and a refused command must not
pay for torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from embedder.names import display_path


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _as_json(args) -> bool:
    return bool(getattr(args, "json", False))


# ------------------------------------------------------------------------------- models


def models(config, args):
    if config is not None and config.all:
        return _models_all(config.name, args)
    if config is not None and config.name:
        return _model_entry(config.name, args)
    from embedder.models.registry import registry_table

    rows = registry_table()
    if _as_json(args):
        print_json(rows)
        return rows
    print(f"{'model':<20}{'dim':>6}  {'offline':<8}{'input':<18}{'other layers':<26}weights file")
    for r in rows:
        other = ", ".join(f"{a} ({d})" for a, d in r["other_layers"].items()) or "-"
        print(f"{r['name']:<20}{r['feature_dim']:>6}  {'yes' if r['weights_offline'] else 'no':<8}"
              f"{r['input']:<18}{other:<26}{r['weights_file']}")
    missing = [r for r in rows if not r["weights_offline"]]
    if missing:
        print(f"\n{len(missing)} models have no pretrained weights on this machine. They download on first use "
              "when there is a network; offline, copy the file to the path shown, pass --weights PATH, "
              "or use --weights none (random init).")
    return rows


def _models_all(pattern: str | None, args) -> dict[str, list[str]]:
    from embedder.models.registry import buildable_models

    groups = buildable_models(pattern)
    if _as_json(args):
        print_json(groups)
        return groups
    print(f"curated aliases ({len(groups['curated'])}): {', '.join(groups['curated']) or '-'}")
    print(f"torchvision classification models ({len(groups['torchvision'])}): "
          f"{', '.join(groups['torchvision']) or '-'}")
    shown = groups["timm"] if pattern else groups["timm"][:20]
    more = ", ... (filter with `embedder models --all 'timm:vit_*'`)" if len(shown) < len(groups["timm"]) else ""
    print(f"timm models ({len(groups['timm'])}): {', '.join(shown) or '-'}{more}")
    if pattern:
        print(f"timm pretrained tags ({len(groups['timm_pretrained'])}): {', '.join(groups['timm_pretrained']) or '-'}")
    print("A timm name takes a pretrained tag (timm:convnext_small.fb_in22k); a torchvision name a weights name "
          "(torchvision:resnet50.IMAGENET1K_V1). `embedder models NAME` shows one entry.")
    return groups


def _model_entry(name: str, args) -> dict:
    from embedder.models.registry import model_entry

    entry = model_entry(name)
    if _as_json(args):
        print_json(entry)
        return entry
    pre = entry["preprocessing"]
    print(f"{name}: {entry['feature_dim']}-d default feature at {entry['default_layer']} (head {entry['head']})")
    print(f"  input: resize {pre['resize_size']} ({pre['interpolation']}), crop {pre['crop_size']}, "
          f"mean {pre['mean']}, std {pre['std']}")
    print("  layers: " + ", ".join(f"{n} ({d})" for n, d in entry["layers"].items())
          + "; aliases: " + (", ".join(f"{a}={n}" for a, n in entry["aliases"].items()) or "-"))
    print(f"  poolings (--pool): {', '.join(entry['poolings'])}")
    if entry["blocks"]:
        print(f"  transformer blocks ({len(entry['blocks'])}, pool with --pool {'|'.join(entry['poolings'])}): "
              f"{entry['blocks'][0]} ... {entry['blocks'][-1]}")
    offline = "present offline" if entry["weights_offline"] else "NOT present offline"
    print(f"  weights: {entry['weights']} ({offline}: {entry['weights_file']})")
    if entry["weights_hint"]:
        print(f"  to use them offline: {entry['weights_hint']}; or pass --weights PATH (a state dict), "
              "or --weights none (random init)")
    print(f"  all layers: embedder inspect {name}")
    return entry


def inspect(config, args):
    from embedder.models.inspection import format_inspection, inspect_model

    ins = inspect_model(config.model, image_size=config.image_size, weights=config.weights)
    print_json(ins.as_dict()) if _as_json(args) else print(format_inspection(ins, config.depth))
    return ins


def stylize(config, args):
    from embedder.models.stylize import stylize as run

    report = run(config)
    print_json(report.as_dict()) if _as_json(args) else print(report.summary())
    return report


# -------------------------------------------------------------------------------- cache


def embed(config, args, ray_options=None):
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
    print_json(report.as_dict()) if _as_json(args) else print(report.summary())
    return report


def _check_embed_paths(config) -> None:
    """SOURCE and --out, checked before torch is imported (seconds): a typo is refused as fast as `info` answers."""
    import os

    from embedder.errors import SourceError
    from embedder.outputs import CACHE, claim

    if "{" not in config.source and not os.path.lexists(config.source):
        raise SourceError(f"SOURCE {config.source} does not exist. Pass an image folder, a .txt/.csv file list, "
                          "a table, a .tar shard, a folder of .tar shards or a pattern such as "
                          "shards/{00000..00099}.tar.")
    claim(config.out, CACHE)


def merge(config, args) -> int:
    from embedder.cache.shards import merge_cache

    rows = merge_cache(config.cache, config.out, overwrite=config.overwrite)
    print(f"wrote {config.out}: {rows} rows, one self-contained file (same fingerprint as {config.cache})")
    return rows


def compact(config, args) -> dict:
    from embedder.cache.compact import compact_cache

    report = compact_cache(config.cache)
    if _as_json(args):
        print_json(report)
    elif report["status"] == "compact":
        print(f"{config.cache} has no superseded or removed rows ({report['rows']} rows). Nothing to do.")
    else:
        print(f"wrote {config.cache}: {report['rows']} live rows, sorted by path; {report['dropped']} dead rows "
              "dropped. Rebuild its index: `embedder index CACHE.h5 --out INDEX_DIR`.")
    return report


def watch(config, args) -> None:
    from embedder.outputs import INDEX, claim
    from embedder.search.watch import embed_config_of
    from embedder.search.watch import watch as run

    _check_embed_paths(config)
    if config.index is not None:  # the index folder is an output too (embedder.outputs)
        claim(config.index, INDEX, [config.out], config.overwrite, flag="--index")

    def show(report, mode):
        if _as_json(args):
            print(json.dumps({**report.as_dict(), "events": mode}, default=str), flush=True)  # one line per sync
        else:
            print(report.summary(), flush=True)

    if not _as_json(args):
        print(f"watching {config.source} (Ctrl-C stops; the next watch or embed catches up)", flush=True)
    try:
        run(embed_config_of(config), config.index, quiet=config.settle, poll=config.poll, interval=config.interval,
            on_sync=show)
    except KeyboardInterrupt:
        print("stopped: everything synced so far is kept; rerun to catch up.", file=sys.stderr)


def info(config, args) -> dict:
    from embedder.cache.reader import describe

    if (Path(config.cache) / "meta.json").is_file():
        return index_info(config, args)
    doc = describe(config.cache, list_errors=config.errors)
    print_json(doc) if _as_json(args) else print(_info_text(doc, config))
    return doc


def index_info(config, args) -> dict:
    from embedder.search.removal import describe_index

    doc = describe_index(config.cache)
    if _as_json(args):
        print_json(doc)
        return doc
    knob = {k: v for k, v in doc["params"].items() if k in ("nprobe", "efSearch")}
    recall = "-" if doc["recall_at_10"] is None else f"{doc['recall_at_10']:.4f}"
    lines = [f"{config.cache}: {doc['kind']} index of {doc['rows']} x {doc['dim']} ({doc['metric']})"
             + (", lists on disk" if doc["on_disk"] else ""),
             f"  searchable   {doc['searchable']} rows",
             f"  removed      {doc['removed']}" + (" (removed in place)" if doc["removed_in_place"] else
                                                   f" ({doc['hidden']} hidden from every search)" if doc["hidden"]
                                                   else ""),
             f"  columns      {', '.join(doc['columns'])}  (for search --where)",
             f"  recall@10    {recall}" + (f" with {knob}" if knob else ""),
             f"  cache        {doc['cache']}" + (f" (layer {doc['layer']})" if doc["layer"] else "")]
    if doc["rebuild"]:
        lines.append(f"  rebuild      pays: {doc['rebuild']}")
    if doc.get("out_of_step"):
        lines.append(f"  OUT OF STEP  {doc['out_of_step']}")
    print("\n".join(lines))
    return doc


def _info_text(doc: dict, config) -> str:
    from embedder.data.sources import describe_ignored

    if doc["complete"]:
        state = "complete"
    elif doc["writer_pid"] is not None:
        state = f"INCOMPLETE (being written right now by embedder pid {doc['writer_pid']}; rows so far shown)"
    else:
        state = "INCOMPLETE (interrupted run; rerun its command to finish)"
    lines = [f"{config.cache}: {doc['rows']} x {doc['dim']} {doc['dtype']}, {state}",
             f"  fingerprint  {doc['fingerprint'][:16]}"]
    if doc.get("superseded") or doc.get("removed"):
        lines.append(f"  dead rows    {doc['superseded']} superseded (changed files), {doc['removed']} removed (gone "
                     f"files), hidden from every reader; {doc['stored_rows']} rows stored, generation "
                     f"{doc['generation']}")
        lines.append(f"  compact      {doc['compact'] or 'does not pay yet (few dead rows)'}")
    if len(doc["layers"]) > 1:
        labels = doc.get("layer_labels", {})
        lines.append("  layers       " + ", ".join(f"{labels.get(n, n)}: {d}" for n, d in doc["layers"].items())
                     + "  (the first is /features; pick one with --layer in probe, index, search)")
    order = ["model", "weights", "layer", "pooling", "normalization", "preprocessing", "decoder", "precision",
             "memory_layout", "runtime", "device_type", "feature_dtype"]
    for key, value in sorted(doc["components"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99):
        if key == "preprocessing":
            value = ", ".join(f"{k}={v}" for k, v in json.loads(value).items())
        elif key == "layer":
            value = doc.get("layer_labels", {}).get(value, value)
        lines.append(f"  {key:<20} {value}")
    lines.append(f"  source       {doc['source']} ({doc['layout']})")
    if doc.get("fidelity"):
        from embedder.extract.fidelity import card_lines

        lines += [line.replace("  fidelity card   :", "  fidelity card") for line in card_lines(doc["fidelity"])]
    if "shards" in doc:
        lines.append(f"  sharded      view over {doc['shards']} finished shards in {config.cache}.shards/ "
                     "(embedder merge makes one file)")
    if doc["classes"]:
        shown = ", ".join(f"{c} ({n})" for c, n in list(doc["rows_per_class"].items())[:12])
        more = f" ... {len(doc['classes']) - 12} more" if len(doc["classes"]) > 12 else ""
        lines.append(f"  classes      {len(doc['classes'])}: {shown}{more}")
    if doc["unlabelled_rows"]:
        lines.append(f"  unlabelled   {doc['unlabelled_rows']} rows")
    if doc["columns"]:
        lines.append("  columns      " + ", ".join(f"{n} ({k})" for n, k in doc["columns"].items()))
    else:
        lines.append("  columns      none (written before metadata columns existed)")
    hint = "" if config.errors or not doc["errors"] else " (list them with --errors)"
    lines.append(f"  errors       {doc['errors']}{hint}")
    lines += [f"    {display_path(e['path'])}: {e['reason']}" for e in doc.get("error_list", [])]
    if doc["ignored"]:
        lines.append(f"  ignored      {describe_ignored(doc['ignored'])}: files under SOURCE that are not rows")
    return "\n".join(lines)


def export_vectors(config, args):
    from embedder.cache.vectors import export_vectors as run

    report = run(config.cache, config.out, config.format, layer=config.layer, rows_per_file=config.rows_per_file,
                 block_rows=config.block_rows, overwrite=config.overwrite, progress=config.progress,
                 metric=config.metric)
    print_json(report.as_dict()) if _as_json(args) else print(report.summary())
    return report


def import_vectors(config, args):
    from embedder.cache.vectors import import_vectors as run

    report = run(list(config.inputs), config.out, source=config.source, overwrite=config.overwrite,
                 block_rows=config.block_rows, progress=config.progress,
                 command=getattr(args, "command_line", "") or "")
    if _as_json(args):
        print_json(report.as_dict())
    else:
        for note in report.notes:
            print(f"note: {note}", file=sys.stderr)
        print(report.summary())
    return report


def make_samples(config, args):
    from embedder.data.samples import make_samples as run

    made = run(config.out, only=list(config.only) or None)
    print(made.summary())
    return made


# -------------------------------------------------------------------------------- learn


def probe(config, args) -> dict:
    from embedder.learn.metrics import format_table
    from embedder.learn.train import run_probe

    report = run_probe(config)
    if _as_json(args):
        print_json(report)
    elif report.get("sweep"):
        from embedder.learn.sweep import format_sweep

        print(format_sweep(report))
    else:
        print(format_table(report))
    return report


def evaluate(config, args) -> dict:
    from embedder.learn.train import evaluate_probe

    result = evaluate_probe(config.probe_dir, config.cache)
    if _as_json(args):
        print_json(result)
    else:
        acc = result["accuracy"]
        print(f"{config.cache}: {result['rows']} rows, accuracy {'-' if acc is None else f'{100 * acc:.2f}%'}")
    return result


def export(config, args) -> Path:
    from embedder.learn.export import export_probe

    path = export_probe(config.probe_dir, config.out, config.weights, overwrite=config.overwrite)
    standalone = path.with_suffix(".onnx")
    print(f"wrote {path}: backbone + linear head, ready for `embedder predict {path} IMAGE...`"
          + (f"; {standalone} and {path.with_suffix('.json')}: the same for onnxruntime, without embedder"
             if standalone.is_file() else ""))
    return path


def finetune(config, args):
    from embedder.learn.finetune import finetune as run

    report = run(config)
    print_json(report.as_dict()) if _as_json(args) else print(report.summary())
    return report


def expand_images(items) -> list[str]:
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


def _failed_part(errors, what: str, total: int) -> None:
    """Exit non-zero when some of the inputs failed (they were printed with their reasons)."""
    from embedder.errors import PartialFailureError

    if errors:
        raise PartialFailureError(f"{len(errors)} of {total} {what} could not be read (reasons above); "
                                  "the others were answered.")


def predict(config, args) -> list[dict]:
    from embedder.errors import AllImagesFailedError
    from embedder.learn.predict import predict as run

    results = run(config.model, expand_images(config.images), top_k=config.top_k, batch_size=config.batch_size,
                  device=config.device, runtime=config.runtime)
    if _as_json(args):
        print_json(results)
    else:
        for r in results:
            if "error" in r:
                print(f"{display_path(r['path'])}\tERROR\t{r['error']}")
                continue
            extra = "  ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top"][1:])
            print(f"{display_path(r['path'])}\t{r['label']}\t{r['probability']:.3f}"
                  + (f"\t({extra})" if extra else ""))
    if all("error" in r for r in results):
        raise AllImagesFailedError("None of the images could be read.")
    _failed_part([r for r in results if "error" in r], "images", len(results))
    return results


# ------------------------------------------------------------------------------- search


def index(config, args) -> dict:
    if config.removing:
        return remove(config, args)
    from embedder.search.build import build_index

    if config.update and (Path(config.out) / "meta.json").is_file():
        return index_update(config, args)
    if config.update and not _as_json(args):
        print(f"no index at {config.out} yet: building one (later runs with --update add the new rows to it)")
    meta = build_index(config.cache, config.out, kind=config.kind, metric=config.metric,
                       memory_budget=config.memory_budget, target_recall=config.target_recall, seed=config.seed,
                       progress=config.progress, on_disk=config.on_disk, layer=config.layer,
                       overwrite=config.overwrite)
    if _as_json(args):
        print_json(meta)
        return meta
    for note in meta["notes"]:
        print(f"embedder: {note}", file=sys.stderr)
    knob = {k: v for k, v in meta["params"].items() if k in ("nprobe", "efSearch")}
    print(f"wrote {config.out}: {meta['kind']} index of {meta['ntotal']} x {meta['dim']} ({meta['metric']}) "
          f"in {meta['build_s']:.1f} s, layer {meta.get('layer_label') or meta['layer']}")
    print(f"  why            {meta['why']}")
    print(f"  parameters     {meta['params']}")
    reached = "reached" if meta["target_reached"] else "NOT reached (the best setting is kept)"
    print(f"  recall@10      {meta['recall_at_10']:.4f} against exact search on {meta['eval_queries']} held-out "
          f"queries; target {meta['target_recall']} {reached}" + (f" with {knob}" if knob else ""))
    return meta


def index_update(config, args) -> dict:
    from embedder.search.update import update_index

    report = update_index(config.cache, config.out, layer=config.layer, kind=config.kind,
                          memory_budget=config.memory_budget, seed=config.seed, progress=config.progress)
    if _as_json(args):
        print_json(report)
        return report
    meta, knob = report["meta"], report["knob"]
    if report["status"] == "up_to_date":
        print(f"{config.out} is up to date: {config.cache} has no rows beyond its {report['ntotal']}; nothing written.")
    else:
        setting = (f"{knob} {report['knob_before']} -> {report['knob_after']}" if report["retuned"]
                   else f"{knob} {report['knob_after']} kept") if knob else "exact search"
        reached = "reached" if meta["target_reached"] else "NOT reached (the best setting is kept)"
        dropped = (f", took out {report['rows_removed']} rows a sync superseded or removed"
                   if report.get("rows_removed") else "")
        print(f"updated {config.out}: added {report['rows_added']} rows{dropped} to the {meta['kind']} index, now "
              f"{report['ntotal']} x {meta['dim']} ({meta['metric']}), in {meta['updates'][-1]['update_s']:.1f} s; "
              f"{setting}; recall@10 {report['recall_at_10']:.4f} against exact search on {meta['eval_queries']} "
              f"{'held-out new' if meta['eval_queries_held_out'] else 'indexed'} queries, target "
              f"{meta['target_recall']} {reached}.")
    for advice in report["advice"]:
        print(f"  a rebuild would be better: {advice}. Rebuild without --update: "
              f"`embedder index {config.cache} --out {config.out}`.")
    return report


def remove(config, args) -> dict:
    from embedder.search.removal import remove_rows

    report = remove_rows(config.cache, config.remove, config.remove_from, config.prune_missing, config.progress)
    if _as_json(args):
        print_json(report)
        return report
    how = "removed in place" if report["removed_in_place"] else "hidden from every search"
    print(f"{config.cache}: {report['newly_removed']} row(s) removed ({how}), "
          f"{report['already_removed']} already removed; {report['removed_rows']} of {report['rows']} rows "
          "removed in all")
    for p in report["paths"]:
        print(f"  {display_path(p)}")
    if report["newly_removed"] > len(report["paths"]):
        print(f"  ... {report['newly_removed'] - len(report['paths'])} more")
    if report["urls_not_checked"]:
        print(f"  {report['urls_not_checked']} URL row(s) not checked (--prune-missing checks files; remove dead "
              "URLs with --remove-from)")
    return report


def search(config, args):
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
    from embedder.errors import ConfigError
    from embedder.models.registry import get_backbone_spec

    built_on = index.meta.get("layer") or index.meta["components"]["layer"]
    if config.layer is not None and get_backbone_spec(index.meta["components"]["model"]).node_name(
            config.layer) != built_on:
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


def dedup(config, args) -> dict:
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
    if _as_json(args):
        print_json(doc)
        return doc
    drop = sum(not e["keep"] for g in doc["groups"] for e in g)
    print(f"{len(found.groups)} near-duplicate groups ({config.metric} {'>=' if config.metric == 'cosine' else '<='} "
          f"{config.threshold}, {found.kind} index), {sum(len(g) for g in found.groups)} images, {drop} to drop"
          + (f" from {config.cache} (duplicates of {config.against})" if config.against else ""))
    for k, g in enumerate(doc["groups"], start=1):
        print(f"group {k} ({len(g)}):")
        for e in g:
            where = f"[{e['cache']}] " if config.against else ""
            print(f"  {'keep' if e['keep'] else 'drop'}  {where}{display_path(e['path'])}")
    return doc


def curate(config, args) -> dict:
    from embedder.curate.run import run_curate

    doc = run_curate(config)
    if _as_json(args):
        print_json(doc)
        return doc
    print(f"{doc['cache']}: {doc['rows']} rows, {doc['labelled']} labelled, {doc['classes']} classes; "
          f"splits: {doc['split_how']}")
    lm = doc["label_mistakes"]
    if "skipped" in lm:
        print(f"  label mistakes  skipped: {lm['skipped']}")
    else:
        print(f"  label mistakes  {lm['issues']} likely (confident learning, {lm['folds']}-fold probe, C {lm['C']:.3g},"
              f" out-of-fold accuracy {100 * lm['out_of_fold_accuracy']:.1f}%)")
        for t in lm["top"][:5]:
            print(f"      {t['label_quality']:.3f}  {t['given_label']} -> {t['suggested_label']}  "
                  f"{display_path(t['path'])}")
    print(f"  outliers        most outlying (cosine distance to neighbour number {doc['outliers']['k']}):")
    for t in doc["outliers"]["top"][:5]:
        print(f"      {t['outlier_score']:.3f}  {display_path(t['path'])}")
    leaks = doc["leaks"]
    if "skipped" in leaks:
        print(f"  leaks           skipped: {leaks['skipped']}")
    else:
        print(f"  leaks           {leaks['count']} val/test rows with a train row at similarity >= "
              f"{leaks['threshold']} ({leaks['by_split']['val']} val, {leaks['by_split']['test']} test)")
        for t in leaks["pairs"][:5]:
            print(f"      {t['similarity']:.3f}  {display_path(t['path'])}  ~  {display_path(t['train_path'])}")
    dup = doc["duplicates"]
    print(f"  duplicates      {dup['groups']} groups (similarity >= {dup['threshold']}), {dup['rows_in_groups']} "
          f"rows, {dup['to_drop']} to drop (--keep {dup['keep']})")
    print(f"wrote {', '.join(doc['files'])} in {doc['out']} ({doc['wall_s']:.1f} s)")
    return doc


def plot(config, args) -> dict:
    from embedder.search.plots import plot_space

    out = config.out or str(Path(config.cache).with_suffix(f".{config.method}.png"))
    path = plot_space(config.cache, out, method=config.method, max_points=config.max_points, seed=config.seed,
                      layer=config.layer, overwrite=config.overwrite, progress=config.progress)
    report = {"out": str(path), "cache": config.cache, "method": config.method, "seed": config.seed}
    print_json(report) if _as_json(args) else print(f"wrote {path}")
    return report


def map_index(config, args) -> dict:
    from embedder.search.maps import compute_map

    report = compute_map(config.index, method=config.method, seed=config.seed, fit_rows=config.fit_rows,
                         progress=config.progress, scores=config.scores)
    if _as_json(args):
        print_json(report)
        return report
    placed = report["mapped"] - report["fitted_on"]
    print(f"wrote {report['map']}: {report['method']} map of {report['mapped']} rows in {report['seconds']:.1f} s"
          + (f" (fitted on {report['fitted_on']}, {placed} placed by the fitted model)" if placed else "")
          + (f", with the curate scores {', '.join(report['scores'])}" if report["scores"] else "")
          + f"; `embedder serve {config.index}` shows it at /map")
    return report


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


def serve(config, args) -> None:
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


# ---------------------------------------------------------------------------------- run


def run(_config, args):
    from embedder.cli.pipeline import run_pipeline

    return run_pipeline(args.pipeline, progress=not args.quiet)
