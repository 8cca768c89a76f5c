"""One probe on one layer: what `embedder probe` and the layer sweep (`--layer all`) both run.

Loads the cache(s), checks that train/val/test caches share one feature space, assigns the
split (embedder.data.splits), trains the linear probe or a scikit-learn classifier, reports
train/val/test accuracy with per-class precision and recall, and saves the model with its
metadata (classes, cache fingerprint, chosen regularisation) into a staging folder that the
caller (embedder.learn.train.run_probe, embedder.learn.sweep.run_layer_sweep) puts in place.
"""

from __future__ import annotations

import functools
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from embedder.cache.fingerprint import component_differences
from embedder.cache.reader import FeatureCache
from embedder.data.splits import Splits, assign_splits, check_labels
from embedder.errors import CacheMismatchError, ConfigError
from embedder.learn.classifiers import fit_classifier, fit_on_validation
from embedder.learn.config import KNN_VOTE, ProbeConfig
from embedder.learn.fewshot import few_shot
from embedder.learn.knn import KNNVote
from embedder.learn.metrics import accuracy, per_class, save_confusion_png, split_metrics
from embedder.learn.probe import LinearProbe
from embedder.learn.probefile import PROBE_FILE, SKLEARN_FILE, ProbeFile, write_probe
from embedder.progress import bar, stage

REPORT_FILE = "report.json"


def same_feature_space(a: FeatureCache, b: FeatureCache, what: str) -> None:
    """Caches of one training run must come from one backbone configuration."""
    diff = component_differences(a.components, b.components)
    if diff:
        raise CacheMismatchError(
            b.path, diff, f"The {what} must be embedded with the same configuration as {a.path} (same fingerprint)."
        )


@dataclass
class _Rows:
    cache: FeatureCache
    rows: np.ndarray  # sorted row indices into the cache
    codes: np.ndarray  # label codes in the run's class list

    def load(self) -> np.ndarray:
        return self.cache.features(self.rows) if len(self.rows) else np.zeros((0, self.cache.dim), np.float32)

    def blocks(self, block_rows: int):
        for start in range(0, len(self.rows), block_rows):
            sel = self.rows[start : start + block_rows]
            # One contiguous read, then a selection in memory: far faster than HDF5 point selection.
            span = self.cache.features(slice(int(sel[0]), int(sel[-1]) + 1))
            yield span[sel - sel[0]], self.codes[start : start + block_rows]


def _plan(config: ProbeConfig, train_cache: FeatureCache, open_cache):
    """(classes, train rows, val rows, test rows, Splits) for the run."""
    labels = train_cache.labels
    classes = train_cache.classes
    check_labels(labels, classes, str(train_cache.path))
    if config.val_cache is None:
        if config.test_cache is not None:
            raise ConfigError("--test-cache needs --val-cache as well.")
        splits = assign_splits(train_cache.paths, labels, classes, config.seed, config.val_fraction, config.test_fraction)
        parts = [_Rows(train_cache, r, labels[r]) for r in (splits.train, splits.val, splits.test)]
        return classes, parts, splits

    def rows_of(cache: FeatureCache, what: str) -> _Rows:
        same_feature_space(train_cache, cache, what)
        lab = cache.labels
        check_labels(lab, cache.classes, str(cache.path))
        unknown = sorted(set(cache.classes) - set(classes))
        if unknown:
            raise ConfigError(f"{cache.path} has classes that the training cache lacks: {unknown}.")
        remap = np.array([classes.index(c) for c in cache.classes] + [-1])
        rows = np.flatnonzero(lab >= 0)
        return _Rows(cache, rows, remap[lab[rows]])

    train_rows = np.flatnonzero(labels >= 0)
    val = rows_of(open_cache(config.val_cache), "validation cache")
    test = rows_of(open_cache(config.test_cache), "test cache") if config.test_cache else None
    parts = [_Rows(train_cache, train_rows, labels[train_rows]), val,
             test or _Rows(train_cache, np.zeros(0, np.int64), np.zeros(0, np.int64))]
    splits = Splits(train_rows, val.rows, parts[2].rows, "separate caches")
    return classes, parts, splits


def train_probe(config: ProbeConfig, open_cache, tmp: Path) -> dict:
    """Train one classifier on `config.layer` of `config.cache` and write its files and report.json into
    `tmp` (a staging folder that the caller moves into place). `open_cache(path)` opens a cache and keeps
    it open until the caller's run ends."""
    t_start = time.perf_counter()
    cache = open_cache(config.cache)
    classes, (train, val, test), splits = _plan(config, cache, open_cache)
    unlabelled = int((cache.labels < 0).sum())
    if unlabelled:
        warnings.warn(f"{unlabelled} unlabelled rows of {cache.path} are left out of training.", stacklevel=2)
    for name, part in (("training", train), ("validation", val)):
        if len(np.unique(part.codes)) < 2:
            raise ConfigError(f"The {name} rows hold a single class; a classifier needs at least two.")
    if config.shots and not len(test.rows):  # refused before the full run, not after it
        raise ConfigError("Few-shot accuracy is measured on test rows; this split has none. Give --test-fraction "
                          "above 0, a test/ folder, or --test-cache.")
    X_val, X_test = val.load(), test.load()
    fit = {"probe": _fit_probe, KNN_VOTE: functools.partial(_fit_knn, test_codes=test.codes)}.get(
        config.classifier, _fit_sklearn)
    fitted = fit(config, cache, classes, train, X_val, val.codes, X_test, tmp)
    report = _report(config, cache, classes, splits, (train, val, test), fitted, tmp)
    if config.shots:
        report["few_shot"] = _few_shot(config, classes, (train, val, test), X_val, X_test)
    report["wall_s"] = time.perf_counter() - t_start
    (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report


@dataclass
class _Fitted:
    """What either trainer hands to the report; predictions are codes into the run's class list."""

    train_pred: np.ndarray
    val_pred: np.ndarray
    test_pred: np.ndarray | None  # None without test rows
    chosen: dict  # the hyper-parameters the validation picked
    extra: dict  # trainer-specific report fields
    fit_s: float
    # Class scores for top-5 (predict_proba or decision_function), columns ordered as score_labels
    # (codes); None for a classifier that has neither.
    val_scores: np.ndarray | None = None
    test_scores: np.ndarray | None = None
    score_labels: np.ndarray | None = None


def _fit_probe(config: ProbeConfig, cache: FeatureCache, classes: list[str], train: _Rows, X_val: np.ndarray,
               val_codes: np.ndarray, X_test: np.ndarray, tmp: Path) -> _Fitted:
    """The PyTorch linear probe, in memory or streamed from the cache (--memory-budget); saves probe.pt."""
    t_fit = time.perf_counter()
    names = np.asarray(classes, dtype=object)
    probe = LinearProbe(Cs=config.Cs, random_state=config.seed, device=config.device)
    streamed = len(train.rows) * cache.dim * 4 > config.memory_budget
    with bar(desc="probe: C sweep", unit="C", total=len(config.Cs), enabled=config.progress) as shown:
        if not streamed:
            X_train = train.load()
            probe.fit(X_train, names[train.codes], X_val, names[val_codes], progress=shown)
        else:
            # A block is a quarter of the budget: it exists in a few copies at once (the read, its
            # selection, the standardised tensor).
            block_rows = max(1, config.memory_budget // (4 * cache.dim * 4))
            probe.fit_blocks(lambda: train.blocks(block_rows), names, cache.dim, val=(X_val, val_codes),
                             progress=shown)
    if not streamed:
        train_pred = probe.predict(X_train)
    else:
        train_pred = np.concatenate([probe.predict(X) for X, _ in train.blocks(block_rows)])
    fit_s = time.perf_counter() - t_fit
    to_codes = {c: i for i, c in enumerate(classes)}

    def codes(pred) -> np.ndarray:
        return np.array([to_codes[c] for c in pred], dtype=np.int64)

    write_probe(tmp / PROBE_FILE, ProbeFile(
        coef=torch.from_numpy(probe.coef_), intercept=torch.from_numpy(probe.intercept_), classes=list(classes),
        model=cache.components["model"], layer=cache.components["layer"], fingerprint=cache.fingerprint,
        components=cache.components, C=float(probe.C_),
    ))
    return _Fitted(
        train_pred=codes(train_pred),
        val_pred=codes(probe.predict(X_val)),
        test_pred=codes(probe.predict(X_test)) if len(X_test) else None,
        chosen={"C": probe.C_, "weight_decay": 1.0 / (probe.C_ * len(train.rows)), "streamed": streamed},
        extra={"cv_results": probe.cv_results_},
        fit_s=fit_s,
        val_scores=probe.predict_proba(X_val),
        test_scores=probe.predict_proba(X_test) if len(X_test) else None,
        score_labels=codes(probe.classes_),
    )


def _fit_sklearn(config: ProbeConfig, cache: FeatureCache, classes: list[str], train: _Rows, X_val: np.ndarray,
                 val_codes: np.ndarray, X_test: np.ndarray, tmp: Path) -> _Fitted:
    """A scikit-learn classifier tuned by cross-validation on the training rows; saves classifier.joblib."""
    import joblib

    t_fit = time.perf_counter()
    X_train = train.load()
    with stage(f"probe: cross-validated {config.classifier}", enabled=config.progress):
        search = fit_classifier(config.classifier, X_train, train.codes, config.seed)
    fit_s = time.perf_counter() - t_fit
    joblib.dump({"model": search.best_estimator_, "classes": classes, "fingerprint": cache.fingerprint,
                 "components": cache.components}, tmp / SKLEARN_FILE)
    return _Fitted(
        train_pred=search.predict(X_train),
        val_pred=search.predict(X_val),
        test_pred=search.predict(X_test) if len(X_test) else None,
        chosen={k.removeprefix("clf__"): v for k, v in search.best_params_.items()},
        extra={"cv_best_accuracy": float(search.best_score_)},
        fit_s=fit_s,
        val_scores=_class_scores(search.best_estimator_, X_val),
        test_scores=_class_scores(search.best_estimator_, X_test) if len(X_test) else None,
        score_labels=search.best_estimator_.classes_,
    )


def _class_scores(model, X: np.ndarray) -> np.ndarray | None:
    """What top-5 ranks: probabilities, else decision scores; None when the model has neither."""
    for method in ("predict_proba", "decision_function"):
        if hasattr(model, method):
            return np.asarray(getattr(model, method)(X))
    return None


def _fit_knn(config: ProbeConfig, cache: FeatureCache, classes: list[str], train: _Rows, X_val: np.ndarray,
             val_codes: np.ndarray, X_test: np.ndarray, tmp: Path, test_codes: np.ndarray) -> _Fitted:
    """DINOv2's k-NN vote, k chosen on the validation rows; every k is reported; saves classifier.joblib."""
    import joblib

    t_fit = time.perf_counter()
    X_train = train.load()
    knn = KNNVote(ks=config.ks, temperature=config.temperature, random_state=config.seed)
    knn.fit(X_train, train.codes, X_val, val_codes)
    fit_s = time.perf_counter() - t_fit
    joblib.dump({"model": knn, "classes": classes, "fingerprint": cache.fingerprint,
                 "components": cache.components}, tmp / SKLEARN_FILE)
    val_by_k = knn.accuracy_by_k(X_val, val_codes)
    test_by_k = knn.accuracy_by_k(X_test, test_codes) if len(X_test) else {}
    return _Fitted(
        train_pred=knn.predict(X_train),
        val_pred=knn.predict(X_val),
        test_pred=knn.predict(X_test) if len(X_test) else None,
        chosen={"k": int(knn.k_), "temperature": knn.temperature},
        extra={"cv_results": knn.cv_results_, "accuracy_by_k": {
            str(k): {"k_used": min(k, len(train.rows)), "val": val_by_k[k], "test": test_by_k.get(k)}
            for k in val_by_k}},
        fit_s=fit_s,
        val_scores=knn.predict_proba(X_val),
        test_scores=knn.predict_proba(X_test) if len(X_test) else None,
        score_labels=knn.classes_,
    )


def _report(config: ProbeConfig, cache: FeatureCache, classes: list[str], splits: Splits,
            parts: tuple[_Rows, _Rows, _Rows], fitted: _Fitted, tmp: Path) -> dict:
    """report.json (without wall_s) and the confusion matrix, on the test rows or else the validation rows."""
    train, val, test = parts
    if fitted.test_pred is not None:
        eval_codes, eval_pred, evaluated_on = test.codes, fitted.test_pred, "test"
    else:
        eval_codes, eval_pred, evaluated_on = val.codes, fitted.val_pred, "val"
    png = save_confusion_png(eval_codes, eval_pred, classes, tmp / "confusion_matrix.png",
                             f"{config.classifier} on {Path(config.cache).name} ({evaluated_on})")
    out = config.out_dir  # where tmp ends up: the report names the final paths
    return {
        "classifier": config.classifier,
        "cache": str(config.cache),
        "fingerprint": cache.fingerprint,
        "model": cache.components.get("model"),
        "layer": cache.components.get("layer"),
        "classes": classes,
        "splits": splits.as_dict(),
        "train_accuracy": accuracy(train.codes, fitted.train_pred),
        "val_accuracy": accuracy(val.codes, fitted.val_pred),
        "test_accuracy": accuracy(test.codes, fitted.test_pred) if fitted.test_pred is not None else None,
        "evaluated_on": evaluated_on,
        "per_class": per_class(eval_codes, eval_pred, classes),
        "metrics": {
            "val": split_metrics(val.codes, fitted.val_pred, fitted.val_scores, fitted.score_labels, len(classes)),
            "test": split_metrics(test.codes, fitted.test_pred, fitted.test_scores, fitted.score_labels, len(classes))
            if fitted.test_pred is not None else None,
        },
        "chosen": fitted.chosen,
        "fit_s": fitted.fit_s,
        "wall_s": None,  # set by the caller once everything but the report is done
        "confusion_png": str(out / Path(png).name),
        "out": str(out),
        **fitted.extra,
    }


def _few_shot(config: ProbeConfig, classes: list[str], parts: tuple[_Rows, _Rows, _Rows], X_val: np.ndarray,
              X_test: np.ndarray) -> dict:
    """The classifier of the run trained on N rows per class of the train split (embedder.learn.fewshot)."""
    train, val, test = parts
    same_cache = os.path.samefile(train.cache.path, val.cache.path)
    with bar(desc="probe: few-shot draws", unit="draw", total=len(config.shots) * config.draws,
             enabled=config.progress) as shown:
        report = few_shot(train.rows, train.codes, train.cache.features, _few_shot_trainer(config, classes, X_val,
                          val.codes, X_test), test.codes, config.shots, config.draws, config.seed,
                          val.rows if same_cache else None, progress=shown)
    report["classifier"] = config.classifier
    return report


def _few_shot_trainer(config: ProbeConfig, classes: list[str], X_val: np.ndarray, val_codes: np.ndarray,
                      X_test: np.ndarray):
    """(few-shot features, codes) -> (test predictions, chosen): hyper-parameters picked on the validation rows."""
    names = np.asarray(classes, dtype=object)

    def train(X: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, dict]:
        if config.classifier == "probe":
            probe = LinearProbe(Cs=config.Cs, random_state=config.seed, device=config.device)
            probe.fit(X, names[codes], X_val, names[val_codes])
            to_codes = {c: i for i, c in enumerate(classes)}
            return np.array([to_codes[c] for c in probe.predict(X_test)]), {"C": probe.C_}
        if config.classifier == KNN_VOTE:
            knn = KNNVote(ks=config.ks, temperature=config.temperature).fit(X, codes, X_val, val_codes)
            return knn.predict(X_test), {"k": int(knn.k_)}
        model, chosen = fit_on_validation(config.classifier, X, codes, X_val, val_codes, config.seed)
        return model.predict(X_test), chosen

    return train
