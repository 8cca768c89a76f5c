"""Train / validation / test assignment shared by the probe, the classifiers and fine-tuning.

One rule everywhere, so the four ways of training in `pipelines/compare.toml` see the same
split:
  * paths under split folders (`train/`, `val/`, `test/`, as in the classic tutorial
    layout) use those folders; with no validation folder, validation is carved out of
    `train/` (stratified);
  * otherwise a stratified, seeded split: `test_fraction` for test, `val_fraction` for
    validation, the rest for training. Rows are ordered by path before shuffling, so the
    split depends only on the set of (path, label) pairs, not on row order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embedder.data.sources import SPLIT_NAMES
from embedder.errors import ConfigError

VAL_FOLDERS = ("val", "valid", "validation")


@dataclass
class Splits:
    train: np.ndarray  # row indices
    val: np.ndarray
    test: np.ndarray  # may be empty
    how: str

    def as_dict(self) -> dict:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test), "how": self.how}


def check_labels(labels: np.ndarray, classes: list[str], what: str = "the cache") -> None:
    if len(classes) == 0 or (labels < 0).all():
        raise ConfigError(
            f"{what} has no labels (a flat folder was embedded). Training needs labelled images: "
            "embed an ImageFolder tree (SOURCE/<class>/...) or a file list with `path,label` lines."
        )
    present = np.unique(labels[labels >= 0])
    if len(present) < 2:
        name = classes[int(present[0])] if len(present) else "?"
        raise ConfigError(f"{what} holds a single class ({name!r}); a classifier needs at least two.")


def _stratified(rows: np.ndarray, labels: np.ndarray, fractions: tuple[float, ...], seed: int, classes):
    """Split `rows` per class into len(fractions)+1 parts (the last takes the remainder)."""
    rng = np.random.default_rng(seed)
    parts = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(labels[rows]):
        members = rows[labels[rows] == c]
        need = 1 + sum(1 for f in fractions if f > 0)  # a zero fraction asks for an empty part
        if len(members) < need:
            raise ConfigError(
                f"Class {classes[c]!r} has {len(members)} labelled image(s); the split needs at least {need} "
                "per class (one per part). Add images, drop the class, or use split folders."
            )
        members = rng.permutation(members)
        start = 0
        still_needed = need - 1
        for i, f in enumerate(fractions):
            if f <= 0:
                parts[i].append(members[:0])
                continue
            still_needed -= 1
            n = min(max(1, round(f * len(members))), len(members) - still_needed - 1 - start)
            parts[i].append(members[start : start + n])
            start += n
        parts[-1].append(members[start:])
    return [np.sort(np.concatenate(p)) for p in parts]


def assign_splits(
    paths: list[str],
    labels: np.ndarray,
    classes: list[str],
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
) -> Splits:
    check_labels(labels, classes)
    labels = np.asarray(labels)
    order = np.array(sorted(range(len(paths)), key=paths.__getitem__), dtype=np.int64)
    labelled = order[labels[order] >= 0]
    tops = np.array([p.split("/", 1)[0] if "/" in p else "" for p in paths])
    if len(paths) and all(t in SPLIT_NAMES for t in tops[labelled]) and (tops[labelled] == "train").any():
        train = labelled[tops[labelled] == "train"]
        val = labelled[np.isin(tops[labelled], VAL_FOLDERS)]
        test = labelled[tops[labelled] == "test"]
        how = "split folders"
        if len(val) == 0:
            val, train = _stratified(train, labels, (val_fraction,), seed, classes)
            how = f"split folders; validation carved from train/ (stratified, seed {seed})"
        return Splits(np.sort(train), np.sort(val), np.sort(test), how)
    test, val, train = _stratified(labelled, labels, (test_fraction, val_fraction), seed, classes)
    how = f"stratified {1 - val_fraction - test_fraction:.0%}/{val_fraction:.0%}/{test_fraction:.0%}, seed {seed}"
    return Splits(train, val, test, how)


def folder_splits(paths: list[str]) -> np.ndarray | None:
    """"train", "val" or "test" per row from the split folders of a split tree (`val/`,
    `valid/` and `validation/` are all "val"), or None when the paths are not one. Unlike
    `assign_splits` nothing is carved out: curation asks about the splits the data has."""
    tops = [p.split("/", 1)[0] if "/" in p else "" for p in paths]
    if not paths or any(t not in SPLIT_NAMES for t in tops) or "train" not in tops:
        return None
    return np.array(["val" if t in VAL_FOLDERS else t for t in tops], dtype=object)
