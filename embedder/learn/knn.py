"""The k-NN probe of DINOv2's `eval/knn.py`: a temperature-weighted vote of the nearest train rows.

Features are L2-normalised, so the inner product is the cosine similarity. Each query's
k nearest train rows (an exact `faiss.IndexFlatIP` search, queries in blocks of
`batch_size`, so memory is `batch_size x k`, never queries x train) vote for their class
with the weight exp(similarity / T); the class with the largest sum wins. One search for the
largest k gives the votes for every smaller k (its first k neighbours), so all the k of
`ks` are scored at the cost of one.

`KNNVote` is a scikit-learn estimator: `fit`/`predict`/`predict_proba`, `classes_` orders
the columns of `predict_proba` (the vote shares), fitted attributes end in `_`. With
`k=None` the k of `ks` with the best validation accuracy wins (the rows passed as
`X_val`/`y_val`, else a stratified `val_fraction` of the training rows); every k is capped
at the number of training rows.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from embedder.learn.config import DEFAULT_KS

TEMPERATURE = 0.07  # DINOv2's eval/knn.py


def normalized(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32, contiguous: what faiss takes); zero rows stay zero."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return np.ascontiguousarray(X / np.where(norms > 0, norms, 1))


class KNNVote(ClassifierMixin, BaseEstimator):
    """Similarity-weighted k-nearest-neighbour vote on cosine similarity (DINOv2 protocol).

    Parameters
    ----------
    k : int or None
        Neighbours per vote. None (default) picks the best of `ks` on validation data.
    ks : sequence of int
        The k compared when `k` is None.
    temperature : float
        A neighbour's weight is exp(cosine similarity / temperature).
    val_fraction : float
        Held-out fraction for choosing k when no validation rows are given.
    batch_size : int
        Queries per FAISS search.
    random_state : int
        Seed of the internal validation split.
    """

    def __init__(self, k=None, ks=DEFAULT_KS, temperature=TEMPERATURE, val_fraction=0.2, batch_size=1024,
                 random_state=0):
        self.k = k
        self.ks = ks
        self.temperature = temperature
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.random_state = random_state

    # -- sklearn API ----------------------------------------------------------------------
    def fit(self, X, y, X_val=None, y_val=None):
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64], y_numeric=False)
        check_classification_targets(y)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature!r}.")
        self.classes_ = np.unique(y)
        codes = np.searchsorted(self.classes_, y)
        Xn = normalized(X)
        ks = [int(self.k)] if self.k is not None else sorted({int(k) for k in self.ks})
        if any(k < 1 for k in ks):
            raise ValueError(f"k must be at least 1, got {ks}.")
        self.cv_results_ = []
        if self.k is not None:
            self.k_ = min(int(self.k), len(Xn))
        elif X_val is not None:
            X_val = validate_data(self, X_val, reset=False, dtype=[np.float32, np.float64])
            self._remember(Xn, codes)
            self.k_ = min(self._choose(ks, X_val, self._codes(np.asarray(y_val))), len(Xn))
        else:
            self.k_ = self._choose_held_out(ks, Xn, codes)
        self._remember(Xn, codes)
        return self

    def predict_proba(self, X):
        """The vote shares of each class (columns ordered as `classes_`)."""
        check_is_fitted(self)
        votes = self.votes(X, [self.k_])[self.k_]
        return votes / votes.sum(axis=1, keepdims=True)

    def predict(self, X):
        check_is_fitted(self)
        votes = self.votes(X, [self.k_])[self.k_]
        return self.classes_[np.argmax(votes, axis=1)]

    def accuracy_by_k(self, X, y, ks=None) -> dict[int, float]:
        """Accuracy of the vote for each k of `ks` (default: the estimator's `ks`), from one search.
        Keys are the k asked for; each is capped at the number of training rows."""
        ks = sorted({int(k) for k in (self.ks if ks is None else ks)})
        codes = self._codes(np.asarray(y))
        votes = self.votes(X, ks)
        return {k: float((np.argmax(v, axis=1) == codes).mean()) if len(codes) else None for k, v in votes.items()}

    def votes(self, X, ks) -> dict[int, np.ndarray]:
        """{k: [n, n_classes] summed exp(sim / T) of the k nearest training rows} for each k."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        return self._votes(normalized(X), ks)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = True
        return tags

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_index", None)  # a faiss index does not pickle; it is rebuilt from train_features_
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if "train_features_" in state:
            self._index = _flat_index(self.train_features_)

    # -- internals ------------------------------------------------------------------------
    def _remember(self, Xn: np.ndarray, codes: np.ndarray) -> None:
        self.train_features_ = Xn
        self.train_codes_ = codes
        self._index = _flat_index(Xn)  # built once here, so predicting changes no attribute

    def _votes(self, Xn: np.ndarray, ks) -> dict[int, np.ndarray]:
        n_train, n_classes = len(self.train_codes_), len(self.classes_)
        capped = {k: min(int(k), n_train) for k in ks}
        k_max = max(capped.values())
        out = {k: np.zeros((len(Xn), n_classes), np.float64) for k in ks}
        index = self._index
        for start in range(0, len(Xn), self.batch_size):
            sim, nn = index.search(Xn[start : start + self.batch_size], k_max)
            weights = np.exp(sim.astype(np.float64) / self.temperature)
            cells = np.arange(len(nn))[:, None] * n_classes + self.train_codes_[nn]  # (query, class) of each vote
            # Votes of the first k neighbours for every k: ranks added segment by segment, so
            # memory stays a block x n_classes (not x k) even for many classes.
            running, done = np.zeros(len(nn) * n_classes), 0
            for kc in sorted(set(capped.values())):
                running += np.bincount(cells[:, done:kc].ravel(), weights[:, done:kc].ravel(),
                                       minlength=len(running))
                done = kc
                for k in (k for k, c in capped.items() if c == kc):
                    out[k][start : start + len(nn)] = running.reshape(len(nn), n_classes)
        return out

    def _choose(self, ks, X_val, val_codes) -> int:
        votes = self._votes(normalized(X_val), ks)
        best = None
        for k in ks:
            acc = float((np.argmax(votes[k], axis=1) == val_codes).mean())
            self.cv_results_.append({"k": k, "k_used": min(k, len(self.train_codes_)), "val_accuracy": acc})
            if best is None or acc > best[0]:  # ties: the smaller k
                best = (acc, k)
        self.best_val_accuracy_ = best[0]
        return best[1]

    def _choose_held_out(self, ks, Xn, codes) -> int:
        try:
            tr, va = train_test_split(np.arange(len(Xn)), test_size=self.val_fraction, stratify=codes,
                                      random_state=self.random_state)
        except ValueError:
            warnings.warn(f"Too few samples per class for a validation split; using k={ks[0]}.", stacklevel=3)
            return min(ks[0], len(Xn))
        self._remember(Xn[tr], codes[tr])
        return min(self._choose(ks, Xn[va], codes[va]), len(Xn))

    def _codes(self, y: np.ndarray) -> np.ndarray:
        codes = np.clip(np.searchsorted(self.classes_, y), 0, len(self.classes_) - 1)
        if not np.array_equal(self.classes_[codes], y):
            raise ValueError("labels contain classes not seen in training")
        return codes


def _flat_index(Xn: np.ndarray):
    """An exact inner-product index of the (unit-length) rows."""
    import faiss

    index = faiss.IndexFlatIP(Xn.shape[1])
    index.add(Xn)
    return index
