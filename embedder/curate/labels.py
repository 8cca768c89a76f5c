"""Likely label mistakes: out-of-fold probabilities of the linear probe, and confident learning.

Each labelled row is scored by a probe that never saw it: the rows are cut into `folds`
stratified, seeded folds and a `LinearProbe` (embedder.learn.probe: standardised features,
multinomial logistic regression) trained on the other folds gives its probabilities. The first
fold sweeps C on an internal validation split; the other folds reuse that C (the sweep is most
of the time, and one C fits folds drawn from the same rows).

From the out-of-fold probabilities P (n x K) and the given labels y:
    label_quality    P[i, y_i], the probe's self-confidence in the given label (lower: suspect)
    suggested_label  argmax_k P[i, k]
    label issues     confident learning (Northcutt et al. 2021) as cleanlab's
                     `find_label_issues(filter_by="confident_learning")`: the per-class threshold
                     t_k is the mean of P[i, k] over rows labelled k; a row's confident class is
                     the most probable of the classes whose probability reaches their threshold;
                     the row is an issue when it has one and it differs from the given label, and
                     the probe's argmax is not the given label. Issues are ranked by
                     label_quality, lowest first (tests/test_curate.py checks the same rows and
                     order against cleanlab itself).
"""

from __future__ import annotations

import numpy as np

from embedder.errors import ConfigError
from embedder.learn.probe import LinearProbe

FLOAT_EPS = 1e-6  # cleanlab's FLOATING_POINT_COMPARISON
THRESHOLD_FLOOR = 2e-6  # cleanlab's CONFIDENT_THRESHOLDS_LOWER_BOUND


def out_of_fold_probabilities(X: np.ndarray, codes: np.ndarray, n_classes: int, folds: int = 5, seed: int = 0,
                              device: str = "auto") -> tuple[np.ndarray, float]:
    """(P [n, n_classes], the C chosen): each row's class probabilities from a probe trained
    on the folds it is not in."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(codes, minlength=n_classes)
    present = counts[counts > 0]
    if len(present) < 2:
        raise ConfigError("Label mistakes need at least two classes with labelled images.")
    splits = min(folds, int(present.min()))
    if splits < 2:
        raise ConfigError("Every class needs at least 2 labelled images for the out-of-fold probe; "
                          f"the smallest has {int(present.min())}.")
    P = np.zeros((len(X), n_classes), dtype=np.float64)
    C = None
    for train, held in StratifiedKFold(splits, shuffle=True, random_state=seed).split(X, codes):
        probe = LinearProbe(C=C, random_state=seed, device=device).fit(X[train], codes[train])
        C = float(probe.C_)
        P[np.ix_(held, probe.classes_)] = probe.predict_proba(X[held])
    return P, C


def label_issues(labels: np.ndarray, P: np.ndarray) -> np.ndarray:
    """Row indices of the label issues found by confident learning, most likely first (see the
    module's docstring)."""
    labels = np.asarray(labels)
    n, k = P.shape
    thresholds = np.array([P[labels == c, c].mean() if (labels == c).any() else 2.0 for c in range(k)])
    thresholds = np.maximum(thresholds, THRESHOLD_FLOOR)
    confident = P >= thresholds - FLOAT_EPS
    many = confident.sum(axis=1)
    guess = np.where(many > 1, P.argmax(axis=1), confident.argmax(axis=1))
    issue = (many > 0) & (guess != labels)
    nudged = P.copy()
    nudged[np.arange(n), labels] += FLOAT_EPS
    issue &= nudged.argmax(axis=1) != labels  # cleanlab leaves out rows the probe itself labels as given
    rows = np.flatnonzero(issue)
    return rows[np.argsort(P[rows, labels[rows]])]


def mistake_ranking(labels: np.ndarray, P: np.ndarray) -> np.ndarray:
    """Every row ranked from most to least likely mislabelled: the confident-learning issues in
    their order, then the other rows by label_quality (lowest first)."""
    issues = label_issues(labels, P)
    rest = np.setdiff1d(np.arange(len(labels)), issues)
    rest = rest[np.argsort(P[rest, labels[rest]], kind="stable")]
    return np.concatenate([issues, rest])
