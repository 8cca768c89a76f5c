"""Accuracy, per-class precision/recall and a confusion-matrix picture, one format for all trainers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float | None:
    return float((np.asarray(y_true) == np.asarray(y_pred)).mean()) if len(y_true) else None


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float | None:
    """Mean per-class recall over the classes present in `y_true` (sklearn's balanced_accuracy_score)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if not len(y_true):
        return None
    return float(np.mean([(y_pred[y_true == c] == c).mean() for c in np.unique(y_true)]))


def top_k_accuracy(y_true: np.ndarray, scores: np.ndarray, k: int, labels: np.ndarray | None = None) -> float | None:
    """Share of rows whose true label is among the k highest `scores` (columns ordered as `labels`,
    default 0..n-1). Ties are ranked as sklearn's top_k_accuracy_score ranks them: among equal
    scores the larger label comes first, so a tie is neither always a hit nor always a miss."""
    y_true, scores = np.asarray(y_true), np.asarray(scores, dtype=np.float64)
    if not len(y_true):
        return None
    labels = np.arange(scores.shape[1]) if labels is None else np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    column = order[np.minimum(np.searchsorted(labels, y_true, sorter=order), len(labels) - 1)]
    if not np.array_equal(labels[column], y_true):
        raise ValueError("top_k_accuracy: a true label is not among the score columns")
    own = scores[np.arange(len(y_true)), column][:, None]
    later = labels[None, :] > y_true[:, None]  # ties: the larger label first, as sklearn orders them
    rank = (scores > own).sum(1) + ((scores == own) & later).sum(1)
    return float((rank < k).mean())


def split_metrics(y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray | None,
                  labels: np.ndarray | None, n_classes: int) -> dict:
    """top-1, top-5 (with more than 5 classes and scores to rank) and balanced accuracy of one split."""
    top5 = None
    if scores is not None and n_classes > 5 and len(y_true):
        top5 = top_k_accuracy(y_true, scores, 5, labels)
    return {"top1_accuracy": accuracy(y_true, y_pred), "top5_accuracy": top5,
            "balanced_accuracy": balanced_accuracy(y_true, y_pred)}


def per_class(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict[str, dict]:
    labels = np.arange(len(classes))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, c in enumerate(classes)
    }


def save_confusion_png(y_true, y_pred, classes: list[str], path: Path, title: str) -> Path:
    from sklearn.metrics import ConfusionMatrixDisplay

    from embedder.figures import pyplot, save_figure

    cm = confusion_matrix(y_true, y_pred, labels=np.arange(len(classes)))
    size = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = pyplot().subplots(figsize=(size, size), dpi=110)
    ConfusionMatrixDisplay(cm, display_labels=classes).plot(ax=ax, colorbar=False, xticks_rotation=45)
    ax.set_title(title)
    return save_figure(fig, path)


def format_table(report: dict) -> str:
    """The human-readable part of a probe/classifier report."""
    lines = [
        (f"{report['classifier']} on {report['cache']}  ({report['splits']['how']}: "
        f"{report['splits']['train']} train / {report['splits']['val']} val / {report['splits']['test']} test)"),
    ]
    for key in ("train_accuracy", "val_accuracy", "test_accuracy"):
        value = report.get(key)
        lines.append(f"  {key.replace('_', ' '):<15} {'-' if value is None else f'{100 * value:.2f}%'}")
    lines += _metric_lines(report)
    lines.append(f"  chosen          {report['chosen']}")
    lines.append(f"  fit time        {report['fit_s']:.2f} s")
    lines.append(f"  per class on {report['evaluated_on']}:")
    lines.append(f"    {'class':<16}{'precision':>10}{'recall':>8}{'support':>9}")
    for name, m in report["per_class"].items():
        lines.append(f"    {name[:16]:<16}{m['precision']:>10.3f}{m['recall']:>8.3f}{m['support']:>9}")
    if report.get("few_shot"):
        from embedder.learn.fewshot import format_few_shot

        lines += format_few_shot(report["few_shot"])
    if report.get("confusion_png"):
        lines.append(f"  confusion matrix: {report['confusion_png']}")
    if report.get("out"):
        lines.append(f"  saved to: {report['out']}")
    return "\n".join(lines)


def _metric_lines(report: dict) -> list[str]:
    def pct(value):
        return "-" if value is None else f"{100 * value:.2f}%"

    lines = []
    for split, m in (report.get("metrics") or {}).items():
        if m:
            lines.append(f"  {split + ' metrics':<15} top-1 {pct(m['top1_accuracy'])}  top-5 {pct(m['top5_accuracy'])}"
                         f"  balanced (mean per-class recall) {pct(m['balanced_accuracy'])}")
    if report.get("accuracy_by_k"):
        lines.append(f"    {'k':>5}{'used':>6}{'val':>9}{'test':>9}")
        for k, row in report["accuracy_by_k"].items():
            mark = "  <- chosen" if row["k_used"] == report["chosen"].get("k") else ""
            lines.append(f"    {k:>5}{row['k_used']:>6}{pct(row['val']):>9}{pct(row['test']):>9}{mark}")
    return lines
