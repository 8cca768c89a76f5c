"""`embedder predict`: a classifier checkpoint (exported probe or fine-tuned best.pt) on image files."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from embedder.extract.core import embed_images
from embedder.learn.checkpoint import load_classifier


def predict(
    model_path: str | os.PathLike,
    paths: Sequence[str],
    top_k: int = 1,
    batch_size: int | None = None,
    device: str = "auto",
    runtime: str = "auto",
) -> list[dict]:
    """One result per image: {"path", "label", "probability", "top": [{"label", "probability"}, ...]}
    for those that decoded, in the order of `paths`, then {"path", "error"} for those that did not.

    `top` holds the `top_k` most probable classes (at least 1, at most all), most probable first.
    A file that cannot be read is a result, not an exception, so one bad file does not end a batch.
    """
    classifier = load_classifier(model_path, device=device, runtime=runtime)
    logits, errors = embed_images(classifier.network, list(paths), batch_size=batch_size)
    failed = {p for p, _ in errors}
    ok = [str(p) not in failed for p in paths]  # the rows of failed files are NaN
    ok_paths = [p for p, good in zip(paths, ok) if good]
    proba = torch.softmax(torch.from_numpy(logits[ok]), dim=1).numpy()
    k = max(1, min(top_k, len(classifier.classes)))
    results = []
    for path, p in zip(ok_paths, proba):
        order = np.argsort(-p)[:k]
        results.append({"path": path, "label": classifier.classes[order[0]], "probability": float(p[order[0]]),
                        "top": [{"label": classifier.classes[i], "probability": float(p[i])} for i in order]})
    results += [{"path": p, "error": reason} for p, reason in errors]
    return results
