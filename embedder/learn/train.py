"""Training on cached features: `embedder probe`, and applying a saved probe to another cache.

`run_probe` trains one layer (embedder.learn.trainer) or, with `--layer all`, every layer
(embedder.learn.sweep), into PROBE_DIR; `evaluate_probe` applies what PROBE_DIR holds to another cache.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np

from embedder.cache.fingerprint import component_differences
from embedder.cache.reader import FeatureCache
from embedder.errors import CacheMismatchError, ConfigError
from embedder.learn.config import ALL_LAYERS, ProbeConfig
from embedder.learn.metrics import accuracy
from embedder.learn.probefile import PROBE_FILE, SKLEARN_FILE, SWEEP_FILE, read_probe
from embedder.learn.sweep import run_layer_sweep
from embedder.learn.trainer import REPORT_FILE, train_probe
from embedder.outputs import CACHE, PROBE, claim, expect, write_dir


def run_probe(config: ProbeConfig) -> dict:
    """Train and save a probe. PROBE_DIR is written as a whole: the files go into a temporary
    folder that replaces PROBE_DIR in one step, so a kill leaves the old folder or the new one."""
    if config.layer == ALL_LAYERS:
        return run_layer_sweep(config)
    # Every cache opened for the run is closed when it ends, also on errors: pipelines run many steps.
    expect(config.cache, CACHE)  # the input first: an index folder given as CACHE is named as one
    claim(config.out_dir, PROBE, [config.cache], config.overwrite)  # before any cache is read
    with write_dir(config.out_dir, PROBE, [config.cache], config.overwrite) as (tmp, _), \
            contextlib.ExitStack() as stack:
        return train_probe(config, lambda path: stack.enter_context(FeatureCache(path, layer=config.layer)), tmp)


def evaluate_probe(probe_dir: str | os.PathLike, cache_path: str | os.PathLike) -> dict:
    """Apply a saved probe (or sklearn classifier) to another cache of the same feature space."""
    probe_dir = Path(probe_dir)
    layer = _trained_layer(probe_dir)
    with FeatureCache(cache_path) as cache:
        if layer is None or layer not in cache.layers or layer == cache.layer:
            return _evaluate(probe_dir, cache)
    with FeatureCache(cache_path, layer=layer) as cache:  # the layer the classifier was trained on
        return _evaluate(probe_dir, cache)


def _trained_layer(probe_dir: Path) -> str | None:
    report = probe_dir / REPORT_FILE
    if report.is_file():
        try:
            return json.loads(report.read_text()).get("layer")
        except (OSError, json.JSONDecodeError):
            return None
    return None


def _saved_classifier(probe_dir: Path):
    """(classes, components, predict: features -> class codes) of the classifier saved in `probe_dir`."""
    if (probe_dir / PROBE_FILE).is_file():
        probe = read_probe(probe_dir)
        W, b = probe.coef.numpy(), probe.intercept.numpy()

        def predict(X):
            return np.argmax(X @ W.T + b, axis=1)

        return probe.classes, probe.components, predict
    if (probe_dir / SKLEARN_FILE).is_file():
        import joblib

        saved = joblib.load(probe_dir / SKLEARN_FILE)
        return saved["classes"], saved["components"], saved["model"].predict
    if (probe_dir / SWEEP_FILE).is_file():
        layers = [r["layer"] for r in json.loads((probe_dir / SWEEP_FILE).read_text())["layers"]]
        raise ConfigError(f"{probe_dir} holds a layer sweep (--layer all): one classifier per layer. Pass one of its "
                          f"folders, e.g. {probe_dir / layers[0]}.")
    raise ConfigError(f"No probe or classifier in {probe_dir}.")


def _evaluate(probe_dir: Path, cache: FeatureCache) -> dict:
    classes, components, predict = _saved_classifier(probe_dir)
    diff = component_differences(cache.components, components)  # (the cache's, the classifier's): as shown
    if diff:
        raise CacheMismatchError(cache.path, diff, f"The classifier in {probe_dir} was trained on features of "
                                 "another configuration; embed the images with the same settings first.")
    labels = cache.labels
    remap = np.array([classes.index(c) if c in classes else -2 for c in cache.classes] + [-1])
    codes = remap[labels]
    preds = np.concatenate([predict(b.features) for b in cache.iter_blocks()]) if len(cache) else np.zeros(0, int)
    known = codes >= 0
    return {
        "cache": str(cache.path),
        "rows": len(cache),
        "accuracy": accuracy(codes[known], preds[known]) if known.any() else None,
        "predictions": [classes[i] for i in preds],
        "paths": cache.paths,
    }
