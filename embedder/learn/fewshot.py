"""Few-shot evaluation: N training rows per class, several seeded draws, mean and std of test accuracy.

The rows are drawn from the train split only. The validation rows, which choose the
hyper-parameters (C, k or a scikit-learn grid point), are never among them: CLIP_benchmark
#125 drew its few-shot rows from train + val and so tuned on rows it had trained on. Each
report counts the overlap it actually had (`val_overlap`), so the claim is checked, not
assumed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# (train features, train codes) -> (test predictions as codes, chosen hyper-parameters)
Trainer = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, dict]]


def draw_shots(codes: np.ndarray, shots: int, seed: int, draw: int) -> np.ndarray:
    """Positions (sorted) of `shots` rows of each class in `codes`, drawn without replacement.

    A class with fewer rows gives all of them. Seeded by (seed, shots, draw), so a draw does
    not change when other shot counts or draws are added to the run."""
    rng = np.random.default_rng([seed, shots, draw])
    picked = []
    for c in np.unique(codes):
        members = np.flatnonzero(codes == c)
        picked.append(rng.choice(members, size=min(shots, len(members)), replace=False))
    return np.sort(np.concatenate(picked))


def few_shot(train_rows: np.ndarray, train_codes: np.ndarray, load: Callable[[np.ndarray], np.ndarray],
             trainer: Trainer, test_codes: np.ndarray, shots: tuple[int, ...], draws: int, seed: int,
             val_rows: np.ndarray | None, progress=None) -> dict:
    """Train `trainer` on each draw and score it on the test rows.

    train_rows: cache rows of the train split (train_codes their labels); `load(rows)` reads
    features; val_rows: the validation rows when they live in the same cache as the train rows
    (None: a separate validation cache, disjoint by construction)."""
    by_shots, overlap = {}, 0
    counts = np.bincount(train_codes)
    for n in shots:
        accs, chosen = [], []
        for d in range(draws):
            pos = draw_shots(train_codes, n, seed, d)
            rows = train_rows[pos]
            if val_rows is not None:
                overlap += int(np.intersect1d(rows, val_rows).size)
            pred, params = trainer(load(rows), train_codes[pos])
            accs.append(float((pred == test_codes).mean()))
            chosen.append(params)
            if progress is not None:
                progress.update(1)
        by_shots[str(n)] = {
            "mean": float(np.mean(accs)), "std": float(np.std(accs)), "accuracies": accs, "chosen": chosen,
            "train_rows": int(np.minimum(counts[counts > 0], n).sum()),
            "short_classes": int((counts[counts > 0] < n).sum()),  # classes with fewer train rows than n
        }
    return {"shots": by_shots, "draws": draws, "seed": seed, "evaluated_on": "test", "val_overlap": overlap}


def format_few_shot(report: dict) -> list[str]:
    lines = [f"  few-shot ({report['draws']} draws each, test accuracy mean ± std):"]
    for n, row in report["shots"].items():
        short = f"  ({row['short_classes']} classes have fewer)" if row["short_classes"] else ""
        lines.append(f"    {n:>4} per class  {100 * row['mean']:6.2f}% ± {100 * row['std']:.2f}{short}")
    lines.append(f"    validation rows among the few-shot train rows: {report['val_overlap']}")
    return lines
