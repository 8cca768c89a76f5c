"""Accuracy, per-class precision/recall and a confusion-matrix picture, one format for all trainers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float | None:
    return float((np.asarray(y_true) == np.asarray(y_pred)).mean()) if len(y_true) else None


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
    lines.append(f"  chosen          {report['chosen']}")
    lines.append(f"  fit time        {report['fit_s']:.2f} s")
    lines.append(f"  per class on {report['evaluated_on']}:")
    lines.append(f"    {'class':<16}{'precision':>10}{'recall':>8}{'support':>9}")
    for name, m in report["per_class"].items():
        lines.append(f"    {name[:16]:<16}{m['precision']:>10.3f}{m['recall']:>8.3f}{m['support']:>9}")
    if report.get("confusion_png"):
        lines.append(f"  confusion matrix: {report['confusion_png']}")
    if report.get("out"):
        lines.append(f"  saved to: {report['out']}")
    return "\n".join(lines)
