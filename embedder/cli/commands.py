"""What the CLI commands print. Each function returns the process exit code."""

from __future__ import annotations

import json

from embedder.cache.reader import FeatureCache
from embedder.cli.main import print_json
from embedder.data.sources import describe_ignored
from embedder.extract.config import EmbedConfig
from embedder.models.registry import get_backbone_spec, list_backbones
from embedder.names import display_path


def models(as_json: bool = False) -> int:
    rows = []
    for name in list_backbones():
        spec = get_backbone_spec(name)
        # Non-default output points, shown by their friendliest name (alias if there is one).
        names = {n: n for n in spec.layer_dims if n != spec.default_layer}
        names.update({n: a for a, n in spec.layer_aliases.items() if n in names})
        rows.append(
            {
                "name": name,
                "feature_dim": spec.feature_dim,
                "default_layer": spec.default_layer,
                "other_layers": {a: spec.layer_dims[n] for n, a in names.items()},
                "weights": spec.weights.identity,
                "weights_offline": spec.weights.available_offline(),
                "weights_file": spec.weights.location(),
                "input": f"{spec.preprocessing.crop_size}px ({spec.preprocessing.interpolation})",
            }
        )
    if as_json:
        print_json(rows)
        return 0
    print(f"{'model':<20}{'dim':>6}  {'offline':<8}{'input':<18}{'other layers':<26}weights file")
    for r in rows:
        other = ", ".join(f"{a} ({d})" for a, d in r["other_layers"].items()) or "-"
        print(
            f"{r['name']:<20}{r['feature_dim']:>6}  {'yes' if r['weights_offline'] else 'no':<8}"
            f"{r['input']:<18}{other:<26}{r['weights_file']}"
        )
    missing = [r for r in rows if not r["weights_offline"]]
    if missing:
        print(
            f"\n{len(missing)} models have no pretrained weights on this machine. They download on first use "
            "when there is a network; offline, copy the file to the path shown, pass --weights PATH, "
            "or use --weights none (random init)."
        )
    return 0


def inspect_command(model: str, image_size: int | None = None, weights: str = "none", depth: int | None = None,
                    as_json: bool = False) -> int:
    from embedder.models.inspection import format_inspection, inspect_model

    ins = inspect_model(model, image_size=image_size, weights=weights)
    if as_json:
        print_json(ins.as_dict())
    else:
        print(format_inspection(ins, depth))
    return 0


def embed_command(config: EmbedConfig, as_json: bool = False, ray_options=None, lock=None,
                  command: str | None = None) -> int:
    """`lock`: the cache's write lock, already taken by the CLI; `command`: the command line, as typed."""
    if ray_options is not None:
        from embedder.extract.ray import embed_ray

        report = embed_ray(config, ray_options, command=command, lock=lock)
    else:
        from embedder.extract.core import embed

        report = embed(config, command=command, lock=lock)
    if as_json:
        print_json(report.as_dict())
    else:
        print(report.summary())
    return 0


def merge_command(cache: str, out: str, overwrite: bool = False) -> int:
    from embedder.cache.shards import merge_cache

    rows = merge_cache(cache, out, overwrite=overwrite)
    print(f"wrote {out}: {rows} rows, one self-contained file (same fingerprint as {cache})")
    return 0


def info(path: str, list_errors: bool = False, as_json: bool = False) -> int:
    with FeatureCache(path, require_complete=False) as cache:
        errors = cache.errors
        labels = cache.labels
        doc = {
            "path": str(path),
            "rows": len(cache),
            "dim": cache.dim,
            "dtype": str(cache.attrs["feature_dtype"]),
            "complete": cache.complete,
            "fingerprint": cache.file_fingerprint,
            "components": cache.file_components,
            "layers": cache.layers,
            "source": cache.source,
            "layout": str(cache.attrs["layout"]),
            "classes": cache.classes,
            "rows_per_class": {c: int((labels == i).sum()) for i, c in enumerate(cache.classes)},
            "unlabelled_rows": int((labels < 0).sum()),
            "errors": len(errors),
            "ignored": cache.ignored_counts,
            "command": str(cache.attrs["command"]),
            "writer_pid": None if cache.complete else cache.writer_pid,
        }
        if "shards" in cache.attrs:  # a view over the shards of a --backend ray run
            doc["shards"] = int(cache.attrs["shards"])
        if list_errors:
            doc["error_list"] = [{"path": p, "reason": r} for p, r in errors]
    if as_json:
        print_json(doc)
        return 0
    if doc["complete"]:
        state = "complete"
    elif doc["writer_pid"] is not None:
        state = f"INCOMPLETE (being written right now by embedder pid {doc['writer_pid']}; rows so far shown)"
    else:
        state = "INCOMPLETE (interrupted run; rerun its command to finish)"
    print(f"{path}: {doc['rows']} x {doc['dim']} {doc['dtype']}, {state}")
    print(f"  fingerprint  {doc['fingerprint'][:16]}")
    if len(doc["layers"]) > 1:
        print("  layers       " + ", ".join(f"{n} ({d})" for n, d in doc["layers"].items())
              + "  (the first is /features; pick one with --layer in probe, index, search)")
    order = ["model", "weights", "layer", "pooling", "normalization", "preprocessing", "decoder", "precision",
             "memory_layout", "device_type", "feature_dtype"]
    components = sorted(doc["components"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99)
    for key, value in components:
        if key == "preprocessing":
            value = ", ".join(f"{k}={v}" for k, v in json.loads(value).items())
        print(f"  {key:<20} {value}")
    print(f"  source       {doc['source']} ({doc['layout']})")
    if "shards" in doc:
        print(f"  sharded      view over {doc['shards']} finished shards in {path}.shards/ (embedder merge "
              "makes one file)")
    if doc["classes"]:
        shown = ", ".join(f"{c} ({n})" for c, n in list(doc["rows_per_class"].items())[:12])
        more = f" ... {len(doc['classes']) - 12} more" if len(doc["classes"]) > 12 else ""
        print(f"  classes      {len(doc['classes'])}: {shown}{more}")
    if doc["unlabelled_rows"]:
        print(f"  unlabelled   {doc['unlabelled_rows']} rows")
    hint = "" if list_errors or not doc["errors"] else " (list them with --errors)"
    print(f"  errors       {doc['errors']}{hint}")
    for e in doc.get("error_list", []):
        print(f"    {display_path(e['path'])}: {e['reason']}")
    if doc["ignored"]:
        print(f"  ignored      {describe_ignored(doc['ignored'])}: files under SOURCE that are not rows")
    return 0


def probe_command(config, as_json: bool = False) -> int:
    from embedder.learn.metrics import format_table
    from embedder.learn.runner import run_probe

    report = run_probe(config)
    if as_json:
        print_json(report)
    else:
        print(format_table(report))
    return 0


def evaluate_command(probe_dir: str, cache: str, as_json: bool = False) -> int:
    from embedder.learn.runner import evaluate_probe

    result = evaluate_probe(probe_dir, cache)
    if as_json:
        print_json(result)
    else:
        acc = result["accuracy"]
        print(f"{cache}: {result['rows']} rows, accuracy {'-' if acc is None else f'{100 * acc:.2f}%'}")
    return 0


def export_command(probe_dir: str, out: str, weights: str | None) -> int:
    from embedder.learn.export import export_probe

    path = export_probe(probe_dir, out, weights)
    print(f"wrote {path}: backbone + linear head, ready for `embedder predict {path} IMAGE...`")
    return 0


def _expand_images(items: list[str]) -> list[str]:
    from pathlib import Path

    from embedder.data.sources import is_image_name
    from embedder.errors import SourceError

    paths = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            paths += sorted(str(q) for q in p.rglob("*") if q.is_file() and is_image_name(q.name))
        else:
            paths.append(item)
    if not paths:
        raise SourceError("No images given (files or folders of images).")
    return paths


def predict_command(model_path: str, images: list[str], top_k: int = 1, batch_size: int = 32,
                    device: str = "auto", as_json: bool = False) -> int:
    import numpy as np
    import torch

    from embedder.errors import AllImagesFailedError
    from embedder.extract.core import embed_images
    from embedder.learn.checkpoint import load_classifier

    classifier = load_classifier(model_path, device=device)
    paths = _expand_images(images)
    logits, errors = embed_images(classifier.network, paths, batch_size=batch_size)
    failed = {p for p, _ in errors}
    ok_paths = [p for p in paths if p not in failed]
    proba = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    k = max(1, min(top_k, len(classifier.classes)))
    results = []
    for path, p in zip(ok_paths, proba):
        order = np.argsort(-p)[:k]
        results.append({"path": path, "label": classifier.classes[order[0]], "probability": float(p[order[0]]),
                        "top": [{"label": classifier.classes[i], "probability": float(p[i])} for i in order]})
    results += [{"path": p, "error": reason} for p, reason in errors]
    if as_json:
        print_json(results)
    else:
        for r in results:
            if "error" in r:
                print(f"{display_path(r['path'])}\tERROR\t{r['error']}")
            else:
                extra = "  ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top"][1:])
                print(f"{display_path(r['path'])}\t{r['label']}\t{r['probability']:.3f}" + (f"\t({extra})" if extra else ""))
    if not ok_paths:
        raise AllImagesFailedError("None of the images could be read.")
    return 0


def index_command(cache: str, out: str, kind: str, metric: str, memory_budget: str | None, target_recall: float,
                  seed: int, progress: bool, as_json: bool, on_disk: bool = False, layer: str | None = None) -> int:
    from embedder.options import parse_size
    from embedder.search.build import build_index

    meta = build_index(cache, out, kind=kind, metric=metric,
                       memory_budget=parse_size(memory_budget) if memory_budget else None,
                       target_recall=target_recall, seed=seed, progress=progress, on_disk=on_disk, layer=layer)
    if as_json:
        print_json(meta)
        return 0
    knob = {k: v for k, v in meta["params"].items() if k in ("nprobe", "efSearch")}
    print(f"wrote {out}: {meta['kind']} index of {meta['ntotal']} x {meta['dim']} ({meta['metric']}) "
          f"in {meta['build_s']:.1f} s, layer {meta['layer']}")
    print(f"  why            {meta['why']}")
    print(f"  parameters     {meta['params']}")
    reached = "reached" if meta["target_reached"] else "NOT reached (the best setting is kept)"
    print(f"  recall@10      {meta['recall_at_10']:.4f} against exact search on {meta['eval_queries']} held-out "
          f"queries; target {meta['target_recall']} {reached}" + (f" with {knob}" if knob else ""))
    return 0


def search_command(index_dir: str, images: list[str] | None, path: str | None, row_id: int | None,
                   vector: str | None, k: int, as_json: bool, grid: str | None, weights: str | None,
                   layer: str | None = None) -> int:
    import numpy as np

    from embedder.errors import ConfigError
    from embedder.models.registry import get_backbone_spec
    from embedder.search.query import SearchIndex

    index = SearchIndex.open(index_dir, weights_path=weights)
    built_on = index.meta.get("layer") or index.meta["components"]["layer"]
    if layer is not None and get_backbone_spec(index.meta["components"]["model"]).node_name(layer) != built_on:
        raise ConfigError(f"{index_dir} indexes the layer {built_on!r}, not {layer!r}. Build an index of that "
                          f"layer with `embedder index CACHE.h5 --layer {layer} --out DIR`.")
    errors: list[tuple[str, str]] = []
    if images:
        results, errors = index.search_files(_expand_images(images), k=k)
        queries = [(str(f), hits) for f, hits in results]
    elif path is not None:
        queries = [(str(index.image_path(index.row_of_path(path))), index.search_ids([index.row_of_path(path)], k)[0])]
    elif row_id is not None:
        queries = [(str(index.image_path(row_id)), index.search_ids([row_id], k)[0])]
    else:
        vec = np.load(vector)
        queries = [(None, hits) for hits in index.search(np.atleast_2d(vec), k)]
    if as_json:
        import json
        import sys

        for q, hits in queries:  # JSON lines: one query per line, streams well for batch mode
            sys.stdout.write(json.dumps({"query": q, "hits": [h.as_dict() for h in hits]}) + "\n")
        for q, reason in errors:
            sys.stdout.write(json.dumps({"query": q, "error": reason}) + "\n")
    else:
        for q, hits in queries:
            print(f"query: {display_path(q or vector)}")
            for h in hits:
                print(f"  {h.rank:>3}  {h.score:>8.4f}  {h.label or '-':<12} {display_path(h.path)}")
        for q, reason in errors:
            print(f"query: {display_path(q)}\n  ERROR {reason}")
    if grid:
        from embedder.search.plots import result_grid

        result_grid(queries[:10], lambda h: index.image_path(h.id), grid)
        if not as_json:
            print(f"grid: {grid}")
    return 0


def dedup_command(cache: str, threshold: float, metric: str, as_json: bool, layer: str | None = None) -> int:
    from embedder.search.dedup import near_duplicates

    groups = near_duplicates(cache, threshold, metric, layer=layer)
    with FeatureCache(cache) as c:
        paths = c.paths
    doc = [[paths[i] for i in g] for g in groups]
    if as_json:
        print_json({"threshold": threshold, "metric": metric, "groups": doc})
        return 0
    print(f"{len(groups)} near-duplicate groups ({metric} {'>=' if metric == 'cosine' else '<='} {threshold}), "
          f"{sum(len(g) for g in groups)} images")
    for n, g in enumerate(doc, start=1):
        print(f"group {n} ({len(g)}):")
        for p in g:
            print(f"  {display_path(p)}")
    return 0


def plot_command(cache: str, method: str, out: str | None, max_points: int, layer: str | None = None) -> int:
    from pathlib import Path

    from embedder.search.plots import plot_space

    out = out or str(Path(cache).with_suffix(f".{method}.png"))
    print(f"wrote {plot_space(cache, out, method=method, max_points=max_points, layer=layer)}")
    return 0
