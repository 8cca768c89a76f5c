"""What the CLI commands print. Each function returns the process exit code."""

from __future__ import annotations

import json

from embedder.cache import FeatureCache
from embedder.cli import print_json
from embedder.config import EmbedConfig
from embedder.registry import get_backbone_spec, list_backbones


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


def embed_command(config: EmbedConfig, as_json: bool = False) -> int:
    from embedder.extract import embed

    report = embed(config)
    if as_json:
        print_json(report.as_dict())
    else:
        print(report.summary())
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
            "fingerprint": cache.fingerprint,
            "components": cache.components,
            "source": cache.source,
            "layout": str(cache.attrs["layout"]),
            "classes": cache.classes,
            "rows_per_class": {c: int((labels == i).sum()) for i, c in enumerate(cache.classes)},
            "unlabelled_rows": int((labels < 0).sum()),
            "errors": len(errors),
            "command": str(cache.attrs["command"]),
        }
        if list_errors:
            doc["error_list"] = [{"path": p, "reason": r} for p, r in errors]
    if as_json:
        print_json(doc)
        return 0
    state = "complete" if doc["complete"] else "INCOMPLETE (interrupted run; rerun its command to finish)"
    print(f"{path}: {doc['rows']} x {doc['dim']} {doc['dtype']}, {state}")
    print(f"  fingerprint  {doc['fingerprint'][:16]}")
    order = ["model", "weights", "layer", "pooling", "normalization", "preprocessing", "decoder", "precision",
             "memory_layout", "device_type", "feature_dtype"]
    components = sorted(doc["components"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99)
    for key, value in components:
        if key == "preprocessing":
            value = ", ".join(f"{k}={v}" for k, v in json.loads(value).items())
        print(f"  {key:<20} {value}")
    print(f"  source       {doc['source']} ({doc['layout']})")
    if doc["classes"]:
        shown = ", ".join(f"{c} ({n})" for c, n in list(doc["rows_per_class"].items())[:12])
        more = f" ... {len(doc['classes']) - 12} more" if len(doc["classes"]) > 12 else ""
        print(f"  classes      {len(doc['classes'])}: {shown}{more}")
    if doc["unlabelled_rows"]:
        print(f"  unlabelled   {doc['unlabelled_rows']} rows")
    print(f"  errors       {doc['errors']}" + ("" if list_errors or not doc["errors"] else " (list them with --errors)"))
    for e in doc.get("error_list", []):
        print(f"    {e['path']}: {e['reason']}")
    return 0
