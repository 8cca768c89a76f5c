"""scikit-learn classifiers on cached features: scaling + classifier, tuned by cross-validation."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from embedder.errors import ConfigError
from embedder.learn.config import CLASSIFIERS


def make_search(name: str, seed: int, n_splits: int, n_samples: int = 10**9) -> GridSearchCV:
    """A GridSearchCV over a Pipeline(StandardScaler, classifier) with a grid per classifier."""
    from sklearn.linear_model import LogisticRegression, RidgeClassifier
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import LinearSVC

    logspace = [float(c) for c in np.logspace(-3, 3, 7)]
    options = {
        "logreg": (LogisticRegression(max_iter=2000), {"clf__C": logspace}),
        "linear-svm": (LinearSVC(max_iter=5000, random_state=seed), {"clf__C": [float(c) for c in np.logspace(-4, 1, 6)]}),
        "ridge": (RidgeClassifier(), {"clf__alpha": [float(a) for a in np.logspace(-2, 4, 7)]}),
        "knn": (
            KNeighborsClassifier(),
            {
                # No more neighbours than a cross-validation training fold holds.
                "clf__n_neighbors": [k for k in (1, 3, 5, 11, 21) if k <= n_samples * (n_splits - 1) // n_splits] or [1],
                "clf__weights": ["uniform", "distance"],
            },
        ),
        "mlp": (
            MLPClassifier(max_iter=500, early_stopping=False, random_state=seed),
            {"clf__hidden_layer_sizes": [(256,), (512,)], "clf__alpha": [1e-4, 1e-2, 1.0]},
        ),
    }
    if name not in options:
        raise ConfigError(f"--classifier must be probe or one of {', '.join(CLASSIFIERS)}, got {name!r}.")
    clf, grid = options[name]
    pipe = Pipeline([("scale", StandardScaler()), ("clf", clf)])
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return GridSearchCV(pipe, grid, cv=cv, scoring="accuracy", n_jobs=1, refit=True)


def fit_classifier(name: str, X: np.ndarray, y: np.ndarray, seed: int = 0) -> GridSearchCV:
    counts = np.bincount(y)
    smallest = int(counts[counts > 0].min())
    if smallest < 2:
        raise ConfigError("Cross-validation needs at least 2 training images in every class.")
    search = make_search(name, seed, n_splits=min(5, smallest), n_samples=len(y))
    return search.fit(X, y)


def fit_on_validation(name: str, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray,
                      seed: int = 0):
    """The classifier whose grid point scores best on (X_val, y_val), refit on (X, y) alone.

    For few-shot runs: one row per class leaves nothing to cross-validate, and the validation
    rows must stay out of the training rows (CLIP_benchmark #125 was that leak)."""
    from sklearn.base import clone

    search = make_search(name, seed, n_splits=2, n_samples=2 * len(y))  # the grid; k capped at len(y)
    n = len(y)
    search.cv = [(np.arange(n), np.arange(n, n + len(y_val)))]  # train on X only, score on X_val only
    search.refit = False
    search.fit(np.concatenate([X, X_val]), np.concatenate([y, y_val]))
    model = clone(search.estimator).set_params(**search.best_params_).fit(X, y)
    return model, {k.removeprefix("clf__"): v for k, v in search.best_params_.items()}
