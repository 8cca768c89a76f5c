"""The linear probe: multinomial logistic regression in PyTorch, with its L2 strength swept.

A fixed regularisation is wrong for probes: the best C for one backbone ranges from about
0.005 to 1000 across datasets. `LinearProbe` standardises the features, then for each C
on a logarithmic grid (strongest regularisation first, each fit warm-started from the
previous one) minimises

    mean cross-entropy + ||W||^2 / (2 C n)        (sklearn's LogisticRegression objective / n)

with full-batch L-BFGS, and keeps the C with the best validation accuracy. The gradient
of each L-BFGS step is accumulated block by block, so the same optimiser runs on arrays in
memory and on a cache streamed from disk (`fit_blocks`), with the same result.

It is a scikit-learn estimator: `fit`/`predict`/`predict_proba`/`decision_function`,
fitted attributes end in `_`, `classes_` orders the columns of `predict_proba`, and
`coef_`/`intercept_` apply to raw (unstandardised) features, so exporting the probe as an
`nn.Linear` is a copy.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from embedder.learn.config import DEFAULT_CS

Blocks = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]  # () -> iterator of (X block, y codes)
ArrayLike = np.ndarray | Sequence[Sequence[float]]


class Progress(Protocol):
    """What `fit` reports to: a tqdm bar, or anything with `update(n)`."""

    def update(self, n: int = 1) -> object: ...


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Linear softmax classifier on frozen features with a validated L2 sweep.

    Parameters
    ----------
    C : float or None
        Inverse regularisation strength. None (default) sweeps `Cs` and picks the best on
        validation data: the rows passed as `X_val`/`y_val`, else a stratified
        `val_fraction` of the training rows (after which the model is refit on all rows).
    Cs : sequence of float
        The grid swept when `C` is None.
    val_fraction : float
        Held-out fraction for the sweep when no validation rows are given.
    max_iter : int
        L-BFGS iterations per fit.
    random_state : int
        Seed of the internal validation split.
    device : str
        "auto" (CUDA when present), "cpu" or "cuda".

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        The class labels, in the order of `predict_proba`'s columns.
    coef_ : ndarray of shape (n_classes, n_features), float32
        Weights on the raw (unstandardised) features.
    intercept_ : ndarray of shape (n_classes,), float32
    C_ : float
        The C that was kept.
    cv_results_ : list of dict
        One row per C tried: ``{"C": ..., "val_accuracy": ...}``.
    n_iter_ : int
        L-BFGS iterations of the final fit.
    """

    def __init__(self, C: float | None = None, Cs: Sequence[float] = DEFAULT_CS, val_fraction: float = 0.2,
                 max_iter: int = 100, random_state: int = 0, device: str = "auto"):
        self.C = C
        self.Cs = Cs
        self.val_fraction = val_fraction
        self.max_iter = max_iter
        self.random_state = random_state
        self.device = device

    # -- sklearn API ----------------------------------------------------------------------
    def fit(self, X: ArrayLike, y: ArrayLike, X_val: ArrayLike | None = None, y_val: ArrayLike | None = None,
            progress: Progress | None = None) -> LinearProbe:
        """Fit on (X, y), sweeping C unless it is fixed.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            The features (float32 or float64).
        y : array-like of shape (n_samples,)
            The labels; at least two classes.
        X_val, y_val : array-like, optional
            Validation rows that score the C sweep; without them a stratified `val_fraction` of (X, y)
            scores it and the model is refit on all rows.
        progress : object with ``update(n)``, optional
            Called once after each C (a tqdm bar).

        Returns
        -------
        LinearProbe
            self, fitted.
        """
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64], y_numeric=False)
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ValueError(f"LinearProbe needs samples of at least 2 classes; got one class ({self.classes_[0]!r}).")
        codes = np.searchsorted(self.classes_, y)
        X = X.astype(np.float32, copy=False)
        if X_val is not None:
            X_val = validate_data(self, X_val, reset=False, dtype=np.float32)
            val_codes = self._codes(np.asarray(y_val))
            self._fit_swept(lambda: [(X, codes)], (X_val, val_codes), refit=None, progress=progress)
        elif self.C is not None:
            self._fit_swept(lambda: [(X, codes)], None, refit=None, progress=progress)
        else:
            try:
                tr, va = train_test_split(
                    np.arange(len(X)), test_size=self.val_fraction, stratify=codes, random_state=self.random_state
                )
            except ValueError:
                warnings.warn("Too few samples per class for a validation split; using C=1.0.", stacklevel=2)
                tr, va = np.arange(len(X)), None
            if va is None:
                self._fit_fixed(lambda: [(X, codes)], 1.0)
            else:
                self._fit_swept(lambda: [(X[tr], codes[tr])], (X[va], codes[va]), refit=lambda: [(X, codes)],
                                progress=progress)
        return self

    def fit_blocks(self, blocks: Blocks, classes: np.ndarray, n_features: int,
                   val: tuple[np.ndarray, np.ndarray] | None = None, progress: Progress | None = None) -> LinearProbe:
        """Fit on data that does not fit in memory, with the same optimiser and result as `fit`.

        Parameters
        ----------
        blocks : callable
            ``blocks()`` yields (X block, class codes) afresh on every call (one call = one pass).
        classes : ndarray
            The class labels that the codes index.
        n_features : int
            The width of X.
        val : (X, codes), optional
            In-memory validation rows; required unless `C` is fixed.
        progress : object with ``update(n)``, optional
            As in `fit`.

        Returns
        -------
        LinearProbe
            self, fitted.
        """
        self.classes_ = np.asarray(classes)
        self.n_features_in_ = n_features
        if val is None and self.C is None:
            raise ValueError("fit_blocks needs validation rows (val=(X, codes)) to sweep C, or a fixed C.")
        self._fit_swept(blocks, val, refit=None, progress=progress)
        return self

    def decision_function(self, X: ArrayLike) -> np.ndarray:
        """The class scores (for two classes, the second's minus the first's).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples, n_classes), or (n_samples,) for two classes
        """
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        scores = X @ self.coef_.T.astype(X.dtype) + self.intercept_.astype(X.dtype)
        return scores[:, 1] - scores[:, 0] if len(self.classes_) == 2 else scores

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        """The softmax probabilities, columns ordered as `classes_`.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
        """
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        scores = X @ self.coef_.T.astype(X.dtype) + self.intercept_.astype(X.dtype)
        scores = scores - scores.max(axis=1, keepdims=True)
        p = np.exp(scores)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, X: ArrayLike) -> np.ndarray:
        """The most probable class of each row.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples,)
            Labels from `classes_`.
        """
        proba = self.predict_proba(X)  # checks fitted-ness before classes_ is touched
        return self.classes_[np.argmax(proba, axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = True
        return tags

    # -- internals ------------------------------------------------------------------------
    def _codes(self, y: np.ndarray) -> np.ndarray:
        codes = np.searchsorted(self.classes_, y)
        codes = np.clip(codes, 0, len(self.classes_) - 1)
        if not np.array_equal(self.classes_[codes], y):
            raise ValueError("validation labels contain classes not seen in training")
        return codes

    def _fit_swept(self, blocks: Blocks, val, refit: Blocks | None, progress=None) -> None:
        dev = _device(self.device)
        mean, scale, n = _moments(blocks, dev)
        Cs = [float(self.C)] if self.C is not None else sorted(float(c) for c in self.Cs)
        k, d = len(self.classes_), len(mean)
        params = [torch.zeros(k, d, device=dev, requires_grad=True), torch.zeros(k, device=dev, requires_grad=True)]
        self.cv_results_ = []
        best = None
        for C in Cs:
            iters = _lbfgs(params, blocks, mean, scale, n, C, self.max_iter, dev)
            row = {"C": C}
            if val is not None:
                row["val_accuracy"] = float(_accuracy(params, val[0], val[1], mean, scale, dev))
            self.cv_results_.append(row)
            if progress is not None:
                progress.update(1)
            score = row.get("val_accuracy", 0.0)
            if best is None or score > best[0]:
                best = (score, C, [p.detach().clone() for p in params], iters)
        score, self.C_, (W, b), self.n_iter_ = best
        if val is not None:
            self.best_val_accuracy_ = score
        if refit is not None:
            mean, scale, n = _moments(refit, dev)
            params = [W.clone().requires_grad_(True), b.clone().requires_grad_(True)]
            self.n_iter_ = _lbfgs(params, refit, mean, scale, n, self.C_, self.max_iter, dev)
            W, b = (p.detach() for p in params)
        # Fold the standardisation into the weights: x @ (W/s).T + (b - W @ (m/s)).
        coef = W / scale
        self.coef_ = coef.double().cpu().numpy().astype(np.float32)
        self.intercept_ = (b - coef @ mean).double().cpu().numpy().astype(np.float32)

    def _fit_fixed(self, blocks: Blocks, C: float) -> None:
        saved = self.C
        self.C = C
        try:
            self._fit_swept(blocks, None, refit=None)
        finally:
            self.C = saved


def _as_tensors(blocks: Blocks, dev) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for X, y in blocks():
        yield torch.as_tensor(np.asarray(X, dtype=np.float32), device=dev), torch.as_tensor(y, device=dev).long()


def _moments(blocks: Blocks, dev) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-feature mean and std in one streamed pass (float64 sums)."""
    n, s, ss = 0, None, None
    for X, _ in _as_tensors(blocks, dev):
        X = X.double()
        s = X.sum(0) if s is None else s + X.sum(0)
        ss = (X * X).sum(0) if ss is None else ss + (X * X).sum(0)
        n += len(X)
    mean = s / n
    std = (ss / n - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant features: leave unscaled
    return mean.float(), std.float(), n


def _lbfgs(params, blocks: Blocks, mean, scale, n: int, C: float, max_iter: int, dev) -> int:
    W, b = params
    lam = 1.0 / (C * n)
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=1e-9,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        total = 0.0
        for X, y in _as_tensors(blocks, dev):
            logits = ((X - mean) / scale) @ W.T + b
            loss = F.cross_entropy(logits, y, reduction="sum") / n
            loss.backward()
            total += loss.item()
        reg = 0.5 * lam * (W * W).sum()
        reg.backward()
        return torch.tensor(total + reg.item())

    opt.step(closure)
    return max(1, int(opt.state[opt._params[0]].get("n_iter", 1)))


@torch.no_grad()
def _accuracy(params, X, codes, mean, scale, dev) -> float:
    W, b = params
    Xt = torch.as_tensor(np.asarray(X, dtype=np.float32), device=dev)
    pred = (((Xt - mean) / scale) @ W.T + b).argmax(1).cpu().numpy()
    return float((pred == codes).mean())
