"""`embedder probe CACHE.h5 --layer all`: the same probe on every layer of a multi-layer cache.

Which layer transfers best to a dataset is an empirical question; a multi-layer cache
(`embed --layer A --layer B ...`) holds the answer's inputs. Every layer is trained with the
same classifier on the same split (the split depends on paths, labels and seed only), and
the best layer is the one with the best *validation* accuracy: picking by test accuracy
would tune on the test rows.

PROBE_DIR holds one probe folder per layer (PROBE_DIR/<layer>/, as `embedder probe --layer
<layer>` writes it), `sweep.json` and the plot `layers.png` (or `--plot PATH`). The whole
folder is staged and replaces PROBE_DIR in one step.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import replace
from pathlib import Path

from embedder.cache.reader import FeatureCache
from embedder.learn.config import ProbeConfig
from embedder.learn.probefile import SWEEP_FILE
from embedder.learn.trainer import train_probe
from embedder.outputs import CACHE, PICTURE, PROBE, claim, expect, png_metadata, write_dir, write_file
from embedder.progress import bar


def cache_layers(path: str) -> dict[str, int]:
    """{layer: width} of a cache, in the order it stores them (the primary layer first)."""
    with FeatureCache(path) as cache:
        return dict(cache.layers) if cache.layers else {cache.layer: cache.dim}


def run_layer_sweep(config: ProbeConfig) -> dict:
    t0 = time.perf_counter()
    layers = cache_layers(config.cache)
    out = config.out_dir
    rows, reports = [], {}
    expect(config.cache, CACHE)
    claim(out, PROBE, [config.cache], config.overwrite)
    if config.plot_path.absolute().parent != out.absolute():
        claim(config.plot_path, PICTURE, [config.cache], config.overwrite, flag="--plot")
    with write_dir(out, PROBE, [config.cache], config.overwrite) as (tmp, _), \
            bar(desc="probe: layers", unit="layer", total=len(layers), enabled=config.progress) as shown:
        for name, dim in layers.items():
            folder = _folder_name(name)
            layer_config = replace(config, layer=name, out=str(out / folder), plot=None)
            (tmp / folder).mkdir()
            with contextlib.ExitStack() as stack:
                report = train_probe(
                    layer_config, lambda p, n=name: stack.enter_context(FeatureCache(p, layer=n)), tmp / folder)
            reports[name] = report
            rows.append({"layer": name, "dim": dim, "val_accuracy": report["val_accuracy"],
                         "test_accuracy": report["test_accuracy"], "chosen": report["chosen"],
                         "fit_s": report["fit_s"], "wall_s": report["wall_s"], "out": str(out / folder)})
            shown.update(1)
        best = max(rows, key=lambda r: r["val_accuracy"])  # first of equals: the earlier layer
        plot = config.plot_path
        in_dir = plot.absolute().parent == out.absolute()
        sweep = {
            "sweep": "layer", "classifier": config.classifier, "cache": str(config.cache),
            "splits": next(iter(reports.values()))["splits"], "layers": rows, "best": best["layer"],
            "val_accuracy": best["val_accuracy"], "test_accuracy": best["test_accuracy"],
            "plot": str(plot), "out": str(out), "wall_s": None,
        }
        title = f"{config.classifier} on {Path(config.cache).name}"
        if in_dir:
            save_layer_plot(rows, best["layer"], tmp / plot.name, title, [config.cache])
        else:  # a file of its own elsewhere: written atomically as well
            with write_file(plot, PICTURE, [config.cache], config.overwrite, flag="--plot") as tmp_png:
                save_layer_plot(rows, best["layer"], tmp_png, title, [config.cache])
        sweep["wall_s"] = time.perf_counter() - t0
        (tmp / SWEEP_FILE).write_text(json.dumps(sweep, indent=2))
    return sweep


def _folder_name(layer: str) -> str:
    """A layer name as one path component (node names hold dots, never slashes, but be sure)."""
    return layer.replace("/", "_").replace("\\", "_") if layer not in (".", "..") else f"layer_{layer}"


def save_layer_plot(rows: list[dict], best: str, path: Path, title: str, inputs=()) -> Path:
    """Validation and test accuracy per layer, in the cache's layer order, the best one marked."""
    from embedder.figures import pyplot

    names = [r["layer"] for r in rows]
    x = range(len(rows))
    fig, ax = pyplot().subplots(figsize=(max(5.0, 0.9 * len(rows) + 2), 4), dpi=110)
    for key, label, style in (("val_accuracy", "validation", "o-"), ("test_accuracy", "test", "s--")):
        values = [r[key] for r in rows]
        if any(v is not None for v in values):
            ax.plot(x, [100 * v if v is not None else float("nan") for v in values], style, label=label)
    b = names.index(best)
    ax.axvline(b, color="0.6", lw=1, ls=":")
    ax.annotate("best (val)", (b, 100 * rows[b]["val_accuracy"]), textcoords="offset points", xytext=(-4, 6), ha="right")
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set_xlabel("layer (in the order the cache stores them)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", metadata=png_metadata(inputs))  # the name may be a temporary one
    pyplot().close(fig)
    return path


def format_sweep(sweep: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    s = sweep["splits"]
    lines = [(f"{sweep['classifier']} on every layer of {sweep['cache']}  ({s['how']}: {s['train']} train / "
              f"{s['val']} val / {s['test']} test)"),
             f"    {'layer':<24}{'dim':>7}{'val acc':>10}{'test acc':>10}{'fit s':>8}{'wall s':>8}"]
    for r in sweep["layers"]:
        mark = "*" if r["layer"] == sweep["best"] else " "
        lines.append(f"  {mark} {r['layer'][:24]:<24}{r['dim']:>7}{pct(r['val_accuracy']):>10}"
                     f"{pct(r['test_accuracy']):>10}{r['fit_s']:>8.2f}{r['wall_s']:>8.2f}")
    lines.append(f"  * best on validation: {sweep['best']}")
    lines.append(f"  plot: {sweep['plot']}")
    lines.append(f"  saved to: {sweep['out']} (one probe folder per layer)")
    return "\n".join(lines)
